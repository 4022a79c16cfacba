"""SSDLite (Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks", Sec. 6.2)
on MobileNetV2 and on FrostNet backbones, made fusable for INT8 (``shared/specs/baselines.md``).

This is the real SSDLite: the extra layers and both prediction heads use depthwise-separable
convolutions (the reference build of the StatAssist/GradBoost paper used full 3x3 heads, 4.61M
params). Every activation is ReLU instead of ReLU6 so each Conv-BN-ReLU fuses into one INT8 conv.

Quantization: everything up to the heads' depthwise layers is INT8; the last layer of each head
(the 1x1 prediction convs, ``float_modules``) stays FP32, as the paper keeps the last layer float.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..quant import FloatFunctional, QuantStub
from ._layers import ConvBNAct, init_weights
from ._registry import register_model
from .detection import Predictor, PriorSpec, SSDDetector, SSDHead, check_detector_args
from .frostnet import MODES, frostnet

__all__ = [
    "InvertedResidual",
    "InvertedResidualConfig",
    "MobileNetV2Features",
    "SSDLiteBody",
    "SSDLITE_PRIORS",
    "ssdlite_frostnet",
    "ssdlite_mobilenet_v2",
]


@dataclass(frozen=True)
class InvertedResidualConfig:
    """One MobileNetV2 stage (Table 2 of the paper): expansion t, channels c, repeats n, stride s."""

    expansion: int
    out_channels: int
    repeats: int
    stride: int


def _ir(t: int, c: int, n: int, s: int) -> InvertedResidualConfig:
    return InvertedResidualConfig(t, c, n, s)


# MobileNetV2 at width 1.0; map sizes at a 300x300 input.
_MOBILENET_V2: tuple[InvertedResidualConfig, ...] = (
    _ir(1, 16, 1, 1),   # 150x150
    _ir(6, 24, 2, 2),   # 75x75
    _ir(6, 32, 3, 2),   # 38x38
    _ir(6, 64, 4, 2),   # 19x19
    _ir(6, 96, 3, 1),   # 19x19
    _ir(6, 160, 3, 2),  # 10x10; the expansion of its first block (576 ch @ 19x19, "layer 15") is source 1
    _ir(6, 320, 1, 1),  # 10x10
)
_MBV2_STEM, _MBV2_LAST = 32, 1280  # the 1x1 conv to 1280 ch ("layer 19") is source 2
_TAP_STAGE = 5  # the stage whose first block's expansion output feeds the first head

# Extra layers on the stride-32 source: 1x1 to depth/2, depthwise 3x3 stride 2, 1x1 to depth.
# Maps 5x5, 3x3, 2x2, 1x1 at 300x300 (after 19x19 and 10x10).
SSDLITE_EXTRA_DEPTHS: tuple[int, ...] = (512, 256, 256, 128)

# The priors of the SSDLite configs (TF Object Detection API, where SSDLite was released): sizes
# spaced linearly from 0.2 to 0.95 of the image (1.0 closes the last level), six boxes per location
# (ratios 1, 2, 1/2, 3, 1/3 and a square of the interpolated size), except the stride-16 level,
# which gets three (0.1 square, 0.2 at ratios 2 and 1/2). With these counts the extra layers and
# heads for 80 classes have the 2.1M params of the MobileNetV2 paper's Table 5.
_SCALES = tuple(round(0.2 + 0.15 * k, 2) for k in range(6)) + (1.0,)
_LOWEST = ((0.1, 0.1), (0.2 * math.sqrt(2), 0.2 / math.sqrt(2)), (0.2 / math.sqrt(2), 0.2 * math.sqrt(2)))
SSDLITE_PRIORS = PriorSpec(
    (_LOWEST,) + PriorSpec.ssd(_SCALES[1:-1], _SCALES[2:], ((2.0, 3.0),) * 5).shapes
)


class InvertedResidual(nn.Module):
    """MobileNetV2 block: expand 1x1 -> depthwise 3x3 -> project 1x1 (no ReLU), residual if shapes allow."""

    def __init__(self, in_channels: int, out_channels: int, *, expansion: int, stride: int) -> None:
        super().__init__()
        hidden = in_channels * expansion
        self.expand = ConvBNAct(in_channels, hidden) if expansion != 1 else nn.Identity()
        self.dw = ConvBNAct(hidden, hidden, 3, stride, groups=hidden)
        self.project = ConvBNAct(hidden, out_channels, act=False)
        self.use_residual = stride == 1 and in_channels == out_channels
        if self.use_residual:
            self.skip_add = FloatFunctional()
        self.hidden_channels = hidden

    def forward_expanded(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(block output, expansion output)``; SSDLite taps the latter."""
        expanded = self.expand(x)
        out = self.project(self.dw(expanded))
        if self.use_residual:
            out = self.skip_add.add(out, x)
        return out, expanded

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_expanded(x)[0]


