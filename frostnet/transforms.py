"""The preprocessing that published weights expect: ``weights.transforms()`` (torchvision's
convention), a :mod:`torchvision.transforms.v2` pipeline built from a manifest entry.

    entry = frostnet.hub.get_weights("frostnet_small_1_0.fashion_mnist.int8_x86")
    preprocess = entry.transforms()
    x = torch.stack([preprocess(Image.open(p)) for p in paths])   # (N, 3, 32, 32), normalized
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Union

import numpy as np
import torch
from PIL import Image
from torch import nn
from torchvision.transforms import v2

__all__ = ["ImageToFloat", "RepeatChannels", "weights_transforms"]

#: Datasets whose images were padded, not resized, to the input size: their native side.
_NATIVE_SIDE = {"fashion_mnist": 28}


class ImageToFloat(nn.Module):
    """A PIL image or an image tensor as a float ``(C, H, W)`` tensor in [0, 1].

    Hand-written because the bit depth of a PIL image lives in its mode, which
    ``v2.ToImage`` + ``v2.ToDtype(scale=True)`` do not read: a 16-bit PNG opens as ``I;16`` or
    as 32-bit ``I`` (scaled by 2**31 there: every pixel ~0), and ``convert("L")`` clips it to 0
    or 255. Here 16-bit images are divided by 65535, float (``F``) images are taken as [0, 1],
    palette/alpha images are converted to RGB/L first.
    """

    def forward(self, img: Union[Image.Image, torch.Tensor]) -> torch.Tensor:  # noqa: D102
        if isinstance(img, torch.Tensor):
            t = img if img.dim() == 3 else img.unsqueeze(0)
            if t.dtype == torch.uint8:
                return t.float() / 255.0
            if t.dtype == torch.uint16:
                return t.float() / 65535.0
            if t.is_floating_point():
                return _check_unit_range(t.float(), "float image tensor")
            raise ValueError(f"image tensors must be uint8, uint16 or float in [0, 1], got {t.dtype}")
        if not isinstance(img, Image.Image):
            raise TypeError(f"expected a PIL image or an image tensor, got {type(img).__name__}")
        mode = img.mode
        if mode.startswith("I;16") or mode in ("I", "F"):
            data = torch.from_numpy(np.asarray(img).astype(np.float32)).view(1, img.height, img.width)
            if mode == "F":
                return _check_unit_range(data, "float (mode F) image")
            if mode == "I" and (data.min() < 0 or data.max() > 65535):
                raise ValueError(f"32-bit integer image with values outside 0..65535 "
                                 f"({data.min():.0f}..{data.max():.0f}); save it as 8- or 16-bit")
            return data / 65535.0
        if mode not in ("L", "RGB"):
            img = img.convert("RGB" if mode in ("P", "PA", "RGBA", "CMYK", "YCbCr", "LAB", "HSV", "RGBX") else "L")
        return v2.functional.pil_to_tensor(img).float() / 255.0


def _check_unit_range(t: torch.Tensor, what: str) -> torch.Tensor:
    if not torch.isfinite(t).all():
        raise ValueError(f"{what} holds NaN or infinite values")
    lo, hi = float(t.min()), float(t.max())
    if lo < 0.0 or hi > 1.0:
        raise ValueError(f"{what} must hold values in [0, 1], got {lo:g}..{hi:g}")
    return t


class RepeatChannels(nn.Module):
    """Replicate a one-channel image to ``channels`` (the zoo's models take RGB-shaped input)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return x.expand(self.channels, -1, -1).contiguous() if x.shape[-3] == 1 else x

    def extra_repr(self) -> str:
        return f"channels={self.channels}"


def weights_transforms(dataset: str, input_size: Sequence[int], mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    """The eval preprocessing of weights trained on ``dataset`` with this input size and mean/std.

    Fashion-MNIST weights (and any dataset of :data:`_NATIVE_SIDE`): gray, resized to the
    native 28x28, zero-padded (centered) to ``input_size``, normalized, replicated to the input
    channels -- exactly ``frostnet.data.prepare_batch``. Other datasets: converted to the input
    channels, resized to ``input_size``, normalized.

    Args:
        dataset: the entry's dataset.
        input_size: ``(channels, height, width)``.
        mean, std: per input channel, in [0, 1] units.
    """
    channels, height, width = (int(v) for v in input_size)
    steps: list[Any] = [ImageToFloat()]
    native = _NATIVE_SIDE.get(dataset)
    if native is not None:
        pad_h, pad_w = height - native, width - native
        steps += [v2.Grayscale(1), v2.Resize((native, native), antialias=True),
                  v2.Pad([pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=0.0),
                  v2.Normalize([float(mean[0])], [float(std[0])]), RepeatChannels(channels)]
    else:
        steps += [v2.Grayscale(1) if channels == 1 else v2.RGB(), v2.Resize((height, width), antialias=True),
                  v2.Normalize([float(m) for m in mean], [float(s) for s in std])]
    return v2.Compose(steps)
