"""LR-ASPP segmentation (Howard et al., "Searching for MobileNetV3") on quantization-friendly
backbones: the StatAssist/GradBoost paper's MobileNetV3-Large/Small "-RE" and dilated FrostNets.

Built as ``shared/specs/baselines.md`` describes:

* "-RE": every hard-swish of MobileNetV3 is a ReLU, so every Conv-BN-act triple fuses; the SE
  gate keeps a hard-sigmoid made of quantizable ops (:class:`~._seg_common.HardSigmoid`).
* The backbone is dilated (output stride 16): the last stage runs at stride 1 with dilation 2 and,
  as in the reference build, its last block is halved before the 1x1 ``layer5``.
* The head's pooling branch is AvgPool 25x25 stride 8 (the paper's change from 49x49 stride
  (16, 20), so 768x768 crops train), clamped to the feature map so small inputs work too.
* ``QuantStub -> INT8 backbone and head -> DeQuantStub -> FP32 tail``: the two classifier convs,
  their sum and the upsampling to the input size stay FP32 (listed in ``float_modules``).

Models return ``{"out": logits}`` at the input resolution (the torchvision convention), float32
also after INT8 conversion. ``num_classes`` defaults to 19, the Cityscapes train classes; the
spec's parameter counts are for 20 (the reference trained with a dummy class).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..quant import DeQuantStub, FloatFunctional, QuantStub
from ._layers import ConvBNAct, check_image_input, init_weights
from ._registry import register_model
from ._seg_common import HardSigmoid, SqueezeExcite, check_positive_int, fuse_segmentation_model, resize
from .frostnet import MODES as FROSTNET_MODES
from .frostnet import frostnet

__all__ = [
    "BneckConfig",
    "LRASPP",
    "LRASPPHead",
    "MobileNetV3Backbone",
    "MobileBottleneck",
    "lraspp_frostnet",
    "lraspp_mobilenet_v3_large_re",
    "lraspp_mobilenet_v3_small_re",
    "mobilenet_v3_re_config",
]

MOBILENET_V3_MODES: tuple[str, ...] = ("large", "small")
NUM_CLASSES = 19  # Cityscapes train classes
OUTPUT_STRIDE = 16


@dataclass(frozen=True)
class BneckConfig:
    """One MobileNetV3 bottleneck row: kernel, expanded channels, output channels, SE, stride."""

    kernel: int
    expanded: int
    out_channels: int
    se: bool
    stride: int


def _b(k: int, e: int, c: int, se: bool, s: int) -> BneckConfig:
    return BneckConfig(k, e, c, se, s)


# Rows are (kernel, expanded, out, SE, stride) of the MobileNetV3 paper's Tables 1-2, grouped by
# the stride at the stage output: layer1 4, layer2 8 (the low-level tap), layer3 16, layer4 16
# (dilated). Rows marked "HS" use hard-swish in the paper and ReLU here. layer4's last row is the
# reference's halved block (paper: 960 -> 160 for Large, 576 -> 96 for Small).
_MOBILENET_V3: dict[str, dict[str, tuple[BneckConfig, ...]]] = {
    "large": {
        "layer1": (_b(3, 16, 16, False, 1), _b(3, 64, 24, False, 2), _b(3, 72, 24, False, 1)),
        "layer2": (_b(5, 72, 40, True, 2), _b(5, 120, 40, True, 1), _b(5, 120, 40, True, 1)),
        "layer3": (_b(3, 240, 80, False, 2), _b(3, 200, 80, False, 1), _b(3, 184, 80, False, 1),  # HS
                   _b(3, 184, 80, False, 1), _b(3, 480, 112, True, 1), _b(3, 672, 112, True, 1)),  # HS
        "layer4": (_b(5, 672, 160, True, 2), _b(5, 960, 160, True, 1), _b(5, 480, 80, True, 1)),  # HS
    },
    "small": {
        "layer1": (_b(3, 16, 16, True, 2),),
        "layer2": (_b(3, 72, 24, False, 2), _b(3, 88, 24, False, 1)),
        "layer3": (_b(5, 96, 40, True, 2), _b(5, 240, 40, True, 1), _b(5, 240, 40, True, 1),  # HS
                   _b(5, 120, 48, True, 1), _b(5, 144, 48, True, 1)),  # HS
        "layer4": (_b(5, 288, 96, True, 2), _b(5, 576, 96, True, 1), _b(5, 288, 48, True, 1)),  # HS
    },
}
_STEM_CHANNELS = 16
# layer5: the 1x1 Conv-BN-ReLU after the halved block (6x its 80/48 channels).
_LAST_CHANNELS = {"large": 480, "small": 288}
_STAGES: tuple[str, ...] = ("layer1", "layer2", "layer3", "layer4")


def mobilenet_v3_re_config(mode: str) -> dict[str, tuple[BneckConfig, ...]]:
    """The bottleneck table of the dilated MobileNetV3-``mode``-RE segmentation backbone."""
    if mode not in _MOBILENET_V3:
        raise ValueError(f"unknown MobileNetV3 mode {mode!r}; valid choices: {', '.join(MOBILENET_V3_MODES)}")
    return _MOBILENET_V3[mode]


class MobileBottleneck(nn.Module):
    """MobileNetV3 bottleneck with ReLU: expand 1x1 -> depthwise kxk -> SE -> project 1x1 (no
    activation), plus the residual add when shapes allow."""

    def __init__(
        self,
        in_channels: int,
        cfg: BneckConfig,
        *,
        stride: int,
        dilation: int = 1,
    ) -> None:
        super().__init__()
        # Kept also where expanded == in_channels (the first block), unlike torchvision: the
        # reference build has it, and the spec's MACs (0.13 GMACs of it at 1024x2048) count it.
        self.expand_conv = ConvBNAct(in_channels, cfg.expanded)
        self.dw_conv = ConvBNAct(cfg.expanded, cfg.expanded, cfg.kernel, stride, groups=cfg.expanded, dilation=dilation)
        if cfg.se:
            # Squeeze to a quarter of the expanded channels, unrounded as in the reference build.
            self.se = SqueezeExcite(cfg.expanded, cfg.expanded // 4)
        self.project_conv = ConvBNAct(cfg.expanded, cfg.out_channels, act=False)
        self.use_residual = stride == 1 and in_channels == cfg.out_channels
        if self.use_residual:
            self.skip_add = FloatFunctional()
        self.stride = stride
        self.out_channels = cfg.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.dw_conv(self.expand_conv(x))
        if hasattr(self, "se"):
            out = self.se(out)
        out = self.project_conv(out)
        if self.use_residual:
            out = self.skip_add.add(out, x)
        return out


class MobileNetV3Backbone(nn.Module):
    """Dilated MobileNetV3-RE returning ``[low (OS8), high (OS16)]`` quantizable feature maps.

    It owns the model's QuantStub; the maps it returns are INT8 after conversion (the head
    consumes them without a dequantize/quantize round trip).
    """

    def __init__(
        self,
        stages: dict[str, tuple[BneckConfig, ...]],
        *,
        last_channels: int,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        self.quant = QuantStub()
        self.conv1 = ConvBNAct(in_channels, _STEM_CHANNELS, 3, 2)
        channels, current_stride, dilation = _STEM_CHANNELS, 2, 1
        for stage in _STAGES:
            blocks = []
            for row in stages[stage]:
                stride = row.stride
                if current_stride * stride > OUTPUT_STRIDE:
                    # Past output stride 16: keep the resolution, dilate the whole stage instead.
                    dilation, stride = dilation * stride, 1
                current_stride *= stride
                blocks.append(MobileBottleneck(channels, row, stride=stride, dilation=dilation))
                channels = row.out_channels
            self.add_module(stage, nn.Sequential(*blocks))
            if stage == "layer2":
                low_channels = channels
        self.layer5 = ConvBNAct(channels, last_channels)
        self.feature_info: list[dict[str, object]] = [
            dict(num_chs=low_channels, reduction=8, module="layer2"),
            dict(num_chs=last_channels, reduction=OUTPUT_STRIDE, module="layer5"),
        ]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        low = self.layer2(self.layer1(self.conv1(self.quant(x))))
        high = self.layer5(self.layer4(self.layer3(low)))
        return [low, high]


class LRASPPHead(nn.Module):
    """Lite R-ASPP: ``b0 * gate(b1)`` at OS16, upsampled to OS8, then the FP32 tail
    ``Conv1x1(b0 * gate) + Conv1x1(low)``.

    Args:
        low_channels: channels of the OS8 low-level features.
        high_channels: channels of the OS16 features.
        num_classes: output classes.
        inter_channels: channels of both branches (128 in the paper).
        pool_size: AvgPool window of the gate branch; clamped to the feature map.
        pool_stride: AvgPool stride of the gate branch.
    """

    float_modules: tuple[str, ...] = ("high_classifier", "low_classifier")

    def __init__(
        self,
        low_channels: int,
        high_channels: int,
        num_classes: int,
        *,
        inter_channels: int = 128,
        pool_size: int = 25,
        pool_stride: int = 8,
    ) -> None:
        super().__init__()
        self.cbr = ConvBNAct(high_channels, inter_channels)  # b0
        self.scale = ConvBNAct(high_channels, inter_channels, act=False)  # b1, after the pool
        self.gate = HardSigmoid()
        self.mul = FloatFunctional()
        self.dequant_high = DeQuantStub()
        self.dequant_low = DeQuantStub()
        self.high_classifier = nn.Conv2d(inter_channels, num_classes, 1)
        self.low_classifier = nn.Conv2d(low_channels, num_classes, 1)
        self.pool_size = pool_size
        self.pool_stride = pool_stride

    def forward(self, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        x = self.cbr(high)
        # The reference's fixed 25x25 window crashes when the OS16 map is smaller (inputs below
        # 400 px); clamping it to the map degrades to global pooling there instead.
        h, w = high.shape[-2:]
        pooled = F.avg_pool2d(high, (min(self.pool_size, h), min(self.pool_size, w)), self.pool_stride)
        s = self.gate(self.scale(pooled))
        x = self.mul.mul(x, resize(s, x.shape[-2:]))
        x = resize(x, low.shape[-2:])
        return self.high_classifier(self.dequant_high(x)) + self.low_classifier(self.dequant_low(low))


class LRASPP(nn.Module):
    """LR-ASPP segmentation model on any backbone returning ``[low (OS8), high (OS16)]``.

    Args:
        backbone: owns the QuantStub; returns the two maps (quantized after conversion).
        low_channels: channels of ``low``.
        high_channels: channels of ``high``.
        num_classes: output classes.
        in_channels: input image channels the backbone was built for.
        name: shown in error messages.
    """

    float_modules: tuple[str, ...] = tuple(f"head.{m}" for m in LRASPPHead.float_modules)

    def __init__(
        self,
        backbone: nn.Module,
        *,
        low_channels: int,
        high_channels: int,
        num_classes: int = NUM_CLASSES,
        in_channels: int = 3,
        name: str = "LRASPP",
    ) -> None:
        super().__init__()
        check_positive_int("num_classes", num_classes)
        self.backbone = backbone
        self.head = LRASPPHead(low_channels, high_channels, num_classes)
        init_weights(self.head)
        # Kaiming fan_out on a 1x1 classifier scales with 1/num_classes (std 0.32 over 128 inputs
        # at 19 classes): large initial logits. The small normal init of torchvision's
        # classifiers keeps the first QAT steps stable (as in FrostNet).
        for conv in (self.head.high_classifier, self.head.low_classifier):
            nn.init.normal_(conv.weight, 0, 0.01)
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.name = name

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        check_image_input(x, self.in_channels, self.name)
        low, high = self.backbone(x)
        return {"out": resize(self.head(low, high), x.shape[-2:])}

    def fuse_model(self, is_qat: Optional[bool] = None) -> None:
        """Fuse every Conv-BN(-ReLU) and SE Linear-ReLU in place; ``is_qat`` defaults to ``self.training``."""
        fuse_segmentation_model(self, self.training if is_qat is None else is_qat)


def lraspp_mobilenet_v3_re(mode: str, *, num_classes: int = NUM_CLASSES, in_channels: int = 3) -> LRASPP:
    """LR-ASPP on the dilated MobileNetV3-``mode``-RE (``"large"`` or ``"small"``).

    Args:
        mode: ``"large"`` or ``"small"``.
        num_classes: output classes (19 = Cityscapes train classes).
        in_channels: input image channels.
    """
    stages = mobilenet_v3_re_config(mode)
    check_positive_int("in_channels", in_channels)
    backbone = MobileNetV3Backbone(stages, last_channels=_LAST_CHANNELS[mode], in_channels=in_channels)
    init_weights(backbone)
    low, high = (int(info["num_chs"]) for info in backbone.feature_info)  # type: ignore[call-overload]
    return LRASPP(
        backbone,
        low_channels=low,
        high_channels=high,
        num_classes=num_classes,
        in_channels=in_channels,
        name=f"lraspp_mobilenet_v3_{mode}_re",
    )


def lraspp_frostnet(mode: str, width: float, *, num_classes: int = NUM_CLASSES, in_channels: int = 3) -> LRASPP:
    """LR-ASPP on FrostNet-``mode`` at ``width``, dilated to output stride 16.

    The head reads layer2 (OS8) and layer5 (the last stage, dilated to OS16).

    Args:
        mode: ``"small"``, ``"base"`` or ``"large"``.
        width: FrostNet channel multiplier (0.35, 0.5, 0.75, 1.0, 1.25).
        num_classes: output classes (19 = Cityscapes train classes).
        in_channels: input image channels.
    """
    check_positive_int("num_classes", num_classes)
    taps = (2, 4)  # layer2 (stride 8) and layer5 (stride 32 -> 16 with dilation)
    backbone = frostnet(
        mode, width, in_channels=in_channels, features_only=True, output_stride=OUTPUT_STRIDE, out_indices=taps
    )
    # The head consumes the taps in INT8: the per-tap DeQuantStubs of features_only become
    # identities, so there is no dequantize/quantize round trip between backbone and head.
    backbone.dequant = nn.ModuleList(nn.Identity() for _ in taps)
    low, high = backbone.feature_info.channels()
    return LRASPP(
        backbone,
        low_channels=low,
        high_channels=high,
        num_classes=num_classes,
        in_channels=in_channels,
        name=f"lraspp_{backbone.name}",
    )


@register_model("segmentation")
def lraspp_mobilenet_v3_large_re(*, num_classes: int = NUM_CLASSES, in_channels: int = 3) -> LRASPP:
    """Mv3-LRASPP-Large-RE of the StatAssist/GradBoost paper (2.42M parameters at 20 classes).

    Example::

        model = frostnet.get_model("lraspp_mobilenet_v3_large_re", num_classes=19)
        logits = model(images)["out"]  # (N, 19, H, W)
    """
    return lraspp_mobilenet_v3_re("large", num_classes=num_classes, in_channels=in_channels)


@register_model("segmentation")
def lraspp_mobilenet_v3_small_re(*, num_classes: int = NUM_CLASSES, in_channels: int = 3) -> LRASPP:
    """Mv3-LRASPP-Small-RE of the StatAssist/GradBoost paper (0.75M parameters at 20 classes).

    Example::

        model = frostnet.get_model("lraspp_mobilenet_v3_small_re", num_classes=19)
    """
    return lraspp_mobilenet_v3_re("small", num_classes=num_classes, in_channels=in_channels)


def _make_frostnet_builder(mode: str, width: float) -> Callable[..., LRASPP]:
    def builder(*, num_classes: int = NUM_CLASSES, in_channels: int = 3) -> LRASPP:
        return lraspp_frostnet(mode, width, num_classes=num_classes, in_channels=in_channels)

    builder.__name__ = builder.__qualname__ = f"lraspp_frostnet_{mode}_{str(width).replace('.', '_')}"
    builder.__doc__ = (
        f"LR-ASPP on FrostNet-{mode.capitalize()} {width}, dilated to output stride 16.\n\n"
        f"Keyword arguments are those of :func:`frostnet.models.lraspp.lraspp_frostnet`.\n\n"
        f"Example::\n\n    model = frostnet.get_model({builder.__name__!r}, num_classes=19)\n"
    )
    return builder


# lraspp_frostnet_small_1_0, lraspp_frostnet_base_1_0, lraspp_frostnet_large_1_0; other widths
# through lraspp_frostnet(mode, width).
for _mode in FROSTNET_MODES:
    _fn = register_model("segmentation")(_make_frostnet_builder(_mode, 1.0))
    globals()[_fn.__name__] = _fn
    __all__.append(_fn.__name__)
del _mode, _fn
