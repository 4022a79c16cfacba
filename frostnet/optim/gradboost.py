"""GradBoost: stochastic gradient boosting as a wrapper around any ``torch.optim`` optimizer.

GradBoost is the second half of "StatAssist & GradBoost" (Section 3.2, equations 5-8 and
Appendix Algorithms 3-4 of the paper). Before the wrapped optimizer steps, a random half of every
gradient tensor is pushed further along its own sign by clamped Laplace noise whose scale follows
the running spread of that gradient element, and the push fades out over the boost steps.

Typical use with the StatAssist recipe::

    optimizer = GradBoost(torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9,
                                          nesterov=True), seed=0)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    optimizer.set_phase("collect")   # StatAssist FP epoch: statistics only, no noise
    ...train one epoch...
    optimizer.set_phase("boost")     # QAT from scratch: noise on
    ...train...
"""

from __future__ import annotations

import math
import numbers
import operator
import os
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from itertools import chain
from typing import Any, Final

import torch
from torch import Tensor
from torch.optim import Optimizer

from ._gradboost_buffers import _FlatLayout, _bits_numel, _run_compiled
from ._wrapper import OptimizerWrapper

__all__ = ["GB_RULES", "GradBoost", "PHASES"]

PHASES: Final[tuple[str, ...]] = ("collect", "boost")
#: The statistics and noise rules of :class:`GradBoost`: the paper's equations (default) or the
#: authors' published code.
GB_RULES: Final[tuple[str, ...]] = ("paper", "authors")

#: The random words of a draw come in two halves (draw() in _draw_log_u is written for two), each
#: from its own reseeded generator.
_NOISE_CHUNKS: Final[int] = 2
#: Below this many elements a second thread costs more than it saves.
_PARALLEL_NUMEL: Final[int] = 1 << 16

_pool: ThreadPoolExecutor | None = None


def _worker_pool() -> ThreadPoolExecutor:
    """One worker thread that draws the second half of the noise on CPU (created on first use)."""
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="frostnet-gradboost")
    return _pool


def _forget_pool() -> None:
    # A forked child has no copy of the worker thread.
    global _pool
    _pool = None


os.register_at_fork(after_in_child=_forget_pool)


def _is_real(value: object) -> bool:
    # bool is an Integral, but True as a decay or clamp is a bug, not a number.
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_decay(decay: float) -> float:
    if not _is_real(decay) or not 0.0 <= decay < 1.0:
        raise ValueError(f"decay must be a number in [0, 1), got {decay!r}")
    return float(decay)


def _check_clamp(clamp: float) -> float:
    if not _is_real(clamp) or not math.isfinite(clamp) or clamp < 0.0:
        raise ValueError(f"clamp must be a finite number >= 0, got {clamp!r}")
    return float(clamp)


def _check_noise_decay(noise_decay: float) -> float:
    if not _is_real(noise_decay) or not 0.0 <= noise_decay <= 1.0:
        raise ValueError(f"noise_decay must be a number in [0, 1], got {noise_decay!r}")
    return float(noise_decay)


def _check_coin_toss(coin_toss: bool) -> bool:
    if not isinstance(coin_toss, bool):
        raise TypeError(f"coin_toss must be a bool (True or False), got {coin_toss!r}")
    return coin_toss


def _check_seed(seed: int) -> int:
    try:
        value = operator.index(seed)
    except TypeError:
        value = None
    if value is None or isinstance(seed, bool) or not 0 <= value < 2**63:
        raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
    return value


def _check_rule(rule: str) -> str:
    if rule not in GB_RULES:
        raise ValueError(f"unknown GradBoost rule {rule!r}; valid rules are {', '.join(GB_RULES)}")
    return rule


def _check_phase(phase: str) -> str:
    if phase not in PHASES:
        raise ValueError(f"unknown GradBoost phase {phase!r}; valid phases are {', '.join(PHASES)}")
    return phase


