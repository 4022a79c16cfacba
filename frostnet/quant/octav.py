"""OCTAV and MAD (Sakr et al., "Optimal Clipping and Magnitude-aware Differentiation for Improved
Quantization-aware Training", ICML 2022).

:func:`octav_clip` is the Newton-Raphson recursion for the MSE-optimal clipping scalar (Corollary
3.2 and its unsigned form in Appendix A). :class:`OctavObserver` uses it for static calibration
(PTQ, or the first batches of QAT); :class:`OctavFakeQuantize` recomputes it every step (dynamic)
and back-propagates with the magnitude-aware derivative (MAD, Sec. 4.2) or piece-wise linear (PWL)
gradients; the paper's "MPH" is MAD for weights and PWL for activations. Both plug into the eager
``torch.ao.quantization`` flow through :func:`get_octav_qconfig` and convert to ordinary INT8
modules (they subclass torch's observer / :class:`~torch.ao.quantization.FakeQuantize`)::

    qconfig = get_octav_qconfig("x86", weight_quant_range=(-8, 7), act_quant_range=(0, 15))
    prepare_qat(model, "x86", qconfig=qconfig)      # W4A4 simulated, still INT8-convertible

A note on names: torch's default fake quantizer passes the gradient inside the clipping range and
zeroes it outside, which the OCTAV paper calls PWL; the OCTAV paper's "STE" passes it everywhere.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import Tensor
from torch.ao.quantization import FakeQuantize, QConfig
from torch.ao.quantization.observer import UniformQuantizationObserverBase

from ._eager import _PER_CHANNEL
from ._qconfig_ranges import quant_ranges

__all__ = ["OCTAV_CLIPPINGS", "OCTAV_GRADIENTS", "OctavFakeQuantize", "OctavObserver", "clipped_quantization_mse", "get_octav_qconfig",
           "octav_clip"]

#: Gradient estimators of OCTAV QAT: ``mph`` = MAD for weights, PWL for activations (the paper's).
OCTAV_GRADIENTS: tuple[str, ...] = ("mph", "mad", "pwl", "ste")
#: Clipping scalars: the OCTAV-optimal one, or the tensor's maximum magnitude (the paper's
#: "max-scaling" baseline: nothing is clipped).
OCTAV_CLIPPINGS: tuple[str, ...] = ("octav", "max")
_CLIP_GRADIENTS = ("mad", "pwl", "ste")


def _bits(quant_min: int, quant_max: int) -> float:
    """Bit width B of a quantization range: 2**B = number of levels (fractional if not a power)."""
    return math.log2(quant_max - quant_min + 1)


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
        clipping: ``"octav"`` (the optimal scalar) or ``"max"`` (max-scaling: the largest
            magnitude, per channel for per-channel qschemes; the OCTAV paper's baseline).
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
        clipping: str = "octav",
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
        if clipping not in OCTAV_CLIPPINGS:
            raise ValueError(f"unknown clipping {clipping!r}; valid choices: {', '.join(OCTAV_CLIPPINGS)}")
        super().__init__(dtype=dtype, qscheme=qscheme, quant_min=quant_min, quant_max=quant_max,
                         factory_kwargs=factory_kwargs, eps=eps, is_dynamic=is_dynamic, **kwargs)
        factory_kwargs = torch.nn.factory_kwargs(factory_kwargs)
        self.ch_axis = ch_axis
        self.per_channel = qscheme == torch.per_channel_symmetric
        self.symmetric = qscheme in (torch.per_tensor_symmetric, torch.per_channel_symmetric)
        self.averaging_constant = averaging_constant
        self.iterations = iterations
        self.clipping = clipping
        self.bits = _bits(self.quant_min, self.quant_max)
        # Empty until the first batch (one value per tensor, or per channel).
        self.register_buffer("min_val", torch.tensor([], **factory_kwargs))
        self.register_buffer("max_val", torch.tensor([], **factory_kwargs))
        self.register_buffer("num_batches", torch.tensor(0, dtype=torch.long))

    @torch.no_grad()
    def batch_range(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The OCTAV clipping range (low, high) of this batch alone (1 value, or 1 per channel)."""
        x = x.detach().to(torch.float32)
        if self.clipping == "max":
            return self._max_range(x)
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

    def _max_range(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.symmetric:
            s = _rows(x.abs(), self.ch_axis if self.per_channel else None).amax(dim=1)
            return -s, s
        low, high = torch.aminmax(x)
        return low.clamp_max(0.0).reshape(1), high.clamp_min(0.0).reshape(1)

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
    clipping: str = "octav",
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
        clipping: ``"octav"`` or ``"max"`` (max-scaling, the paper's baseline; see
            :class:`OctavObserver`).
    """
    if gradient not in OCTAV_GRADIENTS:
        raise ValueError(f"unknown OCTAV gradient {gradient!r}; valid choices: {', '.join(OCTAV_GRADIENTS)}")
    wmin, wmax, amin, amax = quant_ranges(backend, weight_quant_range, act_quant_range)
    per_channel = _PER_CHANNEL[backend]
    wscheme = torch.per_channel_symmetric if per_channel else torch.per_tensor_symmetric
    if not qat:
        act_obs = OctavObserver.with_args(dtype=torch.quint8, qscheme=torch.per_tensor_affine, quant_min=amin,
                                          quant_max=amax, iterations=iterations, clipping=clipping)
        weight_obs = OctavObserver.with_args(dtype=torch.qint8, qscheme=wscheme, quant_min=wmin, quant_max=wmax,
                                             ch_axis=0, iterations=iterations, clipping=clipping)
        return QConfig(activation=act_obs, weight=weight_obs)
    weight_grad, act_grad = ("mad", "pwl") if gradient == "mph" else (gradient, gradient)
    act = OctavFakeQuantize.with_args(
        observer=OctavObserver, quant_min=amin, quant_max=amax, dtype=torch.quint8, qscheme=torch.per_tensor_affine,
        averaging_constant=act_averaging_constant if dynamic else None, iterations=iterations, clipping=clipping,
        gradient=act_grad, dynamic=dynamic, calib_batches=calib_batches)
    weight = OctavFakeQuantize.with_args(
        observer=OctavObserver, quant_min=wmin, quant_max=wmax, dtype=torch.qint8, qscheme=wscheme, ch_axis=0,
        averaging_constant=1.0 if dynamic else None, iterations=iterations, clipping=clipping,
        gradient=weight_grad, dynamic=dynamic, calib_batches=calib_batches)
    return QConfig(activation=act, weight=weight)
