"""StatAssist: warm the optimizer with float training, then continue the same run fake-quantized.

Kim et al. (StatAssist & GradBoost, Sec. 3.1, Algorithm 2): one FP epoch lets the optimizer
accumulate a sensible momentum (and Adam/RMSprop moments); fusing and preparing the model for QAT
afterwards keeps every parameter object, so the optimizer continues with that state. It replaces
LR warm-up.

The switch also starts the optimizer add-ons of the QAT phase: GradBoost moves to its boost phase,
a transition-rate scheduler (:class:`~frostnet.optim.TransitionRateScheduler`, anywhere in the
wrapper chain) attaches to the prepared model, and learnable quantizer parameters created by the
QAT qconfig (EWGS interval bounds) join the optimizer.
"""

from __future__ import annotations

from typing import Any, Optional, TypeVar

import torch
from torch import nn
from torch.optim import Optimizer

from .. import quant
from ..optim import GradBoost, TransitionRateScheduler

__all__ = ["StatAssist", "PHASES", "find_wrapped"]

PHASES = ("fp", "qat")
_O = TypeVar("_O", bound=Optimizer)


def find_wrapped(optimizer: Optional[Optimizer], cls: type[_O]) -> Optional[_O]:
    """The first optimizer of type ``cls`` in a chain of wrappers (``.optimizer``), or None."""
    seen = 0
    while optimizer is not None and seen < 16:
        if isinstance(optimizer, cls):
            return optimizer
        optimizer = getattr(optimizer, "optimizer", None)
        seen += 1
    return None


class StatAssist:
    """Switches a float model and its optimizer to QAT after ``fp_epochs`` epochs.

    Usage in any training loop::

        model = frostnet.get_model("frostnet_small_1_0", num_classes=10)
        opt = GradBoost(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True))
        sa = StatAssist(model, opt, backend="x86", fp_epochs=1)
        for epoch in range(epochs):
            sa.on_epoch_start(epoch)      # prepares QAT in place at epoch == fp_epochs
            ...train one epoch with the same `opt`...
        int8 = frostnet.quant.convert(model, "x86")

    Args:
        model: the float model (with ``fuse_model``); modified in place at the switch.
        optimizer: the optimizer that trains ``model`` in both phases; a :class:`GradBoost`
            wrapper is moved from its ``"collect"`` to its ``"boost"`` phase at the switch.
        backend: the INT8 engine the fake quantization targets.
        fp_epochs: float epochs before the switch (0 = QAT from the first epoch).
        weight_quant_range / act_quant_range: passed to :func:`frostnet.quant.prepare_qat`.
        qconfig: the QAT qconfig (e.g. :func:`frostnet.quant.get_method_qconfig`); None = the
            default one for ``backend`` and the two ranges.
        qparam_group: index of the ``optimizer`` parameter group that receives parameters the
            qconfig's fake quantizers create (EWGS interval bounds); without it such parameters
            are an error, since nothing would train them.
        end_qconfig: the qconfig of the first and last quantized layers
            (:func:`frostnet.quant.keep_8bit_ends`, e.g. the method's 8-bit qconfig while
            ``qconfig`` simulates W4A4); None = every layer uses ``qconfig``.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: Optional[Optimizer] = None,
        *,
        backend: str = "x86",
        fp_epochs: int = 1,
        weight_quant_range: Optional[tuple[int, int]] = None,
        act_quant_range: Optional[tuple[int, int]] = None,
        qconfig: Optional[Any] = None,
        qparam_group: Optional[int] = None,
        end_qconfig: Optional[Any] = None,
    ) -> None:
        if not isinstance(fp_epochs, int) or fp_epochs < 0:
            raise ValueError(f"fp_epochs must be a non-negative integer, got {fp_epochs!r}")
        quant.check_backend(backend)
        if qparam_group is not None:
            groups = len(optimizer.param_groups) if optimizer is not None else 0
            if not isinstance(qparam_group, int) or not 0 <= qparam_group < groups:
                raise ValueError(f"qparam_group must index one of the optimizer's {groups} parameter groups, "
                                 f"got {qparam_group!r}")
        self.model, self.optimizer, self.backend, self.fp_epochs = model, optimizer, backend, fp_epochs
        self.weight_quant_range, self.act_quant_range = weight_quant_range, act_quant_range
        self.qconfig, self.qparam_group, self.end_qconfig = qconfig, qparam_group, end_qconfig
        self.phase = "fp"
        # The float model's tensors by their unfused names. QAT fusion keeps these very objects
        # (parameters and BN buffers), so they remain a float view of the latent weights.
        self._float_tensors: dict[str, torch.Tensor] = dict(model.state_dict(keep_vars=True))
        if isinstance(optimizer, GradBoost) and optimizer.phase != "collect":
            optimizer.set_phase("collect")

    def on_epoch_start(self, epoch: int) -> bool:
        """Switch to QAT if ``epoch`` has reached ``fp_epochs``; True if it switched now."""
        if self.phase == "fp" and epoch >= self.fp_epochs:
            self.switch_to_qat()
            return True
        return False

    def switch_to_qat(self) -> None:
        """Fuse + prepare the model for QAT in place, keeping parameters and optimizer state."""
        if self.phase == "qat":
            raise RuntimeError("StatAssist has already switched this model to QAT")
        before = {id(p) for p in self.model.parameters()}
        quant.prepare_qat(self.model, self.backend, weight_quant_range=self.weight_quant_range,
                          act_quant_range=self.act_quant_range, qconfig=self.qconfig)
        if self.end_qconfig is not None:
            quant.keep_8bit_ends(self.model, self.end_qconfig)
        after = list(self.model.parameters())
        if not before <= {id(p) for p in after}:
            # The optimizer would silently keep stepping orphaned tensors.
            raise RuntimeError("prepare_qat replaced parameter objects; the optimizer state would be lost")
        created = [p for p in after if id(p) not in before]
        if created and self.optimizer is not None:
            if self.qparam_group is None:
                raise RuntimeError(f"the QAT qconfig created {len(created)} learnable quantizer parameters that the "
                                   "optimizer does not train; pass qparam_group (an optimizer group for them)")
            self.optimizer.param_groups[self.qparam_group]["params"].extend(created)
        if isinstance(self.optimizer, GradBoost):
            self.optimizer.set_phase("boost")
        trs = find_wrapped(self.optimizer, TransitionRateScheduler)
        if trs is not None:
            trs.attach(self.model)
        self.phase = "qat"

    def float_state_dict(self) -> dict[str, torch.Tensor]:
        """The latent weights in the float model's (unfused) layout, detached copies."""
        return {k: v.detach().clone() for k, v in self._float_tensors.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"phase": self.phase, "fp_epochs": self.fp_epochs, "backend": self.backend}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the phase; call before loading the model's state dict (QAT needs the skeleton)."""
        if state.get("phase") not in PHASES:
            raise ValueError(f"unknown StatAssist phase {state.get('phase')!r}; valid choices: {', '.join(PHASES)}")
        if state["phase"] == "qat" and self.phase == "fp":
            self.switch_to_qat()
