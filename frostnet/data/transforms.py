"""Joint (image, mask) transforms for semantic segmentation.

Each transform takes and returns ``(image, mask)`` where ``image`` is a
``(C, H, W)`` tensor (uint8 or float) and ``mask`` an ``(H, W)`` integer
tensor. Geometry is drawn once per call and applied to both, the image with
bilinear interpolation and the mask with nearest neighbour (label values must
never be blended), so the two always stay pixel-aligned.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF
from torchvision.transforms.v2 import InterpolationMode

__all__ = [
    "IGNORE_INDEX",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SegCompose",
    "SegResize",
    "SegRandomScale",
    "SegRandomCrop",
    "SegCenterCrop",
    "SegRandomHorizontalFlip",
    "SegNormalize",
    "resize_nearest",
    "segmentation_train_transform",
    "segmentation_eval_transform",
]

IGNORE_INDEX = 255

# Standard ImageNet RGB statistics (torchvision convention), also used for
# segmentation backbones pretrained on ImageNet.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

SegPair = tuple[torch.Tensor, torch.Tensor]
SizeArg = Union[int, Sequence[int]]


def _size2(size: SizeArg) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    if len(size) != 2:
        raise ValueError(f"size must be an int or (height, width), got {size!r}")
    return int(size[0]), int(size[1])


def _check(image: torch.Tensor, mask: torch.Tensor) -> None:
    if image.dim() != 3 or mask.dim() != 2 or image.shape[-2:] != mask.shape:
        raise ValueError(
            f"expected image (C, H, W) and mask (H, W) of equal H, W; got "
            f"{tuple(image.shape)} and {tuple(mask.shape)}"
        )


def _uniform(low: float, high: float, generator: Optional[torch.Generator]) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def resize_nearest(mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Nearest-neighbour resize of an ``(H, W)`` label mask of any dtype.

    Implemented as an index gather because ``F.interpolate`` does not accept
    integer tensors; source pixel = ``floor((dst + 0.5) * src / dst_size)``,
    i.e. pixel-centre aligned like bilinear with ``align_corners=False``.
    """
    h, w = mask.shape
    rows = ((torch.arange(height, dtype=torch.float64) + 0.5) * (h / height)).long()
    cols = ((torch.arange(width, dtype=torch.float64) + 0.5) * (w / width)).long()
    rows, cols = rows.clamp_(max=h - 1), cols.clamp_(max=w - 1)
    return mask[rows[:, None], cols[None, :]]


def _resize_pair(image: torch.Tensor, mask: torch.Tensor, height: int, width: int) -> SegPair:
    if image.shape[-2:] == (height, width):
        return image, mask
    image = TF.resize(image, [height, width], interpolation=InterpolationMode.BILINEAR,
                      antialias=True)
    return image, resize_nearest(mask, height, width)


class SegCompose:
    """Apply joint transforms in sequence."""

    def __init__(
        self, transforms: Sequence[Callable[[torch.Tensor, torch.Tensor], SegPair]]
    ) -> None:
        self.transforms = list(transforms)

    def __call__(self, image: torch.Tensor, mask: torch.Tensor) -> SegPair:
        for t in self.transforms:
            image, mask = t(image, mask)
        return image, mask

    def __repr__(self) -> str:
        inner = ", ".join(repr(t) for t in self.transforms)
        return f"SegCompose([{inner}])"


class SegResize:
    """Resize to a fixed ``(height, width)``, or the short side to ``size`` if int."""

    def __init__(self, size: SizeArg) -> None:
        self.size = size

    def __call__(self, image: torch.Tensor, mask: torch.Tensor) -> SegPair:
        _check(image, mask)
        if isinstance(self.size, int):
            h, w = mask.shape
            scale = self.size / min(h, w)
            return _resize_pair(image, mask, round(h * scale), round(w * scale))
        return _resize_pair(image, mask, *_size2(self.size))

    def __repr__(self) -> str:
        return f"SegResize({self.size!r})"


class SegRandomScale:
    """Rescale both by one factor drawn uniformly from ``[min_scale, max_scale]``."""

    def __init__(self, min_scale: float = 0.5, max_scale: float = 2.0,
                 generator: Optional[torch.Generator] = None) -> None:
        if not 0 < min_scale <= max_scale:
            raise ValueError(f"need 0 < min_scale <= max_scale, got {min_scale}, {max_scale}")
        self.min_scale, self.max_scale, self.generator = min_scale, max_scale, generator

    def __call__(self, image: torch.Tensor, mask: torch.Tensor) -> SegPair:
        _check(image, mask)
        s = _uniform(self.min_scale, self.max_scale, self.generator)
        h, w = mask.shape
        return _resize_pair(image, mask, max(1, round(h * s)), max(1, round(w * s)))

    def __repr__(self) -> str:
        return f"SegRandomScale({self.min_scale}, {self.max_scale})"


