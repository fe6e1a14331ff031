"""Insight into a merge: task-vector analysis of the experts and baselines (the base and each expert
evaluated alone)."""
