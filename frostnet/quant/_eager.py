"""Every use of the eager ``torch.ao.quantization`` API in frostnet lives in this module.

``torch.ao.quantization`` (eager mode) and the quantized tensor dtypes are deprecated in torch 2.14
but remain the only eager INT8 path with real x86/qnnpack kernels. Keeping them behind this one
module means a torchao pt2e path can be added beside it (``frostnet/quant/_pt2e.py``) without
touching the models.
"""

from __future__ import annotations

import collections
import contextlib
import copy
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Optional

import torch
from torch import nn
from torch.ao.nn.quantized import FloatFunctional
from torch.ao.quantization import (
    DeQuantStub,
    FakeQuantize,
    FusedMovingAvgObsFakeQuantize,
    HistogramObserver,
    MovingAverageMinMaxObserver,
    MovingAveragePerChannelMinMaxObserver,
    MinMaxObserver,
    PerChannelMinMaxObserver,
    QConfig,
    QuantStub,
)
from torch.ao.quantization import convert as _ao_convert
from torch.ao.quantization import fuse_modules as _ao_fuse_modules
from torch.ao.quantization import fuse_modules_qat as _ao_fuse_modules_qat
from torch.ao.quantization import prepare as _ao_prepare
from torch.ao.quantization import prepare_qat as _ao_prepare_qat
from torch.ao.quantization.fake_quantize import disable_observer as _ao_disable_observer
from torch.ao.quantization.fake_quantize import enable_observer as _ao_enable_observer
from torch.ao.nn.intrinsic.qat import freeze_bn_stats as _ao_freeze_bn_stats

__all__ = [
    "BACKENDS",
    "act_quant_max",
    "DeQuantStub",
    "FloatFunctional",
    "QuantStub",
    "calibrate",
    "check_backend",
    "convert",
    "disable_observer",
    "enable_observer",
    "freeze_bn_stats",
    "fuse_modules",
    "get_qconfig",
    "is_quantized_model",
    "observers_paused",
    "prepare_ptq",
    "prepare_qat",
    "quantize_ptq",
    "scalar_only",
    "use_engine",
]

#: INT8 engines this project converts for. All three take per-channel weights.
BACKENDS: tuple[str, ...] = ("x86", "fbgemm", "qnnpack")
# Per-channel weights on every engine: torch's qnnpack kernels take them too, and per-tensor
# weights of depthwise convs after BN folding lose too much: the first published FrostNet-Small 1.0
# run, converted per tensor for qnnpack, fell from 89.5% (x86, per channel) to 57.9% test top-1.
_PER_CHANNEL = {"x86": True, "fbgemm": True, "qnnpack": True}
# x86/fbgemm kernels can overflow 16-bit accumulators on CPUs without VNNI when activations use
# the full 8-bit range, so torch's defaults restrict them to 7 bits ("reduce_range"). The same
# range is spelled here as quant_min/quant_max, which is what the observers ask for.
_ACT_QUANT_MAX = {"x86": 127, "fbgemm": 127, "qnnpack": 255}


def check_backend(backend: str) -> str:
    """Return ``backend`` if this project can convert for it and this torch build has it."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown quantization backend {backend!r}; valid choices: {', '.join(BACKENDS)}")
    if backend not in torch.backends.quantized.supported_engines:
        raise RuntimeError(
            f"quantization backend {backend!r} is not supported by this torch build "
            f"(supported engines: {torch.backends.quantized.supported_engines})"
        )
    return backend


@contextlib.contextmanager
def use_engine(backend: str) -> Iterator[None]:
    """Temporarily set ``torch.backends.quantized.engine`` to ``backend``."""
    check_backend(backend)
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = backend
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous


def act_quant_max(backend: str) -> int:
    """The largest activation level frostnet's default INT8 qconfig uses on ``backend``."""
    check_backend(backend)
    return _ACT_QUANT_MAX[backend]


