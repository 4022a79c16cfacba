"""Joint transforms for dense tasks: segmentation (image, mask) and detection (image, boxes).

Detection and the dense batch pipeline use ``torchvision.transforms.v2`` on ``tv_tensors``
(``Image``, ``BoundingBoxes``, ``Mask``), which moves boxes and masks with the image:
:func:`clean_boxes` and :func:`dense_transform`.

The ``Seg*`` classes below are kept hand-written because each takes an explicit
``torch.Generator``: v2's random transforms draw from the global RNG, so a seeded,
resumable pipeline could only use them under ``torch.random.fork_rng``. Each ``Seg*`` transform
takes and returns ``(image, mask)`` where ``image`` is a
``(C, H, W)`` tensor (uint8 or float) and ``mask`` an ``(H, W)`` integer
tensor. Geometry is drawn once per call and applied to both, the image with
bilinear interpolation and the mask with nearest neighbour (label values must
never be blended), so the two always stay pixel-aligned.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF
from torchvision.transforms.v2 import InterpolationMode

__all__ = [
    "IGNORE_INDEX",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SegCompose",
    "check_mask_ids",
    "check_mask_size",
    "clean_boxes",
    "dense_transform",
    "SegResize",
    "SegRandomScale",
    "SegRandomCrop",
    "SegCenterCrop",
    "SegRandomHorizontalFlip",
    "SegNormalize",
    "resize_nearest",
    "single_thread",
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


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run the block with one intra-op thread, restoring the previous count afterwards.

    Per-sample work on small tensors (a 128x128 canvas, one item) is dominated by thread
    start/stop: on this project's loaded 2-core VM, rendering a FashionScenes canvas with 2 threads
    was an order of magnitude slower than with 1. Switching the count is cheap.
    """
    previous = torch.get_num_threads()
    if previous == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


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


def check_mask_ids(mask: torch.Tensor, num_classes: int, source: str) -> None:
    """Raise unless every mask value is 0 (background), 1..``num_classes`` or 255 (ignore).

    Args:
        mask: Integer class-id mask.
        num_classes: Number of object classes (ids 1..num_classes).
        source: The file or sample the mask came from, named in the error.
    """
    bad = ((mask < 0) | (mask > num_classes)) & (mask != IGNORE_INDEX)
    if bool(bad.any()):
        ids = sorted(set(mask[bad].unique().tolist()))
        raise ValueError(f"{source}: mask value(s) {ids[:5]} are not class ids (valid: 0..{num_classes} "
                         f"or {IGNORE_INDEX} = ignore)")


def check_mask_size(image: torch.Tensor, mask: torch.Tensor, image_source: str, mask_source: str) -> None:
    """Raise unless ``mask`` is ``(H, W)`` of the ``(C, H, W)`` ``image``, naming both files and sizes."""
    if tuple(mask.shape) != tuple(image.shape[-2:]):
        raise ValueError(f"mask {mask_source} is {tuple(mask.shape)} (H, W) but its image {image_source} "
                         f"is {tuple(image.shape[-2:])}; they must be the same size")


# Clip to the canvas, then drop boxes under 1 px wide/tall or 1 px^2 (fully outside boxes clip
# to zero area). Neither transform is random, so the v2 classes are used as they are.
_CLEAN_BOXES = v2.Compose([v2.ClampBoundingBoxes(), v2.SanitizeBoundingBoxes(min_size=1.0, min_area=1.0)])


def clean_boxes(boxes: tv_tensors.BoundingBoxes, labels: torch.Tensor,
                **per_box: torch.Tensor) -> dict[str, torch.Tensor]:
    """Clip boxes to their canvas and drop the degenerate ones, keeping per-box fields aligned.

    A box partly outside the image is clipped to it; a box that is fully outside, or has less
    than 1 px width, height or area after clipping (including inverted boxes), is dropped.

    Args:
        boxes: Boxes with their ``canvas_size``.
        labels: ``(K,)`` labels of the boxes.
        **per_box: Other ``(K, ...)`` fields to filter like ``labels`` (e.g. ``difficult``).

    Returns:
        Dict with ``boxes`` (``BoundingBoxes``), ``labels`` and the ``per_box`` fields.
    """
    if len(boxes) != len(labels) or any(len(v) != len(labels) for v in per_box.values()):
        sizes = {"boxes": len(boxes), "labels": len(labels), **{k: len(v) for k, v in per_box.items()}}
        raise ValueError(f"per-box fields must have one entry per box, got lengths {sizes}")
    sample = {"boxes": boxes, "labels": labels, **per_box}
    sanitize = v2.SanitizeBoundingBoxes(min_size=1.0, min_area=1.0,
                                        labels_getter=lambda s: tuple(s[k] for k in ("labels", *per_box)))
    return sanitize(v2.ClampBoundingBoxes()(sample)) if per_box else _CLEAN_BOXES(sample)


