"""Sources: RTSP/HTTP cameras, video files and image folders (OpenCV), and MQTT frames.

``build_source(config, ...)`` makes a ``Source`` from one validated ``SourceConfig``; its
``run(queue)`` produces ``Frame`` objects into the ``FrameQueue`` the runtime made for it.
"""

from worker.sources.base import Backoff, ErrorCallback, Source
from worker.sources.decode import FramePayload, decode_image, image_size, parse_payload
from worker.sources.factory import SOURCE_TYPES, SourceConfig, build_source, parse_source_config
from worker.sources.images import ImageFolderSource, ImageFolderSourceConfig
from worker.sources.mqtt import MqttSource, MqttSourceConfig
from worker.sources.video import VideoSource, VideoSourceConfig, ensure_rtsp_over_tcp

__all__ = [
    "SOURCE_TYPES",
    "Backoff",
    "ErrorCallback",
    "FramePayload",
    "ImageFolderSource",
    "ImageFolderSourceConfig",
    "MqttSource",
    "MqttSourceConfig",
    "Source",
    "SourceConfig",
    "VideoSource",
    "VideoSourceConfig",
    "build_source",
    "decode_image",
    "ensure_rtsp_over_tcp",
    "image_size",
    "parse_payload",
    "parse_source_config",
]