def get_qconfig(
    backend: str,
    *,
    qat: bool,
    weight_quant_range: Optional[tuple[int, int]] = None,
    act_quant_range: Optional[tuple[int, int]] = None,
) -> QConfig:
    """The qconfig frostnet uses for ``backend``.

    Args:
        backend: one of :data:`BACKENDS`.
        qat: fake-quantize modules for quantization-aware training (True) or observers for
            post-training calibration (False).
        weight_quant_range: (quant_min, quant_max) of the signed weights; default (-128, 127).
            A narrower range simulates lower bit widths while staying convertible to INT8.
        act_quant_range: (quant_min, quant_max) of the unsigned activations; default is the
            backend's INT8 range.
    """
    check_backend(backend)
    wmin, wmax = weight_quant_range or (-128, 127)
    amin, amax = act_quant_range or (0, _ACT_QUANT_MAX[backend])
    per_channel = _PER_CHANNEL[backend]
    if qat:
        act = FusedMovingAvgObsFakeQuantize.with_args(
            observer=MovingAverageMinMaxObserver, quant_min=amin, quant_max=amax, dtype=torch.quint8
        )
        if per_channel:
            weight = FusedMovingAvgObsFakeQuantize.with_args(
                observer=MovingAveragePerChannelMinMaxObserver,
                quant_min=wmin,
                quant_max=wmax,
                dtype=torch.qint8,
                qscheme=torch.per_channel_symmetric,
            )
        else:
            weight = FusedMovingAvgObsFakeQuantize.with_args(
                observer=MovingAverageMinMaxObserver,
                quant_min=wmin,
                quant_max=wmax,
                dtype=torch.qint8,
                qscheme=torch.per_tensor_symmetric,
            )
    else:
        act = HistogramObserver.with_args(quant_min=amin, quant_max=amax, dtype=torch.quint8)
        if per_channel:
            weight = PerChannelMinMaxObserver.with_args(
                quant_min=wmin, quant_max=wmax, dtype=torch.qint8, qscheme=torch.per_channel_symmetric
            )
        else:
            weight = MinMaxObserver.with_args(
                quant_min=wmin, quant_max=wmax, dtype=torch.qint8, qscheme=torch.per_tensor_symmetric
            )
    return QConfig(activation=act, weight=weight)


def fuse_modules(module: nn.Module, groups: Sequence[Sequence[str]], *, is_qat: bool) -> None:
    """Fuse ``groups`` of submodule names of ``module`` in place (Conv-BN(-ReLU), Linear-ReLU).

    QAT fusion (``is_qat=True``) keeps BN as a module so fake-quantized training updates its
    statistics, and keeps the original parameter objects, so an optimizer built before fusion
    still trains the fused model.
    """
    if not groups:
        return
    fuse = _ao_fuse_modules_qat if is_qat else _ao_fuse_modules
    fuse(module, [list(g) for g in groups], inplace=True)


def _fuse(model: nn.Module, is_qat: bool) -> None:
    fuse_model = getattr(model, "fuse_model", None)
    if fuse_model is None:
        raise TypeError(f"{type(model).__name__} has no fuse_model(is_qat) method; it cannot be quantized here")
    fuse_model(is_qat=is_qat)


def prepare_qat(
    model: nn.Module,
    backend: str = "x86",
    *,
    weight_quant_range: Optional[tuple[int, int]] = None,
    act_quant_range: Optional[tuple[int, int]] = None,
    qconfig: Optional[QConfig] = None,
) -> nn.Module:
    """Fuse ``model`` for QAT and insert fake quantization, in place; returns ``model``.

    Every parameter object of the float model is still the one the prepared model trains, so an
    optimizer (and its momentum) built on the float model carries over (StatAssist relies on it).
    """
    check_backend(backend)
    model.train()
    _fuse(model, is_qat=True)
    model.qconfig = qconfig or get_qconfig(
        backend, qat=True, weight_quant_range=weight_quant_range, act_quant_range=act_quant_range
    )
    _apply_float_tail(model)
    _ao_prepare_qat(model, inplace=True)
    return model


def prepare_ptq(model: nn.Module, backend: str = "x86", *, qconfig: Optional[QConfig] = None) -> nn.Module:
    """Fuse ``model`` for inference and insert observers for calibration, in place."""
    check_backend(backend)
    model.eval()
    _fuse(model, is_qat=False)
    model.qconfig = qconfig or get_qconfig(backend, qat=False)
    _apply_float_tail(model)
    _ao_prepare(model, inplace=True)
    return model


