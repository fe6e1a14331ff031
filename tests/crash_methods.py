"""Slow merge methods for tests/test_crash_safety.py: each step sleeps ``CRASH_DELAY`` seconds (read at
every step) and appends a line to the file ``CRASH_PROGRESS``, so that a test can kill a run at a known
point. Their results are those of the methods they slow down, bit for bit."""
import os
import time

from llm_merging.merging.Linear import Linear
from llm_merging.merging.TiesMerge import TiesMerge


def _step(what: str) -> None:
    delay = float(os.environ.get("CRASH_DELAY", "0"))
    if delay:
        time.sleep(delay)
    path = os.environ.get("CRASH_PROGRESS")
    if path:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(what + "\n")


class SlowTies(TiesMerge):
    """TIES merging, one step per chunk (merge) or per tensor (search candidates)."""

    def merge_tensor(self, name, base, task_vectors):
        _step(f"tensor {name}")
        return super().merge_tensor(name, base, task_vectors)

    def merge_chunks(self, name, read, numel, n_models):
        chunks = super().merge_chunks(name, read, numel, n_models)
        if chunks is None:
            return None

        def slow():
            for chunk in chunks:
                _step(f"chunk {name}")
                yield chunk

        return slow()


class SlowEval(Linear):
    """Linear merging whose evaluation takes one step per batch."""

    def predict_multiple_choice(self, batch):
        _step("batch")
        return super().predict_multiple_choice(batch)

    def generate(self, batch):
        _step("batch")
        return super().generate(batch)


class SlowSave(Linear):
    """Linear merging whose merged model, once written into the temporary directory by save_pretrained,
    takes one long step (``CRASH_DELAY`` × 100) before it is renamed into place."""

    def merge(self):
        model = super().merge()
        real = model.save_pretrained

        def save_pretrained(path, **kwargs):
            real(path, **kwargs)
            _step("saved")
            time.sleep(100 * float(os.environ.get("CRASH_DELAY", "0")))

        model.save_pretrained = save_pretrained
        return model
