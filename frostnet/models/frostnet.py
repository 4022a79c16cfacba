"""FrostNet-Small/Base/Large (Kim et al., "FrostNet: Towards Quantization-Aware Network
Architecture Search"), built as the authors' released networks (``shared/specs/frostnet.md``).

The float model is the quantizable model: QuantStub/DeQuantStub and FloatFunctional (concat,
residual add) sit in the module tree and are identities until ``frostnet.quant`` prepares it.
Parameter names match the authors' checkpoints (``conv1.conv.0.weight``, ``layer3.0.squeeze_conv...``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..quant import DeQuantStub, FloatFunctional, QuantStub
from ._features import FeatureInfo
from ._layers import ConvBNAct, check_image_input, fuse_conv_bn_act, init_weights, make_divisible
from ._registry import register_model

__all__ = ["FrostBlockConfig", "FrostBottleneck", "FrostNet", "frostnet", "MODES", "WIDTHS", "frostnet_config"]

MODES: tuple[str, ...] = ("small", "base", "large")
WIDTHS: tuple[float, ...] = (0.35, 0.5, 0.75, 1.0, 1.25)
OUTPUT_STRIDES: tuple[int, ...] = (8, 16, 32)
LAST_CHANNELS = 1280
#: Taps a features_only FrostNet returns by default: strides 4, 8, 16, 32.
DEFAULT_OUT_INDICES: tuple[int, ...] = (1, 2, 3, 4)


@dataclass(frozen=True)
class FrostBlockConfig:
    """One Frost bottleneck row of the architecture table (channels at width 1.0)."""

    kernel: int
    out_channels: int
    expansion: int
    reduce: int
    stride: int


def _b(k: int, c: int, e: int, r: int, s: int) -> FrostBlockConfig:
    return FrostBlockConfig(k, c, e, r, s)


# Rows are (kernel, out channels, expansion, reduce factor, stride), grouped by stage.
# Stage strides at the stage output: layer1 4, layer2 8, layer3 16, layer4 32, layer5 32.
_ARCHS: dict[str, dict[str, tuple[FrostBlockConfig, ...]]] = {
    "small": {
        "layer1": (_b(3, 16, 1, 1, 1), _b(5, 24, 3, 4, 2), _b(3, 24, 3, 4, 1)),
        "layer2": (_b(5, 40, 3, 4, 2),),
        "layer3": (_b(5, 80, 3, 4, 2), _b(5, 80, 3, 4, 1), _b(3, 80, 3, 4, 1),
                   _b(5, 96, 3, 2, 1), _b(5, 96, 3, 4, 1), _b(5, 96, 3, 4, 1)),
        "layer4": (_b(5, 192, 6, 4, 2), _b(5, 192, 6, 4, 1), _b(5, 192, 6, 4, 1)),
        "layer5": (_b(5, 320, 6, 2, 1),),
    },
    "base": {
        "layer1": (_b(3, 16, 1, 1, 1), _b(5, 24, 6, 4, 2), _b(3, 24, 3, 4, 1)),
        "layer2": (_b(5, 40, 3, 4, 2), _b(5, 40, 3, 4, 1)),
        "layer3": (_b(5, 80, 3, 4, 2), _b(3, 80, 3, 4, 1), _b(5, 96, 3, 2, 1),
                   _b(3, 96, 3, 4, 1), _b(5, 96, 3, 4, 1), _b(5, 96, 3, 4, 1)),
        "layer4": (_b(5, 192, 6, 2, 2), _b(5, 192, 3, 2, 1), _b(5, 192, 3, 2, 1), _b(5, 192, 3, 2, 1)),
        "layer5": (_b(5, 320, 6, 2, 1),),
    },
    "large": {
        "layer1": (_b(3, 16, 1, 1, 1), _b(3, 24, 6, 4, 2), _b(3, 24, 3, 4, 1)),
        "layer2": (_b(5, 40, 6, 4, 2), _b(3, 40, 3, 4, 1)),
        "layer3": (_b(5, 80, 6, 4, 2), _b(5, 80, 3, 4, 1), _b(5, 80, 3, 4, 1), _b(5, 96, 6, 4, 1),
                   _b(5, 96, 3, 4, 1), _b(3, 96, 3, 4, 1), _b(3, 96, 3, 4, 1)),
        "layer4": (_b(5, 192, 6, 2, 2), _b(5, 192, 6, 4, 1), _b(5, 192, 6, 4, 1),
                   _b(5, 192, 3, 4, 1), _b(5, 192, 3, 4, 1)),
        "layer5": (_b(5, 320, 6, 2, 1),),
    },
}
STAGES: tuple[str, ...] = ("layer1", "layer2", "layer3", "layer4", "layer5")
# Feature taps: the stem (stride 2) and the last stage of each output stride 4/8/16/32.
_TAPS: tuple[str, ...] = ("conv1", "layer1", "layer2", "layer3", "layer5")


def frostnet_config(mode: str, width: float) -> dict[str, tuple[FrostBlockConfig, ...]]:
    """The block table of FrostNet-``mode`` with channels scaled to ``width``."""
    if mode not in _ARCHS:
        raise ValueError(f"unknown FrostNet mode {mode!r}; valid choices: {', '.join(MODES)}")
    if width not in WIDTHS:
        raise ValueError(f"unknown FrostNet width {width!r}; valid choices: {', '.join(map(str, WIDTHS))}")
    return {
        stage: tuple(
            FrostBlockConfig(r.kernel, make_divisible(int(r.out_channels * width)), r.expansion, r.reduce, r.stride)
            for r in rows
        )
        for stage, rows in _ARCHS[mode].items()
    }


class FrostBottleneck(nn.Module):
    """Frost bottleneck (FrostConv): squeeze 1x1 -> concat [squeezed, input] -> expand 1x1 ->
    depthwise kxk -> project 1x1, plus the residual add when shapes allow.

    Blocks with expansion 1 skip squeeze and expansion; blocks with ``in_channels // reduce < 8``
    fall back to a plain inverted residual (no squeeze, no concat), as in the authors' networks.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        kernel_size: int,
        expansion: int,
        reduce: int,
        stride: int,
        dilation: int = 1,
    ) -> None:
        super().__init__()
        self.cascade = expansion != 1 and in_channels // reduce >= 8
        mid = in_channels
        if self.cascade:
            squeezed = make_divisible(in_channels // reduce)
            self.squeeze_conv = ConvBNAct(in_channels, squeezed)
            self.cat = FloatFunctional()
            mid = squeezed + in_channels
        if expansion != 1:
            self.conv1 = ConvBNAct(mid, mid * expansion)
        hidden = mid * expansion
        self.conv2 = ConvBNAct(hidden, hidden, kernel_size, stride, groups=hidden, dilation=dilation)
        self.reduce_conv = ConvBNAct(hidden, out_channels, act=False)
        self.use_residual = stride == 1 and in_channels == out_channels
        if self.use_residual:
            self.skip_add = FloatFunctional()
        self.stride = stride
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        if self.cascade:
            # squeezed features first, then the block input: the channel order of the checkpoints
            out = self.cat.cat([self.squeeze_conv(x), x], dim=1)
        if hasattr(self, "conv1"):
            out = self.conv1(out)
        out = self.reduce_conv(self.conv2(out))
        if self.use_residual:
            out = self.skip_add.add(out, x)
        return out


class FrostNet(nn.Module):
    """FrostNet classifier, or a multi-scale feature extractor with ``features_only=True``.

    Args:
        stages: stage name -> block rows, channels already scaled (see :func:`frostnet_config`).
        stem_channels: output channels of the 3x3 stride-2 stem.
        num_classes: classifier outputs.
        in_channels: input image channels.
        dropout: dropout before the classifier.
        output_stride: 32, or 16/8 to replace the last strides with dilation (segmentation).
        features_only: return the feature maps listed by ``out_indices`` instead of logits.
        out_indices: which taps of :attr:`feature_info` to return (0 = stem, stride 2; 1-4 =
            strides 4, 8, 16, 32).
        name: shown in error messages.
    """

    def __init__(
        self,
        stages: dict[str, Sequence[FrostBlockConfig]],
        *,
        stem_channels: int,
        num_classes: int = 1000,
        in_channels: int = 3,
        dropout: float = 0.2,
        output_stride: int = 32,
        features_only: bool = False,
        out_indices: Sequence[int] = DEFAULT_OUT_INDICES,
        name: str = "FrostNet",
    ) -> None:
        super().__init__()
        _check_positive_int("num_classes", num_classes)
        _check_positive_int("in_channels", in_channels)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        if output_stride not in OUTPUT_STRIDES:
            raise ValueError(f"unknown output_stride {output_stride!r}; valid choices: {', '.join(map(str, OUTPUT_STRIDES))}")
        out_indices = tuple(out_indices)
        if features_only:
            bad = [i for i in out_indices if not 0 <= i < len(_TAPS)]
            if bad or not out_indices or len(set(out_indices)) != len(out_indices):
                raise ValueError(
                    f"out_indices {out_indices!r} must be distinct values from 0..{len(_TAPS) - 1} "
                    f"(taps: {', '.join(f'{i}={t}' for i, t in enumerate(_TAPS))})"
                )
        self.name = name
        self.in_channels = in_channels
        self.features_only = features_only
        self.out_indices = out_indices

        self.quant = QuantStub()
        self.conv1 = ConvBNAct(in_channels, stem_channels, 3, 2)
        current_stride, dilation = 2, 1
        feature_info = [dict(num_chs=stem_channels, reduction=2, module="conv1")]
        last_stage = _TAPS[max(out_indices)] if features_only else STAGES[-1]
        channels = stem_channels
        for stage in STAGES:
            blocks = []
            for row in stages[stage]:
                stride, block_dilation = row.stride, dilation
                if current_stride * row.stride > output_stride:
                    # Past the requested output stride: keep the resolution and widen the
                    # receptive field instead (this block keeps the previous dilation).
                    dilation *= row.stride
                    stride = 1
                current_stride *= stride
                blocks.append(
                    FrostBottleneck(
                        channels,
                        row.out_channels,
                        kernel_size=row.kernel,
                        expansion=row.expansion,
                        reduce=row.reduce,
                        stride=stride,
                        dilation=block_dilation,
                    )
                )
                channels = row.out_channels
            self.add_module(stage, nn.Sequential(*blocks))
            if stage in _TAPS:
                feature_info.append(dict(num_chs=channels, reduction=current_stride, module=stage))
            if stage == last_stage:
                break
        # Describes exactly what forward returns: the out_indices taps with features_only, every
        # tap of the network otherwise (which backbone_with_fpn picks from).
        self.feature_info = FeatureInfo(feature_info, out_indices if features_only else range(len(feature_info)))
        if features_only:
            self.dequant = nn.ModuleList(DeQuantStub() for _ in out_indices)
            self._tap_modules = {feature_info[i]["module"]: k for k, i in enumerate(out_indices)}
        else:
            self.last_layer = ConvBNAct(channels, LAST_CHANNELS)
            self.classifier = nn.Sequential(
                nn.AdaptiveAvgPool2d(1),
                nn.Dropout(dropout),
                nn.Conv2d(LAST_CHANNELS, num_classes, 1),
            )
            self.dequant = DeQuantStub()
            self.num_classes = num_classes
        init_weights(self)
        if not features_only:
            # Kaiming fan_out on a 1x1 classifier scales with 1/num_classes: with few classes the
            # initial logits are huge (loss ~20 at 10 classes) and QAT diverges. Use the small
            # normal init of torchvision's classifiers instead.
            nn.init.normal_(self.classifier[2].weight, 0, 0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        check_image_input(x, self.in_channels, self.name)
        x = self.quant(x)
        if self.features_only:
            outs: list[Optional[torch.Tensor]] = [None] * len(self.out_indices)
            for name, module in self.named_children():
                if name in ("quant", "dequant"):
                    continue
                x = module(x)
                k = self._tap_modules.get(name)
                if k is not None:
                    outs[k] = self.dequant[k](x)
            return outs  # type: ignore[return-value]
        x = self.conv1(x)
        x = self.layer5(self.layer4(self.layer3(self.layer2(self.layer1(x)))))
        x = self.classifier(self.last_layer(x))
        return torch.flatten(self.dequant(x), 1)

    def fuse_model(self, is_qat: Optional[bool] = None) -> None:
        """Fuse every Conv-BN(-ReLU) in place; ``is_qat`` defaults to ``self.training``."""
        fuse_conv_bn_act(self, self.training if is_qat is None else is_qat)


def _check_positive_int(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def frostnet(
    mode: str,
    width: float,
    *,
    num_classes: int = 1000,
    in_channels: int = 3,
    dropout: float = 0.2,
    output_stride: int = 32,
    dilated: bool = False,
    features_only: bool = False,
    out_indices: Optional[Sequence[int]] = None,
) -> FrostNet:
    """Build FrostNet-``mode`` (small/base/large) at ``width`` (0.35, 0.5, 0.75, 1.0, 1.25).

    Args:
        mode: ``"small"``, ``"base"`` or ``"large"``.
        width: channel multiplier; the stem is not widened above 1.0, the head not at all.
        num_classes: classifier outputs.
        in_channels: input image channels.
        dropout: dropout before the classifier conv.
        output_stride: 32, 16 or 8; below 32 the last strides become dilations.
        dilated: shorthand for ``output_stride=16`` (segmentation backbones).
        features_only: return feature maps (see ``FrostNet.feature_info``) instead of logits.
        out_indices: feature taps to return with ``features_only`` (0..4, default 1..4); an error
            without ``features_only`` (a classifier returns logits, not taps).
    """
    if out_indices is not None and not features_only:
        raise ValueError(f"out_indices={tuple(out_indices)!r} only applies with features_only=True (a classifier "
                         "returns logits); pass features_only=True, or drop out_indices")
    stages = frostnet_config(mode, width)
    if dilated:
        if output_stride not in (16, 32):
            raise ValueError(f"dilated=True means output_stride=16; got output_stride={output_stride!r} as well")
        output_stride = 16
    return FrostNet(
        stages,
        stem_channels=make_divisible(32 * min(1.0, width)),
        num_classes=num_classes,
        in_channels=in_channels,
        dropout=dropout,
        output_stride=output_stride,
        features_only=features_only,
        out_indices=DEFAULT_OUT_INDICES if out_indices is None else out_indices,
        name=_model_name(mode, width),
    )


def _model_name(mode: str, width: float) -> str:
    return f"frostnet_{mode}_{str(width).replace('.', '_')}"


def _make_builder(mode: str, width: float) -> Callable[..., FrostNet]:
    name = _model_name(mode, width)

    # Architecture only: weights are attached above the models (frostnet.get_model / torch.hub),
    # so no model module knows where weights come from.
    def builder(
        *,
        num_classes: int = 1000,
        in_channels: int = 3,
        dropout: float = 0.2,
        output_stride: int = 32,
        dilated: bool = False,
        features_only: bool = False,
        out_indices: Optional[Sequence[int]] = None,
    ) -> FrostNet:
        return frostnet(mode, width, num_classes=num_classes, in_channels=in_channels, dropout=dropout,
                        output_stride=output_stride, dilated=dilated, features_only=features_only,
                        out_indices=out_indices)

    builder.__name__ = builder.__qualname__ = name
    builder.__doc__ = f"""FrostNet-{mode.capitalize()} at width {width}.

    Args:
        num_classes: classifier outputs (with weights: default their number of categories).
        in_channels: input image channels.
        dropout: dropout before the classifier conv.
        output_stride: 32, 16 or 8; below 32 the last strides become dilations.
        dilated: shorthand for ``output_stride=16``.
        features_only: return feature maps (see ``model.feature_info``) instead of logits.
        out_indices: taps to return with ``features_only`` (0..4 = strides 2, 4, 8, 16, 32).

    Example::

        model = frostnet.get_model({name!r}, num_classes=10)
        int8 = frostnet.get_model({name!r}, weights="DEFAULT", quantized=True)
    """
    return builder


# One registered builder per (mode, width): frostnet_small_1_0, frostnet_large_0_35, ...
for _mode in MODES:
    for _width in WIDTHS:
        _fn = register_model("classification")(_make_builder(_mode, _width))
        globals()[_fn.__name__] = _fn
        __all__.append(_fn.__name__)
del _mode, _width, _fn