def _apply_float_tail(model: nn.Module) -> None:
    # Modules a model lists in ``float_modules`` (e.g. the last classifier layer that the papers
    # keep in FP32) get no qconfig, so prepare/convert leave them float.
    for name in getattr(model, "float_modules", ()):
        model.get_submodule(name).qconfig = None


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable[torch.Tensor]) -> None:
    """Run ``batches`` through an observed model so its observers record activation ranges."""
    model.eval()
    for x in batches:
        model(x)


_SCALAR_ONLY = "_frostnet_scalar_only"


def scalar_only(ff: FloatFunctional) -> FloatFunctional:
    """Mark a ``FloatFunctional`` that only runs ``add_scalar``/``mul_scalar``.

    Those two never call the observer (in INT8 they shift the input's zero point or scale instead
    of requantizing), so its observer has no range at conversion, which torch reports with a
    "must run observer" warning. :func:`convert` gives a marked one's observer a neutral range
    instead; an unmarked unobserved ``FloatFunctional`` still warns, since there it means a
    calibration that never reached the op.
    """
    setattr(ff, _SCALAR_ONLY, True)
    return ff


def _has_range(observer: object) -> Optional[bool]:
    """Whether a min/max observer has recorded a range (None: not a min/max observer)."""
    min_val = getattr(observer, "min_val", None)
    if not isinstance(min_val, torch.Tensor):
        return None
    return min_val.numel() > 0 and bool(torch.isfinite(min_val).all())


def _settle_scalar_only_observers(model: nn.Module) -> None:
    for m in model.modules():
        if not getattr(m, _SCALAR_ONLY, False):
            continue
        obs = getattr(m, "activation_post_process", None)
        obs = getattr(obs, "activation_post_process", obs)  # a fake quantize's observer
        if _has_range(obs) is False:
            obs(torch.zeros(1))  # the scale is never used by add_scalar/mul_scalar


@contextlib.contextmanager
def _simulated_qparams(model: nn.Module) -> Iterator[None]:
    """Make torch's fused fake quantizers report the qparams their forward pass applied.

    ``FusedMovingAvgObsFakeQuantize`` computes its scale and zero point in C++ from the running
    range, but ``calculate_qparams()`` (which conversion calls) recomputes them with the Python
    observer's formula, and for symmetric weights the two disagree: the C++ one divides the
    negative half by ``-quant_min`` and the positive half by ``quant_max``, the Python one the
    largest magnitude by ``(quant_max - quant_min) / 2``. At 8 bits that is a 0.4% scale
    difference; at 4 bits (-8..7) it is up to 7%, enough to cost an STE-trained W4A4 FrostNet-Small
    0.5 14 points of test top-1 between its fake-quant and INT8 models. Conversion has to reproduce what
    training simulated, so it takes the buffers. A quantizer that never observed anything keeps the
    Python path (and its "must run observer" warning).
    """
    patched = [m for m in model.modules()
               if isinstance(m, FusedMovingAvgObsFakeQuantize) and _has_range(m.activation_post_process)]
    for m in patched:
        # an instance attribute shadows the method for the from_float calls of torch's convert
        m.calculate_qparams = _buffer_qparams(m)  # type: ignore[method-assign]
    try:
        yield
    finally:
        for m in patched:
            del m.calculate_qparams


def _buffer_qparams(fq: FakeQuantize) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
    def qparams() -> tuple[torch.Tensor, torch.Tensor]:
        return fq.scale.detach().clone(), fq.zero_point.detach().clone()

    return qparams


def convert(model: nn.Module, backend: str = "x86", *, inplace: bool = False) -> nn.Module:
    """Convert a calibrated (PTQ) or QAT-trained model to a real INT8 model for ``backend``.

    QAT models convert with the scales and zero points their fake quantizers applied last (their
    ``scale``/``zero_point`` buffers), so the INT8 model computes what the fake-quant model did.

    Sets ``torch.backends.quantized.engine`` to ``backend`` (INT8 kernels are chosen by that
    global): a converted model must run under the engine it was converted for.
    """
    check_backend(backend)
    if not inplace:
        model = copy.deepcopy(model)
    model.eval()
    torch.backends.quantized.engine = backend
    _settle_scalar_only_observers(model)
    with _simulated_qparams(model):
        _ao_convert(model, inplace=True)
    _fold_float_conv_bn(model)
    return model


