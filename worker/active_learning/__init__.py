"""Active learning: pick the frames the model is unsure about into a local COCO dataset for labelling.

Modules: ``config`` (the pipeline's ``active_learning:`` section), ``strategies`` (pure sampling
decisions), ``limits`` (calendar-window limits and batch names, injected clock), ``dataset`` (the
dataset layout and its bounded background writer), ``metrics`` (the samples counter), ``observer``
(the sampler, a result observer).
"""

from worker.active_learning.config import ActiveLearningConfig
from worker.active_learning.dataset import ANNOTATIONS_FILE, DatasetWriter, Sample
from worker.active_learning.limits import WindowLimiter, batch_name
from worker.active_learning.metrics import OUTCOMES, register_metrics
from worker.active_learning.observer import ActiveLearningSampler, build_sampler
from worker.active_learning.strategies import Strategy, compile_strategies

__all__ = [
    "ANNOTATIONS_FILE",
    "OUTCOMES",
    "ActiveLearningConfig",
    "ActiveLearningSampler",
    "DatasetWriter",
    "Sample",
    "Strategy",
    "WindowLimiter",
    "batch_name",
    "build_sampler",
    "compile_strategies",
    "register_metrics",
]