class SegRandomCrop:
    """Random crop to ``size``, padding first if the input is smaller.

    Padding goes right/bottom with ``fill`` for the image and ``ignore_index``
    for the mask, so padded pixels never contribute to the loss.
    """

    def __init__(self, size: SizeArg, fill: float = 0, ignore_index: int = IGNORE_INDEX,
                 generator: Optional[torch.Generator] = None) -> None:
        self.size = _size2(size)
        self.fill, self.ignore_index, self.generator = fill, ignore_index, generator

    def __call__(self, image: torch.Tensor, mask: torch.Tensor) -> SegPair:
        _check(image, mask)
        ch, cw = self.size
        h, w = mask.shape
        ph, pw = max(ch - h, 0), max(cw - w, 0)
        if ph or pw:
            image = F.pad(image, (0, pw, 0, ph), value=self.fill)
            mask = F.pad(mask, (0, pw, 0, ph), value=self.ignore_index)
            h, w = mask.shape
        top = int(torch.randint(0, h - ch + 1, (), generator=self.generator))
        left = int(torch.randint(0, w - cw + 1, (), generator=self.generator))
        return (image[:, top : top + ch, left : left + cw],
                mask[top : top + ch, left : left + cw])

    def __repr__(self) -> str:
        return f"SegRandomCrop({self.size}, fill={self.fill}, ignore_index={self.ignore_index})"


class SegCenterCrop:
    """Center crop to ``size`` (padding with fill/ignore if smaller)."""

    def __init__(self, size: SizeArg, fill: float = 0, ignore_index: int = IGNORE_INDEX) -> None:
        self.size = _size2(size)
        self.fill, self.ignore_index = fill, ignore_index

    def __call__(self, image: torch.Tensor, mask: torch.Tensor) -> SegPair:
        _check(image, mask)
        ch, cw = self.size
        h, w = mask.shape
        ph, pw = max(ch - h, 0), max(cw - w, 0)
        if ph or pw:
            pad = (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)
            image = F.pad(image, pad, value=self.fill)
            mask = F.pad(mask, pad, value=self.ignore_index)
            h, w = mask.shape
        top, left = (h - ch) // 2, (w - cw) // 2
        return (image[:, top : top + ch, left : left + cw],
                mask[top : top + ch, left : left + cw])

    def __repr__(self) -> str:
        return f"SegCenterCrop({self.size})"


class SegRandomHorizontalFlip:
    """Flip both left-right with probability ``p``."""

    def __init__(self, p: float = 0.5, generator: Optional[torch.Generator] = None) -> None:
        self.p, self.generator = p, generator

    def __call__(self, image: torch.Tensor, mask: torch.Tensor) -> SegPair:
        _check(image, mask)
        if float(torch.rand((), generator=self.generator)) < self.p:
            return image.flip(-1), mask.flip(-1)
        return image, mask

    def __repr__(self) -> str:
        return f"SegRandomHorizontalFlip(p={self.p})"


class SegNormalize:
    """Convert the image to float in [0, 1] (if uint8) and normalize; mask -> int64."""

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD) -> None:
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(self, image: torch.Tensor, mask: torch.Tensor) -> SegPair:
        x = image.float() / 255.0 if image.dtype == torch.uint8 else image.float()
        mean = torch.tensor(self.mean).view(-1, 1, 1)
        std = torch.tensor(self.std).view(-1, 1, 1)
        return (x - mean) / std, mask.long()

    def __repr__(self) -> str:
        return f"SegNormalize(mean={self.mean}, std={self.std})"


def segmentation_train_transform(
    crop_size: SizeArg = 512,
    scale_range: tuple[float, float] = (0.5, 2.0),
    base_size: Optional[SizeArg] = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    ignore_index: int = IGNORE_INDEX,
    generator: Optional[torch.Generator] = None,
) -> SegCompose:
    """Standard training recipe: [resize], random scale, crop, flip, normalize.

    Args:
        crop_size: Output crop size (int or ``(h, w)``).
        scale_range: ``(min, max)`` random scale factors.
        base_size: Optional resize applied first (e.g. to downsample
            2048x1024 Cityscapes frames for CPU training).
        mean: Image normalization mean.
        std: Image normalization std.
        ignore_index: Mask value used for crop padding.
        generator: Optional RNG shared by the random steps.
    """
    steps: list[Callable[[torch.Tensor, torch.Tensor], SegPair]] = []
    if base_size is not None:
        steps.append(SegResize(base_size))
    steps += [
        SegRandomScale(*scale_range, generator=generator),
        SegRandomCrop(crop_size, fill=0, ignore_index=ignore_index, generator=generator),
        SegRandomHorizontalFlip(0.5, generator=generator),
        SegNormalize(mean, std),
    ]
    return SegCompose(steps)


def segmentation_eval_transform(
    size: Optional[SizeArg] = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> SegCompose:
    """Evaluation recipe: optional deterministic resize, then normalize."""
    steps: list[Callable[[torch.Tensor, torch.Tensor], SegPair]] = []
    if size is not None:
        steps.append(SegResize(size))
    steps.append(SegNormalize(mean, std))
    return SegCompose(steps)
