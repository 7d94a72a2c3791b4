"""Sampling strategies: pure decisions on one frame's detections.

The three strategies of the reference, with its semantics:

- ``random``: keep the frame when a draw in ``[0, 1)`` is below ``traffic_percentage``.
- ``close_to_threshold``: count the detections (of ``selected_class_names``, or all) whose confidence
  is strictly within ``epsilon`` of ``threshold`` (``|c - threshold| < epsilon``); when there are at
  least ``minimum_objects_close_to_threshold``, keep the frame with probability ``probability``.
- ``detections_number_based``: count the detections (of the selected classes, or all); when the count
  is ``> more_than`` and ``< less_than`` (either bound optional), keep with probability ``probability``.

The functions take arrays and a ``draw`` callable (the injected random source: ``random.Random(seed)
.random`` in tests), call it only once the criteria match (as the reference does), and touch nothing
else. :func:`compile_strategies` turns the configuration into :class:`Strategy` objects for one model,
class names resolved to ids once, so a decision per frame is a few numpy operations.

Example:
    >>> conf = np.array([0.31, 0.52, 0.9], np.float32); cls = np.array([0, 1, 1])
    >>> count_close_to_threshold(conf, cls, None, threshold=0.5, epsilon=0.1)
    1
    >>> sample_close_to_threshold(conf, cls, None, threshold=0.5, epsilon=0.1, minimum=1,
    ...                           probability=1.0, draw=lambda: 0.99)
    True
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from worker.active_learning.config import (
    CloseToThresholdStrategy,
    RandomStrategy,
    StrategyConfig,
)

__all__ = [
    "Draw",
    "Strategy",
    "compile_strategies",
    "count_close_to_threshold",
    "count_selected",
    "is_in_range",
    "sample_close_to_threshold",
    "sample_detections_number",
    "sample_randomly",
    "unknown_classes",
]

#: a uniform draw in ``[0, 1)``
Draw = Callable[[], float]
IdArray = npt.NDArray[np.int64]


def _selected(class_id: npt.NDArray[np.integer], selected_ids: IdArray | None) -> npt.NDArray[np.bool_]:
    if selected_ids is None:
        return np.ones(class_id.shape, dtype=bool)
    return np.isin(class_id, selected_ids)


def count_close_to_threshold(
    confidence: npt.NDArray[np.floating],
    class_id: npt.NDArray[np.integer],
    selected_ids: IdArray | None,
    *,
    threshold: float,
    epsilon: float,
) -> int:
    """Detections of the selected classes with ``|confidence - threshold| < epsilon``.

    Args:
        confidence: float ``(N,)``.
        class_id: int ``(N,)``.
        selected_ids: class ids that count, or ``None`` for all.
        threshold: centre of the band.
        epsilon: half-width of the band (open interval).
    """
    if confidence.shape != class_id.shape:
        raise ValueError(f"confidence {confidence.shape} and class_id {class_id.shape} differ in shape")
    close = np.abs(confidence.astype(np.float64) - threshold) < epsilon
    return int(np.count_nonzero(close & _selected(class_id, selected_ids)))


def count_selected(class_id: npt.NDArray[np.integer], selected_ids: IdArray | None) -> int:
    """Detections of the selected classes (all when ``selected_ids`` is ``None``)."""
    return int(np.count_nonzero(_selected(class_id, selected_ids)))


def is_in_range(value: int, *, more_than: int | None, less_than: int | None) -> bool:
    """``more_than < value < less_than``, each bound optional.

    Example:
        >>> is_in_range(3, more_than=2, less_than=None), is_in_range(3, more_than=3, less_than=None)
        (True, False)
    """
    return (more_than is None or value > more_than) and (less_than is None or value < less_than)


def sample_randomly(*, traffic_percentage: float, draw: Draw) -> bool:
    """Keep the frame with probability ``traffic_percentage``."""
    return draw() < traffic_percentage


def sample_close_to_threshold(
    confidence: npt.NDArray[np.floating],
    class_id: npt.NDArray[np.integer],
    selected_ids: IdArray | None,
    *,
    threshold: float,
    epsilon: float,
    minimum: int,
    probability: float,
    draw: Draw,
) -> bool:
    """``close_to_threshold``: enough detections near the threshold, then a draw below ``probability``."""
    if (
        count_close_to_threshold(confidence, class_id, selected_ids, threshold=threshold, epsilon=epsilon)
        < minimum
    ):
        return False
    return draw() < probability


def sample_detections_number(
    class_id: npt.NDArray[np.integer],
    selected_ids: IdArray | None,
    *,
    more_than: int | None,
    less_than: int | None,
    probability: float,
    draw: Draw,
) -> bool:
    """``detections_number_based``: the count of selected detections in range, then a draw."""
    if not is_in_range(count_selected(class_id, selected_ids), more_than=more_than, less_than=less_than):
        return False
    return draw() < probability


@dataclass(frozen=True, slots=True)
class Strategy:
    """One configured strategy, compiled for one model's classes.

    Attributes:
        name: the strategy's name (a metric label).
        config: its configuration.
        selected_ids: int64 class ids that count, or ``None`` for all classes.
    """

    name: str
    config: StrategyConfig
    selected_ids: IdArray | None

    def matches(
        self, confidence: npt.NDArray[np.floating], class_id: npt.NDArray[np.integer], draw: Draw
    ) -> bool:
        """Whether this strategy keeps a frame with these detections (float ``(N,)``, int ``(N,)``)."""
        cfg = self.config
        if isinstance(cfg, RandomStrategy):
            return sample_randomly(traffic_percentage=cfg.traffic_percentage, draw=draw)
        if isinstance(cfg, CloseToThresholdStrategy):
            return sample_close_to_threshold(
                confidence,
                class_id,
                self.selected_ids,
                threshold=cfg.threshold,
                epsilon=cfg.epsilon,
                minimum=cfg.minimum_objects_close_to_threshold,
                probability=cfg.probability,
                draw=draw,
            )
        # detections_number_based
        return sample_detections_number(
            class_id,
            self.selected_ids,
            more_than=cfg.more_than,
            less_than=cfg.less_than,
            probability=cfg.probability,
            draw=draw,
        )


def unknown_classes(config: StrategyConfig, class_names: Sequence[str]) -> list[str]:
    """The strategy's ``selected_class_names`` the model does not have (empty when all exist)."""
    selected = getattr(config, "selected_class_names", None) or []
    return [name for name in selected if name not in class_names]


def compile_strategies(configs: Sequence[StrategyConfig], class_names: Sequence[str]) -> tuple[Strategy, ...]:
    """Strategies with their class subsets as ids of ``class_names`` (the model's, id order).

    Raises:
        ValueError: a ``selected_class_names`` entry is not one of ``class_names``.
    """
    compiled = []
    for cfg in configs:
        unknown = unknown_classes(cfg, class_names)
        if unknown:
            raise ValueError(
                f"strategy {cfg.name!r}: selected_class_names {unknown} do not exist in the model's "
                f"training set; the model has {list(class_names)}"
            )
        selected = getattr(cfg, "selected_class_names", None)
        ids = None if selected is None else np.array([list(class_names).index(n) for n in selected], np.int64)
        compiled.append(Strategy(cfg.name, cfg, ids))
    return tuple(compiled)
