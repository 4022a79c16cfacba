"""Transition-rate (TR) scheduling for QAT (Lee et al., "Scheduling Weight Transitions for
Quantization-Aware Training", Sec. 4.2): one wrapper for any ``torch.optim`` optimizer.

Instead of scheduling the learning rate of the quantized weights, a target rate :math:`R_t` of
integer-weight transitions is scheduled, and every quantized layer's weights are updated with a
transition-adaptive learning rate (TALR) :math:`U_t` that steers the layer's running transition
rate :math:`K_t` toward :math:`R_t`::

    model = frostnet.get_model("frostnet_small_1_0", num_classes=10)
    frostnet.quant.prepare_qat(model, "x86")
    optimizer = SGDT(model.parameters(), lr=0.05, momentum=0.9, target=0.02, schedule="cosine",
                     total_steps=steps, model=model)            # or TransitionRateScheduler(SGD(...))
    for x, y in batches:
        optimizer.zero_grad(); loss_fn(model(x), y).backward(); optimizer.step()

With a float model first (StatAssist), build the wrapper without ``model`` (it then acts as the plain
optimizer) and call :meth:`TransitionRateScheduler.attach` once the model is prepared for QAT.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable
from itertools import chain
from typing import Any, Final, Optional

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from .. import quant
from ._wrapper import OptimizerWrapper

__all__ = ["AdamT", "AdamWT", "SGDT", "TR_SCHEDULES", "TransitionRateScheduler"]

# Optimizers whose parameter change is not proportional to the learning rate.
_NONLINEAR = (torch.optim.LBFGS, torch.optim.Rprop, torch.optim.ASGD)

#: Schedules of the target transition rate :math:`R_t` (like LR schedules).
TR_SCHEDULES: Final[tuple[str, ...]] = ("constant", "step", "cosine")


def _real(name: str, value: object, low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> float:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        lo, hi = ("(" if low_open else "[") + f"{low:g}", f"{high:g}" + (")" if high_open else "]")
        raise ValueError(f"{name} must be a number in {lo}, {hi}, got {value!r}")
    return float(value)


class TransitionRateScheduler(OptimizerWrapper):
    r"""Schedule the transition rate of quantized weights instead of their learning rate.

    Per quantized layer (a QAT module with ``weight_fake_quant``), with :math:`w_d` the integer
    weight levels (:func:`frostnet.quant.weight_levels`), at every step :math:`t` (Eqs. 5, 10-12):

    .. math::
        k_t &= \frac{1}{N} \sum_i 1\big[w_d^t(i) \neq w_d^{t-1}(i)\big] \\
        K_t &= m K_{t-1} + (1 - m) k_t, \qquad K_0 = 0 \\
        U_t &= \max\big(0, U_{t-1} + \eta (R_t - K_t)\big) \\
        w^{t+1} &= w^t - U_t \, g^t

    where :math:`g^t` is the wrapped optimizer's update direction (momentum, Adam moments, weight
    decay included). Every optimizer accepted here moves a parameter linearly in its learning
    rate, so one inner step at learning rate 1 gives :math:`g^t`: the groups holding quantized
    weights step at ``lr = 1`` and each parameter's change is then scaled by its own rate, the
    TALR :math:`U` for a quantized weight and the group's scheduled ``lr`` for everything else
    in the group (BN, biases, float layers, quantizer parameters), which therefore steps as
    without the scheduler (up to rounding). The scheduled learning rate thus no longer acts on
    the quantized weights; it still sets the first TALR :math:`U_0`.

    **What a transition is here.** :math:`w_d` is the integer level the forward pass uses
    (:func:`frostnet.quant.weight_levels`): ``clamp(round(w * f / scale) + zero_point, qmin, qmax)``,
    with ``scale``/``zero_point`` those the weight fake quantizer used in the last forward pass and
    :math:`f` the BN folding factor
    :math:`\gamma / \sqrt{\sigma^2_{running} + \epsilon}` of fused Conv-BN layers (1 otherwise).
    :math:`k_t` compares the levels of the weights before and after ``step()`` on the *same* grid
    (scale, zero point and :math:`f` taken before the step), so it counts exactly the transitions
    caused by the latent-weight update, the quantity :math:`U` controls; grid changes between steps
    (observer updates, BN statistics, :math:`\gamma` stepped by the optimizer) are not counted.

    **Weight quantizer parameters.** The paper does not train the weight quantizers' scales while
    TR scheduling is active (otherwise levels change without the latent weights moving). With
    ``freeze_weight_qparams=True`` (default) the weight quantizers are frozen when the scheduler
    starts: EWGS intervals stop training, observer-based quantizers (torch's min/max, OCTAV) keep
    the grid of the first QAT forward pass (OCTAV weights thus become static-OCTAV). In fused
    Conv-BN layers the frozen grid is kept fixed in units of the unfolded weight, as the paper's
    quantizer before BN is: after every step it follows BN's folding factor
    (:class:`frostnet.quant.FoldTracker`). Frozen in units of the folded weight, as a plain
    disabled observer leaves it, it collapsed FrostNet-Small 0.5 (W8A8 test top-1 29.65%).

    Args:
        optimizer: the optimizer to wrap (any ``torch.optim`` optimizer except LBFGS, Rprop, ASGD).
        target: :math:`R_0`, the initial target transition rate (fraction of weights per step);
            with ``relative=True`` a fraction of the measured reference rate instead.
        relative: measure the reference rate :math:`\bar k` first: for ``calibration_steps``
            steps every quantized weight steps at its initial rate :math:`U_0` (the scheduled LR:
            plain STE training), then :math:`R_0 = \text{target} \cdot \bar k` (the mean rate over
            those steps and layers) and each layer's :math:`K` starts at its own mean rate. This
            keeps the target in the range the weights actually move at, whatever the bit width:
            at W8A8 the natural rate of FrostNets is 0.15-0.20 per step, at W4A4 0.03-0.05, so a
            fixed 0.02 drives :math:`U` to 0 at 8 bits (see docs/methods.md).
        calibration_steps: length of that measurement (``relative`` only).
        schedule: how :math:`R_t` decays: ``"constant"``, ``"step"`` (times ``gamma`` every
            ``step_size`` steps) or ``"cosine"`` (to ``min_target`` at ``total_steps``).
        total_steps: length of the cosine schedule (steps since the scheduler became active).
        step_size, gamma: the step schedule.
        min_target: the cosine schedule's final value.
        eta: :math:`\eta`, the TALR adaptation rate; None = the initial TALR :math:`U_0`.
        rate_momentum: :math:`m` of the running rate (named so as not to clash with SGD's momentum).
        initial_lr: :math:`U_0`; None = the wrapped optimizer's learning rate of the layer's
            group when the layer is attached.
        freeze_weight_qparams: freeze the weight quantizers (see above).
        model: attach this QAT-prepared model now (else call :meth:`attach` later).
    """

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        target: float = 0.02,
        schedule: str = "cosine",
        total_steps: Optional[int] = None,
        step_size: Optional[int] = None,
        gamma: float = 0.1,
        min_target: float = 0.0,
        eta: Optional[float] = None,
        rate_momentum: float = 0.99,
        initial_lr: Optional[float] = None,
        freeze_weight_qparams: bool = True,
        relative: bool = False,
        calibration_steps: int = 20,
        model: Optional[nn.Module] = None,
    ) -> None:
        if isinstance(optimizer, TransitionRateScheduler):
            raise TypeError("optimizer is already a TransitionRateScheduler; wrap the inner optimizer only once")
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer instance, got {type(optimizer).__name__}")
        if isinstance(optimizer, _NONLINEAR):
            raise TypeError(f"TransitionRateScheduler cannot wrap {type(optimizer).__name__}: its step is not linear in "
                            f"the learning rate; use SGD, Adam, AdamW, RMSprop or another optimizer whose step is")
        self.optimizer = optimizer
        self.config: dict[str, Any] = self._check_config(dict(
            target=target, schedule=schedule, total_steps=total_steps, step_size=step_size, gamma=gamma,
            min_target=min_target, eta=eta, rate_momentum=rate_momentum, initial_lr=initial_lr,
            freeze_weight_qparams=freeze_weight_qparams, relative=relative, calibration_steps=calibration_steps))
        # The measured reference rate of relative targets (None until calibrated).
        self._reference: Optional[float] = None
        # Per quantized weight: {"K": running rate, "U": TALR, "k": last rate}, keyed like
        # optimizer state (by the parameter tensor) and saved by parameter index.
        self.layer_state: dict[Tensor, dict[str, float]] = {}
        self._layers: list[tuple[str, nn.Module, nn.Parameter, int]] = []
        self._steps = 0
        self._freeze_pending = False
        self._fold: Optional[quant.FoldTracker] = None
        self._loaded_folds: dict[Tensor, Tensor] = {}
        self._init_optimizer_base()
        if model is not None:
            self.attach(model)

    @staticmethod
    def _check_config(c: dict[str, Any]) -> dict[str, Any]:
        if c["schedule"] not in TR_SCHEDULES:
            raise ValueError(f"unknown target schedule {c['schedule']!r}; valid choices: {', '.join(TR_SCHEDULES)}")
        c["target"] = _real("target", c["target"], 0.0, 1.0)
        c["min_target"] = _real("min_target", c["min_target"], 0.0, c["target"])
        c["gamma"] = _real("gamma", c["gamma"], 0.0, 1.0)
        c["rate_momentum"] = _real("rate_momentum", c["rate_momentum"], 0.0, 1.0, high_open=True)
        if c["eta"] is not None:
            c["eta"] = _real("eta", c["eta"], 0.0, math.inf, high_open=True)
        if c["initial_lr"] is not None:
            c["initial_lr"] = _real("initial_lr", c["initial_lr"], 0.0, math.inf, high_open=True)
        for name in ("total_steps", "step_size"):
            v = c[name]
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ValueError(f"{name} must be a positive int or None, got {v!r}")
        if c["schedule"] == "cosine" and c["total_steps"] is None:
            raise ValueError("the cosine target schedule needs total_steps")
        if c["schedule"] == "step" and c["step_size"] is None:
            raise ValueError("the step target schedule needs step_size")
        # Checkpoints written before relative targets existed hold absolute ones.
        c.setdefault("relative", False)
        c.setdefault("calibration_steps", 20)
        if not isinstance(c["relative"], bool):
            raise TypeError(f"relative must be a bool, got {c['relative']!r}")
        cal = c["calibration_steps"]
        if not isinstance(cal, int) or isinstance(cal, bool) or cal < 1:
            raise ValueError(f"calibration_steps must be a positive int, got {cal!r}")
        if not isinstance(c["freeze_weight_qparams"], bool):
            raise TypeError(f"freeze_weight_qparams must be a bool, got {c['freeze_weight_qparams']!r}")
        return c

    def __repr__(self) -> str:
        inner = "\n".join("    " + line for line in repr(self.optimizer).splitlines())
        settings = ", ".join(f"{k}={v!r}" for k, v in self.config.items())
        return f"TransitionRateScheduler({settings}, layers={len(self._layers)},\n{inner}\n)"

    # -- layers and schedule -----------------------------------------------------------------------

    @property
    def active(self) -> bool:
        """True once quantized layers are attached (before that, ``step()`` is the plain optimizer's)."""
        return bool(self._layers)

    @property
    def steps(self) -> int:
        """Scheduled steps taken since the scheduler became active (the :math:`t` of :math:`R_t`)."""
        return self._steps

    def attach(self, model: nn.Module) -> int:
        """Schedule every fake-quantized weight of ``model`` (prepared for QAT); returns their number.

        Weights the wrapped optimizer does not train are skipped. A layer keeps its state if it
        already has one (e.g. loaded from a checkpoint before attaching).

        Raises:
            ValueError: ``model`` has no fake-quantized weights the optimizer trains.
        """
        group_of = {id(p): i for i, g in enumerate(self.param_groups) for p in g["params"]}
        layers = []
        for name, module in quant.weight_quantized_modules(model):
            w = module.weight
            if id(w) in group_of and w.requires_grad:
                layers.append((name, module, w, group_of[id(w)]))
        if not layers:
            raise ValueError(f"{type(model).__name__} has no fake-quantized weights trained by this optimizer; "
                             "prepare it for QAT (frostnet.quant.prepare_qat) before attaching")
        self._layers = layers
        for _, _, w, gi in layers:
            if w not in self.layer_state:
                u0 = self.config["initial_lr"]
                self.layer_state[w] = {"K": 0.0, "U": float(self.param_groups[gi]["lr"]) if u0 is None else u0, "k": 0.0}
        if self.config["eta"] is None:
            self.config["eta"] = float(self.layer_state[layers[0][2]]["U"])
        if self.config["freeze_weight_qparams"]:
            for _, module, _, _ in layers:
                if isinstance(module.weight_fake_quant, quant.EWGSFakeQuantize):
                    quant.freeze_weight_quantizer(module)
            # Observer-based grids exist only after a forward pass: freeze them at the first step.
            self._freeze_pending = True
            # A frozen grid of a fused Conv-BN layer must follow BN's folding factor, or it
            # drifts against the weights and can collapse (see quant.FoldTracker).
            self._fold = quant.FoldTracker(modules=[module for _, module, _, _ in layers])
            self._apply_loaded_folds()
        return len(layers)

    @property
    def reference_rate(self) -> Optional[float]:
        """The measured rate relative targets scale (None before calibration or when absolute)."""
        return self._reference

    @property
    def calibrating(self) -> bool:
        """True while a relative target's reference rate is being measured (U is not adapted)."""
        return self.config["relative"] and self._steps < self.config["calibration_steps"]

    def target_rate(self, step: Optional[int] = None) -> float:
        """:math:`R_t` at ``step`` (default: the current step); relative targets: 0 before calibration."""
        t = self._steps if step is None else step
        c = self.config
        scale = 1.0 if not c["relative"] else (self._reference or 0.0)
        if c["schedule"] == "constant":
            return scale * c["target"]
        if c["schedule"] == "step":
            return scale * c["target"] * c["gamma"] ** (t // c["step_size"])
        frac = min(t, c["total_steps"]) / c["total_steps"]
        return scale * (c["min_target"] + (c["target"] - c["min_target"]) * 0.5 * (1.0 + math.cos(math.pi * frac)))

    def layer_rates(self) -> dict[str, dict[str, float]]:
        """Per attached layer: last rate ``k``, running rate ``K`` and TALR ``U``."""
        return {name: dict(self.layer_state[w]) for name, _, w, _ in self._layers}

    def summary(self) -> dict[str, float]:
        """Target rate and the mean running rate / TALR over the layers (for logging)."""
        if not self._layers:
            return {}
        states = [self.layer_state[w] for _, _, w, _ in self._layers]
        return {"tr_target": self.target_rate(), "tr_running": sum(s["K"] for s in states) / len(states),
                "talr_mean": sum(s["U"] for s in states) / len(states)}

    # -- step ------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:  # type: ignore[override]
        """Step the wrapped optimizer, move the quantized weights by their TALR, count their
        transitions and adapt the TALRs (Eqs. 5, 10-12)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self._layers:
            self.optimizer.step()
            return loss
        if self._freeze_pending:
            for _, module, _, _ in self._layers:
                quant.freeze_weight_quantizer(module)
            self._freeze_pending = False
        before = []
        for _, module, w, _ in self._layers:
            grid = quant.weight_quant_grid(module)
            before.append((grid, quant.weight_levels(module, grid)))
        # Groups with quantized weights step at lr = 1 (the update direction g); every parameter
        # in them is then moved by its own rate.
        groups = sorted({gi for _, _, _, gi in self._layers})
        rates = {gi: float(self.param_groups[gi]["lr"]) for gi in groups}
        talr = {id(w): self.layer_state[w]["U"] for _, _, w, _ in self._layers}
        start = {gi: [(p, p.detach().clone()) for p in self.param_groups[gi]["params"]] for gi in groups}
        try:
            for gi in groups:
                self.param_groups[gi]["lr"] = 1.0
            self.optimizer.step()
        finally:
            for gi in groups:
                self.param_groups[gi]["lr"] = rates[gi]
        for gi in groups:
            for p, p0 in start[gi]:
                rate = talr.get(id(p), rates[gi])
                p.sub_(p0).mul_(rate).add_(p0)
        c = self.config
        calibrating = self.calibrating
        target = self.target_rate()
        for (_, module, w, _), (grid, levels) in zip(self._layers, before):
            st = self.layer_state[w]
            k = float((quant.weight_levels(module, grid) != levels).sum()) / max(1, levels.numel())
            st["k"] = k
            if calibrating:
                # Measuring the reference: U stays U_0, the rates are summed.
                st["k_sum"] = st.get("k_sum", 0.0) + k
                continue
            st["K"] = c["rate_momentum"] * st["K"] + (1.0 - c["rate_momentum"]) * k
            st["U"] = max(0.0, st["U"] + c["eta"] * (target - st["K"]))
        if calibrating and self._steps + 1 == c["calibration_steps"]:
            states = [self.layer_state[w] for _, _, w, _ in self._layers]
            for st in states:
                st["K"] = st.pop("k_sum") / c["calibration_steps"]
            self._reference = sum(st["K"] for st in states) / len(states)
        if self._fold is not None:
            self._fold.update()
        self._steps += 1
        return loss

    # -- checkpointing -----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state dict plus a ``"transition"`` entry: the settings, the step
        count and, per attached weight (by parameter index), ``K``, ``U`` and ``k``, and the BN
        factors of the frozen Conv-BN grids."""
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        state_dict = self.optimizer.state_dict()
        index = self._param_indices()
        state_dict["transition"] = {
            "config": dict(self.config),
            "steps": self._steps,
            "reference": self._reference,
            "layers": {index[id(p)]: dict(st) for p, st in self.layer_state.items() if id(p) in index},
            # BN factors the frozen Conv-BN grids were last synchronised to (FoldTracker)
            "folds": {index[id(w)]: f for w, f in self._fold_refs().items() if id(w) in index},
        }
        return self._state_dict_post_hooks(state_dict)

    def _fold_refs(self) -> dict[Tensor, Tensor]:
        if self._fold is None:
            return dict(self._loaded_folds)
        by_module = {id(m): w for _, m, w, _ in self._layers}
        folds = self._fold.state_dict()["folds"]
        return {by_module[id(m)]: f for m, f in zip(self._fold.modules, folds) if f is not None}

    def _apply_loaded_folds(self) -> None:
        if self._fold is None or not self._loaded_folds:
            return
        by_module = {id(m): w for _, m, w, _ in self._layers}
        folds = self._fold.state_dict()["folds"]
        for j, m in enumerate(self._fold.modules):
            w = by_module[id(m)]
            if w in self._loaded_folds:
                folds[j] = self._loaded_folds[w]
        self._fold.load_state_dict({"folds": folds})

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load :meth:`state_dict` output (or a plain state dict of the wrapped optimizer, which
        restarts the TR statistics). Layers attached later keep the loaded per-layer state."""
        state_dict = dict(state_dict)
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = dict(result)
        saved = state_dict.pop("transition", None)
        if saved is not None:
            config = self._check_config(dict(saved["config"]))
            saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
            current = chain.from_iterable(g["params"] for g in self.param_groups)
            id_map = dict(zip(saved_ids, current))
            unknown = sorted(int(i) for i in saved["layers"] if int(i) not in id_map)
            if unknown:
                raise ValueError(f"transition state refers to parameter indices {unknown}, but the optimizer's "
                                 f"parameters are numbered 0..{len(id_map) - 1}")
        self.optimizer.load_state_dict(state_dict)
        self.layer_state = {}
        self._loaded_folds = {}
        if saved is not None:
            self.config = config
            self._steps = int(saved["steps"])
            self._reference = saved.get("reference")
            for idx, st in saved["layers"].items():
                self.layer_state[id_map[int(idx)]] = {k: float(v) for k, v in st.items()}
            for idx, f in saved.get("folds", {}).items():
                if int(idx) in id_map:
                    self._loaded_folds[id_map[int(idx)]] = f
            self._apply_loaded_folds()
        else:
            self._steps = 0
            self._reference = None
        for _, _, w, gi in self._layers:
            if w not in self.layer_state:
                u0 = self.config["initial_lr"]
                self.layer_state[w] = {"K": 0.0, "U": float(self.param_groups[gi]["lr"]) if u0 is None else u0, "k": 0.0}
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)


class SGDT(TransitionRateScheduler):
    """SGD with transition-rate scheduling (the paper's SGDT): ``TransitionRateScheduler(SGD(...))``.

    ``lr`` is used for the parameters that are not quantized weights and as the initial TALR;
    keyword arguments after ``nesterov`` are those of :class:`TransitionRateScheduler`.
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, **kwargs: Any) -> None:
        super().__init__(torch.optim.SGD(params, lr=lr, momentum=momentum, dampening=dampening,
                                         weight_decay=weight_decay, nesterov=nesterov), **kwargs)


class AdamT(TransitionRateScheduler):
    """Adam with transition-rate scheduling (the paper's AdamT); see :class:`SGDT`."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, **kwargs: Any) -> None:
        super().__init__(torch.optim.Adam(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay), **kwargs)


class AdamWT(TransitionRateScheduler):
    """AdamW with transition-rate scheduling (the paper's AdamWT); see :class:`SGDT`."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, **kwargs: Any) -> None:
        super().__init__(torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay), **kwargs)
