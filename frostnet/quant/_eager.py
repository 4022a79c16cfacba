"""Every use of the eager ``torch.ao.quantization`` API in frostnet lives in this module.

``torch.ao.quantization`` (eager mode) and the quantized tensor dtypes are deprecated in torch 2.14
but remain the only eager INT8 path with real x86/qnnpack kernels. Keeping them behind this one
module means a torchao pt2e path can be added beside it (``frostnet/quant/_pt2e.py``) without
touching the models.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterable, Iterator, Sequence
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
    "prepare_ptq",
    "prepare_qat",
    "quantize_ptq",
    "use_engine",
]

#: INT8 engines this project converts for. ``x86`` and ``fbgemm`` take per-channel weights.
BACKENDS: tuple[str, ...] = ("x86", "fbgemm", "qnnpack")
_PER_CHANNEL = {"x86": True, "fbgemm": True, "qnnpack": False}
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


def convert(model: nn.Module, backend: str = "x86", *, inplace: bool = False) -> nn.Module:
    """Convert a calibrated (PTQ) or QAT-trained model to a real INT8 model for ``backend``.

    Sets ``torch.backends.quantized.engine`` to ``backend`` (INT8 kernels are chosen by that
    global): a converted model must run under the engine it was converted for.
    """
    check_backend(backend)
    if not inplace:
        model = copy.deepcopy(model)
    model.eval()
    torch.backends.quantized.engine = backend
    _ao_convert(model, inplace=True)
    return model


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