class GradBoost(OptimizerWrapper):
    r"""Add GradBoost (stochastic gradient boosting) to any ``torch.optim`` optimizer.

    The wrapper edits ``p.grad`` in place and then calls the wrapped optimizer's ``step()``, so
    the boosted gradient goes through the wrapped optimizer's own weight decay, momentum and
    adaptive scaling exactly as in lines 13-16 of the paper's Algorithms 3-4. Nothing is copied
    from the wrapped optimizer: ``param_groups``, ``state``, ``defaults``, ``zero_grad`` and
    ``add_param_group`` are the wrapped optimizer's, and LR schedulers accept the wrapper because
    it is an :class:`~torch.optim.Optimizer`.

    Per parameter tensor and element-wise, with :math:`g_t` the gradient in ``p.grad`` when
    ``step()`` is called (after any clipping or AMP unscaling, before the wrapped optimizer's
    weight decay), :math:`t` the number of steps this parameter had a gradient and :math:`s` the
    number of those taken in the ``"boost"`` phase:

    .. math::
        M_t &= \gamma_1 M_{t-1} + (1 - \gamma_1) \max(M_{t-1}, g_t), \qquad M_0 = 0 \\
        m_t &= \gamma_1 m_{t-1} + (1 - \gamma_1) \min(m_{t-1}, g_t), \qquad m_0 = 0 \\
        b_t &= \frac{M_t - m_t}{1 - \gamma_1^t}                       \quad \text{(eq. 5)} \\
        \psi &\sim \mathrm{Laplace}(0, b_t), \qquad k \sim \mathrm{Bernoulli}(1/2) \\
        \psi &\leftarrow \operatorname{sign}(g_t) \min(|\psi|, \gamma_2)  \quad \text{(eqs. 6-7)} \\
        g_t &\leftarrow g_t + k \, (1 - \text{noise\_decay})^s \, \psi   \quad \text{(eq. 8)}

    :math:`M` and :math:`m` are stored raw in ``boost_state[p]["exp_max"/"exp_min"]``; the bias
    correction :math:`1/(1-\gamma_1^t)` is applied to the value used, never written back (a
    constant gradient :math:`c` then gives exactly :math:`\hat M_t = c`, as Adam's correction
    does for its moments). The statistics are updated in both phases; noise is added only in
    ``"boost"``. With ``coin_toss=False``, :math:`k = 1` everywhere. Since
    :math:`\operatorname{sign}(0) = 0`, gradients that are exactly zero stay zero.

    Where this deliberately differs from the printed algorithms (and from the reference code):

    * Algorithms 3-4 start from :math:`M_0 = 1, m_0 = 0` with no bias correction; since the
      update never lowers :math:`M`, gradients far below 1 would keep :math:`b_t \ge 1` forever
      and the noise would always sit at the clamp. Both start at 0 here, with bias correction.
    * The reference code tracks :math:`|g|` (so its minimum stays 0) and divides the stored
      maximum by the bias correction in place every step (so it compounds). Neither happens here;
      the signed gradient is tracked as equation 5 and Algorithm 3 write it.
    * Line 13 of the algorithms scales by :math:`1 - \gamma_3^t`, which grows to 1; the text of
      equation 8 calls the factor an exponential decay :math:`\lambda^t`. The decay is used,
      with :math:`\lambda = 1 - \text{noise\_decay}` (the reference's parametrisation, so the
      default 1e-2 gives :math:`0.99^s`), counted from the first boost step.
    * Equation 7 as printed, :math:`\min(\max(\psi, 0), \epsilon)`, would zero the noise of every
      negative gradient; the clamp is applied to the magnitude and the sign is kept.
    * Line 6 adds the L2 term to :math:`g` before the statistics; the wrapper sees the loss
      gradient only, because weight decay belongs to the wrapped optimizer (for AdamW it is
      decoupled anyway).

    **rule="authors"** reproduces the authors' published code (clovaai/frostnet, ``QSGD`` & co.)
    instead, with :math:`a_t = |g_t|`, :math:`M_0 = m_0 = 0` and :math:`c_t = 1 - \gamma_1^t`:

    .. math::
        M_t &= \big(\gamma_1 M_{t-1} + (1 - \gamma_1) \max(M_{t-1}, a_t)\big) / c_t \\
        m_t &= \big(\gamma_1 m_{t-1} + (1 - \gamma_1) \min(m_{t-1}, a_t)\big) / c_t \\
        g_t &\leftarrow g_t + \operatorname{sign}(g_t) \min\big(k \, |\psi_1| (M_t - m_t)
              (1 - \text{noise\_decay})^s, \gamma_2\big), \qquad \psi_1 \sim \mathrm{Laplace}(0, 1)

    The stored statistics are divided by :math:`c_t` in place every step, so the division
    compounds (about :math:`\prod_t 1/c_t \approx 10^7` at :math:`\gamma_1 = 0.9`), and since
    :math:`m` tracks :math:`\min(m, |g|)` from 0 it stays 0: the spread is that inflated maximum,
    and the noise sits at the clamp :math:`\gamma_2` (decay applied *before* the clamp) until
    :math:`(1 - \text{noise\_decay})^s` pulls it below, a plateau the paper rule never reaches
    (there the clamp comes first and the decay then shrinks every draw). Both phases update the
    statistics in both rules. Default ``"paper"``: it is the method as the paper's equations define it
    (a running spread of the signed gradient), and the recipe's runs and checkpoints made before
    the option existed used it; ``"authors"`` is what the paper's published numbers were trained
    with. The ``"authors"`` rule takes the per-parameter path (no flat buffers, no ``fused``).

    ``p.grad`` is left boosted after ``step()`` rather than restored: the usual ``zero_grad()``
    discards it, and restoring would cost a copy of every gradient each step. Code that reads
    gradients after ``step()`` sees the boosted values.

    Cost: per parameter element, two statistics and up to three and a half scratch values in the
    parameter's dtype; per step about fifteen element-wise passes, run on one flat buffer per
    (device, dtype) instead of per tensor. :math:`|\psi|` is drawn as :math:`-b_t \log u` from
    16 random bits per element (15 used: the coin and :math:`u`, with :math:`\log u` read from a
    table), so its quantiles are exact on a grid of :math:`2^{-13}` in probability
    (:math:`2^{-14}` without the coin toss); this is what keeps the draw cheap on CPU. The random
    words of each draw come in two halves from two generators that the device generator reseeds
    for that draw; with more than one intra-op thread on CPU a worker thread draws the second
    half while the caller draws the first (the values do not depend on the thread count).

    Randomness comes from one :class:`torch.Generator` per device, seeded with ``seed`` and saved
    in ``state_dict()``, so a run is reproducible and a resumed run continues the same stream.
    Under DDP the gradients are already all-reduced when ``step()`` runs, so every rank must draw
    the same noise to keep the replicas identical: give every rank the same ``seed`` (the
    default) and load the same checkpoint on every rank.

    Args:
        optimizer: The optimizer to boost (any ``torch.optim`` optimizer except LBFGS, whose
            closure re-evaluation would discard the noise).
        decay: :math:`\gamma_1`, the decay of the moving maximum and minimum, in [0, 1).
        clamp: :math:`\gamma_2`, the largest noise magnitude before the decay factor, >= 0.
        noise_decay: Per-boost-step decay rate of the noise, in [0, 1]; the noise is scaled by
            ``(1 - noise_decay) ** s`` at the ``s``-th boost step.
        coin_toss: Apply the noise only where a Bernoulli(1/2) draw is 1 (the paper's random
            subset :math:`D_t`); if False, every element is boosted.
        seed: Seed of the noise generators (one per device).
        phase: Initial phase, ``"collect"`` (statistics only, the StatAssist FP phase; the
            default, so no noise is added until ``set_phase("boost")``) or ``"boost"``
            (statistics and noise).
        fused: Run the statistics and the noise arithmetic of each (device, dtype) bucket as one
            kernel compiled by :func:`torch.compile` instead of about ten element-wise passes
            (the draw itself stays eager, so the random stream is the same). It needs a working
            ``torch.compile`` backend (a C++ compiler on CPU); the first step compiles for a few
            seconds. Results equal the unfused ones up to floating-point rounding. Steps whose
            bucket mixes parameters with different step counts take the unfused path.
        rule: ``"paper"`` (the equations above, default) or ``"authors"`` (the published code's
            statistics and clamp order, see above); not combinable with ``fused``.

    Raises:
        TypeError: If ``optimizer`` is not a supported optimizer or ``coin_toss`` or ``fused`` is
            not a bool.
        ValueError: If a hyper-parameter is out of range or ``phase`` is unknown.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        decay: float = 0.9,
        clamp: float = 1e-3,
        noise_decay: float = 1e-2,
        coin_toss: bool = True,
        seed: int = 0,
        phase: str = "collect",
        fused: bool = False,
        rule: str = "paper",
    ) -> None:
        if isinstance(optimizer, GradBoost):
            raise TypeError("optimizer is already a GradBoost; wrap the inner optimizer only once")
        if not isinstance(optimizer, Optimizer):
            raise TypeError(
                "optimizer must be a torch.optim.Optimizer instance, "
                f"got {type(optimizer).__name__}"
            )
        if isinstance(optimizer, torch.optim.LBFGS):
            raise TypeError(
                "GradBoost does not support LBFGS: it re-evaluates the closure inside step(), "
                "which would replace the boosted gradients"
            )
        self.optimizer = optimizer
        self._decay = _check_decay(decay)
        self._clamp = _check_clamp(clamp)
        self._noise_decay = _check_noise_decay(noise_decay)
        self._coin_toss = _check_coin_toss(coin_toss)
        self._seed = _check_seed(seed)
        self._phase = _check_phase(phase)
        if not isinstance(fused, bool):
            raise TypeError(f"fused must be a bool (True or False), got {fused!r}")
        self._fused = fused
        self._rule = _check_rule(rule)
        if fused and rule == "authors":
            raise ValueError("GradBoost(rule='authors') has no fused kernel; use fused=False with it")
        # Per-parameter GradBoost statistics, kept apart from the wrapped optimizer's state:
        # torch optimizers initialise their own state when theirs is empty, so foreign keys in it
        # would break them.
        self.boost_state: defaultdict[Tensor, dict[str, Any]] = defaultdict(dict)
        self._generators: dict[str, torch.Generator] = {}
        # Generator states loaded before the device's generator exists (it is created lazily).
        self._pending_generator_states: dict[str, Tensor] = {}
        # Flat buffers per (device, dtype) bucket (statistics storage and scratch, see
        # _FlatLayout) and the parameter set each bucket had a gradient for at the last step.
        self._layouts: dict[tuple[torch.device, torch.dtype], _FlatLayout] = {}
        self._previous_ids: dict[tuple[torch.device, torch.dtype], tuple[int, ...]] = {}
        self._log_tables: dict[tuple[torch.device, torch.dtype, bool], Tensor] = {}
        # Per device, the generators of the draw's halves; reseeded from the device generator at
        # every draw, so they hold no state of their own worth saving.
        self._chunk_gens: dict[str, list[torch.Generator]] = {}
        self._init_optimizer_base()

    def __getstate__(self) -> dict[str, Any]:
        # Hooks are process-local (like torch's) and the scratch buffers are recreated lazily.
        return {
            "optimizer": self.optimizer,
            "_decay": self._decay,
            "_clamp": self._clamp,
            "_noise_decay": self._noise_decay,
            "_coin_toss": self._coin_toss,
            "_seed": self._seed,
            "_phase": self._phase,
            "_fused": self._fused,
            "_rule": self._rule,
            "boost_state": self.boost_state,
            "_generators": self._generators,
            "_pending_generator_states": self._pending_generator_states,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._layouts = {}
        self._previous_ids = {}
        self._log_tables = {}
        self._chunk_gens = {}
        self._init_optimizer_base()

    def __repr__(self) -> str:
        inner = "\n".join("    " + line for line in repr(self.optimizer).splitlines())
        return (
            f"GradBoost(decay={self._decay}, clamp={self._clamp}, "
            f"noise_decay={self._noise_decay}, coin_toss={self._coin_toss}, seed={self._seed}, "
            f"phase={self._phase!r}, fused={self._fused}, rule={self._rule!r},\n{inner}\n)"
        )

    # -- hyper-parameters and phase --------------------------------------------------------------

    @property
    def decay(self) -> float:
        """gamma1, the decay of the moving maximum and minimum."""
        return self._decay

    @decay.setter
    def decay(self, value: float) -> None:
        self._decay = _check_decay(value)

    @property
    def clamp(self) -> float:
        """gamma2, the largest noise magnitude before the decay factor."""
        return self._clamp

    @clamp.setter
    def clamp(self, value: float) -> None:
        self._clamp = _check_clamp(value)

    @property
    def noise_decay(self) -> float:
        """Per-boost-step decay rate of the noise (factor ``(1 - noise_decay) ** s``)."""
        return self._noise_decay

    @noise_decay.setter
    def noise_decay(self, value: float) -> None:
        self._noise_decay = _check_noise_decay(value)

    @property
    def coin_toss(self) -> bool:
        """Whether only a Bernoulli(1/2) subset of the elements is boosted."""
        return self._coin_toss

    @coin_toss.setter
    def coin_toss(self, value: bool) -> None:
        self._coin_toss = _check_coin_toss(value)

    @property
    def seed(self) -> int:
        """Seed of the per-device noise generators."""
        return self._seed

    @property
    def rule(self) -> str:
        """``"paper"`` or ``"authors"`` (see the class docstring)."""
        return self._rule

    @property
    def phase(self) -> str:
        """The current phase, ``"collect"`` or ``"boost"``; change it with :meth:`set_phase`."""
        return self._phase

    def set_phase(self, phase: str) -> None:
        """Switch between statistics only (``"collect"``) and statistics plus noise (``"boost"``).

        Args:
            phase: ``"collect"`` or ``"boost"``.

        Raises:
            ValueError: If ``phase`` is not one of :data:`PHASES`.
        """
        self._phase = _check_phase(phase)

    def noise_factor(self, param: Tensor) -> float:
        """The decay factor ``(1 - noise_decay) ** s`` used at ``param``'s latest boost step.

        Returns 1.0 before the first boost step (no noise has been scaled yet).
        """
        st = self.boost_state.get(param) or {}
        return (1.0 - self._noise_decay) ** st.get("boost_step", 0)

    def statistics(self, param: Tensor) -> tuple[Tensor, Tensor]:
        """Bias-corrected moving maximum and minimum of ``param``'s gradient (new tensors).

        Raises:
            KeyError: If ``param`` has not been through a step with a gradient yet.
        """
        st = self.boost_state.get(param)
        if not st:
            raise KeyError("no GradBoost statistics for this parameter yet: it has not had a step")
        if self._rule == "authors":
            # stored already divided (in place, compounding)
            return st["exp_max"].clone(), st["exp_min"].clone()
        correction = 1.0 - self._decay ** st["step"]
        return st["exp_max"] / correction, st["exp_min"] / correction

    # -- step ------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(  # type: ignore[override]
        self, closure: Callable[[], float] | None = None
    ) -> float | None:
        """Update the statistics, boost the gradients (``"boost"`` phase) and step the optimizer.

        Args:
            closure: Re-evaluates the model and returns the loss; called once, before the
                gradients are read.

        Returns:
            The closure's loss, or None.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._boost_gradients()
        # The closure has already produced the gradients: stepping the wrapped optimizer with it
        # again would recompute them and drop the noise.
        self.optimizer.step()
        return loss

    def _boost_gradients(self) -> None:
        buckets: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
        seen: set[int] = set()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None or id(p) in seen:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("GradBoost does not support sparse gradients")
                if not p.is_floating_point():
                    # max/min and sign have no meaning for complex numbers.
                    raise TypeError(
                        f"GradBoost needs real floating-point parameters, got one of {p.dtype}"
                    )
                seen.add(id(p))
                buckets.setdefault((p.device, p.dtype), []).append(p)
        for (device, dtype), params in buckets.items():
            self._boost_bucket(device, dtype, params)

    def _boost_bucket(self, device: torch.device, dtype: torch.dtype, params: list[Tensor]) -> None:
        try:
            self._boost_bucket_unguarded(device, dtype, params)
        except RuntimeError:
            # A fused kernel that cannot compile fails before touching the statistics: take the
            # step counts back so that the step is not half counted.
            if self._fused:
                for p in params:
                    st = self.boost_state[p]
                    if st.get("step"):
                        st["step"] -= 1
                        if self._phase == "boost":
                            st["boost_step"] -= 1
            raise

    def _boost_bucket_unguarded(
        self, device: torch.device, dtype: torch.dtype, params: list[Tensor]
    ) -> None:
        boost = self._phase == "boost"
        layout = self._layout_for(device, dtype, params) if self._rule == "paper" else None
        states = [self.boost_state[p] for p in params]
        for st in states:
            if "step" not in st:
                st.update(step=0, boost_step=0)
            st["step"] += 1
            if boost:
                st["boost_step"] += 1
        generator = self._generator(device) if boost else None
        grads = [p.grad for p in params]
        if self._rule == "authors":
            self._boost_authors(params, states, generator)
            return

        if layout is not None:
            # Fast path: the bucket as one flat tensor, so that each operation is one kernel over
            # all elements instead of one small kernel per parameter.
            torch._foreach_copy_(layout.grad_views, grads)
            if generator is None:
                if self._fused:
                    _run_compiled("statistics", layout.grad, layout.exp_max, layout.exp_min,
                                  self._scalar(1.0 - self._decay, device, dtype))
                else:
                    self._update_statistics(layout.grad, layout.exp_max, layout.exp_min, layout.work)
                return
            if layout.sign is None:
                layout.allocate_noise_buffers()
            # Parameters added later, or that missed steps, have their own step counts: runs of
            # equal counts share the t-dependent clamp bound.
            segments: list[tuple[int, int, float]] = []
            scales: list[float] = []
            start = 0
            for p, st in zip(params, states):
                correction = 1.0 - self._decay ** st["step"]
                bound = self._clamp * correction
                end = start + p.numel()
                if segments and segments[-1][2] == bound:
                    segments[-1] = (segments[-1][0], end, bound)
                else:
                    segments.append((start, end, bound))
                start = end
                scales.append((1.0 - self._noise_decay) ** st["boost_step"] / correction)
            if self._fused and len(segments) == 1 and len(set(scales)) == 1:
                # One compiled kernel: statistics, noise and the boosted gradient in layout.grad,
                # with log(u) drawn into layout.work and layout.sign's memory as the index.
                index = layout.sign.view(-1).view(torch.int32)[: layout.work.numel()] \
                    if layout.sign.element_size() >= 4 else None
                self._draw_log_u(layout.work, index, layout.bits, generator)
                _run_compiled("boost", layout.grad, layout.exp_max, layout.exp_min, layout.work,
                              self._scalar(1.0 - self._decay, device, dtype),
                              self._scalar(segments[0][2], device, dtype),
                              self._scalar(scales[0], device, dtype))
                torch._foreach_copy_(grads, layout.grad_views)
                return
            self._update_statistics(layout.grad, layout.exp_max, layout.exp_min, layout.work)
            # sign(g) first: the gathered gradient's buffer is then free for the noise draw.
            torch.sign(layout.grad, out=layout.sign)
            self._noise_magnitude(layout.exp_max, layout.exp_min, layout.work, layout.grad,
                                  layout.bits, segments, generator)
            # g <- g + sign(g) (1 - noise_decay)^s min(|psi|, gamma2), straight into p.grad.
            torch._foreach_addcmul_(grads, layout.work_views, layout.sign_views, scales)
            return

        # Fallback while the set of parameters with gradients is changing: the same update,
        # one parameter at a time.
        for p, st in zip(params, states):
            if "exp_max" not in st:
                st["exp_max"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_min"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            grad = p.grad
            work = torch.empty(grad.shape, device=device, dtype=dtype)  # contiguous
            self._update_statistics(grad, st["exp_max"], st["exp_min"], work)
            if generator is None:
                continue
            correction = 1.0 - self._decay ** st["step"]
            bits = torch.empty(_bits_numel(grad.numel()), device=device, dtype=torch.int64)
            self._noise_magnitude(st["exp_max"], st["exp_min"], work, torch.empty_like(work),
                                  bits, [(0, grad.numel(), self._clamp * correction)], generator)
            sign = torch.sign(grad)
            scale = (1.0 - self._noise_decay) ** st["boost_step"] / correction
            grad.addcmul_(work, sign, value=scale)

    def _boost_authors(self, params: list[Tensor], states: list[dict[str, Any]],
                       generator: torch.Generator | None) -> None:
        """The authors' code's rule, one parameter at a time (see the class docstring)."""
        weight = 1.0 - self._decay
        for p, st in zip(params, states):
            if "exp_max" not in st:
                st["exp_max"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_min"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            grad = p.grad
            exp_max, exp_min = st["exp_max"], st["exp_min"]
            correction = 1.0 - self._decay ** st["step"]
            magnitude = grad.abs()
            exp_max.lerp_(torch.maximum(exp_max, magnitude), weight).div_(correction)
            exp_min.lerp_(torch.minimum(exp_min, magnitude), weight).div_(correction)
            if generator is None:
                continue
            work = torch.empty(grad.shape, device=grad.device, dtype=grad.dtype)
            bits = torch.empty(_bits_numel(grad.numel()), device=grad.device, dtype=torch.int64)
            self._draw_log_u(work, None, bits, generator)
            # -log(u) is k |psi_1| (k = 0 where log(u) > 0, see _draw_log_u); the decay comes
            # before the clamp, as in the authors' code.
            work.neg_().clamp_(min=0.0).mul_(exp_max - exp_min)
            work.mul_((1.0 - self._noise_decay) ** st["boost_step"]).clamp_(max=self._clamp)
            grad.addcmul_(work, torch.sign(grad))

    def _update_statistics(
        self, grad: Tensor, exp_max: Tensor, exp_min: Tensor, work: Tensor
    ) -> None:
        """M <- gamma1 M + (1 - gamma1) max(M, g) and m likewise with min, in place."""
        weight = 1.0 - self._decay
        torch.maximum(exp_max, grad, out=work)
        exp_max.lerp_(work, weight)
        torch.minimum(exp_min, grad, out=work)
        exp_min.lerp_(work, weight)

    def _noise_magnitude(
        self,
        exp_max: Tensor,
        exp_min: Tensor,
        work: Tensor,
        spare: Tensor,
        bits: Tensor,
        segments: list[tuple[int, int, float]],
        generator: torch.Generator,
    ) -> None:
        """Fill ``work`` with ``k (1 - gamma1^t) min(|psi|, gamma2)``, psi ~ Laplace(0, b_t).

        ``work`` and ``spare`` are contiguous scratch shaped like the statistics (``spare`` is
        overwritten), ``bits`` an int64 buffer of ``_bits_numel(work.numel())`` elements.
        ``segments`` lists ``(start, end, bound)`` runs of the flattened elements with the clamp
        bound ``gamma2 (1 - gamma1^t)``; with several runs the tensors must be flat.
        """
        flat_spare = spare.view(-1)
        index = flat_spare.view(torch.int32)[: work.numel()] if spare.element_size() >= 4 else None
        self._draw_log_u(work, index, bits, generator)
        # spare <- m - M = -(1 - gamma1^t) b_t <= 0, so work <- log(u) (m - M) is
        # (1 - gamma1^t) |psi| >= 0 where k = 1, and <= 0 (clamped to 0) where k = 0. The bias
        # correction stays folded into the clamp bound and the final scale: no pass of its own.
        torch.sub(exp_min, exp_max, out=spare)
        work.mul_(spare)
        if len(segments) == 1:
            work.clamp_(0.0, segments[0][2])
        else:
            for start, end, bound in segments:
                work[start:end].clamp_(0.0, bound)

    def _draw_log_u(
        self, work: Tensor, index: Tensor | None, bits: Tensor, generator: torch.Generator
    ) -> None:
        """Fill contiguous ``work`` with log(u) of fresh draws (see :meth:`_noise_magnitude`).

        ``index`` is int32 scratch of ``work.numel()`` elements (None: allocated here), ``bits``
        an int64 buffer of ``_bits_numel(work.numel())`` words.
        """
        # Random bits: every int64 word feeds four elements. Each element keeps 15 bits (the int64
        # range of random_() leaves every fourth int16's top bit at 0): j is uniform on
        # [0, 2**15) and the table holds log(u) for u = (j | 1) / 2**14, uniform on (0, 2) and never
        # 0 (an even j reads its odd neighbour's entry, which spares a bitwise_or pass). With the
        # coin toss, u < 1 (probability exactly 1/2) is k = 1, and given that -log(u) ~ Exp(1),
        # the law of |Laplace(0, 1)|, up to a 2**-13 grid of its quantiles; log(u) > 0 is k = 0
        # and is clamped to zero noise below. Without the coin toss u = (j | 1) / 2**15 on (0, 1)
        # makes every element an Exp(1) draw (2**-14 grid). This costs about a third of torch's
        # uniform_() followed by log_(), which dominated the step on CPU.
        #
        # Both the CPU generator and index_select run on one core, so the words come in
        # _NOISE_CHUNKS halves, each from its own generator seeded by the device generator for
        # this draw; with more than one intra-op thread the halves are drawn and looked up side by
        # side. The draws do not depend on the thread count.
        numel = work.numel()
        words = bits.numel()
        if index is None:
            index = torch.empty(numel, device=work.device, dtype=torch.int32)
        table = self._log_table(work.device, work.dtype)
        out = work.view(-1)
        seeds = torch.empty(_NOISE_CHUNKS, device=bits.device, dtype=torch.int64)
        seeds = seeds.random_(generator=generator).tolist()
        chunk_generators = self._chunk_generators(bits.device)
        half = (words + 1) // 2

        def draw(chunk: int) -> None:
            lo, hi = (0, half) if chunk == 0 else (half, words)
            if lo == hi:
                return
            gen = chunk_generators[chunk]
            gen.manual_seed(seeds[chunk])
            bits[lo:hi].random_(generator=gen)
            start, end = 4 * lo, min(4 * hi, numel)
            index[start:end].copy_(bits.view(torch.int16)[start:end].bitwise_and_(0x7FFF))
            torch.index_select(table, 0, index[start:end], out=out[start:end])

        if work.device.type == "cpu" and numel >= _PARALLEL_NUMEL and torch.get_num_threads() > 1:
            pending = _worker_pool().submit(draw, 1)
            try:
                draw(0)
            finally:
                pending.result()
        else:
            draw(0)
            draw(1)

    @staticmethod
    def _scalar(value: float, device: torch.device, dtype: torch.dtype) -> Tensor:
        # A 0-dim tensor rather than a Python float: the compiled kernels then never recompile
        # for a new step's bound or scale.
        return torch.tensor(value, device=device, dtype=dtype)

    def _log_table(self, device: torch.device, dtype: torch.dtype) -> Tensor:
        """log((j | 1) * 2**-14) (coin toss) or log((j | 1) * 2**-15) for j < 2**15, indexed by j."""
        key = (device, dtype, self._coin_toss)
        table = self._log_tables.get(key)
        if table is None:
            # An even j reads its odd neighbour's value (log(0) would be -inf).
            j = torch.arange(2**15, device=device, dtype=torch.int32).bitwise_or_(1)
            table = torch.log(j.to(dtype) * (2.0**-14 if self._coin_toss else 2.0**-15))
            self._log_tables[key] = table
        return table

    def _layout_for(
        self, device: torch.device, dtype: torch.dtype, params: list[Tensor]
    ) -> _FlatLayout | None:
        """The flat layout of these parameters, (re)built when the set with gradients is new.

        A set that differs from the layout's is only adopted once it repeats on the next step,
        so a model whose parameters alternate between having and lacking gradients takes the
        per-parameter path instead of rebuilding the layout every step. None means: take the
        per-parameter path this step.
        """
        key = (device, dtype)
        ids = tuple(id(p) for p in params)
        layout = self._layouts.get(key)
        previous = self._previous_ids.get(key)
        self._previous_ids[key] = ids
        if layout is not None and layout.ids == ids:
            owned = zip(params, layout.max_views)
            if all(self.boost_state[p].get("exp_max") is view for p, view in owned):
                return layout
        elif layout is not None and ids != previous:
            return None
        if layout is not None:
            # Give the parameters leaving the layout their own copy of the statistics, so the
            # old flat buffers can be freed.
            leaving = {id(p) for p in layout.params} - set(ids)
            for p in layout.params:
                st = self.boost_state.get(p)
                if id(p) in leaving and st and "exp_max" in st:
                    st["exp_max"] = st["exp_max"].clone()
                    st["exp_min"] = st["exp_min"].clone()
        layout = _FlatLayout(params, device, dtype)
        for p, vmax, vmin in zip(params, layout.max_views, layout.min_views):
            st = self.boost_state.get(p)
            if st and "exp_max" in st:
                vmax.copy_(st["exp_max"])
                vmin.copy_(st["exp_min"])
            self.boost_state[p]["exp_max"] = vmax
            self.boost_state[p]["exp_min"] = vmin
        self._layouts[key] = layout
        return layout

    def _chunk_generators(self, device: torch.device) -> list[torch.Generator]:
        gens = self._chunk_gens.get(str(device))
        if gens is None:
            gens = [torch.Generator(device=device) for _ in range(_NOISE_CHUNKS)]
            self._chunk_gens[str(device)] = gens
        return gens

    def _generator(self, device: torch.device) -> torch.Generator:
        name = str(device)
        gen = self._generators.get(name)
        if gen is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(self._seed)
            saved = self._pending_generator_states.pop(name, None)
            if saved is None:
                # A checkpoint written by another rank names its own device ("cuda:0" loaded on
                # "cuda:1"); under DDP all ranks' generators are identical, so take it over.
                pending = self._pending_generator_states
                same_type = [k for k in pending if k.split(":")[0] == device.type]
                if len(same_type) == 1:
                    saved = self._pending_generator_states.pop(same_type[0])
            if saved is not None:
                gen.set_state(saved)
            self._generators[name] = gen
        return gen

    # -- checkpointing ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state dict plus a ``"gradboost"`` entry.

        The ``"gradboost"`` entry holds the hyper-parameters, the phase, the per-parameter step
        counters and raw statistics (keyed by parameter index like ``"state"``) and the noise
        generator states, so a resumed run draws the same noise as an uninterrupted one. As with
        ``torch.optim``, tensors are shared with the live state: save or deep-copy the result
        before stepping again.
        """
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        state_dict = self.optimizer.state_dict()
        index = self._param_indices()
        state_dict["gradboost"] = {
            "phase": self._phase,
            "decay": self._decay,
            "clamp": self._clamp,
            "noise_decay": self._noise_decay,
            "coin_toss": self._coin_toss,
            "seed": self._seed,
            "rule": self._rule,
            "state": {
                index[id(p)]: dict(st) for p, st in self.boost_state.items() if st.get("step")
            },
            "generators": {
                **self._pending_generator_states,
                **{name: gen.get_state() for name, gen in self._generators.items()},
            },
        }
        return self._state_dict_post_hooks(state_dict)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict from :meth:`state_dict` (or a plain one of the wrapped optimizer).

        Hyper-parameters, phase, statistics and generator states are restored, like
        ``torch.optim`` restores the learning rates. A plain optimizer state dict (no
        ``"gradboost"`` entry) loads the wrapped optimizer and restarts the GradBoost statistics
        and generators from scratch.

        Raises:
            ValueError: If the saved groups do not match, or a saved hyper-parameter is invalid.
        """
        state_dict = dict(state_dict)
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = dict(result)
        saved = state_dict.pop("gradboost", None)
        # Validate everything GradBoost owns before touching any state, so a bad checkpoint
        # leaves the optimizer as it was.
        if saved is not None:
            config = {
                "decay": _check_decay(saved["decay"]),
                "clamp": _check_clamp(saved["clamp"]),
                "noise_decay": _check_noise_decay(saved["noise_decay"]),
                "coin_toss": _check_coin_toss(saved["coin_toss"]),
                "seed": _check_seed(saved["seed"]),
                "phase": _check_phase(saved["phase"]),
                # checkpoints from before the option used the paper rule
                "rule": _check_rule(saved.get("rule", "paper")),
            }
            saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
            current = chain.from_iterable(g["params"] for g in self.param_groups)
            id_map = dict(zip(saved_ids, current))
            unknown = sorted(int(i) for i in saved["state"] if int(i) not in id_map)
            if unknown:
                raise ValueError(
                    f"GradBoost state refers to parameter indices {unknown}, but the optimizer's "
                    f"parameters are numbered 0..{len(id_map) - 1}"
                )
        self.optimizer.load_state_dict(state_dict)
        self.boost_state = defaultdict(dict)
        self._generators = {}
        self._pending_generator_states = {}
        self._layouts = {}
        self._previous_ids = {}
        if saved is not None:
            self._decay = config["decay"]
            self._clamp = config["clamp"]
            self._noise_decay = config["noise_decay"]
            self._coin_toss = config["coin_toss"]
            self._seed = config["seed"]
            self._phase = config["phase"]
            self._rule = config["rule"]
            for idx, st in saved["state"].items():
                p = id_map[int(idx)]
                self.boost_state[p] = {
                    "step": int(st["step"]),
                    "boost_step": int(st["boost_step"]),
                    # copy=True: never alias the caller's tensors, which they may reuse.
                    "exp_max": st["exp_max"].to(device=p.device, dtype=p.dtype, copy=True),
                    "exp_min": st["exp_min"].to(device=p.device, dtype=p.dtype, copy=True),
                }
            self._pending_generator_states = {
                name: gen_state.clone() for name, gen_state in saved["generators"].items()
            }
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)
