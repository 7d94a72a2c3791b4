"""The pipeline file's ``active_learning:`` section.

Parameter names follow the reference's active-learning configuration where it has them
(``traffic_percentage``, ``threshold``, ``epsilon``, ``probability``,
``minimum_objects_close_to_threshold``, ``selected_class_names``, ``more_than``, ``less_than``,
``batches_name_prefix``, ``recreation_interval``, ``max_batch_images``, ``max_image_size``,
``jpeg_compression_level``, ``persist_predictions``, per-strategy ``limits`` of type ``minutely`` /
``hourly`` / ``daily``). Fractions are in ``[0, 1]`` as in the reference (``traffic_percentage: 0.1``
keeps about one frame in ten). segstream has no cloud: samples go to a local (or mounted) folder,
``root``, as ``<root>/<dataset>/<batch>/`` (see :mod:`worker.active_learning.dataset`).

Example::

    active_learning:
      root: out/active-learning
      limits: {minutely: 10, hourly: 100, daily: 1000}     # per dataset, all sources together
      sampling_strategies:
        - {name: unsure, type: close_to_threshold, threshold: 0.5, epsilon: 0.15, probability: 1.0}
        - {name: baseline, type: random, traffic_percentage: 0.01}
      batching_strategy: {batches_name_prefix: al, recreation_interval: daily, max_batch_images: 500}
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "ActiveLearningConfig",
    "BatchingStrategyConfig",
    "CloseToThresholdStrategy",
    "DetectionsNumberStrategy",
    "LimitConfig",
    "RandomStrategy",
    "RecreationInterval",
    "StrategyConfig",
    "WindowLimits",
]

RecreationInterval = Literal["never", "daily", "weekly", "monthly"]
LimitType = Literal["minutely", "hourly", "daily"]
#: a dataset or batch name is one safe path component
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"

Fraction = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]
ClassNames = Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LimitConfig(_Strict):
    """One limit of a strategy, as in the reference: ``{type: minutely, value: 10}``."""

    type: LimitType
    value: int = Field(ge=0)


class WindowLimits(_Strict):
    """Most samples per calendar minute / hour / day (UTC); ``None``: no limit of that kind."""

    minutely: int | None = Field(None, ge=0)
    hourly: int | None = Field(None, ge=0)
    daily: int | None = Field(None, ge=0)

    def as_dict(self) -> dict[str, int]:
        """``{window: limit}`` of the limits that are set."""
        return {
            k: v
            for k, v in (("minutely", self.minutely), ("hourly", self.hourly), ("daily", self.daily))
            if v is not None
        }


class _StrategyBase(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$", description="unique; a metric label")
    limits: list[LimitConfig] = Field(default_factory=list, description="this strategy's own limits")

    @field_validator("limits")
    @classmethod
    def _one_limit_per_type(cls, limits: list[LimitConfig]) -> list[LimitConfig]:
        types = [limit.type for limit in limits]
        if len(types) != len(set(types)):
            raise ValueError(f"one limit per type, got {types}")
        return limits

    def window_limits(self) -> dict[str, int]:
        """``{window: limit}`` of this strategy's own limits."""
        return {limit.type: limit.value for limit in self.limits}


class RandomStrategy(_StrategyBase):
    """Keep a random share of the frames."""

    type: Literal["random"]
    traffic_percentage: Fraction = Field(description="share of frames kept, in [0, 1]")


class CloseToThresholdStrategy(_StrategyBase):
    """Keep frames with detections whose confidence lies in ``(threshold - epsilon, threshold + epsilon)``."""

    type: Literal["close_to_threshold"]
    threshold: Fraction = Field(description="centre of the confidence band")
    epsilon: Fraction = Field(description="half-width of the band (open interval)")
    probability: Fraction = Field(description="share of the matching frames kept")
    minimum_objects_close_to_threshold: int = Field(1, ge=1, description="detections in the band needed")
    selected_class_names: ClassNames | None = Field(None, description="only these classes count")


class DetectionsNumberStrategy(_StrategyBase):
    """Keep frames with more than ``more_than`` and fewer than ``less_than`` detections (of some classes)."""

    type: Literal["detections_number_based"]
    more_than: int | None = Field(None, ge=0, description="keep frames with more detections than this")
    less_than: int | None = Field(None, ge=0, description="keep frames with fewer detections than this")
    probability: Fraction = Field(description="share of the matching frames kept")
    selected_class_names: ClassNames | None = Field(None, description="only these classes count")

    @model_validator(mode="after")
    def _range(self) -> DetectionsNumberStrategy:
        if self.more_than is not None and self.less_than is not None and self.more_than >= self.less_than:
            raise ValueError(f"more_than ({self.more_than}) must be < less_than ({self.less_than})")
        return self


StrategyConfig = Annotated[
    RandomStrategy | CloseToThresholdStrategy | DetectionsNumberStrategy, Field(discriminator="type")
]


class BatchingStrategyConfig(_Strict):
    """How samples are grouped into labelling batches (one folder each)."""

    batches_name_prefix: str = Field("al_batch", pattern=NAME_PATTERN)
    recreation_interval: RecreationInterval = Field(
        "daily", description="a new batch every UTC day / ISO week (Monday) / month, or never"
    )
    max_batch_images: int | None = Field(None, ge=1, description="a full batch refuses more samples")


class ActiveLearningConfig(_Strict):
    """Active learning: which frames of steps with ``disable_active_learning: false`` are kept."""

    enabled: bool = Field(True, description="false: the section is kept but nothing is sampled")
    root: Path = Field(description="dataset root folder: <root>/<dataset>/<batch>/")
    sampling_strategies: list[StrategyConfig] = Field(min_length=1)
    limits: WindowLimits = Field(default_factory=WindowLimits, description="per dataset, across sources")
    batching_strategy: BatchingStrategyConfig = Field(default_factory=BatchingStrategyConfig)
    max_image_size: tuple[Annotated[int, Field(ge=16)], Annotated[int, Field(ge=16)]] | None = Field(
        None, description="(height, width): larger frames are downsized, keeping the aspect ratio"
    )
    jpeg_compression_level: int = Field(95, ge=1, le=100, description="JPEG quality of the stored images")
    persist_predictions: bool = Field(True, description="store the predictions as pre-annotations")
    segmentation_format: Literal["rle", "polygon"] = Field(
        "rle",
        description="rle: the exact masks (COCO RLE); polygon: each mask's largest outer contour, as "
        "v1-v3 publish it (holes and extra pieces are lost; for importers that read polygons only, "
        "e.g. Label Studio's)",
    )
    queue_size: int = Field(16, ge=1, le=4096, description="samples waiting for the writer; more are dropped")
    max_datasets: int = Field(
        16, ge=1, le=1024, description="distinct dataset names accepted (per-frame names)"
    )
    error_report_interval_s: float = Field(
        60.0, gt=0, le=86_400, description="write errors logged once per interval"
    )
    seed: int | None = Field(None, description="seed of the sampling draws (default: from the OS)")

    @field_validator("sampling_strategies")
    @classmethod
    def _unique_names(cls, strategies: list[StrategyConfig]) -> list[StrategyConfig]:
        names = [s.name for s in strategies]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ValueError(f"strategy names must be unique, duplicated: {duplicated}")
        return strategies