def _fold_float_conv_bn(model: nn.Module) -> None:
    """Fold the Conv-BN pairs that stay FP32 in a converted model (layers without a qconfig, such
    as the detectors' last layers) into one convolution.

    QAT fuses them in training mode into a float ``ConvBn2d`` (BN keeps training), which torch's
    convert leaves as it is; an INT8 file is rebuilt by fusing in evaluation mode, which folds
    BN into the convolution. Folding here makes the converted model and the rebuilt one the
    same modules with the same tensors.
    """
    intrinsic = torch.ao.nn.intrinsic
    for name, child in list(model.named_children()):
        if type(child) in (intrinsic.ConvBn1d, intrinsic.ConvBn2d, intrinsic.ConvBn3d):
            setattr(model, name, torch.nn.utils.fusion.fuse_conv_bn_eval(child[0], child[1]))
        elif type(child) in (intrinsic.ConvBnReLU1d, intrinsic.ConvBnReLU2d, intrinsic.ConvBnReLU3d):
            relu_cls = {intrinsic.ConvBnReLU1d: intrinsic.ConvReLU1d, intrinsic.ConvBnReLU2d: intrinsic.ConvReLU2d,
                        intrinsic.ConvBnReLU3d: intrinsic.ConvReLU3d}[type(child)]
            setattr(model, name, relu_cls(torch.nn.utils.fusion.fuse_conv_bn_eval(child[0], child[1]), child[2]))
        else:
            _fold_float_conv_bn(child)


def quantize_ptq(model: nn.Module, batches: Iterable[torch.Tensor], backend: str = "x86") -> nn.Module:
    """Post-training quantization of a float model: fuse, observe ``batches``, convert.

    The float ``model`` is left untouched.
    """
    observed = prepare_ptq(copy.deepcopy(model), backend)
    calibrate(observed, batches)
    return convert(observed, backend, inplace=True)


def freeze_bn_stats(model: nn.Module) -> None:
    """Stop updating BN running statistics in QAT-fused modules (late-phase QAT)."""
    model.apply(_ao_freeze_bn_stats)


def disable_observer(model: nn.Module) -> None:
    """Freeze the quantization ranges of every fake-quantize module."""
    model.apply(_ao_disable_observer)


def enable_observer(model: nn.Module) -> None:
    """Let every fake-quantize module update its quantization range again."""
    model.apply(_ao_enable_observer)


def is_quantized_model(model: nn.Module) -> bool:
    """True if ``model`` holds converted INT8 modules."""
    return any(type(m).__module__.startswith("torch.ao.nn.quantized") and not isinstance(m, FloatFunctional)
               for m in model.modules())


def is_fake_quant_module(module: nn.Module) -> bool:
    """True for the fake-quantize modules that QAT inserts."""
    return isinstance(module, FakeQuantize)


@contextlib.contextmanager
def observers_paused(model: nn.Module) -> Iterator[None]:
    """Stop the fake quantizers of ``model`` from observing inside the block (restored after).

    torch's fake quantizers also observe in evaluation mode, so evaluating a QAT model moves its
    ranges toward the evaluation data; at W4A4 that cost FrostNet-Small 0.5 runs whole points
    between their fake-quant and INT8 figures. Evaluation has to leave the model as it found it.
    """
    paused = [m for m in model.modules() if is_fake_quant_module(m) and bool(m.observer_enabled[0])]
    for m in paused:
        m.disable_observer()
    try:
        yield
    finally:
        for m in paused:
            m.enable_observer()


# --------------------------------------------------------------------------------------------
# INT8 state <-> plain tensors (the INT8 safetensors format; see frostnet/serialization.py)
#
# safetensors has no quantized dtypes. A converted model's state dict is flattened into plain
# tensors plus a JSON "layout" that says how to rebuild each entry:
#   {"kind": "tensor"}                               the tensor itself, stored under its key
#   {"kind": "qtensor", "dtype": "qint8", "qscheme": "per_channel_affine", "axis": 0}
#       integer values under ``key`` (int8/uint8/int32), scales (float64) under ``key@scale``
#       and zero points (int64) under ``key@zero_point`` (0-d per tensor, 1-d per channel)
#   {"kind": "tuple", "items": [...]}                items stored under ``key@0``, ``key@1``, ...
#   {"kind": "none"} / {"kind": "dtype", "value": "qint8"}
# Restoring checks every entry against the state dict of a freshly converted skeleton (same
# keys, kinds, shapes, dtypes and qschemes), so a file that does not fit raises instead of
# producing a silently different model.
# --------------------------------------------------------------------------------------------

