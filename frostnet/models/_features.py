"""Feature taps of a backbone (``feature_info``) and plugging them into torchvision heads.

Public through :mod:`frostnet.models` (``frostnet.models.backbone_with_fpn``,
``frostnet.models.FeatureInfo``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Optional, Union, overload

from torch import nn

__all__ = ["FeatureInfo", "backbone_with_fpn"]


class FeatureInfo(Sequence[Mapping[str, Any]]):
    """The feature maps a backbone returns, in order (timm's ``feature_info``).

    Each item is a dict with ``num_chs`` (channels), ``reduction`` (stride w.r.t. the input),
    ``module`` (the module whose output is tapped) and ``index`` (the tap's number among all
    taps of the network, what ``out_indices`` selects).

    Example::

        model = frostnet.get_model("frostnet_small_1_0", features_only=True, out_indices=(2, 4))
        model.feature_info.channels()   # [40, 320]
        model.feature_info.reduction()  # [8, 32]
    """

    def __init__(self, taps: Sequence[Mapping[str, Any]], out_indices: Iterable[int]) -> None:
        """Args:
            taps: every tap of the network, in order (num_chs, reduction, module).
            out_indices: the taps returned.
        """
        taps = list(taps)
        chosen = list(out_indices)
        bad = [i for i in chosen if not 0 <= i < len(taps)]
        if bad:
            raise ValueError(f"out_indices {tuple(chosen)!r} must be taps 0..{len(taps) - 1}")
        self._info = [{**taps[i], "index": i} for i in chosen]

    @overload
    def __getitem__(self, i: int) -> Mapping[str, Any]: ...

    @overload
    def __getitem__(self, i: slice) -> list[Mapping[str, Any]]: ...

    def __getitem__(self, i: Union[int, slice]) -> Union[Mapping[str, Any], list[Mapping[str, Any]]]:
        return self._info[i]

    def __len__(self) -> int:
        return len(self._info)

    def __iter__(self) -> Iterator[Mapping[str, Any]]:
        return iter(self._info)

    def __repr__(self) -> str:
        return f"FeatureInfo({self._info!r})"

    def channels(self) -> list[int]:
        """Channels of each returned feature map."""
        return [int(f["num_chs"]) for f in self._info]

    def reduction(self) -> list[int]:
        """Stride of each returned feature map w.r.t. the input."""
        return [int(f["reduction"]) for f in self._info]

    def module_names(self) -> list[str]:
        """Names of the tapped modules."""
        return [str(f["module"]) for f in self._info]


def backbone_with_fpn(
    model: nn.Module,
    *,
    out_indices: Sequence[int] = (1, 2, 3, 4),
    out_channels: int = 256,
    extra_blocks: Optional[Any] = None,
) -> nn.Module:
    """Wrap a FrostNet (classifier or ``features_only``) as a torchvision ``BackboneWithFPN``.

    Args:
        model: a float FrostNet; its ``feature_info`` names the tap modules.
        out_indices: taps to feed the FPN (1..4 = strides 4, 8, 16, 32); a ``features_only``
            model must return them.
        out_channels: FPN channels (``backbone.out_channels`` for torchvision detectors).
        extra_blocks: a ``torchvision.ops.feature_pyramid_network.ExtraFPNBlock``, e.g.
            ``LastLevelP6P7`` for RetinaNet; default ``LastLevelMaxPool``.

    Example::

        backbone = frostnet.models.backbone_with_fpn(frostnet.get_model("frostnet_small_1_0"))
        detector = torchvision.models.detection.FasterRCNN(backbone, num_classes=91)
    """
    # imported here: torchvision's detection package is only needed by callers of this helper
    from torchvision.models.detection.backbone_utils import BackboneWithFPN

    info = getattr(model, "feature_info", None)
    if not isinstance(info, FeatureInfo):
        raise TypeError(f"{type(model).__name__} has no FeatureInfo feature_info; pass a FrostNet")
    by_index = {int(f["index"]): f for f in info}
    bad = [i for i in out_indices if i not in by_index]
    if bad or not out_indices:
        have = ", ".join(f"{i}={f['module']}" for i, f in by_index.items())
        raise ValueError(f"out_indices {tuple(out_indices)!r} must be taps the model has: {have}")
    return_layers = {str(by_index[i]["module"]): str(k) for k, i in enumerate(out_indices)}
    in_channels = [int(by_index[i]["num_chs"]) for i in out_indices]
    return BackboneWithFPN(model, return_layers, in_channels, out_channels, extra_blocks=extra_blocks)