def dense_transform(
    image: torch.Tensor,
    target: dict[str, torch.Tensor],
    *,
    size: int,
    train: bool,
    generator: Optional[torch.Generator] = None,
    scale_jitter: float = 0.0,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[tv_tensors.Image, dict[str, torch.Tensor]]:
    """Resize one dense sample to ``size`` x ``size`` and, for training, jitter and flip it.

    Image, ``boxes`` and ``masks`` move together through ``torchvision.transforms.v2``
    functionals (the mask is resized with nearest neighbour, never blended). The random
    parameters are drawn from ``generator`` here and passed to the functionals, because v2's
    transform classes would draw them from the global RNG. Training draws, per sample, a scale
    ``s`` in ``[1 - scale_jitter, 1 + scale_jitter]`` (resize to ``round(s * size)``, then a random
    ``size`` crop, or random placement with zero image / ``ignore_index`` mask padding) and a
    horizontal flip with probability 0.5. Boxes are then clipped and sanitized (:func:`clean_boxes`).

    Args:
        image: ``(C, H, W)`` uint8 image.
        target: May hold ``boxes`` (``BoundingBoxes`` or xyxy float ``(K, 4)`` pixels) with
            ``labels``, and ``masks`` (``(H, W)`` integer class ids). Other keys pass through.
        size: Output side.
        train: Apply the random scale jitter and flip.
        generator: Source of the random draws (required when ``train``).
        scale_jitter: Half-width of the training scale range, ``0 <= scale_jitter < 1``.
        ignore_index: Mask value of padded pixels.

    Returns:
        ``(image, target)``: uint8 ``tv_tensors.Image`` ``(C, size, size)`` and the target with
        ``boxes`` as ``BoundingBoxes`` on the new canvas and ``masks`` as ``tv_tensors.Mask``.
    """
    if not 0.0 <= scale_jitter < 1.0:
        raise ValueError(f"scale_jitter must be in [0, 1), got {scale_jitter!r}")
    if train and generator is None:
        raise ValueError("dense_transform(train=True) needs a generator so the augmentation is reproducible")
    h, w = image.shape[-2:]
    out = dict(target)
    parts: dict[str, torch.Tensor] = {"image": tv_tensors.Image(image)}
    if "boxes" in target:
        boxes = tv_tensors.BoundingBoxes(target["boxes"], format="XYXY", canvas_size=(h, w))
        # Clean before moving: a box outside the image must not be carried into padding.
        cleaned = clean_boxes(boxes, target["labels"])
        parts["boxes"], labels = cleaned["boxes"], cleaned["labels"]
    if "masks" in target:
        sample = f"of sample {target.get('image_id', '?')}"
        check_mask_size(image, target["masks"], sample, sample)
        parts["masks"] = tv_tensors.Mask(target["masks"])
    side = size
    if train and scale_jitter:
        side = max(1, round(size * _uniform(1.0 - scale_jitter, 1.0 + scale_jitter, generator)))
    if (h, w) != (side, side):
        parts = {k: TF.resize(v, [side, side], antialias=True) for k, v in parts.items()}
    if side > size:
        top, left = (int(torch.randint(0, side - size + 1, (), generator=generator)) for _ in range(2))
        parts = {k: TF.crop(v, top, left, size, size) for k, v in parts.items()}
    elif side < size:
        top, left = (int(torch.randint(0, size - side + 1, (), generator=generator)) for _ in range(2))
        pad = [left, top, size - side - left, size - side - top]
        parts = {k: TF.pad(v, pad, fill=ignore_index if k == "masks" else 0) for k, v in parts.items()}
    if train and float(torch.rand((), generator=generator)) < 0.5:
        parts = {k: TF.horizontal_flip(v) for k, v in parts.items()}
    if "boxes" in parts:
        out.update(clean_boxes(parts["boxes"], labels))
    if "masks" in parts:
        out["masks"] = parts["masks"]
    return parts["image"], out