_QDTYPES: dict[str, tuple[torch.dtype, torch.dtype, int, int]] = {
    # name -> (quantized dtype, integer storage dtype, min, max)
    "qint8": (torch.qint8, torch.int8, -128, 127),
    "quint8": (torch.quint8, torch.uint8, 0, 255),
    "qint32": (torch.qint32, torch.int32, -(2**31), 2**31 - 1),
}
_QSCHEMES: dict[str, torch.qscheme] = {
    "per_tensor_affine": torch.per_tensor_affine,
    "per_channel_affine": torch.per_channel_affine,
}
_SEP = "@"


def _qdtype_name(dtype: torch.dtype) -> str:
    for name, (qdtype, _, _, _) in _QDTYPES.items():
        if qdtype == dtype:
            return name
    raise TypeError(f"unsupported quantized dtype {dtype}; supported: {', '.join(_QDTYPES)}")


def _qscheme_name(qscheme: torch.qscheme) -> str:
    for name, q in _QSCHEMES.items():
        if q == qscheme:
            return name
    raise TypeError(f"unsupported qscheme {qscheme}; supported: {', '.join(_QSCHEMES)}")


def _flatten_value(key: str, value: object, out: dict[str, torch.Tensor]) -> dict[str, object]:
    if isinstance(value, torch.Tensor) and value.is_quantized:
        qscheme = _qscheme_name(value.qscheme())
        desc: dict[str, object] = {"kind": "qtensor", "dtype": _qdtype_name(value.dtype), "qscheme": qscheme}
        out[key] = value.int_repr().contiguous()
        if qscheme == "per_channel_affine":
            desc["axis"] = int(value.q_per_channel_axis())
            out[key + _SEP + "scale"] = value.q_per_channel_scales().to(torch.float64).contiguous()
            out[key + _SEP + "zero_point"] = value.q_per_channel_zero_points().to(torch.int64).contiguous()
        else:
            out[key + _SEP + "scale"] = torch.tensor(value.q_scale(), dtype=torch.float64)
            out[key + _SEP + "zero_point"] = torch.tensor(value.q_zero_point(), dtype=torch.int64)
        return desc
    if isinstance(value, torch.Tensor):
        out[key] = value.detach().cpu().contiguous().clone()
        return {"kind": "tensor"}
    if isinstance(value, (tuple, list)):
        return {"kind": "tuple", "items": [_flatten_value(f"{key}{_SEP}{i}", v, out) for i, v in enumerate(value)]}
    if value is None:
        return {"kind": "none"}
    if isinstance(value, torch.dtype):
        return {"kind": "dtype", "value": str(value).replace("torch.", "")}
    raise TypeError(f"state dict entry {key!r} has unsupported type {type(value).__name__}")


def int8_state_to_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, object]]]:
    """Flatten a converted INT8 model's state dict into plain tensors and a JSON-able layout.

    Args:
        model: a model returned by :func:`convert` / :func:`quantize_ptq`.

    Returns:
        ``(tensors, layout)``: tensors for safetensors (no quantized dtypes) and, per state dict
        key, the descriptor that :func:`int8_state_from_tensors` needs to rebuild it.

    Raises:
        ValueError: ``model`` holds no converted INT8 modules.
    """
    if not is_quantized_model(model):
        raise ValueError(f"{type(model).__name__} is not a converted INT8 model; convert it first (frostnet.quant.convert)")
    tensors: dict[str, torch.Tensor] = {}
    layout = {key: _flatten_value(key, value, tensors) for key, value in model.state_dict().items()}
    return tensors, layout


