"""Inference optimization of converted models: TorchScript trace + freeze.

An eager INT8 model spends much of its time in Python: every quantized module's ``forward`` and
every ``FloatFunctional`` call goes through the interpreter. Tracing records the ops once and
freezing inlines the weights and packed parameters as constants, so the INT8 kernels run back to
back (FrostNet-Small 1.0, x86, 1 thread: about half the eager INT8 latency)::

    int8 = quant.quantize_ptq(model, calibration_batches, "x86")
    fast = quant.optimize_for_inference(int8, torch.randn(1, 3, 224, 224))
    logits = fast(images)                  # same outputs as int8(images), bit for bit

The result is specialized to the example's shapes (batch size and resolution): optimize once per
input shape. It is checked against the eager model on the example and on a mirrored copy of it,
which also catches Python branches on the data that tracing would have frozen.

On the x86 engine, dilated depthwise convolutions (the output-stride-16 stages of the LR-ASPP
backbones) are also rewritten as undilated ones over phase-split input, which x86's fast depthwise
kernels cover (LR-ASPP FrostNet-Small 1.0 at 256x512: about 12 times faster). The two kernels can
round a requantization tie differently, so each convolution is split only where it reproduces the
eager output on the example and its mirrored copy, and the whole rewrite is kept only if the model's outputs stay
bitwise equal on the checks; on other inputs a split convolution may still differ by one
quantization step at such a tie.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Optional, Union

import torch
from torch import nn

from ._eager import check_backend, is_fake_quant_module, is_quantized_model, split_dilated_depthwise, use_engine

__all__ = ["optimize_for_inference"]

Inputs = Union[torch.Tensor, tuple[torch.Tensor, ...]]

# Deprecation notices torch 2.14 emits for every call of these APIs (the TorchScript path is
# still the one that removes the eager Python overhead of eager-mode INT8 models).
_DEPRECATIONS = (
    r"`torch\.jit\.trace` is deprecated",
    r"`torch\.jit\.trace_method` is deprecated",
    r"`torch\.jit\.freeze` is deprecated",
)


@contextlib.contextmanager
def _quiet_tracing() -> Iterator[None]:
    with warnings.catch_warnings():
        for message in _DEPRECATIONS:
            warnings.filterwarnings("ignore", message=message, category=FutureWarning)
        # Quantized modules turn their scale/zero-point tensors into Python numbers and shape
        # checks read sizes: tracing warns that these become constants. Both are constants of a
        # converted model at a fixed input shape, and the outputs are checked on two inputs.
        warnings.filterwarnings("ignore", message=r"Converting a tensor to a Python", category=torch.jit.TracerWarning)
        yield


def _as_tuple(example_input: Any) -> tuple[torch.Tensor, ...]:
    inputs = example_input if isinstance(example_input, tuple) else (example_input,)
    if not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
        raise TypeError(
            "example_input must be a tensor or a non-empty tuple of tensors (e.g. torch.randn(1, 3, 224, 224)), "
            f"got {_describe(example_input)}"
        )
    for t in inputs:
        if t.is_quantized:
            raise TypeError("example_input must be a float tensor: converted models quantize their input themselves "
                            f"(QuantStub), got a {t.dtype} tensor")
        if t.device.type != "cpu":
            raise ValueError(f"INT8 models run on the CPU; example_input is on {t.device}")
    return inputs


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {', '.join(type(v).__name__ for v in value) or 'nothing'}"
    return type(value).__name__


def _mirrored(inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    # A second input with the example's shape and value distribution, but different data.
    return tuple(t.flip(-1) if t.is_floating_point() and t.dim() > 0 else t for t in inputs)


def _max_difference(a: Any, b: Any, where: str = "output") -> tuple[float, str]:
    """Largest absolute difference between two output structures (inf if they do not match)."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.shape != b.shape or a.dtype != b.dtype:
            return float("inf"), f"{where}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
        if a.is_quantized:
            a, b = a.dequantize(), b.dequantize()
        if a.numel() == 0:
            return 0.0, where
        if not a.is_floating_point():
            return (0.0 if torch.equal(a, b) else float("inf")), where
        same_nan = torch.isnan(a) == torch.isnan(b)
        if not bool(same_nan.all()):
            return float("inf"), f"{where}: NaN positions differ"
        d = (torch.nan_to_num(a, nan=0.0) - torch.nan_to_num(b, nan=0.0)).abs().max().item()
        return d, where
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        if set(a) != set(b):
            return float("inf"), f"{where}: keys {sorted(a)} vs {sorted(b)}"
        return max((_max_difference(a[k], b[k], f"{where}[{k!r}]") for k in a), key=lambda r: r[0], default=(0.0, where))
    if isinstance(a, Sequence) and isinstance(b, Sequence) and not isinstance(a, str):
        if len(a) != len(b):
            return float("inf"), f"{where}: {len(a)} vs {len(b)} items"
        return max((_max_difference(x, y, f"{where}[{i}]") for i, (x, y) in enumerate(zip(a, b))),
                   key=lambda r: r[0], default=(0.0, where))
    return (0.0 if a == b else float("inf")), where


