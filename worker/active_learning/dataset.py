"""The local active-learning dataset and its bounded background writer.

Layout (the folder layout of a Roboflow COCO export: images next to ``_annotations.coco.json``)::

    <root>/<dataset>/<batch>/
        _annotations.coco.json          # COCO: info, licenses, categories, images, annotations
        belt_00000041_3f2a9c1e.jpg      # one JPEG per sample: <source>_<frame number>_<random>.jpg
        ...

The COCO file:

- ``categories``: the model's class names, ``id`` = class id + 1 (COCO ids start at 1); a batch that
  already exists keeps its categories and gains any new name at the next free id;
- ``images``: ``id``, ``file_name``, ``width``, ``height`` (of the stored image), ``date_captured``
  (ISO 8601, UTC) and ``segstream``: pipeline, source, frame id and number, capture time (Unix s),
  the strategy that picked the frame, inference id, model id, the frame's original size;
- ``annotations`` (when predictions are kept as pre-annotations): ``segmentation`` as compressed COCO
  RLE (``{"size": [H, W], "counts": str}``, exactly what ``pycocotools.mask.encode`` gives for the
  mask at the stored size), or with ``segmentation_format: polygon`` each mask's largest outer contour
  (``[[x1, y1, x2, y2, ...]]``, the points v1-v3 publish), ``bbox`` ``[x, y, w, h]``, ``area`` (mask
  pixels), ``iscrowd`` 0,
  ``score`` (the confidence, rounded like the published one) and ``attributes`` (``score``, and the
  published ``detection_id`` when the frame's predictions were among the published outputs).

Writes are atomic: an image is written to a temporary file, flushed, ``fsync``-ed and renamed before
the COCO file mentions it; the COCO file is rewritten the same way (temporary file, ``fsync``,
``os.replace``, ``fsync`` of the folder). A crash (SIGKILL, power loss) leaves the previous complete
file, never a half-written one; at worst an image that no annotation file references yet. A batch is
appendable across restarts: the writer reads the existing file and goes on with the next ids.

The writer is one thread with a bounded queue. ``try_put`` never blocks: a full queue refuses the
sample (the caller counts it as dropped). Each wake-up takes every queued sample, and rewrites each
touched batch's COCO file once. An unwritable root or a full disk fails the samples (counted), is
logged once per ``error_report_interval_s`` and shows in :meth:`DatasetWriter.status`; it never
raises into the worker. A rewrite costs time in proportion to the batch's size: bound it with
``max_batch_images`` or a ``recreation_interval``.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import queue
import re
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

from worker.step.detections import Detections
from worker.step.rle import encode_crop
from worker.step.serialize import mask_to_polygon

__all__ = ["ANNOTATIONS_FILE", "DatasetWriter", "Sample", "atomic_write", "scale_crop"]

log = logging.getLogger(__name__)

ANNOTATIONS_FILE = "_annotations.coco.json"
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")
_DRAIN_MAX = 64
_OPEN_BATCHES = 8


@dataclass(frozen=True, slots=True)
class Sample:
    """One frame to store, with what the sampler decided.

    Attributes:
        dataset: dataset name (a safe path component).
        batch: batch name (a safe path component).
        image: ``(H, W, 3)`` uint8 BGR frame (not modified).
        detections: the primary step's detections, or ``None``.
        class_names: the model's class names, id order.
        metadata: JSON-ready frame metadata (pipeline, source, frame_id, frame_number, capture_time,
            strategy, inference_id, model_id).
        outputs: the published workflow outputs (to find the published ``detection_id``s), or ``None``.
    """

    dataset: str
    batch: str
    image: npt.NDArray[np.uint8]
    detections: Detections | None
    class_names: tuple[str, ...]
    metadata: Mapping[str, Any]
    outputs: Mapping[str, Any] | None = None


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that ``path`` holds either its old or its new content, whole.

    Temporary file in the same folder, flush, ``fsync``, ``os.replace``, ``fsync`` of the folder.

    Raises:
        OSError: anything the file system refuses (the temporary file is removed).
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def scale_crop(
    crop: npt.NDArray[np.bool_], offset: tuple[int, int], scale: float, frame_shape: tuple[int, int]
) -> tuple[npt.NDArray[np.bool_], tuple[int, int]]:
    """A mask crop at ``offset`` resampled (nearest) into a frame scaled by ``scale``.

    Args:
        crop: bool ``(h, w)``.
        offset: ``(x0, y0)`` in the original frame.
        scale: new size / old size (<= 1 when downsizing).
        frame_shape: ``(H', W')`` of the scaled frame.

    Returns:
        The scaled crop and its offset: pixel ``(i, j)`` of the scaled frame is set when the pixel
        of the original frame under its centre is set, as ``cv2.resize`` with ``INTER_NEAREST_EXACT`` of
        the full-frame mask would do, computed on the crop only.

    Example:
        >>> c, o = scale_crop(np.ones((4, 4), bool), (4, 0), 0.5, (4, 4)); c.shape, o
        ((2, 2), (2, 0))
    """
    h, w = crop.shape
    x0, y0 = offset
    height, width = frame_shape
    nx0, ny0 = int(np.floor(x0 * scale)), int(np.floor(y0 * scale))
    nx1 = min(width, int(np.ceil((x0 + w) * scale)))
    ny1 = min(height, int(np.ceil((y0 + h) * scale)))
    cols = np.floor((np.arange(nx0, nx1) + 0.5) / scale).astype(np.int64) - x0
    rows = np.floor((np.arange(ny0, ny1) + 0.5) / scale).astype(np.int64) - y0
    col_ok = (cols >= 0) & (cols < w)
    row_ok = (rows >= 0) & (rows < h)
    out = np.zeros((len(rows), len(cols)), dtype=bool)
    if col_ok.any() and row_ok.any():
        out[np.ix_(row_ok, col_ok)] = crop[np.ix_(rows[row_ok], cols[col_ok])]
    return out, (nx0, ny0)


def _safe(text: str) -> str:
    return _UNSAFE.sub("-", text).strip("-.")[:48] or "frame"


def _published_detection_ids(outputs: Mapping[str, Any] | None, sample: Sample) -> list[str] | None:
    """The published predictions' ``detection_id``s of this frame, when they match the detections."""
    det = sample.detections
    if outputs is None or det is None:
        return None
    frame_id = sample.metadata.get("frame_id")
    for value in outputs.values():
        if not isinstance(value, Mapping):
            continue
        preds = value.get("predictions")
        if isinstance(preds, Mapping):  # ``$steps.seg.*`` outputs: the step's dict
            preds = preds.get("predictions")
        if not isinstance(preds, list) or len(preds) != len(det):
            continue
        if all(
            isinstance(p, Mapping) and p.get("parent_id") == frame_id and p.get("class_id") == int(c)
            for p, c in zip(preds, det.class_id, strict=True)
        ):
            return [str(p.get("detection_id")) for p in preds]
    return None


