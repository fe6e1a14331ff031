"""The pipeline: one run configuration, a run context, phases and the runner that walks them."""