def optimize_for_inference(
    model: nn.Module,
    example_input: Inputs,
    *,
    backend: Optional[str] = None,
    atol: Optional[float] = None,
) -> torch.jit.ScriptModule:
    """Trace and freeze a converted INT8 model for fast CPU inference.

    Args:
        model: a converted INT8 model (:func:`frostnet.quant.convert` / ``quantize_ptq``) in eval
            mode. A float model in eval mode works too (its outputs then agree within ``atol``:
            freezing folds BatchNorm into the convolutions, which changes float rounding).
        example_input: a float tensor (or tuple of tensors) with the shapes the optimized model
            will be called with; the result is specialized to them.
        backend: INT8 engine to trace under (``x86``, ``fbgemm``, ``qnnpack``); the engine the
            model was converted for. Default: the current ``torch.backends.quantized.engine``
            (which :func:`frostnet.quant.convert` sets). The optimized model must run under the
            same engine.
        atol: largest allowed absolute difference from the eager model's outputs. Default: 0
            (bitwise equal) for INT8 models, 1e-4 times the largest output magnitude for float
            models.

    Returns:
        A frozen ``torch.jit.ScriptModule`` whose outputs equal the eager model's.

    Raises:
        TypeError: ``model`` is not a module, or ``example_input`` is not float tensors.
        ValueError: the model is in training mode, prepared but not converted, fails on the
            example, or the optimized model's outputs differ from the eager model's.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a converted INT8 model), got {type(model).__name__}")
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError("model is already a TorchScript module; pass the eager model it came from")
    if model.training:
        raise ValueError(f"{type(model).__name__} is in training mode; call model.eval() first "
                         "(freezing bakes in eval-mode behaviour)")
    # observers hang off ``activation_post_process`` (a float FloatFunctional keeps an Identity there)
    prepared = [name for name, m in model.named_modules() if is_fake_quant_module(m) or not isinstance(
        getattr(m, "activation_post_process", None), (type(None), nn.Identity))]
    if prepared:
        raise ValueError(
            f"{type(model).__name__} is prepared for quantization but not converted (observers or fake quantization "
            f"in {prepared[0]!r}, ...); convert it first with frostnet.quant.convert(model, backend)"
        )
    inputs = _as_tuple(example_input)
    quantized = is_quantized_model(model)
    engine = check_backend(backend) if backend is not None else torch.backends.quantized.engine
    context = use_engine(engine) if backend is not None else contextlib.nullcontext()

    with context, torch.inference_mode(False), torch.no_grad():
        try:
            expected = model(*inputs)
        except Exception as e:
            shapes = ", ".join(str(tuple(t.shape)) for t in inputs)
            raise ValueError(f"{type(model).__name__} failed on the example input of shape {shapes}: {e}") from e
        checks = [(inputs, expected)]
        other = _mirrored(inputs)
        checks.append((other, model(*other)))
        # On x86 a dilated depthwise convolution runs tens of times slower than an undilated one:
        # try the phase-split form first (the same integer arithmetic), and keep it only if its
        # outputs are the eager model's.
        candidates = [model]
        if quantized and engine in ("x86", "fbgemm"):
            rewritten, names = split_dilated_depthwise(model, [x for x, _ in checks])
            if names:
                candidates.insert(0, rewritten)
        for candidate in candidates:
            frozen = _trace_and_freeze(candidate, inputs)
            failure = _first_difference(frozen, checks, atol, quantized)
            if failure is None:
                return frozen
        raise ValueError(f"the optimized {type(model).__name__} differs from the eager model on {failure}; the "
                         f"model may branch on its input data in Python, which tracing cannot follow (engine {engine!r})")


def _trace_and_freeze(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> torch.jit.ScriptModule:
    with _quiet_tracing():
        try:
            traced = torch.jit.trace(model, inputs, check_trace=False, strict=False)
        except RuntimeError as e:
            raise ValueError(
                f"{type(model).__name__} cannot be traced: {e}. Outputs must be tensors, or tuples, lists or "
                "dicts of tensors (nested lists of tuples are not: wrap the model in a module that flattens them)"
            ) from e
        return torch.jit.freeze(traced.eval())


def _first_difference(frozen: torch.jit.ScriptModule, checks: list[tuple[tuple[torch.Tensor, ...], Any]],
                      atol: Optional[float], quantized: bool) -> Optional[str]:
    """None if ``frozen`` reproduces every ``(inputs, expected)`` within tolerance, else where it does not."""
    for i, (x, want) in enumerate(checks):
        got = frozen(*x)
        tol = atol
        if tol is None:
            tol = 0.0 if quantized else 1e-4 * max(_max_abs(want), 1.0)
        diff, where = _max_difference(got, want)
        if not diff <= tol:
            which = "the example input" if i == 0 else "a mirrored copy of the example input"
            return f"{which}: max |difference| {diff:.3g} at {where} (allowed {tol:.3g})"
    return None


def _max_abs(value: Any) -> float:
    if isinstance(value, torch.Tensor):
        v = value.dequantize() if value.is_quantized else value
        return float(v.abs().max()) if v.is_floating_point() and v.numel() else 0.0
    if isinstance(value, Mapping):
        return max((_max_abs(v) for v in value.values()), default=0.0)
    if isinstance(value, Sequence) and not isinstance(value, str):
        return max((_max_abs(v) for v in value), default=0.0)
    return 0.0
