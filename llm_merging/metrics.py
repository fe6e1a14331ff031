"""Metrics: accuracy and ROUGE, computed locally (never ``evaluate.load``, which needs the Hub).

ROUGE follows the ``evaluate`` "rouge" metric: ``rouge_score.RougeScorer`` with its default tokenizer,
``use_stemmer=False``, each pair scored as ``scorer.score(reference, prediction)``; ``rougeLsum`` splits
summaries into sentences on newlines (rouge_score's default, as ``evaluate`` uses it). Instead of the
bootstrap "mid" of ``evaluate`` (random resampling), the reported value is the plain mean of the
per-example F-measures, which is deterministic.
"""
from __future__ import annotations

from typing import Sequence

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")


def accuracy(predictions: Sequence[int], labels: Sequence[int]) -> float:
    """Fraction of predictions equal to their label."""
    if len(predictions) != len(labels):
        raise ValueError(f"accuracy: {len(predictions)} predictions for {len(labels)} labels")
    if not labels:
        raise ValueError("accuracy: no examples")
    return sum(int(p) == int(t) for p, t in zip(predictions, labels)) / len(labels)


def rouge_per_example(
    predictions: Sequence[str],
    references: Sequence[str],
    rouge_types: Sequence[str] = ROUGE_TYPES,
    use_stemmer: bool = False,
) -> dict[str, list[float]]:
    """Per-example ROUGE F-measures, ``{rouge_type: [f, ...]}``."""
    from rouge_score import rouge_scorer

    if len(predictions) != len(references):
        raise ValueError(f"rouge: {len(predictions)} predictions for {len(references)} references")
    scorer = rouge_scorer.RougeScorer(rouge_types=list(rouge_types), use_stemmer=use_stemmer)
    out: dict[str, list[float]] = {t: [] for t in rouge_types}
    for ref, pred in zip(references, predictions):
        scores = scorer.score(ref, pred)
        for t in rouge_types:
            out[t].append(scores[t].fmeasure)
    return out


def rouge(
    predictions: Sequence[str],
    references: Sequence[str],
    rouge_types: Sequence[str] = ROUGE_TYPES,
    use_stemmer: bool = False,
) -> dict[str, float]:
    """Mean ROUGE F-measure per type over the examples (deterministic, no bootstrap)."""
    if not references:
        raise ValueError("rouge: no examples")
    per = rouge_per_example(predictions, references, rouge_types, use_stemmer)
    return {t: sum(v) / len(v) for t, v in per.items()}
