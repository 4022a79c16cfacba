"""EWGS (Lee et al., "Network Quantization with Element-wise Gradient Scaling", CVPR 2021).

:class:`EWGSFakeQuantize` learns the interval ``[l, u]`` of a quantizer (Eqs. 1-3) and scales each
gradient element in the backward pass by ``1 + delta sign(g) (x_n - x_q)`` (Eq. 4); one interval
per tensor as in the paper, except x86/fbgemm weights, which learn one per output channel so that
the INT8 model keeps those backends' per-channel layout. It subclasses
:class:`~torch.ao.quantization.FakeQuantize`, so :func:`frostnet.quant.convert` turns a trained
model into ordinary INT8 modules.

The paper (Sec. 4.1) and the authors' code train the interval bounds with their own Adam at
lr 1e-5 (:func:`ewgs_parameters` lists them for it). :func:`estimate_ewgs_deltas` sets
``delta = max(0, (Tr(H)/N) / (3 std(g)))`` per quantizer from a Hutchinson estimate of the
Hessian trace (Eqs. 8-10) averaged over several batches and Rademacher vectors;
:func:`update_ewgs_deltas` is the one-batch form.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.ao.quantization import FakeQuantize, MinMaxObserver, PerChannelMinMaxObserver, QConfig

from ._eager import _PER_CHANNEL
from ._qconfig_ranges import quant_ranges

__all__ = ["EWGSFakeQuantize", "EWGSTraceEstimate", "copy_ewgs_bounds", "estimate_ewgs_deltas", "ewgs_parameters",
           "ewgs_trace_estimates", "get_ewgs_qconfig", "update_ewgs_deltas"]

_MIN_WIDTH = 1e-8


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


@dataclass(frozen=True)
class EWGSTraceEstimate:
    r"""One quantizer's Hutchinson statistics in the paper's units (see :func:`ewgs_trace_estimates`).

    ``mean_trace`` is :math:`\mathrm{Tr}(H_{x_q}) / N` averaged over batches and vectors,
    ``grad_std`` :math:`\sigma(g_{x_q})` averaged over batches; ``delta`` is Eq. 10's
    :math:`\max(0, \mathrm{mean\_trace} / (3 \, \mathrm{grad\_std}))`.
    """

    mean_trace: float
    grad_std: float

    @property
    def delta(self) -> float:
        return max(0.0, self.mean_trace / (3.0 * self.grad_std)) if self.grad_std > 0 else 0.0


def _ewgs_quantizers(model: nn.Module) -> list[tuple[str, EWGSFakeQuantize]]:
    named = [(n, m) for n, m in model.named_modules() if isinstance(m, EWGSFakeQuantize)]
    if not named:
        raise ValueError(f"{type(model).__name__} has no EWGS quantizers; prepare it with get_ewgs_qconfig")
    fresh = [n for n, m in named if int(m.initialized[0]) == 0]
    if fresh:
        raise ValueError(f"EWGS quantizers {fresh[:3]} have no interval yet; run a training forward pass before "
                         "estimating their deltas")
    return named


def _rademacher(shape: torch.Size, like: Tensor, generator: Optional[torch.Generator]) -> Tensor:
    # Drawn on CPU, so a CPU generator gives the same vectors for a model on any device.
    return torch.randint(0, 2, shape, generator=generator, device="cpu").to(like.device, like.dtype) * 2 - 1


def ewgs_trace_estimates(
    model: nn.Module,
    closures: Iterable[Callable[[], Tensor]],
    *,
    samples: int = 8,
    per_quantizer: bool = True,
    generator: Optional[torch.Generator] = None,
) -> dict[str, EWGSTraceEstimate]:
    r"""Hutchinson estimates of every EWGS quantizer's Hessian trace (EWGS paper, Eqs. 8-9).

    For each closure (one batch: it runs ``model`` and returns the loss), one forward/backward
    records each quantizer's output :math:`Q` and gradient :math:`g_Q`. In the paper's units
    (:math:`Q = l + (u - l) x_q`, so :math:`g_{x_q} = (u - l) g_Q` and
    :math:`H_{x_q} = D H_Q D` with :math:`D = \mathrm{diag}(u - l)`, per channel for per-channel
    intervals), :math:`\mathrm{Tr}(H_{x_q}) \approx v^T H_{x_q} v = (Dv)^T H_Q (Dv)` with
    Rademacher :math:`v`, from a second backward pass through :math:`g_Q^T (D v)`.

    ``per_quantizer=True`` (the paper's estimate) runs one Hessian-vector product per quantizer
    and vector; ``False`` runs one per vector for all quantizers at once (independent vectors, so
    the cross terms :math:`v_i^T H_{ij} v_j` vanish in expectation but add variance: its sign is
    far less stable, see docs/methods.md). Model buffers (BN running statistics, observers) are
    restored afterwards and the global RNG is left untouched.

    Args:
        model: a model prepared with :func:`get_ewgs_qconfig` (not DDP-wrapped), after at least one
            training forward pass (which sets the intervals).
        closures: one per batch; each runs ``model`` and returns the scalar loss.
        samples: Rademacher vectors per batch.
        per_quantizer: one Hessian-vector product per quantizer (exact per-quantizer Hutchinson).
        generator: source of the Rademacher vectors (default: the global RNG, whose state is
            restored afterwards).

    Raises:
        ValueError: ``model`` has no EWGS quantizers, one has no interval yet, ``samples`` < 1 or
            ``closures`` is empty.
    """
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples!r}")
    named = _ewgs_quantizers(model)
    modules = [m for _, m in named]
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    devices = sorted({b.device for b in buffers.values() if b.device.type == "cuda"}, key=str)
    traces = torch.zeros(len(modules), dtype=torch.float64)
    trace_counts = torch.zeros(len(modules), dtype=torch.float64)
    stds = torch.zeros(len(modules), dtype=torch.float64)
    counts = torch.zeros(len(modules), dtype=torch.float64)
    batches = 0
    try:
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            for closure in closures:
                batches += 1
                with _capture_ewgs_outputs(modules):
                    loss = closure()
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
                    last = k == samples - 1
                    dvs = [_rademacher(y.shape, y, generator) * width for _, y, _, width in used]
                    if per_quantizer:
                        hvs = [torch.autograd.grad(g, y, grad_outputs=dv, retain_graph=not (last and j == len(used) - 1),
                                                   allow_unused=True)[0]
                               for j, ((_, y, g, _), dv) in enumerate(zip(used, dvs))]
                    else:
                        hvs = list(torch.autograd.grad([g for _, _, g, _ in used], [y for _, y, _, _ in used],
                                                       grad_outputs=dvs, retain_graph=not last, allow_unused=True))
                    for (i, y, _, _), dv, hv in zip(used, dvs, hvs):
                        if hv is not None:
                            traces[i] += float((dv * hv).sum()) / y.numel()
                            trace_counts[i] += 1
    finally:
        with torch.no_grad():
            for name, b in model.named_buffers():
                if name in buffers and b.shape == buffers[name].shape:
                    b.copy_(buffers[name])
    if batches == 0:
        raise ValueError("closures is empty: give at least one batch to estimate the EWGS deltas on")
    mean_trace = traces / trace_counts.clamp_min(1)
    std = stds / counts.clamp_min(1)
    return {n: EWGSTraceEstimate(float(t), float(s)) for (n, _), t, s in zip(named, mean_trace, std)}


def _set_deltas(model: nn.Module, estimates: dict[str, EWGSTraceEstimate]) -> dict[str, float]:
    """Write Eq. 10's delta into every quantizer (averaged over the ranks under torch.distributed)."""
    named = _ewgs_quantizers(model)
    deltas = torch.tensor([estimates[n].delta for n, _ in named], dtype=torch.float64)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        synced = deltas.to(device=named[0][1].delta.device, dtype=torch.float32)
        dist.all_reduce(synced)
        deltas = synced.cpu().double() / dist.get_world_size()
    with torch.no_grad():
        for (_, m), d in zip(named, deltas):
            m.delta.fill_(float(d))
    return {n: float(d) for (n, _), d in zip(named, deltas)}


def estimate_ewgs_deltas(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    *,
    samples: int = 8,
    per_quantizer: bool = True,
    generator: Optional[torch.Generator] = None,
) -> dict[str, float]:
    r"""Set every EWGS quantizer's ``delta`` from its Hessian trace over several batches (Eqs. 8-10).

    .. math::
        \delta = \max\Big(0, \frac{\mathrm{Tr}(H_{x_q}) / N}{3 \sigma(g_{x_q})}\Big)

    with the trace averaged over ``samples`` Rademacher vectors on each of ``batches`` and
    :math:`\sigma` over the batches (:func:`ewgs_trace_estimates`). How stable the sign of delta
    is with given settings is measured by ``tools/ewgs_delta_agreement.py`` (docs/methods.md).
    Under ``torch.distributed`` the deltas are averaged over the ranks.

    Args:
        model: an EWGS-prepared model (not DDP-wrapped) after a training forward pass.
        batches: ``(input, target)`` pairs, already on the model's device.
        loss_fn: ``loss_fn(model(input), target)`` is the training loss.
        samples, per_quantizer, generator: see :func:`ewgs_trace_estimates`.

    Returns:
        The new delta of every EWGS quantizer, by module name.
    """
    closures = ((lambda x=x, y=y: loss_fn(model(x), y)) for x, y in batches)
    return set_ewgs_deltas(model, closures, samples=samples, per_quantizer=per_quantizer, generator=generator)


def set_ewgs_deltas(
    model: nn.Module,
    closures: Iterable[Callable[[], Tensor]],
    *,
    samples: int = 8,
    per_quantizer: bool = True,
    generator: Optional[torch.Generator] = None,
) -> dict[str, float]:
    """:func:`estimate_ewgs_deltas` for losses that are not ``loss_fn(model(x), y)`` (a detector
    computes its loss from ``model(x, targets)``): each closure runs the model on one batch and
    returns its training loss."""
    estimates = ewgs_trace_estimates(model, closures, samples=samples, per_quantizer=per_quantizer, generator=generator)
    return _set_deltas(model, estimates)


def update_ewgs_deltas(
    model: nn.Module,
    loss_fn: Callable[[], Tensor],
    *,
    samples: int = 1,
    per_quantizer: bool = False,
    generator: Optional[torch.Generator] = None,
) -> dict[str, float]:
    """One-batch form of :func:`estimate_ewgs_deltas`: ``loss_fn()`` runs ``model`` on a batch and
    returns the loss. Its defaults (one vector, all quantizers at once) are the recipe's original
    ones, whose sign of delta is barely better than a coin (docs/methods.md).

    Raises:
        ValueError: ``model`` has no EWGS quantizers, or one has no interval yet.
    """
    estimates = ewgs_trace_estimates(model, [loss_fn], samples=samples, per_quantizer=per_quantizer,
                                     generator=generator)
    return _set_deltas(model, estimates)


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
    wmin, wmax, amin, amax = quant_ranges(backend, weight_quant_range, act_quant_range)
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