def weight_qscheme(model: nn.Module) -> str:
    """``per_channel_affine`` or ``per_tensor_affine``: the scheme of the first INT8 weight."""
    for value in model.state_dict().values():
        if isinstance(value, tuple):
            value = value[0] if value else None
        if isinstance(value, torch.Tensor) and value.is_quantized and value.dtype == torch.qint8:
            return _qscheme_name(value.qscheme())
    raise ValueError(f"{type(model).__name__} has no INT8 weights")


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor) and value.is_quantized:
        return f"{_qscheme_name(value.qscheme())} {_qdtype_name(value.dtype)} tensor of shape {list(value.shape)}"
    if isinstance(value, torch.Tensor):
        return f"{str(value.dtype).replace('torch.', '')} tensor of shape {list(value.shape)}"
    return type(value).__name__


def _take(tensors: dict[str, torch.Tensor], used: set[str], key: str) -> torch.Tensor:
    if key not in tensors:
        raise ValueError(f"missing tensor {key!r}")
    used.add(key)
    return tensors[key]


def _check_tensor(key: str, t: torch.Tensor, dtype: torch.dtype, shape: Sequence[int]) -> None:
    if t.dtype != dtype:
        raise ValueError(f"tensor {key!r} has dtype {str(t.dtype).replace('torch.', '')}, expected {str(dtype).replace('torch.', '')}")
    if list(t.shape) != list(shape):
        raise ValueError(f"tensor {key!r} has shape {list(t.shape)}, expected {list(shape)}")


def _restore_value(
    key: str, desc: object, ref: object, tensors: dict[str, torch.Tensor], used: set[str]
) -> object:
    if not isinstance(desc, dict) or "kind" not in desc:
        raise ValueError(f"layout entry for {key!r} is not a descriptor: {desc!r}")
    kind = desc["kind"]
    if kind == "qtensor":
        if not (isinstance(ref, torch.Tensor) and ref.is_quantized):
            raise ValueError(f"{key!r} is stored as a quantized tensor but the model expects a {_describe(ref)}")
        dtype_name, qscheme = desc.get("dtype"), desc.get("qscheme")
        if dtype_name not in _QDTYPES:
            raise ValueError(f"{key!r} has unknown quantized dtype {dtype_name!r}; valid choices: {', '.join(_QDTYPES)}")
        if qscheme not in _QSCHEMES:
            raise ValueError(f"{key!r} has unknown qscheme {qscheme!r}; valid choices: {', '.join(_QSCHEMES)}")
        if dtype_name != _qdtype_name(ref.dtype) or qscheme != _qscheme_name(ref.qscheme()):
            raise ValueError(f"{key!r} is a {qscheme} {dtype_name} tensor but the model expects a {_describe(ref)} "
                             "(was the file written for another backend?)")
        _, int_dtype, qmin, qmax = _QDTYPES[dtype_name]
        values = _take(tensors, used, key)
        _check_tensor(key, values, int_dtype, ref.shape)
        scale = _take(tensors, used, key + _SEP + "scale")
        zero_point = _take(tensors, used, key + _SEP + "zero_point")
        if qscheme == "per_channel_affine":
            axis = desc.get("axis")
            if axis != ref.q_per_channel_axis():
                raise ValueError(f"{key!r} is quantized along axis {axis!r}, the model expects axis {ref.q_per_channel_axis()}")
            qshape: list[int] = [ref.shape[axis]]
        else:
            qshape = []
        _check_tensor(key + _SEP + "scale", scale, torch.float64, qshape)
        _check_tensor(key + _SEP + "zero_point", zero_point, torch.int64, qshape)
        if not (torch.isfinite(scale).all() and (scale > 0).all()):
            raise ValueError(f"{key!r} has scales that are not positive finite numbers")
        if ((zero_point < qmin) | (zero_point > qmax)).any():
            raise ValueError(f"{key!r} has zero points outside [{qmin}, {qmax}]")
        if qscheme == "per_channel_affine":
            return torch._make_per_channel_quantized_tensor(values, scale, zero_point, int(desc["axis"]))
        return torch._make_per_tensor_quantized_tensor(values, float(scale), int(zero_point))
    if kind == "tensor":
        if not isinstance(ref, torch.Tensor) or ref.is_quantized:
            raise ValueError(f"{key!r} is stored as a plain tensor but the model expects a {_describe(ref)}")
        t = _take(tensors, used, key)
        _check_tensor(key, t, ref.dtype, ref.shape)
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ValueError(f"tensor {key!r} holds NaN or infinite values")
        return t
    if kind == "tuple":
        items = desc.get("items")
        if not isinstance(ref, (tuple, list)) or not isinstance(items, list) or len(items) != len(ref):
            raise ValueError(f"{key!r} is stored as a tuple of {len(items) if isinstance(items, list) else '?'} items "
                             f"but the model expects a {_describe(ref)}")
        return tuple(_restore_value(f"{key}{_SEP}{i}", d, r, tensors, used) for i, (d, r) in enumerate(zip(items, ref)))
    if kind == "none":
        if ref is not None:
            raise ValueError(f"{key!r} is stored as None but the model expects a {_describe(ref)}")
        return None
    if kind == "dtype":
        if not isinstance(ref, torch.dtype) or desc.get("value") != str(ref).replace("torch.", ""):
            raise ValueError(f"{key!r} is stored as dtype {desc.get('value')!r} but the model expects {ref!r}")
        return ref
    raise ValueError(f"layout entry for {key!r} has unknown kind {kind!r}; valid: tensor, qtensor, tuple, none, dtype")


