"""FashionScenes: detection and segmentation canvases composed from real Fashion-MNIST items.

VOC, COCO and Cityscapes cannot be downloaded on every machine this project runs on; Fashion-MNIST
is a Debian package. A FashionScenes canvas pastes 1-6 Fashion-MNIST items, each rescaled to
0.8-2x of its 28 px, at random positions onto a ``size`` x ``size`` gray canvas (plain or
textured), later items on top of earlier ones. Every canvas is a pure function of ``(seed, split,
index)``, so the same dataset arguments give the same pixels and targets on every machine.

Rules (``docs/scenes.md`` explains them with a picture):

* **Foreground**: a pixel of a rescaled item is the item's when its gray value is at least
  :data:`FOREGROUND_THRESHOLD` (10 of 255). Only those pixels are pasted; the rest of the item's
  28x28 square (Fashion-MNIST's black surround) leaves the background visible.
* **Occlusion**: items are painted in order, so item ``j`` hides the pixels of items ``< j`` it
  covers. With ``occlusion=False`` an item is placed only where its foreground touches no earlier
  item's (up to :data:`PLACEMENT_TRIES` positions, else it is left out).
* **Boxes**: the tight box of an item's *visible* foreground pixels, ``(x1, y1, x2, y2)`` in
  continuous pixel-edge coordinates (a box around columns 3..7 is ``x1=3, x2=8``), the torchvision
  convention. An item with less than ``min_visible`` of its foreground visible gets no box.
* **Semantic mask**: 0 background, 1..10 the visible item's Fashion-MNIST class + 1, and 255
  (ignore) on faint rim pixels: visible item pixels darker than :data:`EDGE_THRESHOLD` (30 of
  255) that touch another owner (background or another item). Those are the antialiased edges
  that rescaling creates, where a one-pixel shift changes the answer.
* **Splits**: ``train`` canvases draw only from the Fashion-MNIST train file minus its last
  ``val_size`` items, ``val`` only from that held-out slice, ``test`` only from the 10k test
  file, so no item is shared between splits.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .fashion_mnist import FASHION_MNIST_CLASSES, FashionMNIST
from .transforms import IGNORE_INDEX, single_thread

__all__ = [
    "EDGE_THRESHOLD",
    "FOREGROUND_THRESHOLD",
    "PLACEMENT_TRIES",
    "SCENES_BACKGROUNDS",
    "SCENES_CATEGORIES",
    "SCENES_DEFAULT_NUM_IMAGES",
    "FashionScenes",
    "SceneItem",
]

PathLike = Union[str, os.PathLike]

# Index == label id: 0 is background, 1..10 the Fashion-MNIST classes (class + 1).
SCENES_CATEGORIES: tuple[str, ...] = ("background", *FASHION_MNIST_CLASSES)
SCENES_DEFAULT_NUM_IMAGES: dict[str, int] = {"train": 20000, "val": 1000, "test": 2000}
SCENES_BACKGROUNDS = ("plain", "texture")
FOREGROUND_THRESHOLD = 10
EDGE_THRESHOLD = 30
PLACEMENT_TRIES = 20
_ITEM_SIZE = 28
_SPLIT_CODES = {"train": 1, "val": 2, "test": 3}
_TEXTURE_STREAM = 0x7E57_0000_0000  # xor-ed into a canvas seed to seed its background texture


@dataclass(frozen=True)
class SceneItem:
    """One pasted item of a canvas, in paint order.

    Attributes:
        source_index: Position of the item in its Fashion-MNIST IDX file (train or test file).
        source_file: ``"train"`` or ``"test"``: which IDX file ``source_index`` points into.
        label: Target label, Fashion-MNIST class + 1 (1..10).
        side: Rescaled item size in pixels (the item is ``side`` x ``side``).
        left: Column of the item's top-left corner on the canvas.
        top: Row of the item's top-left corner on the canvas.
        foreground: Number of the item's foreground pixels.
        visible: Number of those pixels not covered by later items.
        has_box: Whether the item got a box (``visible >= min_visible * foreground``).
    """

    source_index: int
    source_file: str
    label: int
    side: int
    left: int
    top: int
    foreground: int
    visible: int
    has_box: bool


def _range_arg(name: str, value: Sequence[float], low: float, integer: bool) -> tuple:
    """Validate a ``(min, max)`` pair with ``low <= min <= max``."""
    try:
        lo, hi = value
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a (min, max) pair, got {value!r}") from None
    if integer and not (isinstance(lo, int) and isinstance(hi, int)):
        raise ValueError(f"{name} must be a pair of ints, got {value!r}")
    if not low <= lo <= hi:
        raise ValueError(f"{name} must satisfy {low} <= min <= max, got {value!r}")
    return lo, hi


def _canvas_seed(seed: int, split: str, index: int) -> int:
    # Distinct, stable seeds per (seed, split, index); the modulus keeps them in int64 range.
    return ((seed * 1_000_003 + _SPLIT_CODES[split]) * 10_000_019 + index) % (2**63 - 1)


def _uniform(gen: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=gen))


def _randint(gen: torch.Generator, low: int, high: int) -> int:
    """Uniform integer in ``low..high`` inclusive."""
    return int(torch.randint(low, high + 1, (), generator=gen))


def _texture(size: int, gen: torch.Generator) -> torch.Tensor:
    """Smooth noise plus an oriented stripe pattern, gray values about 0..100 (uint8 (H, W)).

    Darker than most items, yet with edges and gradients, so a model cannot segment by
    thresholding the background away.
    """
    low = torch.rand(1, 1, 6, 6, generator=gen)
    blobs = F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)[0, 0]
    angle = _uniform(gen, 0.0, math.pi)
    period = _uniform(gen, 6.0, 20.0)
    coords = torch.arange(size, dtype=torch.float32)
    phase = coords[None, :] * math.cos(angle) + coords[:, None] * math.sin(angle)
    stripes = torch.sin(2 * math.pi * phase / period)
    grain = torch.rand(size, size, generator=gen)
    tex = 15 + 55 * blobs + 15 * stripes + 12 * grain
    return tex.round().clamp_(0, 255).to(torch.uint8)


def _rescale(item: torch.Tensor, side: int) -> torch.Tensor:
    """Resize a (28, 28) uint8 item to (side, side) with antialiased bilinear filtering."""
    if side == _ITEM_SIZE:
        return item
    x = F.interpolate(item[None, None].float(), size=(side, side), mode="bilinear",
                      align_corners=False, antialias=True)[0, 0]
    return x.round().clamp_(0, 255).to(torch.uint8)


def _rim(owner: torch.Tensor) -> torch.Tensor:
    """Pixels whose 3x3 neighbourhood holds more than one owner id (bool (H, W))."""
    o = owner.float()[None, None]
    hi = F.max_pool2d(o, 3, stride=1, padding=1)
    lo = -F.max_pool2d(-o, 3, stride=1, padding=1)
    return (hi != lo)[0, 0]


class FashionScenes(Dataset):
    """Detection and segmentation canvases composed from Fashion-MNIST items.

    ``dataset[i]`` returns ``(image, target)``: ``image`` uint8 ``(1, size, size)``; ``target`` a
    dict with ``boxes`` float32 ``(K, 4)`` xyxy pixels, ``labels`` int64 ``(K,)`` in 1..10,
    ``masks`` int64 ``(size, size)`` semantic mask (0 background, 1..10, 255 ignore) and
    ``image_id`` = ``i``. Canvases are rendered on first access and kept in memory.

    Attributes:
        categories: :data:`SCENES_CATEGORIES`, index == label id.
        source: The Fashion-MNIST items the canvases draw from (a FashionMNIST split).
    """

    categories = SCENES_CATEGORIES

    def __init__(
        self,
        root: Optional[PathLike] = None,
        split: str = "train",
        *,
        num_images: Optional[int] = None,
        size: int = 128,
        items: tuple[int, int] = (1, 6),
        scale: tuple[float, float] = (0.8, 2.0),
        occlusion: bool = True,
        background: str = "plain",
        min_visible: float = 0.3,
        val_size: int = 5000,
        seed: int = 0,
    ) -> None:
        """Index a split (the canvases are rendered lazily).

        Args:
            root: Directory with the Fashion-MNIST IDX files (default: the Debian package path).
            split: ``"train"``, ``"val"`` or ``"test"``.
            num_images: Number of canvases; default :data:`SCENES_DEFAULT_NUM_IMAGES` (20000
                train, 1000 val, 2000 test).
            size: Canvas side in pixels; must fit the largest rescaled item.
            items: ``(min, max)`` items per canvas, inclusive.
            scale: ``(min, max)`` item scale relative to 28 px, drawn uniformly.
            occlusion: Let items overlap (later on top); ``False`` keeps their foregrounds apart.
            background: ``"plain"`` (black, like Fashion-MNIST) or ``"texture"``.
            min_visible: Items with a smaller visible fraction of their foreground get no box.
            val_size: Items held out of the Fashion-MNIST train file for ``val`` (its last
                ``val_size`` items); ``train`` canvases never use them. ``val`` needs it > 0.
            seed: Seed of the composition; each canvas is seeded by ``(seed, split, index)``.

        Raises:
            ValueError: A bad argument; the message names it and the valid values.
            FileNotFoundError: Fashion-MNIST is not installed (the message says how to get it).
        """
        if split not in _SPLIT_CODES:
            raise ValueError(f"unknown FashionScenes split {split!r}; valid: {', '.join(_SPLIT_CODES)}")
        if background not in SCENES_BACKGROUNDS:
            raise ValueError(f"unknown background {background!r}; valid: {', '.join(SCENES_BACKGROUNDS)}")
        if num_images is None:
            num_images = SCENES_DEFAULT_NUM_IMAGES[split]
        if not isinstance(num_images, int) or num_images < 0:
            raise ValueError(f"num_images must be an int >= 0, got {num_images!r}")
        self.items_range = _range_arg("items", items, 0, integer=True)
        self.scale = _range_arg("scale", scale, 1e-6, integer=False)
        largest = round(_ITEM_SIZE * self.scale[1])
        if not isinstance(size, int) or size < largest:
            raise ValueError(f"size must be an int >= {largest} (the largest item: 28 px x scale "
                             f"{self.scale[1]}), got {size!r}")
        if not 0.0 <= min_visible <= 1.0:
            raise ValueError(f"min_visible must be in [0, 1], got {min_visible!r}")
        if split == "val" and val_size <= 0:
            raise ValueError("split='val' needs val_size > 0 (the Fashion-MNIST items held out for it)")
        self.split, self.size, self.num_images = split, size, num_images
        self.occlusion, self.background = occlusion, background
        self.min_visible, self.val_size, self.seed = min_visible, val_size, seed
        self.source = FashionMNIST(root, split, val_size=0 if split == "test" else val_size)
        self._source_file = "test" if split == "test" else "train"
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                     list[SceneItem]]] = {}

    def __len__(self) -> int:
        return self.num_images

    def _index(self, index: int) -> int:
        if not -self.num_images <= index < self.num_images:
            raise IndexError(f"canvas index {index} out of range for {self.num_images} {self.split} canvases")
        return index % self.num_images if self.num_images else index

    def _render(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                           list[SceneItem]]:
        gen = torch.Generator().manual_seed(_canvas_seed(self.seed, self.split, index))
        size = self.size
        if self.background == "texture":
            # its own stream, so a textured canvas holds the same items as its plain twin
            canvas = _texture(size, torch.Generator().manual_seed(_canvas_seed(self.seed, self.split, index) ^ _TEXTURE_STREAM))
        else:
            canvas = torch.zeros(size, size, dtype=torch.uint8)
        owner = torch.full((size, size), -1, dtype=torch.int64)
        placed: list[tuple[int, int, int, int, int, int]] = []  # source, label, side, left, top, fg
        for _ in range(_randint(gen, *self.items_range)):
            src = int(torch.randint(len(self.source), (), generator=gen))
            side = max(1, round(_ITEM_SIZE * _uniform(gen, *self.scale)))
            pixels = _rescale(self.source.images[src], side)
            fg = pixels >= FOREGROUND_THRESHOLD
            for _try in range(1 if self.occlusion else PLACEMENT_TRIES):
                left, top = _randint(gen, 0, size - side), _randint(gen, 0, size - side)
                region = owner[top:top + side, left:left + side]
                if self.occlusion or not bool((region[fg] >= 0).any()):
                    break
            else:
                continue  # no free spot: the item is left out
            region[fg] = len(placed)
            canvas[top:top + side, left:left + side][fg] = pixels[fg]
            placed.append((src, int(self.source.targets[src]) + 1, side, left, top, int(fg.sum())))

        mask = torch.zeros(size, size, dtype=torch.uint8)
        labels_of = torch.tensor([0] + [p[1] for p in placed], dtype=torch.uint8)
        mask[:] = labels_of[owner + 1]
        mask[(owner >= 0) & (canvas < EDGE_THRESHOLD) & _rim(owner)] = IGNORE_INDEX
        visible = torch.bincount(owner[owner >= 0], minlength=len(placed)) if placed else torch.zeros(0)
        boxes, labels, scene_items = [], [], []
        for j, (src, label, side, left, top, n_fg) in enumerate(placed):
            n_vis = int(visible[j])
            keep = n_fg > 0 and n_vis > 0 and n_vis >= self.min_visible * n_fg
            if keep:
                mine = owner == j
                rows = mine.any(1).nonzero()[:, 0]
                cols = mine.any(0).nonzero()[:, 0]
                boxes.append([int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1])
                labels.append(label)
            scene_items.append(SceneItem(int(self.source.indices[src]), self._source_file, label, side,
                                         left, top, n_fg, n_vis, keep))
        return (canvas[None], torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                torch.tensor(labels, dtype=torch.int64), mask, scene_items)

    def _get(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                        list[SceneItem]]:
        index = self._index(index)
        if index not in self._cache:
            with single_thread():
                self._cache[index] = self._render(index)
        return self._cache[index]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, object]]:
        index = self._index(index)
        image, boxes, labels, mask, _ = self._get(index)
        # Clones: callers may edit the sample in place without corrupting the cache.
        return image.clone(), {"boxes": boxes.clone(), "labels": labels.clone(),
                               "masks": mask.long(), "image_id": index}

    def scene_items(self, index: int) -> list[SceneItem]:
        """The items pasted on canvas ``index``, in paint order (boxed or not)."""
        return list(self._get(index)[4])

    def __repr__(self) -> str:
        return (f"FashionScenes(split={self.split!r}, n={len(self)}, size={self.size}, "
                f"background={self.background!r}, occlusion={self.occlusion}, seed={self.seed})")
