"""FoldTracker: fixed weight grids of fused Conv-BN QAT layers follow BN's folding factor."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch import Tensor, nn

from .ewgs import _MIN_WIDTH, EWGSFakeQuantize
from .weight_levels import bn_fold, weight_quantized_modules

__all__ = ["FoldTracker"]

_MIN_FOLD = 1e-12  # |BN factor| floor, so a zeroed gamma cannot make a grid ratio infinite


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
