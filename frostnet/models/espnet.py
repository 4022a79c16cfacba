"""ESPNet (Mehta et al., ECCV 2018) and ESPNetV2 (Mehta et al., CVPR 2019) segmentation, in the
fusable form of the StatAssist/GradBoost paper (Appendix B, ``shared/specs/baselines.md``).

The paper's changes to the published networks:

* every PReLU is a ReLU, so each Conv-BN-act triple fuses into one INT8 conv;
* where a Concat or residual Add sat between a conv and its BN + activation (which cannot fuse), a
  1x1 Conv-BN-ReLU ("CBR") follows the Concat/Add instead (ESPNet's decoder drops one, see
  :class:`ESPNet`);
* ESPNet's transposed convs become bilinear x2 upsampling followed by a 1x1 Conv-BN-ReLU;
* everything is INT8 except the last 1x1 classifier conv (``float_modules``).

Models return ``{"out": logits}`` at the input resolution, float32 also after INT8 conversion.
``num_classes`` defaults to 19 (Cityscapes train classes); the spec's parameter counts are for 20.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..quant import DeQuantStub, FloatFunctional, QuantStub
from ._layers import ConvBNAct, check_image_input, init_weights
from ._registry import register_model
from ._seg_common import check_positive_int, fuse_segmentation_model, resize

__all__ = [
    "EESP",
    "EESPDownsampler",
    "ESPBlock",
    "ESPNet",
    "ESPNetV2",
    "ESPNetV2Level",
    "PSPModule",
    "espnet",
    "espnet_v2",
]

NUM_CLASSES = 19  # Cityscapes train classes


def _conv(in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1, *,
          dilation: int = 1, groups: int = 1) -> nn.Conv2d:
    """A bare conv (no BN follows it in the published networks), "same" padding, no bias."""
    padding = (kernel_size - 1) // 2 * dilation
    return nn.Conv2d(
        in_channels, out_channels, kernel_size, stride, padding, dilation=dilation, groups=groups, bias=False
    )


# ---------------------------------------------------------------------------------------------
# ESPNet


class ESPBlock(nn.Module):
    """ESP block: reduce -> K=5 parallel dilated 3x3 convs -> hierarchical feature fusion ->
    concat -> optional residual add -> 1x1 CBR.

    Args:
        in_channels: input channels.
        out_channels: output channels, split over the 5 branches (the d=1 branch takes the
            remainder).
        stride: 2 for the strided (down-sampling) block, whose reduction is a 3x3 stride-2 conv.
        residual: add the input when shapes allow (stride 1 and ``in == out``).
    """

    DILATIONS: tuple[int, ...] = (1, 2, 4, 8, 16)

    def __init__(self, in_channels: int, out_channels: int, *, stride: int = 1, residual: bool = True) -> None:
        super().__init__()
        k = len(self.DILATIONS)
        n = out_channels // k
        if n < 1:
            raise ValueError(
                f"an ESP block needs at least {k} output channels (one per dilated branch), got {out_channels}"
            )
        n1 = out_channels - (k - 1) * n
        self.reduce = _conv(in_channels, n, 3, 2) if stride == 2 else _conv(in_channels, n)
        self.branches = nn.ModuleList(_conv(n, n1 if d == 1 else n, 3, dilation=d) for d in self.DILATIONS)
        # Running sums d2, d2+d4, d2+d4+d8, d2+d4+d8+d16 (d1 stays alone): one FloatFunctional
        # per add, since each owns an observer once prepared.
        self.hff = nn.ModuleList(FloatFunctional() for _ in range(k - 2))
        self.cat = FloatFunctional()
        self.use_residual = residual and stride == 1 and in_channels == out_channels
        if self.use_residual:
            self.skip_add = FloatFunctional()
        self.cbr = ConvBNAct(out_channels, out_channels)  # replaces BN + PReLU after the concat/add

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.reduce(x)
        outs = [branch(r) for branch in self.branches]
        fused = outs[:2]
        for add, out in zip(self.hff, outs[2:]):
            fused.append(add.add(fused[-1], out))
        y = self.cat.cat(fused, dim=1)
        if self.use_residual:
            y = self.skip_add.add(y, x)
        return self.cbr(y)


class ESPNet(nn.Module):
    """ESPNet (ESPNet-C encoder + decoder), fused.

    Encoder at input H x W: level1 CBR s2 (H/2) -> b1 on [level1, image/2] -> strided ESP (H/4),
    ``p`` ESP blocks -> b2 on [blocks, strided, image/4] -> strided ESP (H/8), ``q`` ESP blocks ->
    b3 on [strided, blocks] -> 1x1 classifier at H/8. Decoder: 1x1 Conv-BN, x2 up + CBR, concat
    with the projected level-2 features, ESP block (no residual), x2 up + CBR, concat with the
    level-1 features, 3x3 CBR, x2 up to the input size, FP32 1x1 classifier.

    Args:
        num_classes: output classes (at least 5: the decoder's ESP block splits them over its
            five branches).
        in_channels: input image channels (also concatenated, average-pooled, into b1 and b2).
        p: ESP blocks at level 2.
        q: ESP blocks at level 3.
        name: shown in error messages.
    """

    float_modules: tuple[str, ...] = ("classifier",)

    def __init__(
        self,
        *,
        num_classes: int = NUM_CLASSES,
        in_channels: int = 3,
        p: int = 2,
        q: int = 8,
        name: str = "espnet",
    ) -> None:
        super().__init__()
        check_positive_int("num_classes", num_classes)
        check_positive_int("in_channels", in_channels)
        check_positive_int("p", p)
        check_positive_int("q", q)
        if num_classes < len(ESPBlock.DILATIONS):
            raise ValueError(
                f"espnet needs num_classes >= {len(ESPBlock.DILATIONS)} (its decoder ESP block splits the "
                f"classes over {len(ESPBlock.DILATIONS)} dilated branches), got {num_classes}"
            )
        c = num_classes
        l1, l2, l3 = 16 + in_channels, 2 * 64 + in_channels, 2 * 128
        self.quant = QuantStub()
        self.image_pool = nn.AvgPool2d(3, stride=2, padding=1)  # input image at H/2, H/4
        # encoder
        self.level1 = ConvBNAct(in_channels, 16, 3, 2)
        self.cat1 = FloatFunctional()
        self.b1 = ConvBNAct(l1, l1)
        self.level2_0 = ESPBlock(l1, 64, stride=2)
        self.level2 = nn.Sequential(*(ESPBlock(64, 64) for _ in range(p)))
        self.cat2 = FloatFunctional()
        self.b2 = ConvBNAct(l2, l2)
        self.level3_0 = ESPBlock(l2, 128, stride=2)
        self.level3 = nn.Sequential(*(ESPBlock(128, 128) for _ in range(q)))
        self.cat3 = FloatFunctional()
        self.b3 = ConvBNAct(l3, l3)
        self.encoder_classifier = _conv(l3, c)
        # decoder: the BN on the classes becomes a fusable Conv1x1-BN, and each transposed conv
        # a bilinear x2 followed by a 1x1 CBR
        self.classes_bn = ConvBNAct(c, c, act=False)
        self.up_l3 = ConvBNAct(c, c)
        self.level2_classifier = _conv(l2, c)
        self.cat4 = FloatFunctional()
        # The published BN + PReLU after this concat is dropped, not replaced by a CBR, as in the
        # reference build: the concat feeds the ESP block's 1x1 reduction directly (the spec's
        # 30.21 GMACs at 1024x2048 count no 2C x 2C conv here).
        self.combine_l2_l3 = ESPBlock(2 * c, c, residual=False)
        self.up_l2 = ConvBNAct(c, c)
        self.cat5 = FloatFunctional()
        self.conv = ConvBNAct(l1 + c, c, 3)
        self.dequant = DeQuantStub()
        self.classifier = _conv(c, c)  # FP32, at full resolution
        # Kaiming fan_out also for the classifier: it is C -> C, so the init preserves variance
        # (a small init would keep the logits near 0 for many steps behind this only C-wide map).
        init_weights(self)
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.name = name

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        check_image_input(x, self.in_channels, self.name)
        size = x.shape[-2:]
        x = self.quant(x)
        image2 = self.image_pool(x)
        image4 = self.image_pool(image2)
        out0 = self.b1(self.cat1.cat([self.level1(x), image2], dim=1))
        out1_0 = self.level2_0(out0)
        out1 = self.b2(self.cat2.cat([self.level2(out1_0), out1_0, image4], dim=1))
        out2_0 = self.level3_0(out1)
        out2 = self.b3(self.cat3.cat([out2_0, self.level3(out2_0)], dim=1))
        y = self.classes_bn(self.encoder_classifier(out2))
        y = self.up_l3(resize(y, out1.shape[-2:], align_corners=True))
        y = self.combine_l2_l3(self.cat4.cat([self.level2_classifier(out1), y], dim=1))
        y = self.up_l2(resize(y, out0.shape[-2:], align_corners=True))
        y = self.conv(self.cat5.cat([y, out0], dim=1))
        y = resize(self.dequant(y), size, align_corners=True)
        return {"out": self.classifier(y)}

    def fuse_model(self, is_qat: Optional[bool] = None) -> None:
        """Fuse every Conv-BN(-ReLU) in place; ``is_qat`` defaults to ``self.training``."""
        fuse_segmentation_model(self, self.training if is_qat is None else is_qat)


# ---------------------------------------------------------------------------------------------
# ESPNetV2


class EESP(nn.Module):
    """EESP unit: grouped 1x1 projection -> ``branches`` depthwise dilated 3x3 convs ->
    hierarchical feature fusion -> concat -> dense 1x1 CBR -> grouped 1x1 expansion (Conv-BN) ->
    residual add + ReLU.

    The hierarchical fusion really adds each branch to the running sum of the previous ones, as
    the ESPNetV2 paper designs it; in the StatAssist reference build it is a no-op (a Python
    ``exec`` bug leaves every branch unfused), so its weights do not transfer one to one.

    Args:
        in_channels: input channels.
        out_channels: output channels (a multiple of ``branches``).
        stride: 2 in the down-samplers, where the output has no residual and no activation
            (the down-sampler adds and activates after its concat).
        branches: parallel depthwise branches (K).
        r_lim: largest effective receptive field of a branch; kernels 3, 5, 7, ... above it
            become 3 (dilation = (kernel - 1) / 2).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        stride: int = 1,
        branches: int = 4,
        r_lim: int = 7,
    ) -> None:
        super().__init__()
        n = out_channels // branches
        if n * branches != out_channels:
            raise ValueError(f"EESP out_channels must be a multiple of branches={branches}, got {out_channels}")
        self.proj = ConvBNAct(in_channels, n, groups=branches)
        kernels = sorted(k if k <= r_lim else 3 for k in range(3, 3 + 2 * branches, 2))
        self.branches = nn.ModuleList(_conv(n, n, 3, stride, dilation=(k - 1) // 2, groups=n) for k in kernels)
        self.hff = nn.ModuleList(FloatFunctional() for _ in range(branches - 1))
        self.cat = FloatFunctional()
        self.dense = ConvBNAct(out_channels, out_channels)  # replaces BN + PReLU after the concat
        self.use_residual = stride == 1 and in_channels == out_channels
        # Without a residual the activation follows the expansion directly, so it fuses into it;
        # strided units return the Conv-BN output for the down-sampler to combine.
        self.expand = ConvBNAct(out_channels, out_channels, groups=branches, act=stride == 1 and not self.use_residual)
        if self.use_residual:
            self.add_relu = FloatFunctional()
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.proj(x)
        fused = [self.branches[0](p)]
        for add, branch in zip(self.hff, self.branches[1:]):
            fused.append(add.add(fused[-1], branch(p)))
        y = self.expand(self.dense(self.cat.cat(fused, dim=1)))
        if self.use_residual:
            y = self.add_relu.add_relu(y, x)
        return y


class EESPDownsampler(nn.Module):
    """Strided EESP concatenated with an average-pooled shortcut, plus the input reinforcement
    (CBR 3x3 -> Conv1x1-BN on the average-pooled image), then ReLU (fused into the add)."""

    def __init__(self, in_channels: int, out_channels: int, *, image_channels: int, r_lim: int) -> None:
        super().__init__()
        if out_channels <= in_channels:
            raise ValueError(
                f"a down-sampler widens its input: out_channels {out_channels} <= in_channels {in_channels}"
            )
        self.eesp = EESP(in_channels, out_channels - in_channels, stride=2, r_lim=r_lim)
        self.avg = nn.AvgPool2d(3, stride=2, padding=1)
        self.cat = FloatFunctional()
        self.reinforce = nn.Sequential(
            ConvBNAct(image_channels, image_channels, 3),
            ConvBNAct(image_channels, out_channels, act=False),
        )
        self.add_relu = FloatFunctional()

    def forward(self, x: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        y = self.cat.cat([self.avg(x), self.eesp(x)], dim=1)
        return self.add_relu.add_relu(y, self.reinforce(image))


class PSPModule(nn.Module):
    """Pyramid context: ``levels`` times (AvgPool 3x3 s2 -> depthwise 3x3), each resized back,
    concatenated with the input -> 1x1 CBR."""

    def __init__(self, channels: int, out_channels: int, *, levels: int = 4) -> None:
        super().__init__()
        self.pool = nn.AvgPool2d(3, stride=2, padding=1)
        self.stages = nn.ModuleList(_conv(channels, channels, 3, groups=channels) for _ in range(levels))
        self.cat = FloatFunctional()
        self.project = ConvBNAct(channels * (levels + 1), out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        outs, y = [x], x
        for stage in self.stages:
            y = self.pool(y)
            outs.append(resize(stage(y), size, align_corners=True))
        return self.project(self.cat.cat(outs, dim=1))


@dataclass(frozen=True)
class ESPNetV2Level:
    """One encoder level: a down-sampler to ``channels`` then ``blocks`` EESP units."""

    channels: int
    blocks: int
    down_r_lim: int
    block_r_lim: Optional[int]  # None when the level has no units


# ESPNetV2 at s = 2.0 (the EESPNet classification config, levels 2-4 kept for segmentation):
# (channels, EESP units, r_lim of the down-sampler, r_lim of the units); level 1 is a 3x3 CBR s2
# to 32 channels. Output strides 4, 8, 16.
_ESPNETV2_STEM = 32
_ESPNETV2_LEVELS: dict[str, ESPNetV2Level] = {
    "level2": ESPNetV2Level(128, 0, 13, None),
    "level3": ESPNetV2Level(256, 3, 11, 9),
    "level4": ESPNetV2Level(512, 7, 9, 7),
}


class ESPNetV2(nn.Module):
    """ESPNetV2 segmentation (s = 2.0), fused.

    Encoder: CBR s2 (32 ch, H/2) -> down-samplers with input reinforcement to 128 (H/4), 256 (H/8)
    and 512 (H/16) channels, with 3 and 7 EESP units at H/8 and H/16. Decoder: 1x1 CBR 512 -> 256,
    x2, concat with level 3, EESP 512 -> 256 + PSP context, 1x1 CBR to classes, x2, concat with
    level 2 -> 1x1 CBR, x2, concat with level 1 -> FP32 1x1 classifier, x2 to the input size.
    (The published model also returns an auxiliary level-3 output in training; this one returns
    only ``"out"``.)

    Args:
        num_classes: output classes.
        in_channels: input image channels (also the input reinforcement's channels).
        dropout: ``Dropout2d`` before the two class projections (0.2 at s = 2.0).
        name: shown in error messages.
    """

    float_modules: tuple[str, ...] = ("classifier",)

    def __init__(
        self,
        *,
        num_classes: int = NUM_CLASSES,
        in_channels: int = 3,
        dropout: float = 0.2,
        name: str = "espnet_v2",
    ) -> None:
        super().__init__()
        check_positive_int("num_classes", num_classes)
        check_positive_int("in_channels", in_channels)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        c = num_classes
        self.quant = QuantStub()
        self.image_pool = nn.AvgPool2d(3, stride=2, padding=1)  # the reinforcement's image pyramid
        self.level1 = ConvBNAct(in_channels, _ESPNETV2_STEM, 3, 2)
        channels = _ESPNETV2_STEM
        for level_name, level in _ESPNETV2_LEVELS.items():
            down = EESPDownsampler(channels, level.channels, image_channels=in_channels, r_lim=level.down_r_lim)
            self.add_module(f"{level_name}_0", down)
            channels = level.channels
            if level.blocks and level.block_r_lim is not None:
                units = (EESP(channels, channels, r_lim=level.block_r_lim) for _ in range(level.blocks))
                self.add_module(level_name, nn.Sequential(*units))
        l2, l3, l4 = (level.channels for level in _ESPNETV2_LEVELS.values())
        # decoder
        self.proj_l4 = ConvBNAct(l4, l3)
        self.cat_l3 = FloatFunctional()
        self.context = nn.Sequential(EESP(2 * l3, l3, r_lim=7), PSPModule(l3, l3))
        # the published C (1x1) + BN + PReLU on classes: one fusable Conv-BN-ReLU
        self.project_l3 = nn.Sequential(nn.Dropout2d(dropout), ConvBNAct(l3, c))
        self.cat_l2 = FloatFunctional()
        self.project_l2 = ConvBNAct(l2 + c, c)
        self.cat_l1 = FloatFunctional()
        self.dequant = DeQuantStub()
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = _conv(_ESPNETV2_STEM + c, c)  # FP32
        init_weights(self)
        # Kaiming fan_out scales with 1/num_classes while this conv reads 32 + num_classes
        # channels: large initial logits. Use the small normal init of torchvision's classifiers.
        nn.init.normal_(self.classifier.weight, 0, 0.01)
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.name = name

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        check_image_input(x, self.in_channels, self.name)
        size = x.shape[-2:]
        x = self.quant(x)
        l1 = self.level1(x)
        # The pooled image at each level: 3x3 s2 pad 1 rounds up like the stride-2 convs, so the
        # pyramid matches the feature maps at any input size.
        image = self.image_pool(self.image_pool(x))
        l2 = self.level2_0(l1, image)
        image = self.image_pool(image)
        l3 = self.level3(self.level3_0(l2, image))
        image = self.image_pool(image)
        l4 = self.level4(self.level4_0(l3, image))
        y = resize(self.proj_l4(l4), l3.shape[-2:], align_corners=True)
        y = self.context(self.cat_l3.cat([l3, y], dim=1))
        y = resize(self.project_l3(y), l2.shape[-2:], align_corners=True)
        y = resize(self.project_l2(self.cat_l2.cat([l2, y], dim=1)), l1.shape[-2:], align_corners=True)
        y = self.classifier(self.dropout(self.dequant(self.cat_l1.cat([l1, y], dim=1))))
        return {"out": resize(y, size, align_corners=True)}

    def fuse_model(self, is_qat: Optional[bool] = None) -> None:
        """Fuse every Conv-BN(-ReLU) in place; ``is_qat`` defaults to ``self.training``."""
        fuse_segmentation_model(self, self.training if is_qat is None else is_qat)


@register_model("segmentation")
def espnet(*, num_classes: int = NUM_CLASSES, in_channels: int = 3) -> ESPNet:
    """ESPNet (p=2, q=8), fused as in the StatAssist/GradBoost paper (0.60M parameters at 20 classes).

    Example::

        model = frostnet.get_model("espnet", num_classes=19)
        logits = model(images)["out"]  # (N, 19, H, W)
    """
    return ESPNet(num_classes=num_classes, in_channels=in_channels, p=2, q=8, name="espnet")


@register_model("segmentation")
def espnet_v2(*, num_classes: int = NUM_CLASSES, in_channels: int = 3, dropout: float = 0.2) -> ESPNetV2:
    """ESPNetV2 (s = 2.0), fused as in the StatAssist/GradBoost paper (3.43M parameters at 20 classes).

    Example::

        model = frostnet.get_model("espnet_v2", num_classes=19)
    """
    return ESPNetV2(num_classes=num_classes, in_channels=in_channels, dropout=dropout, name="espnet_v2")