class MobileNetV2Features(nn.Module):
    """MobileNetV2 without its classifier, returning SSDLite's two sources.

    Returns ``[expansion output of the first stride-32 block (stride 16), last 1x1 conv (stride 32)]``.
    """

    def __init__(self, in_channels: int = 3, rows: Sequence[InvertedResidualConfig] = _MOBILENET_V2) -> None:
        super().__init__()
        layers: list[nn.Module] = [ConvBNAct(in_channels, _MBV2_STEM, 3, 2)]
        channels = _MBV2_STEM
        tap_channels = 0
        for stage, row in enumerate(rows):
            for i in range(row.repeats):
                block = InvertedResidual(channels, row.out_channels, expansion=row.expansion,
                                         stride=row.stride if i == 0 else 1)
                if stage == _TAP_STAGE and i == 0:
                    self.tap_index, tap_channels = len(layers), block.hidden_channels
                layers.append(block)
                channels = row.out_channels
        layers.append(ConvBNAct(channels, _MBV2_LAST))
        self.features = nn.Sequential(*layers)
        self.out_channels: tuple[int, int] = (tap_channels, _MBV2_LAST)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        for i, layer in enumerate(self.features):
            if i == self.tap_index:
                x, tap = layer.forward_expanded(x)
            else:
                x = layer(x)
        return [tap, x]


def _extra_block(in_channels: int, depth: int) -> nn.Sequential:
    mid = depth // 2
    return nn.Sequential(
        ConvBNAct(in_channels, mid),
        ConvBNAct(mid, mid, 3, 2, groups=mid),
        ConvBNAct(mid, depth),
    )


def _separable_predictor(channels: int, outputs: int) -> Predictor:
    # depthwise 3x3-BN-ReLU (INT8), then the 1x1 prediction conv (FP32, with bias)
    return Predictor(nn.Conv2d(channels, outputs, 1), pre=ConvBNAct(channels, channels, 3, groups=channels))