def _check_coco(coco: Any) -> None:
    """Raise ``ValueError`` unless ``coco`` has the lists and ids this writer appends to."""
    try:
        if not isinstance(coco, dict):
            raise TypeError("not an object")
        for key in ("images", "annotations", "categories"):
            if not isinstance(coco.setdefault(key, []), list):
                raise TypeError(f"{key!r} is not a list")
        for entry in (*coco["images"], *coco["annotations"], *coco["categories"]):
            int(entry["id"])
        for category in coco["categories"]:
            str(category["name"])
    except (TypeError, KeyError, ValueError) as exc:
        raise ValueError(f"not a COCO annotations file: {exc!r}") from None


@dataclass
class _Batch:
    folder: Path
    coco: dict[str, Any]
    next_image_id: int
    next_annotation_id: int
    category_ids: dict[str, int] = field(default_factory=dict)

    @property
    def images(self) -> int:
        return len(self.coco["images"])


class DatasetWriter:
    """Writes samples into ``<root>/<dataset>/<batch>/`` from one background thread.

    Args:
        root: the dataset root folder (created when missing).
        queue_size: samples waiting at most; ``try_put`` refuses more.
        max_image_size: ``(height, width)`` the stored images fit in (aspect ratio kept), or ``None``.
        jpeg_quality: 1..100.
        persist_predictions: store the predictions as annotations.
        segmentation_format: ``"rle"`` (exact masks) or ``"polygon"`` (each mask's largest outer contour).
        max_batch_images: most images per batch, or ``None``.
        on_outcome: called from the writer thread with each sample and ``"written"``, ``"batch_full"``
            or ``"failed"`` (and from :meth:`close` with ``"dropped"`` for samples it had no time for).
        report_interval_s: write errors are logged at most once per this many seconds.
        clock: Unix seconds (``date_created`` and error times).
        version: the worker's version (in the COCO ``info``).
        autostart: start the thread at the first ``try_put`` (else only :meth:`start` does).
    """

    def __init__(
        self,
        root: Path,
        *,
        queue_size: int = 16,
        max_image_size: tuple[int, int] | None = None,
        jpeg_quality: int = 95,
        persist_predictions: bool = True,
        segmentation_format: str = "rle",
        max_batch_images: int | None = None,
        on_outcome: Callable[[Sample, str], None] | None = None,
        report_interval_s: float = 60.0,
        clock: Callable[[], float] = time.time,
        version: str = "",
        autostart: bool = True,
    ) -> None:
        self.root = Path(root)
        self._autostart = autostart
        self._queue: queue.Queue[Sample | None] = queue.Queue(queue_size)
        self._max_size = max_image_size
        self._quality = int(jpeg_quality)
        self._persist = persist_predictions
        if segmentation_format not in ("rle", "polygon"):
            raise ValueError(f"segmentation_format must be 'rle' or 'polygon', got {segmentation_format!r}")
        self._polygons = segmentation_format == "polygon"
        self._max_batch = max_batch_images
        self._on_outcome = on_outcome or (lambda _s, _o: None)
        self._interval = report_interval_s
        self._clock = clock
        self._version = version
        self._batches: dict[tuple[str, str], _Batch] = {}
        self._full: set[tuple[str, str]] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._counts = {"written": 0, "batch_full": 0, "failed": 0, "dropped": 0}
        self._last_error: str | None = None
        self._last_error_at: float | None = None
        self._last_logged = -float("inf")
        self._suppressed = 0
        self._last_ok_at: float | None = None

    # ------------------------------------------------------------------ the caller's side (event loop)

    def start(self) -> None:
        """Start the writer thread (``active-learning.writer``)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="active-learning.writer", daemon=True)
            self._thread.start()

    def try_put(self, sample: Sample) -> bool:
        """Queue a sample without blocking; ``False`` when the queue is full or the writer is closing."""
        if self._stopping:
            return False
        if self._thread is None and self._autostart:
            self.start()  # the thread exists once there is something to write
        try:
            self._queue.put_nowait(sample)
        except queue.Full:
            return False
        return True

    def batch_full(self, dataset: str, batch: str) -> bool:
        """Whether the writer already found this batch at ``max_batch_images`` (a cheap set lookup)."""
        return (dataset, batch) in self._full

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    def status(self) -> dict[str, Any]:
        """JSON-ready state for readiness details: counts, queue depth, the last write error."""
        with self._lock:
            error_at = self._last_error_at
            failing = error_at is not None and (self._last_ok_at is None or self._last_ok_at < error_at)
            return {
                "root": str(self.root),
                "writing": not failing,
                "queue_depth": self._queue.qsize(),
                **self._counts,
                "last_error": self._last_error,
                "last_error_at": None
                if error_at is None
                else dt.datetime.fromtimestamp(error_at, dt.UTC).isoformat(timespec="seconds"),
            }

    def close(self, timeout: float = 10.0) -> int:
        """Write what is queued (within ``timeout``), stop the thread; returns samples not written.

        Blocking: call it from a thread (``asyncio.to_thread``).
        """
        self._stopping = True
        deadline = time.monotonic() + timeout
        if self._thread is not None:
            while self._thread.is_alive():
                try:
                    self._queue.put(None, timeout=0.05)
                    break
                except queue.Full:
                    if time.monotonic() > deadline:
                        break
            self._thread.join(max(0.0, deadline - time.monotonic()))
        left = 0
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                left += 1
                self._outcome(item, "dropped")
        return left

    # ------------------------------------------------------------------ the writer thread

    def _outcome(self, sample: Sample, outcome: str) -> None:
        with self._lock:
            self._counts[outcome] += 1
        try:
            self._on_outcome(sample, outcome)
        except Exception:  # a metrics bug must not stop the writer
            log.exception("active learning: outcome callback failed")

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            items = [item]
            while len(items) < _DRAIN_MAX:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = None in items
            samples = [s for s in items if s is not None]
            groups: dict[tuple[str, str], list[Sample]] = {}
            for sample in samples:
                groups.setdefault((sample.dataset, sample.batch), []).append(sample)
            for key, group in groups.items():
                try:
                    self._write_group(key, group)
                except Exception as exc:  # a bug must not stop the thread: fail these samples, go on
                    log.exception("active learning: writing %d samples into %s/%s failed", len(group), *key)
                    self._error(f"writing into {key[0]}/{key[1]} failed", exc)
                    for sample in group:
                        self._outcome(sample, "failed")
            if stop:
                return

    def _error(self, what: str, exc: BaseException) -> None:
        now = self._clock()
        with self._lock:
            self._last_error = f"{what}: {exc}"
            self._last_error_at = now
        if now - self._last_logged >= self._interval:
            more = f" ({self._suppressed} more since the last report)" if self._suppressed else ""
            log.error("active learning: %s: %s%s", what, exc, more)
            self._last_logged = now
            self._suppressed = 0
        else:
            self._suppressed += 1

    def _write_group(self, key: tuple[str, str], samples: Sequence[Sample]) -> None:
        try:
            batch = self._open(key, samples[0].class_names)
        except OSError as exc:
            self._error(f"cannot open batch {key[0]}/{key[1]} under {self.root}", exc)
            for sample in samples:
                self._outcome(sample, "failed")
            return
        added: list[tuple[Sample, Path]] = []
        refused: list[Sample] = []
        failed: list[Sample] = []
        images_before = len(batch.coco["images"])
        annotations_before = len(batch.coco["annotations"])
        ids_before = (batch.next_image_id, batch.next_annotation_id)
        for sample in samples:
            if self._max_batch is not None and batch.images >= self._max_batch:
                self._full.add(key)
                refused.append(sample)
                continue
            try:
                added.append((sample, self._add(batch, sample)))
            except OSError as exc:
                self._error(f"cannot write an image into {batch.folder}", exc)
                failed.append(sample)
            except Exception as exc:  # a sample the writer cannot handle: it fails alone (nothing added)
                log.exception("active learning: sample %s refused", sample.metadata.get("frame_id"))
                self._error(f"cannot store sample {sample.metadata.get('frame_id')}", exc)
                failed.append(sample)
        if added:
            try:
                atomic_write(batch.folder / ANNOTATIONS_FILE, self._encode(batch.coco))
            except OSError as exc:
                self._error(f"cannot write {batch.folder / ANNOTATIONS_FILE}", exc)
                # keep memory equal to the file on disk: forget this round's entries and images
                del batch.coco["images"][images_before:]
                del batch.coco["annotations"][annotations_before:]
                batch.next_image_id, batch.next_annotation_id = ids_before
                for sample, path in added:
                    path.unlink(missing_ok=True)
                    failed.append(sample)
                added = []
            else:
                with self._lock:
                    self._last_ok_at = self._clock()
        if self._max_batch is not None and batch.images >= self._max_batch:
            self._full.add(key)
        for sample, _ in added:
            self._outcome(sample, "written")
        for sample in refused:
            self._outcome(sample, "batch_full")
        for sample in failed:
            self._outcome(sample, "failed")

    def _open(self, key: tuple[str, str], class_names: Sequence[str]) -> _Batch:
        batch = self._batches.get(key)
        if batch is None:
            folder = self.root / key[0] / key[1]
            folder.mkdir(parents=True, exist_ok=True)
            for stale in folder.glob(".*.tmp-*"):  # left by a crash mid-write
                stale.unlink(missing_ok=True)
            batch = self._load(folder)
            if len(self._batches) >= _OPEN_BATCHES:
                self._batches.pop(next(iter(self._batches)))
            self._batches[key] = batch
        for name in class_names:
            if name not in batch.category_ids:
                cid = max(batch.category_ids.values(), default=0) + 1
                batch.category_ids[name] = cid
                batch.coco["categories"].append({"id": cid, "name": name, "supercategory": "none"})
        return batch

    def _load(self, folder: Path) -> _Batch:
        path = folder / ANNOTATIONS_FILE
        coco: dict[str, Any] | None = None
        if path.exists():
            try:
                coco = json.loads(path.read_bytes())
                _check_coco(coco)
            except ValueError as exc:  # never written by this writer: set it aside, start afresh
                aside = path.with_name(f"{ANNOTATIONS_FILE}.unreadable-{int(self._clock())}")
                os.replace(path, aside)
                log.error(
                    "active learning: %s is not valid COCO JSON (%s); moved to %s", path, exc, aside.name
                )
                coco = None
        if coco is None:
            coco = {
                "info": {
                    "description": f"segstream active learning: {folder.parent.name} / {folder.name}",
                    "version": self._version,
                    "date_created": dt.datetime.fromtimestamp(self._clock(), dt.UTC).isoformat(
                        timespec="seconds"
                    ),
                },
                "licenses": [],
                "categories": [],
                "images": [],
                "annotations": [],
            }
        coco.setdefault("categories", [])
        coco.setdefault("annotations", [])
        return _Batch(
            folder=folder,
            coco=coco,
            next_image_id=max((int(i["id"]) for i in coco["images"]), default=0) + 1,
            next_annotation_id=max((int(a["id"]) for a in coco["annotations"]), default=0) + 1,
            category_ids={str(c["name"]): int(c["id"]) for c in coco["categories"]},
        )

    @staticmethod
    def _encode(coco: Mapping[str, Any]) -> bytes:
        return json.dumps(coco, separators=(",", ":")).encode()

    def _scaled(self, image: npt.NDArray[np.uint8]) -> tuple[npt.NDArray[np.uint8], float]:
        height, width = image.shape[:2]
        if self._max_size is None:
            return image, 1.0
        max_h, max_w = self._max_size
        scale = min(max_h / height, max_w / width)
        if scale >= 1.0:
            return image, 1.0
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        resized: npt.NDArray[np.uint8] = np.asarray(
            cv2.resize(image, size, interpolation=cv2.INTER_AREA), np.uint8
        )
        return resized, scale

    def _add(self, batch: _Batch, sample: Sample) -> Path:
        """Write the image (atomically) and append its COCO entries; returns the image's path.

        Everything that can fail on the sample's content happens before the image is written and
        before anything is appended, so a failure leaves the batch as it was.
        """
        image, scale = self._scaled(sample.image)
        height, width = image.shape[:2]
        meta = dict(sample.metadata)
        number = int(meta.get("frame_number", 0))
        name = f"{_safe(str(meta.get('source', 'frame')))}_{number:08d}_{uuid.uuid4().hex[:8]}.jpg"
        try:
            captured = dt.datetime.fromtimestamp(float(meta["capture_time"]), dt.UTC)
        except (KeyError, TypeError, ValueError, OverflowError, OSError):  # absent or out of range
            captured = None
        image_id = batch.next_image_id
        entry = {
            "id": image_id,
            "file_name": name,
            "width": int(width),
            "height": int(height),
            "date_captured": None if captured is None else captured.isoformat(timespec="milliseconds"),
            "segstream": {
                **meta,
                "original_width": int(sample.image.shape[1]),
                "original_height": int(sample.image.shape[0]),
            },
        }
        annotations: list[dict[str, Any]] = []
        det = sample.detections
        if self._persist and det is not None and len(det):
            ids = _published_detection_ids(sample.outputs, sample)
            for i in range(len(det)):
                ann_id = batch.next_annotation_id + len(annotations)
                ann = self._annotation(batch, sample, det, i, scale, (height, width), ids, image_id, ann_id)
                if ann is not None:
                    annotations.append(ann)
        ok, jpeg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, self._quality])
        if not ok:
            raise OSError("JPEG encoding failed")
        path = batch.folder / name
        atomic_write(path, jpeg.tobytes())
        batch.coco["images"].append(entry)
        batch.coco["annotations"].extend(annotations)
        batch.next_image_id += 1
        batch.next_annotation_id += len(annotations)
        return path

    def _annotation(
        self,
        batch: _Batch,
        sample: Sample,
        det: Detections,
        i: int,
        scale: float,
        shape: tuple[int, int],
        detection_ids: list[str] | None,
        image_id: int,
        annotation_id: int,
    ) -> dict[str, Any] | None:
        """One COCO annotation; ``None`` for a polygon of an empty mask (not representable)."""
        crop = det.masks.crops[i]
        x0, y0 = (int(v) for v in det.masks.offsets[i])
        if scale != 1.0:
            crop, (x0, y0) = scale_crop(crop, (x0, y0), scale, shape)
        if self._polygons:
            points = mask_to_polygon(crop, (x0, y0))
            if not points:
                return None
            segmentation: Any = [[round(v, 2) for p in points for v in (p["x"], p["y"])]]
        else:
            rle = encode_crop(crop, (x0, y0), shape)
            segmentation = {"size": rle["size"], "counts": rle["counts"]}
        x1, y1, x2, y2 = (float(v) * scale for v in det.xyxy[i])
        score = round(float(det.confidence[i]), 4)
        attributes: dict[str, Any] = {"score": score}
        if detection_ids is not None:
            attributes["detection_id"] = detection_ids[i]
        return {
            "id": annotation_id,
            "image_id": image_id,
            "category_id": batch.category_ids[sample.class_names[int(det.class_id[i])]],
            "segmentation": segmentation,
            "area": int(crop.sum()),
            "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
            "iscrowd": 0,
            "score": score,
            "attributes": attributes,
        }
