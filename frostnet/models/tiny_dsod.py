"""Tiny-DSOD (Li et al., "Tiny-DSOD: Lightweight Object Detection for Resource-Restricted
Usages", BMVC 2018), made fusable for INT8 (``shared/specs/baselines.md``).

Depthwise dense blocks (DDB-b) extract features, a down path builds six scales, and the
depthwise feature pyramid (D-FPN) feeds the coarse context back to the fine maps. Every conv is
Conv-BN(-ReLU) so it fuses; concatenations and additions go through ``FloatFunctional``.

Quantization: everything up to the prediction heads is INT8; the heads (3x3 Conv-BN, the last layer,
``float_modules``) stay FP32, as the StatAssist/GradBoost paper keeps the last layer float.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..quant import FloatFunctional, QuantStub
from ._layers import ConvBNAct, init_weights
from ._registry import register_model
from .detection import Predictor, PriorSpec, SSDDetector, SSDHead, check_detector_args

__all__ = ["DenseStageConfig", "DenseLayer", "DenseStage", "TinyDSODBody", "TINY_DSOD_PRIORS", "tiny_dsod"]


@dataclass(frozen=True)
class StemConfig:
    """One stem layer: a full conv, or a depthwise one (``out_channels`` = its input)."""

    kernel: int
    out_channels: int
    stride: int
    depthwise: bool = False


@dataclass(frozen=True)
class DenseStageConfig:
    """A dense stage: ``layers`` DDB-b layers of ``growth`` channels, a 1x1 transition to
    ``transition`` channels, an optional 2x2 max pool; ``source``: the transition output (before
    the pool) is the first detection source."""

    layers: int
    growth: int
    transition: int
    pool: bool
    source: bool = False


# Map sizes at a 300x300 input.
_STEM: tuple[StemConfig, ...] = (
    StemConfig(3, 64, 2),                     # 150x150
    StemConfig(1, 64, 1),
    StemConfig(3, 64, 1, depthwise=True),
    StemConfig(1, 128, 1),
    StemConfig(3, 128, 1, depthwise=True),    # then max pool 2x2 -> 75x75
)
_STAGES: tuple[DenseStageConfig, ...] = (
    DenseStageConfig(4, 32, 128, pool=True),                # 75x75: 128 + 4*32 = 256 -> 128, pool -> 38x38
    DenseStageConfig(6, 48, 128, pool=True, source=True),   # 38x38: 416 -> 128 (source 1), pool -> 19x19
    DenseStageConfig(6, 64, 256, pool=False),               # 19x19: 512 -> 256
    DenseStageConfig(6, 80, 64, pool=False),                # 19x19: 736 -> 64, half of source 2
)
# Down path: six 128-ch scales 38, 19, 10, 5, 3, 2, each new one built from halves of 64 channels.
_SOURCE_CHANNELS, _HALF = 128, 64
_NUM_LEVELS = 6

# SSD300's VOC boxes (sizes 30..315 px of 300), 4 / 6 / 6 / 6 / 4 / 4 per location.
TINY_DSOD_PRIORS = PriorSpec.ssd(
    min_sizes=tuple(s / 300 for s in (30, 60, 111, 162, 213, 264)),
    max_sizes=tuple(s / 300 for s in (60, 111, 162, 213, 264, 315)),
    aspect_ratios=((2.0,), (2.0, 3.0), (2.0, 3.0), (2.0, 3.0), (2.0,), (2.0,)),
)


def _pool() -> nn.MaxPool2d:
    # ceil_mode: odd maps keep their last row/column (75 -> 38, 19 -> 10, 5 -> 3, 3 -> 2)
    return nn.MaxPool2d(2, 2, ceil_mode=True)


class DenseLayer(nn.Module):
    """DDB-b layer: 1x1 conv to ``growth`` channels, depthwise 3x3, concatenated after the input."""

    def __init__(self, in_channels: int, growth: int) -> None:
        super().__init__()
        self.conv = ConvBNAct(in_channels, growth)
        self.dw = ConvBNAct(growth, growth, 3, groups=growth)
        self.cat = FloatFunctional()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cat.cat([x, self.dw(self.conv(x))], dim=1)


class DenseStage(nn.Module):
    """Dense layers -> 1x1 transition -> optional max pool (applied by the caller)."""

    def __init__(self, in_channels: int, cfg: DenseStageConfig) -> None:
        super().__init__()
        self.dense = nn.Sequential(*(DenseLayer(in_channels + i * cfg.growth, cfg.growth) for i in range(cfg.layers)))
        self.transition = ConvBNAct(in_channels + cfg.layers * cfg.growth, cfg.transition)
        self.pool = _pool() if cfg.pool else nn.Identity()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(pooled output, transition output before the pool)``."""
        t = self.transition(self.dense(x))
        return self.pool(t), t


class DownLevel(nn.Module):
    """One down-path scale: ``[max pool -> 1x1 conv, other half]`` concatenated.

    The other half is ``skip`` (the backbone's 64 channels) for the first level, else a learned
    1x1 conv (BN, no ReLU) -> depthwise 3x3 stride 2.
    """

    def __init__(self, in_channels: int, *, learned: bool) -> None:
        super().__init__()
        self.pool = _pool()
        self.pool_conv = ConvBNAct(in_channels, _HALF)
        if learned:
            self.reduce = ConvBNAct(in_channels, _HALF, act=False)
            self.dw = ConvBNAct(_HALF, _HALF, 3, 2, groups=_HALF)
        self.cat = FloatFunctional()

    def forward(self, x: torch.Tensor, skip: Optional[torch.Tensor] = None) -> torch.Tensor:
        other = skip if skip is not None else self.dw(self.reduce(x))
        return self.cat.cat([self.pool_conv(self.pool(x)), other], dim=1)


