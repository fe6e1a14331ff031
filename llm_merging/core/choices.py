"""The fixed choices of run options, in one torch-free home so that the command line offers them (and
``--help`` answers) without loading the library."""

#: what ``--save`` writes: an HF directory, the kit's safetensor.pt, a PEFT adapter by SVD, or nothing
SAVE_MODES = ("full", "kit", "adapter", "none")
#: multiple-choice scoring rules (``--mc-scoring``): exact log p(choice | prompt), or the starter kit's
SCORINGS = ("exact", "starter_kit")
#: model dtypes a run may ask for (``--dtype``)
DTYPES = ("auto", "float32", "bfloat16", "float16")
#: the built-in data-aware methods, which read ``--calibration-data`` (their classes say ``needs_calibration``)
DATA_AWARE_METHODS = ("regmean", "regmean_plus", "fisher", "adamerging")
