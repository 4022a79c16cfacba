"""SSD prior (default/anchor) boxes that follow the feature-map sizes of the actual input."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torchvision.ops import box_convert

__all__ = ["PriorSpec", "make_priors"]

Shape = tuple[float, float]


@dataclass(frozen=True)
class PriorSpec:
    """Default boxes of every prediction level: ``(width, height)`` as fractions of the image.

    Every location of level ``k`` gets the boxes ``shapes[k]``, in that order. Build SSD's layout
    with :meth:`ssd`.
    """

    shapes: tuple[tuple[Shape, ...], ...]

    def __post_init__(self) -> None:
        if not self.shapes or any(not level for level in self.shapes):
            raise ValueError(f"every level needs at least one box shape, got {self.shapes!r}")
        for k, level in enumerate(self.shapes):
            if any(len(s) != 2 or not (s[0] > 0 and s[1] > 0) for s in level):
                raise ValueError(f"level {k}: box shapes are positive (width, height) pairs, got {level!r}")

    @classmethod
    def ssd(
        cls,
        min_sizes: Sequence[float],
        max_sizes: Sequence[float],
        aspect_ratios: Sequence[Sequence[float]],
    ) -> PriorSpec:
        """SSD's boxes: per level a square of side ``s = min_sizes[k]``, a square of side
        ``sqrt(s * max_sizes[k])``, then ``(s * sqrt(r), s / sqrt(r))`` and its transpose for each
        ratio ``r``: ``2 + 2 * len(aspect_ratios[k])`` boxes."""
        if not len(min_sizes) == len(max_sizes) == len(aspect_ratios):
            raise ValueError(
                f"min_sizes, max_sizes and aspect_ratios need one entry per level, got "
                f"{len(min_sizes)}, {len(max_sizes)} and {len(aspect_ratios)}"
            )
        levels = []
        for k, (s, s_max, ratios) in enumerate(zip(min_sizes, max_sizes, aspect_ratios)):
            if not 0 < s <= s_max or any(r <= 0 for r in ratios):
                raise ValueError(f"level {k}: need 0 < min_size <= max_size and positive ratios, got "
                                 f"{s!r}, {s_max!r}, {tuple(ratios)!r}")
            shapes: list[Shape] = [(s, s), (math.sqrt(s * s_max),) * 2]  # type: ignore[list-item]
            for r in ratios:
                shapes += [(s * math.sqrt(r), s / math.sqrt(r)), (s / math.sqrt(r), s * math.sqrt(r))]
            levels.append(tuple(shapes))
        return cls(tuple(levels))

    @property
    def num_levels(self) -> int:
        return len(self.shapes)

    @property
    def num_anchors(self) -> tuple[int, ...]:
        """Boxes per location of every level."""
        return tuple(len(level) for level in self.shapes)

    def num_priors(self, feature_sizes: Sequence[tuple[int, int]]) -> int:
        """Total number of priors for the given per-level ``(height, width)`` map sizes."""
        return sum(h * w * a for (h, w), a in zip(feature_sizes, self.num_anchors))


def make_priors(
    spec: PriorSpec,
    feature_sizes: Sequence[tuple[int, int]],
    *,
    clip: bool = True,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Priors ``(P, 4)`` as normalized ``(cx, cy, w, h)``, level by level, row-major, boxes last.

    The step of a level is the image side divided by its map size, so centres sit at
    ``((j + 0.5) / W_k, (i + 0.5) / H_k)`` and every input size (not only 300x300) gets a matching
    grid. (The reference build used a fixed step of 300 on a 2x2 map, putting three centres on the
    border.)

    Args:
        spec: box shapes per level.
        feature_sizes: ``(height, width)`` of every prediction map, one per level of ``spec``.
        clip: clip the boxes to the image, in corner form, so no prior extends outside it.
        device, dtype: of the returned tensor.
    """
    if len(feature_sizes) != spec.num_levels:
        raise ValueError(
            f"got {len(feature_sizes)} feature maps {list(feature_sizes)} for {spec.num_levels} prior levels"
        )
    levels = []
    for k, (h, w) in enumerate(feature_sizes):
        if h < 1 or w < 1:
            raise ValueError(f"level {k}: feature map size must be positive, got {(h, w)}")
        cy = (torch.arange(h, device=device, dtype=dtype) + 0.5) / h
        cx = (torch.arange(w, device=device, dtype=dtype) + 0.5) / w
        cy, cx = torch.meshgrid(cy, cx, indexing="ij")
        centers = torch.stack([cx, cy], dim=-1).reshape(-1, 1, 2)  # (HW, 1, 2)
        sizes = torch.tensor(spec.shapes[k], device=device, dtype=dtype)  # (A, 2)
        boxes = torch.cat([centers.expand(-1, len(sizes), 2), sizes.expand(h * w, -1, 2)], dim=-1)
        levels.append(boxes.reshape(-1, 4))
    priors = torch.cat(levels)
    if clip:
        priors = box_convert(box_convert(priors, "cxcywh", "xyxy").clamp(0.0, 1.0), "xyxy", "cxcywh")
    return priors