class SSDLiteBody(nn.Module):
    """QuantStub -> backbone (two sources) -> extra layers -> separable heads (FP32 last convs).

    Args:
        backbone: image -> ``[stride-16 map, stride-32 map]``, quantized domain (no stubs of its own).
        backbone_channels: channels of those two maps.
        num_classes: classes including background.
        num_anchors: priors per location of each of the ``2 + len(extra_depths)`` levels.
        extra_depths: output channels of the extra layers.
    """

    def __init__(
        self,
        backbone: nn.Module,
        backbone_channels: Sequence[int],
        *,
        num_classes: int,
        num_anchors: Sequence[int],
        extra_depths: Sequence[int] = SSDLITE_EXTRA_DEPTHS,
    ) -> None:
        super().__init__()
        channels = list(backbone_channels) + list(extra_depths)
        if len(num_anchors) != len(channels):
            raise ValueError(f"need priors per location for {len(channels)} levels, got {list(num_anchors)}")
        self.quant = QuantStub()
        self.backbone = backbone
        extras, prev = [], backbone_channels[-1]
        for depth in extra_depths:
            extras.append(_extra_block(prev, depth))
            prev = depth
        self.extras = nn.ModuleList(extras)
        self.head = SSDHead(
            [_separable_predictor(c, a * 4) for c, a in zip(channels, num_anchors)],
            [_separable_predictor(c, a * num_classes) for c, a in zip(channels, num_anchors)],
        )
        self.float_modules: tuple[str, ...] = tuple(f"head.{n}" for n in self.head.float_modules)
        init_weights(self.extras)
        init_weights(self.head)
        for name in self.head.float_modules:
            # Kaiming fan_out on a 1x1 predictor gives huge initial logits; SSD heads start small.
            pred = self.head.get_submodule(name)
            nn.init.normal_(pred.weight, 0.0, 0.01)
            nn.init.zeros_(pred.bias)

    def forward(self, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        features = self.backbone(self.quant(x))
        y = features[-1]
        for extra in self.extras:
            y = extra(y)
            features.append(y)
        return self.head(features)


@register_model("detection")
def ssdlite_mobilenet_v2(
    *,
    num_classes: int = 21,
    in_channels: int = 3,
    score_thresh: float = 0.01,
    nms_thresh: float = 0.45,
    topk_candidates: int = 200,
    detections_per_img: int = 200,
) -> SSDDetector:
    """SSDLite-MobileNetV2 ("SSD-mv2" of the StatAssist/GradBoost paper), 300x300, VOC by default.

    Sources: the 576-ch expansion of MobileNetV2's first stride-32 block (19x19 at 300x300), the
    1280-ch last conv (10x10) and four separable extra layers (5, 3, 2, 1); 3 priors per location on
    the first level and 6 on the others (1917 at 300x300). 3.36M params and 0.65 GMACs at 300x300
    with 21 classes (the StatAssist paper lists 2.95M / 1.60B; for 80 classes the extra layers and
    heads have the 2.1M params of the MobileNetV2 paper's Table 5).
    The 1x1 prediction convs stay FP32 (``model.float_modules``); everything before them is INT8.

    Args:
        num_classes: classes including background (21 for VOC).
        in_channels: input image channels.
        score_thresh, nms_thresh, topk_candidates, detections_per_img: post-processing (SSD's
            0.01, 0.45, 200 per class, 200 per image).

    Example::

        model = frostnet.get_model("ssdlite_mobilenet_v2").eval()
        detections = model(torch.rand(1, 3, 300, 300))  # [{"boxes", "scores", "labels"}]
    """
    check_detector_args(num_classes=num_classes, in_channels=in_channels, score_thresh=score_thresh,
                        nms_thresh=nms_thresh, topk_candidates=topk_candidates, detections_per_img=detections_per_img)
    backbone = MobileNetV2Features(in_channels)
    body = SSDLiteBody(backbone, backbone.out_channels, num_classes=num_classes, num_anchors=SSDLITE_PRIORS.num_anchors)
    return SSDDetector(body, SSDLITE_PRIORS, num_classes=num_classes, in_channels=in_channels,
                       name="ssdlite_mobilenet_v2", image_size=300, score_thresh=score_thresh,
                       nms_thresh=nms_thresh, topk_candidates=topk_candidates, detections_per_img=detections_per_img)


# FrostNet taps used as SSDLite sources: layer3 (stride 16) and layer5 (stride 32).
_FROSTNET_TAPS: tuple[int, int] = (3, 4)


def ssdlite_frostnet(
    mode: str,
    width: float,
    *,
    num_classes: int = 21,
    in_channels: int = 3,
    score_thresh: float = 0.01,
    nms_thresh: float = 0.45,
    topk_candidates: int = 200,
    detections_per_img: int = 200,
) -> SSDDetector:
    """SSDLite head on FrostNet-``mode`` at ``width``: sources are the stride-16 (layer3) and
    stride-32 (layer5) stage outputs, then the same extra layers and heads as SSDLite-MobileNetV2.

    The backbone's own Quant/DeQuant stubs become identities: the detector quantizes once at its
    input, so no INT8 -> FP32 -> INT8 round trip sits between backbone and extra layers. Backbone
    parameter names (``body.backbone.layer3...``) match a ``features_only`` FrostNet's.

    Args:
        mode: ``"small"``, ``"base"`` or ``"large"``.
        width: FrostNet channel multiplier (0.35, 0.5, 0.75, 1.0, 1.25).
        num_classes, in_channels, score_thresh, nms_thresh, topk_candidates, detections_per_img:
            as :func:`ssdlite_mobilenet_v2`.
    """
    check_detector_args(num_classes=num_classes, in_channels=in_channels, score_thresh=score_thresh,
                        nms_thresh=nms_thresh, topk_candidates=topk_candidates, detections_per_img=detections_per_img)
    backbone = frostnet(mode, width, in_channels=in_channels, features_only=True, out_indices=_FROSTNET_TAPS)
    backbone.quant = nn.Identity()
    backbone.dequant = nn.ModuleList(nn.Identity() for _ in _FROSTNET_TAPS)
    channels = backbone.feature_info.channels()
    body = SSDLiteBody(backbone, channels, num_classes=num_classes, num_anchors=SSDLITE_PRIORS.num_anchors)
    return SSDDetector(body, SSDLITE_PRIORS, num_classes=num_classes, in_channels=in_channels,
                       name=_model_name(mode, width), image_size=300, score_thresh=score_thresh,
                       nms_thresh=nms_thresh, topk_candidates=topk_candidates, detections_per_img=detections_per_img)


def _model_name(mode: str, width: float) -> str:
    return f"ssdlite_frostnet_{mode}_{str(width).replace('.', '_')}"


def _make_builder(mode: str, width: float) -> Callable[..., SSDDetector]:
    def builder(
        *,
        num_classes: int = 21,
        in_channels: int = 3,
        score_thresh: float = 0.01,
        nms_thresh: float = 0.45,
        topk_candidates: int = 200,
        detections_per_img: int = 200,
    ) -> SSDDetector:
        return ssdlite_frostnet(mode, width, num_classes=num_classes, in_channels=in_channels,
                                score_thresh=score_thresh, nms_thresh=nms_thresh,
                                topk_candidates=topk_candidates, detections_per_img=detections_per_img)

    builder.__name__ = builder.__qualname__ = _model_name(mode, width)
    builder.__doc__ = (
        f"SSDLite on FrostNet-{mode.capitalize()} {width}, 300x300, VOC (21 classes) by default.\n\n"
        f"Keyword arguments are those of :func:`frostnet.models.ssdlite.ssdlite_frostnet`.\n\n"
        f"Example::\n\n    detector = frostnet.get_model({builder.__name__!r}, num_classes=21).eval()\n"
        f"    detections = detector(torch.rand(1, 3, 300, 300))  # [{{'boxes', 'scores', 'labels'}}]\n"
    )
    return builder


# One registered builder per mode at width 1.0: ssdlite_frostnet_small_1_0, ...
_SSDLITE_WIDTHS: tuple[float, ...] = (1.0,)
for _mode in MODES:
    for _width in _SSDLITE_WIDTHS:
        _fn = register_model("detection")(_make_builder(_mode, _width))
        globals()[_fn.__name__] = _fn
        __all__.append(_fn.__name__)
del _mode, _width, _fn
