"""ONNX export of ``SegNet`` in the Ultralytics segmentation layout, and its check against PyTorch.

The exported graph has one input ``images`` ``[B, 3, H, W]`` (float32 RGB in [0, 1]) with dynamic
batch and spatial axes, and outputs ``output0`` ``[B, 4 + C + 32, N]`` and ``output1``
``[B, 32, H/4, W/4]``. Ultralytics-style ``metadata_props`` (``names``, ``imgsz``, ``stride``,
``task``, ...) are written into the file so that it also loads as a plain Ultralytics export.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from training.model import ExportWrapper, SegNet

__all__ = ["check_export", "export_onnx"]


def export_onnx(
    net: SegNet,
    path: Path,
    *,
    class_names: tuple[str, ...] | list[str],
    input_size: tuple[int, int],
    extra_metadata: dict[str, str] | None = None,
) -> Path:
    """Export ``net`` (evaluation mode) to ``path`` with dynamic axes and metadata.

    Args:
        net: the trained network (its training flag is restored afterwards).
        path: output ``.onnx`` file.
        class_names: class names in id order.
        input_size: default ``(height, width)`` input.
        extra_metadata: more ``metadata_props`` entries.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = net.training
    wrapper = ExportWrapper(net).eval()
    dummy = torch.zeros(1, 3, *input_size)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's deprecation notice for the TorchScript exporter
            torch.onnx.export(
                wrapper,
                (dummy,),
                str(path),
                input_names=["images"],
                output_names=["output0", "output1"],
                dynamic_axes={
                    "images": {0: "batch", 2: "height", 3: "width"},
                    "output0": {0: "batch", 2: "anchors"},
                    "output1": {0: "batch", 2: "mask_height", 3: "mask_width"},
                },
                opset_version=17,
                do_constant_folding=True,
                dynamo=False,
            )
    finally:
        net.train(was_training)
    model = onnx.load(str(path))
    props = {
        "description": "segstream factory-parts demo segmentation model (synthetic conveyor-belt parts)",
        "author": "segstream training/",
        "task": "segment",
        "stride": "32",
        "batch": "1",
        "imgsz": str(list(input_size)),
        "names": str(dict(enumerate(class_names))),
    }
    props.update(extra_metadata or {})
    del model.metadata_props[:]
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@torch.no_grad()
def check_export(
    net: SegNet,
    path: Path,
    *,
    shapes: tuple[tuple[int, int, int], ...] = ((1, 320, 320), (2, 640, 640)),
    seed: int = 0,
) -> dict[str, float]:
    """Run the ONNX file and the PyTorch model on random inputs and compare raw outputs.

    Args:
        net: the PyTorch model that was exported.
        path: the ONNX file.
        shapes: ``(batch, height, width)`` inputs to try.

    Returns:
        Largest absolute difference per output (``output0``, ``output1``) over all inputs.

    Raises:
        ValueError: when shapes differ or a difference exceeds the tolerance (1e-3 relative to the
            output's range).
    """
    was_training = net.training
    wrapper = ExportWrapper(net).eval()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(seed)
    worst = {"output0": 0.0, "output1": 0.0}
    try:
        for b, h, w in shapes:
            x = torch.rand(b, 3, h, w, generator=gen)
            ref = [t.numpy() for t in wrapper(x)]
            got = sess.run(["output0", "output1"], {"images": x.numpy()})
            for name, r, g in zip(("output0", "output1"), ref, got, strict=True):
                if r.shape != g.shape:
                    raise ValueError(
                        f"{name} shape differs at input {(b, 3, h, w)}: torch {r.shape} onnx {g.shape}"
                    )
                diff = float(np.abs(r - g).max())
                tol = 1e-3 * max(1.0, float(np.abs(r).max()))
                if diff > tol:
                    raise ValueError(f"{name} differs by {diff:.3g} (> {tol:.3g}) at input {(b, 3, h, w)}")
                worst[name] = max(worst[name], diff)
    finally:
        net.train(was_training)
    return worst
