"""Weight EMA for the recipe: an exponential moving average of the trained parameters.

Built on :class:`torch.optim.swa_utils.AveragedModel` (``use_buffers=False``): the parameters
are averaged; BatchNorm's running statistics are averaged alike (as timm's EMA does: statistics
of the live weights do not fit averaged weights while the learning rate is high); every other
buffer is copied from the live model at each update. Those are the fake quantizers' observers:
this recipe's weight and activation observers are moving averages (constant 0.01) themselves, so
their ranges already smooth the last hundred or so steps, and an INT8 conversion of the averaged
weights uses them as it would the live model's.

StatAssist changes the model's structure when it switches to QAT (fusion, fake quantization), so
the average restarts from the live weights at the switch: the exported EMA is an average over the
QAT phase only. With ``--ema-decay d`` it covers about ``1 / (1 - d)`` steps, so an average
started (or restarted by a resume that adds the flag) that many steps before the end equals one
kept from the start up to a negligible weight.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

__all__ = ["WeightEMA"]


def _bn_statistics(averaged: nn.Module, live: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(averaged, live)`` pairs of the BatchNorm running means and variances of two same-structured models."""
    pairs = []
    for mine, theirs in zip(averaged.modules(), live.modules()):
        if isinstance(mine, nn.modules.batchnorm._BatchNorm) and mine.running_mean is not None:
            assert isinstance(theirs, nn.modules.batchnorm._BatchNorm) and theirs.running_mean is not None
            assert mine.running_var is not None and theirs.running_var is not None
            pairs += [(mine.running_mean, theirs.running_mean), (mine.running_var, theirs.running_var)]
    return pairs


class WeightEMA:
    """The exponential moving average of a model's parameters, restarted when the phase changes.

    Args:
        decay: weight of the old average per step, in ``(0, 1)``.
    """

    def __init__(self, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"--ema-decay must lie in (0, 1) (e.g. 0.999; 0 turns EMA off), got {decay}")
        self.decay = decay
        self.phase: Optional[str] = None
        self.averaged: Optional[AveragedModel] = None

    @property
    def module(self) -> nn.Module:
        """The averaged copy of the model (raises before :meth:`start`)."""
        if self.averaged is None:
            raise RuntimeError("the weight EMA has not started; call start(model, phase) first")
        return self.averaged.module

    def start(self, model: nn.Module, phase: str) -> None:
        """Begin a new average at ``model``'s current weights (``phase``: StatAssist's phase)."""
        self.averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(self.decay), use_buffers=False)
        self.averaged.update_parameters(model)  # the first update copies the weights
        self.phase = phase

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One EMA step towards ``model``'s parameters; its buffers are copied."""
        if self.averaged is None:
            raise RuntimeError("the weight EMA has not started; call start(model, phase) first")
        for mine, theirs in zip(self.averaged.module.buffers(), model.buffers()):
            if mine.shape != theirs.shape:
                # observers size their min/max buffers at the first batch they see (as they do themselves)
                mine.resize_(theirs.shape)
        stats = _bn_statistics(self.averaged.module, model)
        before = [mine.clone() for mine, _ in stats]
        self.averaged.update_parameters(model)  # averages the parameters, copies every buffer
        for (mine, theirs), old in zip(stats, before):
            mine.copy_(old.lerp(theirs, 1.0 - self.decay))

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the average into ``model`` in place (same structure): the averaged parameters and
        BatchNorm statistics, and the other buffers, which are the live model's as of the last update."""
        mine = self.module.state_dict()
        theirs = model.state_dict()
        if mine.keys() != theirs.keys():
            raise RuntimeError(f"the EMA copy and the model differ in {sorted(mine.keys() ^ theirs.keys())[:5]}: "
                               "they come from different phases or architectures")
        # in place (not load_state_dict's module-level logic): tensors referenced elsewhere, such as
        # StatAssist's float view of the latent weights, see the new values
        for key, value in mine.items():
            target = theirs[key]
            if target.shape != value.shape:
                raise RuntimeError(f"{key}: the EMA copy holds shape {tuple(value.shape)}, the model "
                                   f"{tuple(target.shape)}; update() the average from this model first")
            target.copy_(value)

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs to continue the average bit for bit."""
        return {"decay": self.decay, "phase": self.phase,
                "averaged": self.averaged.state_dict() if self.averaged is not None else None}

    def load_state_dict(self, state: dict[str, Any], model: nn.Module) -> None:
        """Restore an average saved by :meth:`state_dict`; ``model`` has the checkpoint's structure."""
        if state.get("averaged") is None:
            return
        self.start(model, state["phase"])
        assert self.averaged is not None
        self.averaged.load_state_dict(state["averaged"], strict=True)
