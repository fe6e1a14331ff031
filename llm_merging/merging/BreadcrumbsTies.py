"""``breadcrumbs_ties``: Model Breadcrumbs masks, then TIES sign consensus (Davari & Belilovsky 2023)."""
from __future__ import annotations

from llm_merging.merging.Breadcrumbs import Breadcrumbs
from llm_merging.merging.hparams import CONSENSUS


class BreadcrumbsTies(Breadcrumbs):
    """Model Breadcrumbs: mask out small entries and outliers (top γ) of each task vector, then TIES consensus."""

    consensus = "ties"
    hyperparameters = {**Breadcrumbs.hyperparameters, **CONSENSUS}

