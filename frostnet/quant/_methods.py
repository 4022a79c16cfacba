"""QAT methods beside plain fake quantization: EWGS, OCTAV with magnitude-aware gradients, and the
integer-weight bookkeeping that transition-rate scheduling (:mod:`frostnet.optim.transition`) reads.

Every module here plugs into the eager ``torch.ao.quantization`` flow through a :class:`QConfig`:
:func:`frostnet.quant.prepare_qat` inserts them like the default fake quantizers and
:func:`frostnet.quant.convert` turns the trained model into ordinary INT8 modules for x86, fbgemm or
qnnpack (both subclass :class:`~torch.ao.quantization.FakeQuantize`, so conversion reads their
``calculate_qparams()`` and ``quant_min``/``quant_max`` like any other fake quantizer)::

    qconfig = get_method_qconfig("octav", "x86", weight_quant_range=(-8, 7), act_quant_range=(0, 15))
    prepare_qat(model, "x86", qconfig=qconfig)      # W4A4 simulated, still INT8-convertible
    ...train...
    int8 = convert(model, "x86")

EWGS (Lee et al., "Network Quantization with Element-wise Gradient Scaling", CVPR 2021)
    :class:`EWGSFakeQuantize` learns the interval ``[l, u]`` of a quantizer (Eqs. 1-3) and scales
    each gradient element in the backward pass by ``1 + delta sign(g) (x_n - x_q)`` (Eq. 4); one
    interval per tensor as in the paper, except x86/fbgemm weights, which learn one per output
    channel so that the INT8 model keeps those backends' per-channel layout.
    :func:`update_ewgs_deltas` sets ``delta = max(0, (Tr(H)/N) / (3 std(g)))`` per quantizer from a
    Hutchinson estimate of the Hessian trace (Eqs. 8-10); call it every k iterations.

OCTAV and MAD (Sakr et al., "Optimal Clipping and Magnitude-aware Differentiation for Improved
Quantization-aware Training", ICML 2022)
    :func:`octav_clip` is the Newton-Raphson recursion for the MSE-optimal clipping scalar
    (Corollary 3.2 and its unsigned form in Appendix A). :class:`OctavObserver` uses it for static
    calibration (PTQ, or the first batches of QAT); :class:`OctavFakeQuantize` recomputes it every
    step (dynamic) and back-propagates with the magnitude-aware derivative (MAD, Sec. 4.2) or
    piece-wise linear (PWL) gradients; the paper's "MPH" is MAD for weights and PWL for activations.

A note on names: torch's default fake quantizer passes the gradient inside the clipping range and
zeroes it outside, which the OCTAV paper calls PWL; the OCTAV paper's "STE" passes it everywhere.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.ao.quantization import FakeQuantize, FakeQuantizeBase, MinMaxObserver, PerChannelMinMaxObserver, QConfig
from torch.ao.quantization.observer import UniformQuantizationObserverBase

from ._eager import _ACT_QUANT_MAX, _PER_CHANNEL, check_backend, get_qconfig

__all__ = [
    "EWGSFakeQuantize",
    "FoldTracker",
    "OCTAV_GRADIENTS",
    "OctavFakeQuantize",
    "OctavObserver",
    "QAT_METHODS",
    "WeightQuantGrid",
    "bn_fold",
    "clipped_quantization_mse",
    "copy_ewgs_bounds",
    "ewgs_parameters",
    "freeze_weight_quantizer",
    "get_ewgs_qconfig",
    "get_method_qconfig",
    "get_octav_qconfig",
    "octav_clip",
    "update_ewgs_deltas",
    "weight_levels",
    "weight_quant_grid",
    "weight_quantized_modules",
]

#: QAT methods of :func:`get_method_qconfig`: ``ste`` is torch's default fake quantization.
QAT_METHODS: tuple[str, ...] = ("ste", "ewgs", "octav")
#: Gradient estimators of OCTAV QAT: ``mph`` = MAD for weights, PWL for activations (the paper's).
OCTAV_GRADIENTS: tuple[str, ...] = ("mph", "mad", "pwl", "ste")
_CLIP_GRADIENTS = ("mad", "pwl", "ste")


def _bits(quant_min: int, quant_max: int) -> float:
    """Bit width B of a quantization range: 2**B = number of levels (fractional if not a power)."""
    return math.log2(quant_max - quant_min + 1)


# ---------------------------------------------------------------------------------------------
# OCTAV: the optimal clipping scalar
# ---------------------------------------------------------------------------------------------


def _rows(x: Tensor, ch_axis: Optional[int]) -> Tensor:
    """``x`` as a 2-D tensor: one row per channel of ``ch_axis``, or a single row."""
    if ch_axis is None:
        return x.reshape(1, -1)
    return x.movedim(ch_axis, 0).reshape(x.shape[ch_axis], -1)


@torch.no_grad()
def octav_clip(
    x: Tensor,
    bits: float,
    *,
    unsigned: bool = False,
    ch_axis: Optional[int] = None,
    iterations: int = 10,
    init: Optional[Tensor] = None,
) -> Tensor:
    r"""The clipping scalar :math:`s^*` that minimises the clipped quantization MSE of ``x``.

    OCTAV (Corollary 3.2): starting from a guess :math:`s_1`, iterate

    .. math::
        s_{n+1} = \frac{\sum_i |x_i| \, 1\{|x_i| > s_n\}}
                       {\frac{4^{-B}}{3} \sum_i 1\{0 < |x_i| \le s_n\} + \sum_i 1\{|x_i| > s_n\}}

    which is Newton-Raphson on :math:`J(s)` (see :func:`clipped_quantization_mse`). Zeros are left
    out of the discretization term (integer quantization represents them exactly). For unsigned
    data (Appendix A) the factor is :math:`4^{-B}/12` and :math:`x` replaces :math:`|x|`.

    The default first guess is :math:`s_1 = E[|x| \mid x \neq 0]`, the value the recursion reaches
    in two steps from the paper's :math:`s_{max}` (:math:`s_{max} \to 0 \to E[|x| \mid x \neq 0]`);
    the same two steps are taken in one whenever no element exceeds :math:`s_n`, which also makes
    data whose non-zero magnitudes are all equal converge (to that magnitude) instead of
    oscillating. The loop stops early once :math:`s` no longer changes (the set
    :math:`\{|x| > s\}` is then stable, so it is an exact fixed point). Ten steps are enough from
    a nearby guess (``init``: e.g. the previous step's value); from :math:`s_1` at 8 bits the
    recursion needs about 20 (10 leave the MSE ~0.1% above its minimum).

    Args:
        x: the data (a weight tensor, or a batch of activations).
        bits: :math:`B`; fractional values are allowed (``log2`` of the number of levels).
        unsigned: quantization over :math:`[0, s]`; negative values are ignored.
        ch_axis: one clipping scalar per index of this axis (per-channel weights), else one.
        iterations: at most this many Newton-Raphson steps (the paper uses 10).
        init: first guess :math:`s_1` (one value, or one per channel); default
            :math:`E[|x| \mid x \neq 0]`.

    Returns:
        A 1-element tensor, or one value per channel of ``ch_axis`` (same dtype as ``x``, >= 0).
    """
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations!r}")
    data = x.detach()
    mags = _rows(data.clamp_min(0.0) if unsigned else data.abs(), ch_axis)
    noise = 4.0 ** (-bits) / (12.0 if unsigned else 3.0)
    nonzero = (mags > 0).sum(dim=1).to(mags.dtype)
    restart = mags.sum(dim=1) / nonzero.clamp_min(1.0)
    s = restart if init is None else init.detach().to(restart).reshape(-1).expand_as(restart).clamp_min(0.0)
    zero = torch.zeros((), dtype=mags.dtype, device=mags.device)
    for _ in range(iterations):
        above = mags > s[:, None]
        n_above = above.sum(dim=1).to(mags.dtype)
        clipped = torch.where(above, mags, zero).sum(dim=1)
        denominator = noise * (nonzero - n_above) + n_above
        s_next = torch.where(n_above > 0, clipped / denominator.clamp_min(1e-30), restart)
        if torch.equal(s_next, s):
            break
        s = s_next
    return s


def clipped_quantization_mse(
    x: Tensor, s: Tensor | float, bits: float, *, unsigned: bool = False, ch_axis: Optional[int] = None
) -> Tensor:
    r"""The OCTAV paper's model of the clipped quantization MSE (Eq. 4), per element of ``x``:

    .. math::
        J(s) = \frac{4^{-B}}{3} s^2 \, E\big[1\{0 < |x| \le s\}\big] + E\big[(|x| - s)^2 \, 1\{|x| > s\}\big]

    (:math:`4^{-B}/12` and :math:`x` for unsigned data). :func:`octav_clip` minimises it.
    ``s`` may hold one value per channel of ``ch_axis``.
    """
    mags = _rows(x.detach().clamp_min(0.0) if unsigned else x.detach().abs(), ch_axis)
    s = torch.as_tensor(s, dtype=mags.dtype, device=mags.device).reshape(-1, 1)
    noise = 4.0 ** (-bits) / (12.0 if unsigned else 3.0)
    inside = (mags > 0) & (mags <= s)
    clipped = (mags - s).clamp_min(0.0)
    return (noise * s.square() * inside + clipped.square()).mean(dim=1)


class OctavObserver(UniformQuantizationObserverBase):
    """Observer whose quantization range is the OCTAV-optimal clipping range.

    Symmetric qschemes (weights) clip to :math:`[-s, s]` with the signed recursion, per channel for
    per-channel qschemes. Affine qschemes (activations, per tensor) use the unsigned recursion on
    :math:`[0, s]` when the batch is non-negative; a batch with negative values gets the signed
    :math:`s` and the range :math:`[\\max(\\min x, -s), \\min(\\max x, s)]` (the signed clipping
    range narrowed to the data, which can only lower the MSE; the paper treats only the purely
    signed and unsigned cases).

    Each batch's recursion starts from the stored range (10 steps then reach the fixed point).
    Successive batches are combined as a running mean of their ranges (``averaging_constant=None``:
    static calibration, the paper's averaging over calibration batches) or an exponential moving
    average (``averaging_constant=c``; 1.0 keeps the latest batch only).

    Args:
        dtype, qscheme, quant_min, quant_max, eps: as for torch's observers.
        ch_axis: channel axis of per-channel qschemes.
        averaging_constant: None for the running mean, else the EMA weight of a new batch.
        iterations: Newton-Raphson steps of :func:`octav_clip`.
    """

    min_val: Tensor
    max_val: Tensor
    num_batches: Tensor

    def __init__(
        self,
        dtype: torch.dtype = torch.quint8,
        qscheme: torch.qscheme = torch.per_tensor_affine,
        quant_min: Optional[int] = None,
        quant_max: Optional[int] = None,
        ch_axis: int = 0,
        averaging_constant: Optional[float] = None,
        iterations: int = 10,
        factory_kwargs: Optional[dict[str, Any]] = None,
        eps: float = torch.finfo(torch.float32).eps,
        is_dynamic: bool = False,
        **kwargs: Any,
    ) -> None:
        if qscheme == torch.per_channel_affine or qscheme == torch.per_channel_affine_float_qparams:
            raise NotImplementedError("OctavObserver supports per-channel symmetric and per-tensor qschemes only")
        if averaging_constant is not None and not 0.0 < averaging_constant <= 1.0:
            raise ValueError(f"averaging_constant must be None or in (0, 1], got {averaging_constant!r}")
        if iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {iterations!r}")
        super().__init__(dtype=dtype, qscheme=qscheme, quant_min=quant_min, quant_max=quant_max,
                         factory_kwargs=factory_kwargs, eps=eps, is_dynamic=is_dynamic, **kwargs)
        factory_kwargs = torch.nn.factory_kwargs(factory_kwargs)
        self.ch_axis = ch_axis
        self.per_channel = qscheme == torch.per_channel_symmetric
        self.symmetric = qscheme in (torch.per_tensor_symmetric, torch.per_channel_symmetric)
        self.averaging_constant = averaging_constant
        self.iterations = iterations
        self.bits = _bits(self.quant_min, self.quant_max)
        # Empty until the first batch (one value per tensor, or per channel).
        self.register_buffer("min_val", torch.tensor([], **factory_kwargs))
        self.register_buffer("max_val", torch.tensor([], **factory_kwargs))
        self.register_buffer("num_batches", torch.tensor(0, dtype=torch.long))

    @torch.no_grad()
    def batch_range(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The OCTAV clipping range (low, high) of this batch alone (1 value, or 1 per channel)."""
        x = x.detach().to(torch.float32)
        # Warm start from the stored range: a few Newton steps then suffice (see octav_clip).
        init = torch.maximum(-self.min_val, self.max_val) if self.min_val.numel() > 0 else None
        if self.symmetric:
            ch_axis = self.ch_axis if self.per_channel else None
            if init is not None and init.numel() != (x.shape[self.ch_axis] if self.per_channel else 1):
                init = None
            s = octav_clip(x, self.bits, ch_axis=ch_axis, iterations=self.iterations, init=init)
            return -s, s
        low, high = torch.aminmax(x)
        if low >= 0:
            s = octav_clip(x, self.bits, unsigned=True, iterations=self.iterations, init=init)
            return torch.zeros_like(s), s
        s = octav_clip(x, self.bits, iterations=self.iterations, init=init)
        return torch.maximum(-s, low.reshape(1)), torch.minimum(s, high.reshape(1))

    @torch.no_grad()
    def update(self, low: Tensor, high: Tensor) -> None:
        """Fold one batch's range into the stored range (running mean or EMA)."""
        if self.min_val.numel() == 0 or self.min_val.shape != low.shape:
            self.min_val.resize_(low.shape).copy_(low)
            self.max_val.resize_(high.shape).copy_(high)
        else:
            weight = self.averaging_constant or 1.0 / (float(self.num_batches) + 1.0)
            self.min_val.lerp_(low.to(self.min_val), weight)
            self.max_val.lerp_(high.to(self.max_val), weight)
        self.num_batches += 1

    def forward(self, x_orig: Tensor) -> Tensor:
        if x_orig.numel() == 0:
            return x_orig
        self.update(*self.batch_range(x_orig))
        return x_orig

    @torch.jit.export
    def calculate_qparams(self) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        return self._calculate_qparams(self.min_val, self.max_val)

    def extra_repr(self) -> str:
        return (f"bits={self.bits:g}, averaging_constant={self.averaging_constant}, "
                f"min_val={self.min_val}, max_val={self.max_val}")

    @torch.jit.export
    def reset_min_max_vals(self) -> None:
        self.min_val.resize_(0)
        self.max_val.resize_(0)
        self.num_batches.zero_()

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # The stored range is empty until observed: size it to the checkpoint's before loading.
        for name in ("min_val", "max_val"):
            if prefix + name in state_dict:
                getattr(self, name).resize_(state_dict[prefix + name].shape)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class _ClippedFakeQuantizeFn(torch.autograd.Function):
    """Fake quantization with the gradient of Sec. 4 of the OCTAV paper outside the clip range.

    Inside (elements whose rounded level lies in [quant_min, quant_max]) the gradient passes
    unchanged. Outside: ``"pwl"`` zeroes it (torch's default), ``"ste"`` passes it, and ``"mad"``
    multiplies it by :math:`\\alpha = s / |x|`, i.e. ``clip(x) / x`` (Proposition 4.3 and Eq. 10).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: Tensor, zero_point: Tensor, enabled: Tensor,  # type: ignore[override]
                ch_axis: Optional[int], quant_min: int, quant_max: int, gradient: str) -> Tensor:
        if ch_axis is None:
            y, inside = torch.ops.aten._fake_quantize_per_tensor_affine_cachemask_tensor_qparams(
                x, scale, zero_point, enabled, quant_min, quant_max)
        else:
            y, inside = torch.ops.aten.fake_quantize_per_channel_affine_cachemask(
                x, scale, zero_point, ch_axis, quant_min, quant_max)
        ctx.gradient = gradient
        if gradient == "mad":
            # alpha = clip(x) / x; clipped elements are never 0 (0 is always a level), the guard
            # only keeps the unused branch of torch.where finite.
            safe_x = torch.where(inside, torch.ones_like(x), x)
            ctx.save_for_backward(torch.where(inside, torch.ones_like(x), y / safe_x))
        elif gradient == "pwl":
            ctx.save_for_backward(inside)
        return y

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Optional[Tensor], ...]:  # type: ignore[override]
        if ctx.gradient == "ste":
            grad_x = grad
        else:
            (factor,) = ctx.saved_tensors
            grad_x = grad * factor
        return grad_x, None, None, None, None, None, None, None


class OctavFakeQuantize(FakeQuantize):
    """Fake quantization with OCTAV clipping and MAD / PWL / STE gradients.

    In training with ``dynamic=True`` every forward pass clips with the OCTAV range of the current
    tensor (the paper's dynamic quantization); the observer also keeps a running range (EMA for
    activations, the latest value for weights), which the ``scale``/``zero_point`` buffers hold and
    evaluation-mode forward passes, a disabled observer and :func:`~frostnet.quant.convert` use. With ``dynamic=False`` (static-OCTAV) the range is the
    mean over the first ``calib_batches`` observed batches and is frozen afterwards (the observer
    disables itself). As with torch's fake quantizers, the observer runs whenever it is enabled
    (also in evaluation mode, which is how cross-backend calibration works).

    Args:
        observer: an :class:`OctavObserver` constructor (``OctavObserver.with_args(...)``).
        quant_min, quant_max: the simulated integer range (e.g. -8, 7 for 4-bit weights).
        gradient: ``"mad"``, ``"pwl"`` or ``"ste"`` for the clipped elements.
        dynamic: recompute the clipping range every training step.
        calib_batches: static mode: batches averaged before the range freezes.
        **observer_kwargs: dtype, qscheme, ch_axis, averaging_constant, iterations.
    """

    def __init__(
        self,
        observer: Any = OctavObserver,
        quant_min: Optional[int] = None,
        quant_max: Optional[int] = None,
        *,
        gradient: str = "mad",
        dynamic: bool = True,
        calib_batches: int = 5,
        **observer_kwargs: Any,
    ) -> None:
        if gradient not in _CLIP_GRADIENTS:
            raise ValueError(f"unknown OCTAV gradient {gradient!r}; valid choices: {', '.join(_CLIP_GRADIENTS)}")
        if calib_batches < 1:
            raise ValueError(f"calib_batches must be >= 1, got {calib_batches!r}")
        super().__init__(observer=observer, quant_min=quant_min, quant_max=quant_max, **observer_kwargs)
        if not isinstance(self.activation_post_process, OctavObserver):
            raise TypeError(f"OctavFakeQuantize needs an OctavObserver, got {type(self.activation_post_process).__name__}")
        self.gradient = gradient
        self.dynamic = dynamic
        self.calib_batches = calib_batches

    def forward(self, X: Tensor) -> Tensor:
        obs: OctavObserver = self.activation_post_process  # type: ignore[assignment]
        batch_qparams = None
        if self.observer_enabled[0] == 1 and X.numel() > 0:
            low, high = obs.batch_range(X)
            obs.update(low, high)
            if self.training and self.dynamic:
                batch_qparams = obs._calculate_qparams(low, high)
            # The buffers hold the running range: what evaluation, a frozen observer and
            # conversion (calculate_qparams) use.
            scale, zero_point = obs.calculate_qparams()
            with torch.no_grad():
                if self.scale.shape != scale.shape:
                    self.scale.resize_(scale.shape)
                    self.zero_point.resize_(zero_point.shape)
                self.scale.copy_(scale)
                self.zero_point.copy_(zero_point)
            if not self.dynamic and int(obs.num_batches) >= self.calib_batches:
                self.disable_observer()
        if self.fake_quant_enabled[0] == 1:
            scale, zero_point = batch_qparams if batch_qparams is not None else (self.scale, self.zero_point)
            X = _ClippedFakeQuantizeFn.apply(
                X, scale.to(X.device), zero_point.to(device=X.device, dtype=torch.int32), self.fake_quant_enabled,
                self.ch_axis if self.is_per_channel else None, obs.quant_min, obs.quant_max, self.gradient)
        return X

    def extra_repr(self) -> str:
        return f"gradient={self.gradient!r}, dynamic={self.dynamic}, " + super().extra_repr()


# ---------------------------------------------------------------------------------------------
# EWGS: learnable interval, element-wise gradient scaling
# ---------------------------------------------------------------------------------------------


_MIN_WIDTH = 1e-8
_MIN_FOLD = 1e-12  # |BN factor| floor, so a zeroed gamma cannot make a grid ratio infinite


def _channel_shape(x: Tensor, ch_axis: Optional[int]) -> list[int]:
    """Shape that broadcasts a per-channel vector along ``ch_axis`` of ``x`` (all ones if None)."""
    shape = [1] * x.dim()
    if ch_axis is not None:
        shape[ch_axis] = -1
    return shape


def _ewgs_grid(lower: Optional[Tensor], upper: Tensor, quant_min: int, quant_max: int) -> tuple[Tensor, Tensor]:
    """(scale, zero point) of the interval, shaped like ``upper`` (one value, or one per channel).

    Affine (``lower`` given): the interval :math:`[\\min(l, 0), \\max(u, 0)]` (INT8 needs 0 in the
    range, as torch's observers do), split into ``quant_max - quant_min`` steps and shifted by
    less than half a step so that 0 is a level. Symmetric (``lower`` None): the interval
    :math:`[u \\, q_{min} / q_{max}, u]` with zero point 0.
    """
    if lower is None:
        scale = upper.detach().clamp_min(_MIN_WIDTH) / quant_max
        return scale, torch.zeros_like(scale, dtype=torch.int32)
    low = lower.detach().clamp_max(0.0)
    high = upper.detach().clamp_min(0.0)
    scale = (high - low).clamp_min(_MIN_WIDTH) / (quant_max - quant_min)
    zero_point = torch.clamp(torch.round(quant_min - low / scale), quant_min, quant_max)
    return scale, zero_point.to(torch.int32)


class _EWGSFn(torch.autograd.Function):
    r"""Forward: ``(clamp(round(x / scale) + zp, qmin, qmax) - zp) * scale`` (torch's fake quant).

    Backward (EWGS paper, Eq. 4, in the paper's normalised units where
    :math:`x_n - x_q = (\mathrm{clamp}(c, q_{min}, q_{max}) - q) / (q_{max} - q_{min})`,
    :math:`c = x / scale + zp` and :math:`q` the integer level):

    .. math::
        g_x = g \, m \, (1 + \delta \, \mathrm{sign}(g) (x_n - x_q))

    with :math:`m` torch's in-range mask (:math:`\mathrm{round}(c) \in [q_{min}, q_{max}]`: half a
    step wider than the clip of Eq. 1, so that :math:`\delta = 0` is exactly torch's
    straight-through gradient); the gradients of the bounds follow from
    :math:`Q(x) = l + (u - l) x_q` with the same scaled round derivative (zero point treated as
    :math:`l`, i.e. straight through its snapping). Per-channel intervals (``ch_axis``) get one
    bound gradient per channel. The backward is written with differentiable operations on
    :math:`g`, so a Hessian-vector product can pass through it (Hutchinson).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, lower: Optional[Tensor], upper: Tensor, delta: Tensor,  # type: ignore[override]
                quant_min: int, quant_max: int, ch_axis: Optional[int]) -> Tensor:
        scale, zero_point = _ewgs_grid(lower, upper, quant_min, quant_max)
        shape = _channel_shape(x, ch_axis)
        scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
        inv_scale = 1.0 / scale
        scaled = x * inv_scale
        rounded = torch.round(scaled)
        levels = torch.clamp(rounded + zero_point, quant_min, quant_max)
        ctx.save_for_backward(scaled, rounded, levels, zero_point, delta)
        ctx.quant_range = (quant_min, quant_max)
        ctx.symmetric = lower is None
        ctx.ch_axis = ch_axis
        return (levels - zero_point) * scale

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Optional[Tensor], ...]:  # type: ignore[override]
        scaled, rounded, levels, zero_point, delta = ctx.saved_tensors
        quant_min, quant_max = ctx.quant_range
        n = quant_max - quant_min
        latent = scaled + zero_point                          # c = x / scale + zp
        # torch's in-range mask (so that delta = 0 is exactly torch's straight-through gradient)
        inside = ((rounded + zero_point) >= quant_min) & ((rounded + zero_point) <= quant_max)
        error = (latent.clamp(quant_min, quant_max) - levels) / n   # x_n - x_q, x_n clipped (Eq. 1)
        factor = inside * (1.0 + delta * torch.sign(grad) * error)
        grad_x = grad * factor
        grad_lower = grad_upper = None
        need_lower = ctx.needs_input_grad[1]
        if need_lower or ctx.needs_input_grad[2]:
            ch_axis = ctx.ch_axis
            dims = [d for d in range(grad.dim()) if d != ch_axis]

            def reduce(t: Tensor) -> Tensor:
                return t.sum(dim=dims) if ch_axis is not None else t.sum().reshape(1)

            if ctx.symmetric:
                # Q = scale * q with scale = u / qmax
                grad_upper = reduce(grad * (levels - factor * latent)) / quant_max
            else:
                # Q = l + scale (q - qmin), c - qmin = (x - l) / scale, scale = (u - l) / n
                grad_step = reduce(grad * ((levels - quant_min) - factor * (latent - quant_min)))
                grad_upper = grad_step / n
                grad_lower = reduce(grad * (1.0 - factor)) - grad_step / n
        return grad_x, grad_lower if need_lower else None, grad_upper, None, None, None, None


class EWGSFakeQuantize(FakeQuantize):
    r"""Fake quantization with a learnable interval and EWGS gradients (EWGS paper, Sec. 3).

    The interval :math:`[l, u]` is split into ``quant_max - quant_min`` equal steps (Eqs. 1-3 with
    the INT8 grid): ``scale = (u - l) / (qmax - qmin)``. Adaptations that make the result an
    INT8 tensor the backends accept:

    * affine qschemes (activations) learn :math:`l` and :math:`u`; the grid covers
      :math:`[\min(l, 0), \max(u, 0)]`, shifted by less than half a step so that 0 is a level (the
      integer zero point); the gradient treats the shifted lower bound as :math:`l`.
    * symmetric qschemes (weights, zero point 0) learn only :math:`u`; :math:`l = u \cdot q_{min} / q_{max}`
      (the paper's output :math:`2(x_q - 0.5)` has no zero level and is not representable).
    * ``per_channel_symmetric`` (weights on every engine, whose INT8 weights are per channel)
      learns one :math:`u` per channel of ``ch_axis``, so the INT8 model has the layout of every
      other model of that engine; the paper's one interval per quantizer is the per-tensor case
      (``per_channel=False`` in :func:`get_ewgs_qconfig`).
      :math:`\delta` stays one value per quantizer.

    The bounds are set on the first forward pass (Sec. 4.1): weights :math:`u = 3\sigma(w)` (per
    channel: of that channel); non-negative activations :math:`l = 0, u = 3\sigma(a) / \sqrt{1 - 2/\pi}`;
    activations with negative values :math:`[\max(\min a, \mu - 3\sigma), \min(\max a, \mu + 3\sigma)]`.

    ``delta`` (a buffer, 0 at first: plain STE) is the EWGS scaling factor; set it with
    :func:`update_ewgs_deltas`. ``observer_enabled`` only governs the initialisation (the
    observer module itself is never run).
    """

    delta: Tensor
    initialized: Tensor

    def __init__(
        self, observer: Any = MinMaxObserver, quant_min: Optional[int] = None, quant_max: Optional[int] = None,
        **observer_kwargs: Any,
    ) -> None:
        factory_kwargs = torch.nn.factory_kwargs(observer_kwargs.get("factory_kwargs"))
        super().__init__(observer=observer, quant_min=quant_min, quant_max=quant_max, **observer_kwargs)
        self.symmetric = self.qscheme in (torch.per_tensor_symmetric, torch.per_channel_symmetric)
        if self.is_per_channel and self.qscheme != torch.per_channel_symmetric:
            raise ValueError(f"per-channel EWGS intervals must be symmetric (weights): use per_channel_symmetric or a "
                             f"per-tensor qscheme, got {self.qscheme}")
        qmin, qmax = self.activation_post_process.quant_min, self.activation_post_process.quant_max
        if self.symmetric and not qmin < 0 < qmax:
            raise ValueError(f"a symmetric EWGS quantizer needs a signed range, got [{qmin}, {qmax}]")
        # Per-channel bounds get their length on the first forward pass (or from a state dict).
        self.upper = nn.Parameter(torch.ones(1, **factory_kwargs))
        self.lower: Optional[nn.Parameter] = None if self.symmetric else nn.Parameter(torch.zeros(1, **factory_kwargs))
        self.register_buffer("delta", torch.zeros(1, **factory_kwargs))
        self.register_buffer("initialized", torch.zeros(1, dtype=torch.uint8))
        # A list while update_ewgs_deltas records the outputs (see _capture_ewgs_outputs).
        self._captured: Optional[list[Tensor]] = None

    @property
    def lower_bound(self) -> Tensor:
        """:math:`l` (derived from :math:`u` for symmetric quantizers)."""
        if self.lower is None:
            return self.upper * (self.activation_post_process.quant_min / self.activation_post_process.quant_max)
        return self.lower

    def interval_width(self, like: Tensor) -> Tensor:
        """:math:`u - l` of the grid in use, shaped to broadcast against ``like`` (an input)."""
        scale, _ = self.calculate_qparams()
        n = self.activation_post_process.quant_max - self.activation_post_process.quant_min
        return (scale * n).reshape(_channel_shape(like, self.ch_axis if self.is_per_channel else None))

    @torch.no_grad()
    def _initialize(self, x: Tensor) -> None:
        x = x.detach().to(torch.float32)
        std, mean = torch.std_mean(x) if x.numel() > 1 else (x.abs().sum(), x.sum())
        if self.symmetric:
            u = torch.full((1,), max(3.0 * float(std), _MIN_WIDTH))
            if self.is_per_channel:
                rows = x.movedim(self.ch_axis, 0).reshape(x.shape[self.ch_axis], -1)
                u = 3.0 * rows.std(dim=1) if rows.shape[1] > 1 else u.expand(rows.shape[0])
                # a constant channel has no spread: give it the tensor's interval
                u = torch.where(u > _MIN_WIDTH, u, torch.full_like(u, max(3.0 * float(std), _MIN_WIDTH)))
            self.upper.data = u.to(self.upper)
        else:
            low, high = (float(v) for v in torch.aminmax(x))
            if low >= 0:
                lower, upper = 0.0, 3.0 * float(std) / math.sqrt(1.0 - 2.0 / math.pi)
            else:
                lower = max(low, float(mean - 3.0 * std))
                upper = min(high, float(mean + 3.0 * std))
            self.lower.fill_(lower)  # type: ignore[union-attr]
            self.upper.fill_(max(upper, lower + 1e-3 * max(1.0, abs(lower))))
        self.initialized.fill_(1)

    def calculate_qparams(self) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        return _ewgs_grid(self.lower, self.upper, self.activation_post_process.quant_min,
                          self.activation_post_process.quant_max)

    def forward(self, X: Tensor) -> Tensor:
        if self.observer_enabled[0] == 1 and self.initialized[0] == 0:
            self._initialize(X)
        with torch.no_grad():
            scale, zero_point = self.calculate_qparams()
            if self.scale.shape != scale.shape:
                self.scale.resize_(scale.shape)
                self.zero_point.resize_(zero_point.shape)
            self.scale.copy_(scale)
            self.zero_point.copy_(zero_point)
        if self.fake_quant_enabled[0] == 1:
            X = _EWGSFn.apply(X, self.lower, self.upper, self.delta, self.activation_post_process.quant_min,
                              self.activation_post_process.quant_max, self.ch_axis if self.is_per_channel else None)
            if self._captured is not None:
                self._captured.append(X)
        return X

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # Per-channel bounds are sized on the first forward pass: take the checkpoint's size.
        saved = state_dict.get(prefix + "upper")
        if isinstance(saved, Tensor) and saved.shape != self.upper.shape:
            with torch.no_grad():
                self.upper.data = torch.empty_like(saved, dtype=self.upper.dtype, device=self.upper.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        with torch.no_grad():
            low, high = self.lower_bound.detach(), self.upper.detach()
        bounds = (f"lower={float(low):.4g}, upper={float(high):.4g}" if high.numel() == 1
                  else f"upper=[{high.numel()} channels]")
        return f"{bounds}, delta={float(self.delta):.4g}, " + super().extra_repr()


def ewgs_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The interval bounds of every :class:`EWGSFakeQuantize` in ``model`` (to hand to an optimizer)."""
    return [p for m in model.modules() if isinstance(m, EWGSFakeQuantize) for p in (m.lower, m.upper) if p is not None]


@torch.no_grad()
def copy_ewgs_bounds(source: nn.Module, target: nn.Module) -> int:
    """Copy the learned intervals and deltas of ``source``'s EWGS quantizers into the same-named
    ones of ``target`` (e.g. the model prepared for another backend); returns how many were copied.

    A per-channel interval copied into a per-tensor quantizer (``per_channel=False``) becomes the
    widest channel's interval, so no channel is clipped more than it was in training.
    """
    theirs = {n: m for n, m in source.named_modules() if isinstance(m, EWGSFakeQuantize)}
    copied = 0
    for name, mine in target.named_modules():
        src = theirs.get(name)
        if not isinstance(mine, EWGSFakeQuantize) or src is None or mine.symmetric != src.symmetric:
            continue
        upper = src.upper.detach()
        if mine.is_per_channel and src.is_per_channel:
            mine.upper.data = upper.clone()
        else:
            mine.upper.data = upper.max().reshape(1).clone() if upper.numel() > 1 else upper.clone()
        if mine.lower is not None:
            mine.lower.copy_(src.lower)  # type: ignore[arg-type]
        mine.delta.copy_(src.delta)
        mine.initialized.copy_(src.initialized)
        copied += 1
    return copied


@contextlib.contextmanager
def _capture_ewgs_outputs(modules: Sequence[EWGSFakeQuantize]) -> Iterator[None]:
    for m in modules:
        m._captured = []
    try:
        yield
    finally:
        for m in modules:
            m._captured = None


def update_ewgs_deltas(
    model: nn.Module,
    loss_fn: Callable[[], Tensor],
    *,
    samples: int = 1,
    generator: Optional[torch.Generator] = None,
) -> dict[str, float]:
    r"""Set every EWGS quantizer's ``delta`` from the Hessian of the loss (EWGS paper, Eqs. 8-10).

    One forward/backward of ``loss_fn()`` (which must run ``model`` and return the loss) records
    each quantizer's output :math:`Q` and gradient :math:`g_Q = \partial L / \partial Q`. In the
    paper's units (discrete values :math:`x_q \in [0, 1]`, :math:`Q = l + (u - l) x_q`, so
    :math:`g_{x_q} = (u - l) g_Q` and :math:`H_{x_q} = D H_Q D` with :math:`D = \mathrm{diag}(u - l)`,
    per element: per channel for per-channel intervals):

    .. math::
        \delta = \max\Big(0, \frac{\mathrm{Tr}(H_{x_q}) / N}{3 \sigma(g_{x_q})}\Big), \qquad
        \mathrm{Tr}(H_{x_q}) \approx v^T H_{x_q} v = (D v)^T H_Q (D v)

    Hutchinson's estimate uses Rademacher :math:`v` (Eqs. 8-9) and :math:`H_Q (Dv)` from a second
    backward pass through :math:`g_Q^T (D v)`, for all quantizers at once (their vectors are
    independent, so the cross terms vanish in expectation), averaged over ``samples`` vectors.

    Model buffers (BN running statistics, observers) are restored afterwards and the global RNG is
    left untouched, so the extra pass does not change the training run it is called from. Under
    ``torch.distributed`` the deltas are averaged over the ranks (each estimated on its own batch).

    Args:
        model: a model prepared with :func:`get_ewgs_qconfig` (not DDP-wrapped), after at least
            one training forward pass (which sets the intervals).
        loss_fn: runs ``model`` on a batch and returns the scalar loss.
        samples: Rademacher vectors per estimate.
        generator: source of the Rademacher vectors (default: the global RNG, whose state is
            restored afterwards, so the draws are reproducible from it).

    Returns:
        The new delta of every EWGS quantizer, by module name.

    Raises:
        ValueError: ``model`` has no EWGS quantizers, or one has no interval yet.
    """
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples!r}")
    named = [(n, m) for n, m in model.named_modules() if isinstance(m, EWGSFakeQuantize)]
    if not named:
        raise ValueError(f"{type(model).__name__} has no EWGS quantizers; prepare it with get_ewgs_qconfig")
    modules = [m for _, m in named]
    fresh = [n for n, m in named if int(m.initialized[0]) == 0]
    if fresh:
        raise ValueError(f"EWGS quantizers {fresh[:3]} have no interval yet; run a training forward pass before "
                         "estimating their deltas")
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    devices = sorted({b.device for b in buffers.values() if b.device.type == "cuda"}, key=str)
    traces = torch.zeros(len(modules), dtype=torch.float64)
    stds = torch.zeros(len(modules), dtype=torch.float64)
    counts = torch.zeros(len(modules), dtype=torch.float64)
    try:
        with torch.random.fork_rng(devices=devices), _capture_ewgs_outputs(modules), torch.enable_grad():
            loss = loss_fn()
            outputs = [(i, y) for i, m in enumerate(modules) for y in (m._captured or []) if y.requires_grad]
            grads = torch.autograd.grad(loss, [y for _, y in outputs], create_graph=True, allow_unused=True)
            used = []
            for (i, y), g in zip(outputs, grads):
                if g is None:
                    continue
                width = modules[i].interval_width(y).detach()
                g_xq = g.detach() * width
                stds[i] += float(g_xq.std()) if g_xq.numel() > 1 else 0.0
                counts[i] += 1
                if g.requires_grad:
                    used.append((i, y, g, width))
            for k in range(samples):
                dvs = [(torch.randint(0, 2, y.shape, generator=generator, device="cpu").to(y.device, y.dtype) * 2 - 1)
                       * width for _, y, _, width in used]
                hvs = torch.autograd.grad([g for _, _, g, _ in used], [y for _, y, _, _ in used], grad_outputs=dvs,
                                          retain_graph=k < samples - 1, allow_unused=True)
                for (i, y, _, _), dv, hv in zip(used, dvs, hvs):
                    if hv is not None:
                        traces[i] += float((dv * hv).sum()) / y.numel()
    finally:
        with torch.no_grad():
            for name, b in model.named_buffers():
                if name in buffers and b.shape == buffers[name].shape:
                    b.copy_(buffers[name])
    mean_diag = traces / (samples * counts.clamp_min(1))
    std = stds / counts.clamp_min(1)
    deltas = torch.where(std > 0, mean_diag / (3.0 * std), torch.zeros_like(std)).clamp_min(0.0)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        device = modules[0].delta.device
        synced = deltas.to(device=device, dtype=torch.float32)
        dist.all_reduce(synced)
        deltas = synced.cpu().double() / dist.get_world_size()
    with torch.no_grad():
        for m, d in zip(modules, deltas):
            m.delta.fill_(float(d))
    return {n: float(d) for (n, _), d in zip(named, deltas)}


# ---------------------------------------------------------------------------------------------
# qconfigs
# ---------------------------------------------------------------------------------------------


def _ranges(backend: str, weight_quant_range: Optional[tuple[int, int]],
            act_quant_range: Optional[tuple[int, int]]) -> tuple[int, int, int, int]:
    check_backend(backend)
    wmin, wmax = weight_quant_range or (-128, 127)
    amin, amax = act_quant_range or (0, _ACT_QUANT_MAX[backend])
    return wmin, wmax, amin, amax


def get_ewgs_qconfig(
    backend: str,
    *,
    weight_quant_range: Optional[tuple[int, int]] = None,
    act_quant_range: Optional[tuple[int, int]] = None,
    per_channel: Optional[bool] = None,
) -> QConfig:
    """QAT qconfig with :class:`EWGSFakeQuantize` everywhere.

    Args:
        backend: one of :data:`~frostnet.quant.BACKENDS` (sets the default activation range).
        weight_quant_range / act_quant_range: as for :func:`~frostnet.quant.get_qconfig`.
        per_channel: one weight interval per output channel; default: as the backend's INT8
            weights (per channel on every engine; False gives the paper's one interval per tensor).
    """
    wmin, wmax, amin, amax = _ranges(backend, weight_quant_range, act_quant_range)
    per_channel = _PER_CHANNEL[backend] if per_channel is None else per_channel
    act = EWGSFakeQuantize.with_args(observer=MinMaxObserver, quant_min=amin, quant_max=amax, dtype=torch.quint8,
                                     qscheme=torch.per_tensor_affine)
    if per_channel:
        weight = EWGSFakeQuantize.with_args(observer=PerChannelMinMaxObserver, quant_min=wmin, quant_max=wmax,
                                            dtype=torch.qint8, qscheme=torch.per_channel_symmetric, ch_axis=0)
    else:
        weight = EWGSFakeQuantize.with_args(observer=MinMaxObserver, quant_min=wmin, quant_max=wmax, dtype=torch.qint8,
                                            qscheme=torch.per_tensor_symmetric)
    return QConfig(activation=act, weight=weight)


def get_octav_qconfig(
    backend: str,
    *,
    qat: bool = True,
    weight_quant_range: Optional[tuple[int, int]] = None,
    act_quant_range: Optional[tuple[int, int]] = None,
    gradient: str = "mph",
    dynamic: bool = True,
    calib_batches: int = 5,
    iterations: int = 10,
    act_averaging_constant: float = 0.01,
) -> QConfig:
    """qconfig with OCTAV clipping: per-channel weights (every engine), per-tensor activations.

    Args:
        backend: one of :data:`~frostnet.quant.BACKENDS`.
        qat: :class:`OctavFakeQuantize` modules (True) or :class:`OctavObserver` for post-training
            calibration (False; ranges averaged over the calibration batches).
        weight_quant_range / act_quant_range: as for :func:`~frostnet.quant.get_qconfig`.
        gradient: ``"mph"`` (MAD weights, PWL activations), ``"mad"``, ``"pwl"`` or ``"ste"``.
        dynamic: QAT: recompute the clipping every step (else static-OCTAV, frozen after
            ``calib_batches`` batches).
        calib_batches: static QAT: batches averaged before freezing.
        iterations: Newton-Raphson steps.
        act_averaging_constant: dynamic QAT: EMA weight of the activation range that evaluation
            and conversion use.
    """
    if gradient not in OCTAV_GRADIENTS:
        raise ValueError(f"unknown OCTAV gradient {gradient!r}; valid choices: {', '.join(OCTAV_GRADIENTS)}")
    wmin, wmax, amin, amax = _ranges(backend, weight_quant_range, act_quant_range)
    per_channel = _PER_CHANNEL[backend]
    wscheme = torch.per_channel_symmetric if per_channel else torch.per_tensor_symmetric
    if not qat:
        act_obs = OctavObserver.with_args(dtype=torch.quint8, qscheme=torch.per_tensor_affine, quant_min=amin,
                                          quant_max=amax, iterations=iterations)
        weight_obs = OctavObserver.with_args(dtype=torch.qint8, qscheme=wscheme, quant_min=wmin, quant_max=wmax,
                                             ch_axis=0, iterations=iterations)
        return QConfig(activation=act_obs, weight=weight_obs)
    weight_grad, act_grad = ("mad", "pwl") if gradient == "mph" else (gradient, gradient)
    act = OctavFakeQuantize.with_args(
        observer=OctavObserver, quant_min=amin, quant_max=amax, dtype=torch.quint8, qscheme=torch.per_tensor_affine,
        averaging_constant=act_averaging_constant if dynamic else None, iterations=iterations,
        gradient=act_grad, dynamic=dynamic, calib_batches=calib_batches)
    weight = OctavFakeQuantize.with_args(
        observer=OctavObserver, quant_min=wmin, quant_max=wmax, dtype=torch.qint8, qscheme=wscheme, ch_axis=0,
        averaging_constant=1.0 if dynamic else None, iterations=iterations,
        gradient=weight_grad, dynamic=dynamic, calib_batches=calib_batches)
    return QConfig(activation=act, weight=weight)


def get_method_qconfig(
    method: str,
    backend: str,
    *,
    weight_quant_range: Optional[tuple[int, int]] = None,
    act_quant_range: Optional[tuple[int, int]] = None,
    **options: Any,
) -> QConfig:
    """The QAT qconfig of ``method`` (one of :data:`QAT_METHODS`) for ``backend``.

    ``options`` go to :func:`get_octav_qconfig` (``gradient``, ``dynamic``, ...) or
    :func:`get_ewgs_qconfig` (``per_channel``); ``ste`` is :func:`~frostnet.quant.get_qconfig`
    (torch's moving-average min/max fake quantization) and takes none.
    """
    if method == "ste":
        if options:
            raise TypeError(f"the ste qconfig takes no options, got {sorted(options)}")
        return get_qconfig(backend, qat=True, weight_quant_range=weight_quant_range, act_quant_range=act_quant_range)
    if method == "ewgs":
        return get_ewgs_qconfig(backend, weight_quant_range=weight_quant_range, act_quant_range=act_quant_range,
                                **options)
    if method == "octav":
        return get_octav_qconfig(backend, qat=True, weight_quant_range=weight_quant_range,
                                 act_quant_range=act_quant_range, **options)
    raise ValueError(f"unknown QAT method {method!r}; valid choices: {', '.join(QAT_METHODS)}")


# ---------------------------------------------------------------------------------------------
# integer weight levels (for transition-rate scheduling)
# ---------------------------------------------------------------------------------------------


def weight_quantized_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every QAT layer whose weight is fake-quantized (``weight_fake_quant``)."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(getattr(m, "weight_fake_quant", None), FakeQuantizeBase)
            and isinstance(getattr(m, "weight", None), nn.Parameter)]


@dataclass(frozen=True)
class WeightQuantGrid:
    """The quantization grid of a layer's weight at one moment (detached copies).

    ``scale`` and ``zero_point`` broadcast against the weight; ``fold`` is the BN folding factor
    ``gamma / sqrt(running_var + eps)`` of a fused Conv-BN QAT layer (broadcast along dim 0), or
    None.
    """

    scale: Tensor
    zero_point: Tensor
    quant_min: int
    quant_max: int
    fold: Optional[Tensor]


def _weight_fake_quant_range(fq: nn.Module) -> tuple[int, int]:
    obs = getattr(fq, "activation_post_process", fq)
    return int(obs.quant_min), int(obs.quant_max)


@torch.no_grad()
def weight_quant_grid(module: nn.Module) -> WeightQuantGrid:
    """Snapshot of the grid ``module.weight_fake_quant`` last used, with the BN folding factor."""
    fq = module.weight_fake_quant
    weight = module.weight
    shape = [1] * weight.dim()
    scale = fq.scale.detach().clone().to(weight.dtype)
    zero_point = fq.zero_point.detach().clone().to(weight.dtype)
    if getattr(fq, "is_per_channel", False) and scale.numel() > 1:
        shape_c = list(shape)
        shape_c[fq.ch_axis] = -1
        scale, zero_point = scale.reshape(shape_c), zero_point.reshape(shape_c)
    else:
        scale, zero_point = scale.reshape(-1)[:1].reshape(shape), zero_point.reshape(-1)[:1].reshape(shape)
    fold = bn_fold(module)
    if fold is not None:
        shape_o = list(shape)
        shape_o[0] = -1
        fold = fold.reshape(shape_o)
    qmin, qmax = _weight_fake_quant_range(fq)
    return WeightQuantGrid(scale, zero_point, qmin, qmax, fold)


@torch.no_grad()
def bn_fold(module: nn.Module) -> Optional[Tensor]:
    r"""The BN folding factor :math:`\gamma / \sqrt{\sigma^2_{running} + \epsilon}` of a fused
    Conv-BN QAT layer (one value per output channel, a detached copy), or None for other layers."""
    bn = getattr(module, "bn", None)
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or bn.running_var is None:
        return None
    gamma = bn.weight if bn.weight is not None else torch.ones_like(bn.running_var)
    return (gamma / torch.sqrt(bn.running_var + bn.eps)).detach().clone()


def _grid_is_fixed(fq: nn.Module) -> bool:
    # A grid no observer re-derives from the weights: learned (EWGS) or frozen (disabled observer).
    return isinstance(fq, EWGSFakeQuantize) or not bool(fq.observer_enabled[0])


class FoldTracker:
    r"""Keeps fixed weight grids of fused Conv-BN QAT layers fixed in units of the *unfolded* weight.

    torch's Conv-BN QAT layers fake-quantize the folded weight :math:`w f` with
    :math:`f = \gamma / \sqrt{\sigma^2 + \epsilon}`; the papers' quantizers sit on :math:`w`
    itself, before BN. A grid that no observer re-derives every step (EWGS's learned interval,
    a quantizer frozen for transition-rate scheduling) therefore drifts against the weights
    whenever BN's statistics or :math:`\gamma` move, and it can collapse: when the folded weights
    outgrow the grid they clip, the conv output (divided by :math:`f` for the BN statistics)
    shrinks, :math:`\sigma^2` falls, :math:`f` grows, and more weights clip, until
    :math:`\sigma^2 \ll \epsilon` and the levels sit at the ends of the range, which is what
    FrostNet-Small 0.5 runs with EWGS and TALR reached.

    :meth:`update`, called after every optimizer step, rescales such a grid per output channel by
    :math:`|f_{now}| / |f_{synced}|` (the scale buffer of an observer-based quantizer, the upper
    bound of an EWGS one), so the levels of the weights change only when the weights do. Layers
    whose quantizer has a single (per-tensor) scale cannot follow a per-channel factor and are left
    alone. The first :meth:`update` after construction takes the current factors as the
    reference; :meth:`state_dict` holds the references, for an exact resume.

    Args:
        model: a QAT-prepared model: track every Conv-BN layer with a weight quantizer in it.
        modules: or the QAT layers to track (those without BN are skipped); pass one of the two.
    """

    def __init__(self, model: Optional[nn.Module] = None, *, modules: Optional[Sequence[nn.Module]] = None) -> None:
        if (model is None) == (modules is None):
            raise ValueError("pass either model or modules to FoldTracker")
        found = [m for _, m in weight_quantized_modules(model)] if model is not None else list(modules or ())
        self.modules = [m for m in found if bn_fold(m) is not None]
        self._synced: list[Optional[Tensor]] = [None] * len(self.modules)

    def state_dict(self) -> dict[str, Any]:
        """The factors the grids were last synchronised to (per tracked layer, None before)."""
        return {"folds": [None if f is None else f.clone() for f in self._synced]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        folds = state.get("folds")
        if not isinstance(folds, list) or len(folds) != len(self.modules):
            got = len(folds) if isinstance(folds, list) else type(folds).__name__
            raise ValueError(f"FoldTracker state has {got} layer factors, this tracker tracks {len(self.modules)} layers")
        for i, (f, m) in enumerate(zip(folds, self.modules)):
            if f is not None and f.shape != m.bn.running_var.shape:
                raise ValueError(f"FoldTracker state: layer {i} has {f.numel()} factors, the layer has "
                                 f"{m.bn.running_var.numel()} channels")
        self._synced = [None if f is None else f.detach().clone() for f in folds]

    @torch.no_grad()
    def update(self) -> int:
        """Rescale the fixed grids to the current BN factors; returns how many grids moved."""
        moved = 0
        for i, m in enumerate(self.modules):
            f = bn_fold(m).abs().clamp_min(_MIN_FOLD)  # type: ignore[union-attr]
            ref, self._synced[i] = self._synced[i], f
            fq = m.weight_fake_quant
            if ref is None or not _grid_is_fixed(fq):
                continue
            ratio = f / ref
            if isinstance(fq, EWGSFakeQuantize):
                if fq.upper.numel() != ratio.numel():
                    continue
                fq.upper.mul_(ratio.to(fq.upper)).clamp_(min=_MIN_WIDTH)
            else:
                if fq.scale.numel() != ratio.numel():
                    continue
                fq.scale.mul_(ratio.to(fq.scale))
                # torch's fused quantizer recomputes its scale from the observer's range on every
                # forward pass, observer enabled or not: that range is its grid.
                obs = getattr(fq, "activation_post_process", None)
                for name in ("min_val", "max_val"):
                    v = getattr(obs, name, None)
                    if isinstance(v, Tensor) and v.numel() == ratio.numel():
                        v.mul_(ratio.to(v))
            moved += 1
        return moved


@torch.no_grad()
def weight_levels(module: nn.Module, grid: Optional[WeightQuantGrid] = None, weight: Optional[Tensor] = None) -> Tensor:
    r"""The integer level of every weight element on the grid of the weight fake quantizer.

    .. math::
        w_d = \mathrm{clamp}(\mathrm{round}(w \cdot f / s) + z, q_{min}, q_{max})

    with :math:`f` the BN folding factor of fused Conv-BN layers (1 otherwise), :math:`s, z` the
    scale and zero point in the fake quantizer's buffers (per channel or per tensor): the levels
    its last forward pass simulated, which are the integers INT8 conversion stores
    (:func:`frostnet.quant.convert` converts torch's fused quantizer with these buffers too).
    Returned as a float tensor of integers shaped like the weight.

    Args:
        module: a QAT layer with ``weight_fake_quant``.
        grid: the grid to use (default: the current one, :func:`weight_quant_grid`).
        weight: the latent weight to use (default: ``module.weight``).
    """
    grid = grid or weight_quant_grid(module)
    w = (module.weight if weight is None else weight).detach()
    if grid.fold is not None:
        w = w * grid.fold
    return torch.clamp(torch.round(w * (1.0 / grid.scale)) + grid.zero_point, grid.quant_min, grid.quant_max)


def freeze_weight_quantizer(module: nn.Module) -> None:
    """Stop the weight quantizer of a QAT layer from changing its grid.

    EWGS: the interval bounds stop training (``requires_grad=False``). Observer-based quantizers
    (torch's min/max, OCTAV): the observer is disabled, so the grid stays the one of the last
    forward pass (call after at least one forward pass).
    """
    fq = module.weight_fake_quant
    if isinstance(fq, EWGSFakeQuantize):
        for p in (fq.lower, fq.upper):
            if p is not None:
                p.requires_grad_(False)
    else:
        fq.disable_observer()