class UpFuse(nn.Module):
    """D-FPN step: bilinear resize of the coarser map -> depthwise 3x3, added to the lateral map."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.dw = ConvBNAct(channels, channels, 3, groups=channels)
        self.add = FloatFunctional()

    def forward(self, coarse: torch.Tensor, lateral: torch.Tensor) -> torch.Tensor:
        # resize to the lateral's exact size (not x2): ceil-mode pooling makes 3 -> 2, 19 -> 10
        up = F.interpolate(coarse, size=lateral.shape[-2:], mode="bilinear", align_corners=False)
        return self.add.add(lateral, self.dw(up))


class TinyDSODBody(nn.Module):
    """QuantStub -> stem -> dense stages -> down path -> D-FPN -> heads (FP32 last layers).

    Args:
        num_classes: classes including background.
        in_channels: input image channels.
        num_anchors: priors per location of each of the six levels.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        in_channels: int = 3,
        num_anchors: Sequence[int] = TINY_DSOD_PRIORS.num_anchors,
    ) -> None:
        super().__init__()
        if len(num_anchors) != _NUM_LEVELS:
            raise ValueError(f"Tiny-DSOD predicts on {_NUM_LEVELS} levels, got priors per location {list(num_anchors)}")
        self.quant = QuantStub()
        stem: list[nn.Module] = []
        channels = in_channels
        for row in _STEM:
            if row.depthwise:
                stem.append(ConvBNAct(channels, channels, row.kernel, row.stride, groups=channels))
            else:
                stem.append(ConvBNAct(channels, row.out_channels, row.kernel, row.stride))
                channels = row.out_channels
        stem.append(_pool())
        self.stem = nn.Sequential(*stem)
        stages = []
        for cfg in _STAGES:
            stages.append(DenseStage(channels, cfg))
            channels = cfg.transition
        self.stages = nn.ModuleList(stages)
        self._source_stage = next(i for i, cfg in enumerate(_STAGES) if cfg.source)
        self.down = nn.ModuleList(DownLevel(_SOURCE_CHANNELS, learned=i > 0) for i in range(_NUM_LEVELS - 1))
        self.up = nn.ModuleList(UpFuse(_SOURCE_CHANNELS) for _ in range(_NUM_LEVELS - 1))
        self.head = SSDHead(
            [Predictor(ConvBNAct(_SOURCE_CHANNELS, a * 4, 3, act=False)) for a in num_anchors],
            [Predictor(ConvBNAct(_SOURCE_CHANNELS, a * num_classes, 3, act=False)) for a in num_anchors],
        )
        self.float_modules: tuple[str, ...] = tuple(f"head.{n}" for n in self.head.float_modules)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        x = self.stem(self.quant(x))
        first = x
        for i, stage in enumerate(self.stages):
            x, t = stage(x)
            if i == self._source_stage:
                first = t
        levels = [first, self.down[0](first, skip=x)]
        for down in self.down[1:]:
            levels.append(down(levels[-1]))
        # D-FPN, coarse to fine: each level adds the upsampled context of the one below it
        fused = [levels[-1]]
        for up, lateral in zip(reversed(self.up), reversed(levels[:-1])):
            fused.append(up(fused[-1], lateral))
        return self.head(fused[::-1])


@register_model("detection")
def tiny_dsod(
    *,
    num_classes: int = 21,
    in_channels: int = 3,
    score_thresh: float = 0.01,
    nms_thresh: float = 0.45,
    topk_candidates: int = 200,
    detections_per_img: int = 200,
) -> SSDDetector:
    """Tiny-DSOD ("T-DSOD" of the StatAssist/GradBoost paper), 300x300, VOC by default.

    Six 128-ch sources at 38/19/10/5/3/2 (300x300), 4/6/6/6/4/4 SSD priors per location (8744).
    The first source is the 38x38 transition output after the second dense stage, before its
    pool (as in DSOD). The 3x3 Conv-BN heads stay FP32 (``model.float_modules``); everything
    before them is INT8. 1.67M params (0.81M backbone + 0.87M heads) and 1.30 GMACs at 300x300
    with 21 classes; the reference build has 1.69M / 1.32G, the paper lists 2.17M / 2.24B.

    Args:
        num_classes: classes including background (21 for VOC).
        in_channels: input image channels.
        score_thresh, nms_thresh, topk_candidates, detections_per_img: post-processing (SSD's
            0.01, 0.45, 200 per class, 200 per image).

    Example::

        model = frostnet.get_model("tiny_dsod").eval()
        detections = model(torch.rand(1, 3, 300, 300))  # [{"boxes", "scores", "labels"}]
    """
    check_detector_args(num_classes=num_classes, in_channels=in_channels, score_thresh=score_thresh,
                        nms_thresh=nms_thresh, topk_candidates=topk_candidates, detections_per_img=detections_per_img)
    body = TinyDSODBody(num_classes=num_classes, in_channels=in_channels)
    return SSDDetector(
        body, TINY_DSOD_PRIORS, num_classes=num_classes, in_channels=in_channels, name="tiny_dsod",
        image_size=300, score_thresh=score_thresh, nms_thresh=nms_thresh, topk_candidates=topk_candidates,
        detections_per_img=detections_per_img,
    )
