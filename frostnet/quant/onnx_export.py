"""ONNX export of frostnet models and static INT8 (QDQ) quantization with onnxruntime.

The float model is exported with the dynamo exporter (``torch.onnx.export(..., dynamo=True)``, a
dynamic batch dimension, input ``"input"``: the same float NCHW tensor the PyTorch model takes),
then quantized by onnxruntime's ``quantize_static`` in QDQ format: per-channel signed INT8
weights (as frostnet's eager qconfig: depthwise convolutions need per-channel scales), unsigned
INT8 activations calibrated on the model's data::

    onnx_export.export_onnx(model, "model.onnx", calibration_batches)          # INT8 QDQ
    session = onnx_export.OnnxModule("model.onnx", threads=1)
    logits = session(images)                                                 # a torch tensor

``method="pt2e"`` exports the torchao pt2e INT8 graph (:func:`frostnet.quant.pt2e.quantize_pt2e`)
instead. It keeps the same accuracy but onnxruntime does not fuse its quantize/dequantize pairs
into INT8 kernels (docs/deployment-export.md has the measurement), so ``"ort"`` is the default.

Dense models export their tensor body (:func:`tensor_body`): a detector's per-level
``(loc, conf)`` outputs flattened into one tuple; priors, decoding and NMS stay in Python.

onnx, onnxscript and onnxruntime are optional: ``pip install 'frostnet[export]'``.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

import torch
from torch import nn

from .pt2e import dynamic_batch, example_from, quantize_pt2e, require

if TYPE_CHECKING:  # numpy comes with onnxruntime; frostnet.quant imports this module without it
    import numpy as np

__all__ = ["ONNX_METHODS", "OnnxModule", "export_onnx", "quantize_onnx", "tensor_body"]

#: How the INT8 ONNX graph is made: onnxruntime's static QDQ quantization of the float export, or
#: the dynamo export of the torchao pt2e INT8 graph.
ONNX_METHODS: tuple[str, ...] = ("ort", "pt2e")
INPUT_NAME = "input"

PathLike = Union[str, os.PathLike]


class DetectorBody(nn.Module):
    """A detector's tensor network with its per-level ``(loc, conf)`` pairs flattened into one
    tuple (export formats take tensors and tuples of tensors, not lists of pairs)."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(t for level in self.body(x) for t in level)


def tensor_body(model: nn.Module, task: str) -> nn.Module:
    """What an export holds: the model itself, or for a detector its tensor network
    (:class:`DetectorBody` over ``model.body``); priors, decoding and NMS stay in Python.

    Args:
        model: a frostnet model (float or eager INT8).
        task: ``classification``, ``segmentation`` or ``detection``.
    """
    if task != "detection":
        return model
    if not hasattr(model, "body"):
        raise TypeError(f"a detection model must expose its tensor network as .body; {type(model).__name__} does not")
    return DetectorBody(model.body).eval()


def _atomic_target(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp.onnx")
    os.close(fd)
    return Path(tmp)


def _export_program(model: nn.Module, example: torch.Tensor, path: Path, dynamic: bool = True) -> None:
    require("onnxscript", purpose="ONNX export (torch.onnx dynamo exporter)")
    kwargs: dict[str, Any] = {}
    if dynamic:
        kwargs["dynamic_shapes"] = dynamic_batch()
    program = torch.onnx.export(model, (example,), dynamo=True, input_names=[INPUT_NAME], verbose=False, **kwargs)
    program.save(str(path))


def quantize_onnx(float_path: PathLike, out_path: PathLike, batches: Sequence[torch.Tensor]) -> Path:
    """onnxruntime static QDQ quantization of a float ONNX file (written atomically).

    Args:
        float_path: the float model (from :func:`export_onnx` with ``int8=False``).
        out_path: where the INT8 QDQ model goes.
        batches: calibration images (min/max ranges of every activation over all of them).
    """
    quant = require("onnxruntime.quantization", package="onnxruntime", purpose="ONNX INT8 quantization")
    out_path = Path(out_path)
    feeds = iter([{INPUT_NAME: b.detach().cpu().numpy()} for b in batches])

    class Reader(quant.CalibrationDataReader):
        def get_next(self) -> Optional[dict[str, np.ndarray]]:
            return next(feeds, None)

    tmp = _atomic_target(out_path)
    pre = _atomic_target(out_path)
    try:
        # shape inference + graph cleanup that quantize_static's docs ask for before quantizing
        quant.shape_inference.quant_pre_process(str(float_path), str(pre))
        quant.quantize_static(
            str(pre), str(tmp), Reader(), quant_format=quant.QuantFormat.QDQ, per_channel=True,
            activation_type=quant.QuantType.QUInt8, weight_type=quant.QuantType.QInt8,
            calibrate_method=quant.CalibrationMethod.MinMax,
        )
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
        pre.unlink(missing_ok=True)
    return out_path


def export_onnx(
    model: nn.Module,
    path: PathLike,
    batches: Sequence[torch.Tensor],
    *,
    int8: bool = True,
    method: str = "ort",
) -> Path:
    """Export ``model`` to ONNX (float or INT8 QDQ), atomically.

    Args:
        model: the float model in eval mode (for a detector, its :func:`tensor_body`).
        path: the ``.onnx`` file to write.
        batches: calibration images; the first one is also the export example.
        int8: quantize (True) or write the float graph.
        method: one of :data:`ONNX_METHODS` (INT8 only).

    Returns:
        ``path``.
    """
    if method not in ONNX_METHODS:
        raise ValueError(f"unknown ONNX INT8 method {method!r}; valid choices: {', '.join(ONNX_METHODS)}")
    batches = list(batches)
    path = Path(path)
    example = example_from(batches)
    tmp = _atomic_target(path)
    try:
        if int8 and method == "pt2e":
            graph = quantize_pt2e(model, batches, backend="x86")
            program = torch.export.export(graph, (example,), dynamic_shapes=dynamic_batch())
            require("onnxscript", purpose="ONNX export (torch.onnx dynamo exporter)")
            torch.onnx.export(program, dynamo=True, input_names=[INPUT_NAME], verbose=False).save(str(tmp))
            os.replace(tmp, path)
        elif int8:
            _export_program(model.eval(), example, tmp)
            quantize_onnx(tmp, path, batches)
        else:
            _export_program(model.eval(), example, tmp)
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


class OnnxModule(nn.Module):
    """An onnxruntime session as a module: float NCHW tensor in, tensor (or tuple) out.

    Args:
        path: the ``.onnx`` file.
        threads: onnxruntime intra-op threads (0 = its default).
    """

    def __init__(self, path: PathLike, *, threads: int = 0) -> None:
        super().__init__()
        ort = require("onnxruntime", purpose="running ONNX models")
        if not Path(path).is_file():
            raise FileNotFoundError(f"no ONNX model at {path} (write one with tools/export.py --format onnx)")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> Union[torch.Tensor, tuple[torch.Tensor, ...]]:
        outputs = self.session.run(None, {self.input_name: x.detach().cpu().numpy()})
        tensors = tuple(torch.from_numpy(o) for o in outputs)
        return tensors[0] if len(tensors) == 1 else tensors