def int8_state_from_tensors(
    skeleton: nn.Module, tensors: dict[str, torch.Tensor], layout: dict[str, object]
) -> None:
    """Fill a converted ``skeleton`` with the INT8 state stored as ``tensors`` + ``layout``.

    Strict: every state dict key of the skeleton must be in ``layout`` and vice versa, and every
    tensor of ``tensors`` must be used; kinds, shapes, dtypes and qschemes must match the
    skeleton. Weights are repacked for the current quantized engine.

    Raises:
        ValueError: naming the offending key(s) and what is wrong.
    """
    reference = skeleton.state_dict()
    missing = [k for k in reference if k not in layout]
    extra = [k for k in layout if k not in reference]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing keys {_short(missing)}")
        if extra:
            parts.append(f"unexpected keys {_short(extra)}")
        raise ValueError("; ".join(parts))
    used: set[str] = set()
    state = collections.OrderedDict(
        (key, _restore_value(key, layout[key], ref, tensors, used)) for key, ref in reference.items()
    )
    unused = [k for k in tensors if k not in used]
    if unused:
        raise ValueError(f"unexpected tensors {_short(unused)}")
    # module versions (e.g. quantized Linear's packed-params layout) travel in ``_metadata``
    state._metadata = getattr(reference, "_metadata", None)  # type: ignore[attr-defined]
    skeleton.load_state_dict(state, strict=True)


def _short(keys: Sequence[str], n: int = 5) -> str:
    shown = ", ".join(repr(k) for k in list(keys)[:n])
    return f"[{shown}{', ...' if len(keys) > n else ''}] ({len(keys)} in all)"


def quantized_skeleton(model: nn.Module, backend: str) -> nn.Module:
    """Turn a float model (in place) into a converted INT8 model for ``backend`` whose weights and
    quantization parameters are placeholders, ready for :func:`int8_state_from_tensors`.

    Fuses for inference, prepares with the backend's PTQ qconfig and converts without
    calibration (the uncalibrated-observer warnings are silenced: every value is overwritten).
    """
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"must run observer before calling calculate_qparams")
        prepare_ptq(model, backend, qconfig=QConfig(
            activation=MinMaxObserver.with_args(dtype=torch.quint8, quant_min=0, quant_max=_ACT_QUANT_MAX[backend]),
            weight=get_qconfig(backend, qat=False).weight,
        ))
        return convert(model, backend, inplace=True)


__all__ += ["int8_state_from_tensors", "int8_state_to_tensors", "quantized_skeleton", "weight_qscheme"]


# ------------------------------------------------------------------ dilated depthwise convolutions


