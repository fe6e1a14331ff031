"""Merge methods for the multi-process tests (run as ``-m dp_methods:CLASS``): each one misbehaves on
process 1 only, at a known point, so the tests can check that every process stops the same way."""
import os

from llm_merging.core.errors import ConfigError
from llm_merging.merging import get_method_class

RANK = int(os.environ.get("RANK", "0"))
_Linear = get_method_class("linear")


class _FirstBatchOnRank1(_Linear):
    """Calls ``trip()`` on process 1 right after its first multiple-choice batch."""

    tripped = False

    def predict_multiple_choice(self, batch):
        out = super().predict_multiple_choice(batch)
        if RANK == 1 and not self.tripped:
            self.tripped = True
            self.trip()
        return out

    def trip(self):  # pragma: no cover - overridden
        raise NotImplementedError


class BudgetOnRank1(_FirstBatchOnRank1):
    """Process 1's budget runs out after its first batch (the runner hands the budget's ``expired``)."""

    def trip(self):
        self.should_stop.__self__.seconds = 0.0


class UserErrorOnRank1(_FirstBatchOnRank1):
    """A user error on process 1 during the evaluation."""

    def trip(self):
        raise ConfigError("dp test: bad batch")


class InternalErrorInMergeOnRank1(_Linear):
    """An internal error on process 1 during the merge."""

    def merge(self):
        out = super().merge()
        if RANK == 1:
            raise RuntimeError("boom")
        return out
