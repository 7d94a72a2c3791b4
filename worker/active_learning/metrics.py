"""``segstream_active_learning_samples_total{dataset,strategy,outcome}``, registered on a given registry.

Each frame that a strategy picks is counted once, with its final outcome:

| outcome | meaning |
|---|---|
| ``written`` | the image (and its pre-annotations) are in the dataset |
| ``limited`` | a per-minute / hour / day limit was reached |
| ``batch_full`` | the batch holds ``max_batch_images`` already |
| ``dropped`` | the writer's queue was full (it fell behind), or the worker stopped first |
| ``failed`` | the write failed (disk full, unwritable root: see the readiness details) |
| ``refused`` | the dataset name is not a safe folder name, or one name too many (``max_datasets``) |

Label values are bounded: strategies come from the pipeline file, datasets are capped by
``max_datasets`` (an unsafe or surplus name is counted as ``dataset="other"``).
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter

__all__ = ["OUTCOMES", "precreate", "register_metrics"]

OUTCOMES = ("written", "limited", "batch_full", "dropped", "failed", "refused")


def register_metrics(registry: CollectorRegistry) -> Counter:
    """Create the samples counter on ``registry`` (the worker's ``Metrics.registry``)."""
    return Counter(
        "segstream_active_learning_samples",
        "Frames picked by an active-learning strategy, by dataset, strategy and final outcome.",
        ["dataset", "strategy", "outcome"],
        registry=registry,
    )


def precreate(counter: Counter, datasets: Iterable[str], strategies: Iterable[str]) -> None:
    """Create the series of known datasets and strategies at 0 (so ``rate()`` sees them from the start)."""
    names = list(strategies)
    for dataset in datasets:
        for strategy in names:
            for outcome in OUTCOMES:
                counter.labels(dataset, strategy, outcome)