class _SpaceToDepthDepthwise(nn.Module):
    """A converted dilated depthwise convolution run as an undilated one on phase-split input.

    The x86 and qnnpack kernels have fast paths only for undilated depthwise convolutions; a
    dilated one (the output-stride-16 stages of the LR-ASPP backbones) falls back to a generic
    kernel that is tens of times slower than the float convolution. With dilation ``d``, stride 1
    and "same" padding ``d (k - 1) / 2``, every phase ``(a, b)`` of the input
    (``x[..., a::d, b::d]``) is convolved with the same kernel undilated: ``pixel_unshuffle``
    moves the ``d * d`` phases into channels, an undilated depthwise convolution with each channel's
    weights repeated ``d * d`` times runs on them, ``pixel_shuffle`` interleaves the result. The
    integer weights, bias and requantization are the original's, so the arithmetic is the same.
    """

    def __init__(self, conv: nn.Module) -> None:
        super().__init__()
        d = conv.dilation[0]
        channels = conv.in_channels * d * d
        weight = conv.weight()
        reps = torch.repeat_interleave
        if weight.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
            expanded = torch._make_per_channel_quantized_tensor(
                reps(weight.int_repr(), d * d, 0), reps(weight.q_per_channel_scales(), d * d),
                reps(weight.q_per_channel_zero_points(), d * d), 0)
        else:
            expanded = torch._make_per_tensor_quantized_tensor(
                reps(weight.int_repr(), d * d, 0), weight.q_scale(), weight.q_zero_point())
        bias = conv.bias()
        self.expanded = type(conv)(channels, channels, conv.kernel_size, stride=1,
                                   padding=tuple((k - 1) // 2 for k in conv.kernel_size), groups=channels,
                                   bias=bias is not None)
        self.expanded.set_weight_bias(expanded, None if bias is None else reps(bias, d * d))
        self.expanded.scale, self.expanded.zero_point = conv.scale, conv.zero_point
        self.d = d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.d
        height, width = x.shape[-2:]
        # Height and width must be multiples of d: pad the bottom and right with real zeros (the
        # zero point), which is what the original's zero padding sees there, and crop after.
        pad_h, pad_w = -height % d, -width % d
        if pad_h or pad_w:
            x = nn.functional.pad(x, (0, pad_w, 0, pad_h))
        y = torch.pixel_shuffle(self.expanded(torch.pixel_unshuffle(x, d)), d)
        return y[..., :height, :width].contiguous() if pad_h or pad_w else y


def _is_rewritable_dilated_depthwise(m: nn.Module) -> bool:
    if type(m) not in (torch.ao.nn.quantized.Conv2d, torch.ao.nn.intrinsic.quantized.ConvReLU2d):
        return False
    d = m.dilation[0]
    return (d > 1 and m.dilation == (d, d) and m.stride == (1, 1) and m.padding_mode == "zeros"
            and m.groups == m.in_channels == m.out_channels
            and m.padding == tuple(d * (k - 1) // 2 for k in m.kernel_size)
            and all(k % 2 == 1 for k in m.kernel_size))


def split_dilated_depthwise(
    model: nn.Module, examples: Optional[Sequence[tuple[torch.Tensor, ...]]] = None
) -> tuple[nn.Module, list[str]]:
    """A copy of a converted model whose dilated depthwise convolutions run undilated on
    phase-split input (see :class:`_SpaceToDepthDepthwise`), and the names of those modules.

    The split form runs x86's depthwise kernel instead of its generic one, and the two can round a
    requantization tie differently (one quantization step, seen in ESPNetV2). With ``examples``
    (argument tuples of the model), each convolution is split only if its split form reproduces
    its output on every input it gets from them, so the split model's outputs on the examples are
    the original's. Returns ``(model, [])`` (the model itself, not a copy)
    when there is nothing to split.
    """
    names = [n for n, m in model.named_modules() if _is_rewritable_dilated_depthwise(m)]
    splits = {n: _SpaceToDepthDepthwise(model.get_submodule(n)) for n in names}
    if examples is not None and names:
        seen: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {n: [] for n in names}
        hooks = [model.get_submodule(n).register_forward_hook(
            lambda mod, args, out, n=n: seen[n].append((args[0], out))) for n in names]
        try:
            with torch.no_grad():
                for args in examples:
                    model(*args)
        finally:
            for h in hooks:
                h.remove()
        with torch.no_grad():
            names = [n for n in names if seen[n] and all(
                torch.equal(splits[n](x).int_repr(), y.int_repr()) for x, y in seen[n])]
    if not names:
        return model, []
    model = copy.deepcopy(model)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, copy.deepcopy(splits[name]))
    return model, names


__all__ += ["split_dilated_depthwise"]
