"""Cityscapes fine-annotation semantic segmentation loader.

Expected tree::

    root/leftImg8bit/{train,val,test}/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    root/gtFine/{train,val,test}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png

The ``labelIds`` PNGs hold the 34 raw Cityscapes label ids; training uses the
19 evaluated classes, so ids are mapped through :data:`CITYSCAPES_LABEL_TO_TRAIN_ID`
with every other id sent to 255 (ignored by the loss and the metric).

Bad input: a labelIds value that is not a Cityscapes label id (0..33) nor 255, or a mask whose
size differs from its image, raises naming the file. (``torchvision.datasets.Cityscapes`` would
serve for reading the tree, but it returns PIL images of raw ids and checks neither.)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as TF

from .transforms import IGNORE_INDEX, check_mask_size

__all__ = [
    "CITYSCAPES_CLASSES",
    "CITYSCAPES_LABEL_TO_TRAIN_ID",
    "CITYSCAPES_SPLITS",
    "label_ids_to_train_ids",
    "Cityscapes",
]

PathLike = Union[str, os.PathLike]

CITYSCAPES_SPLITS = ("train", "val", "test")

# Official table from cityscapesScripts/helpers/labels.py: label id -> train id.
# 255 marks classes not used for training/evaluation. "license plate" has id
# -1 (it never occurs in the uint8 labelIds PNGs) and official trainId -1; it
# is ignored here as well.
CITYSCAPES_LABEL_TO_TRAIN_ID: dict[int, int] = {
    -1: IGNORE_INDEX,  # license plate
    0: IGNORE_INDEX,   # unlabeled
    1: IGNORE_INDEX,   # ego vehicle
    2: IGNORE_INDEX,   # rectification border
    3: IGNORE_INDEX,   # out of roi
    4: IGNORE_INDEX,   # static
    5: IGNORE_INDEX,   # dynamic
    6: IGNORE_INDEX,   # ground
    7: 0,              # road
    8: 1,              # sidewalk
    9: IGNORE_INDEX,   # parking
    10: IGNORE_INDEX,  # rail track
    11: 2,             # building
    12: 3,             # wall
    13: 4,             # fence
    14: IGNORE_INDEX,  # guard rail
    15: IGNORE_INDEX,  # bridge
    16: IGNORE_INDEX,  # tunnel
    17: 5,             # pole
    18: IGNORE_INDEX,  # polegroup
    19: 6,             # traffic light
    20: 7,             # traffic sign
    21: 8,             # vegetation
    22: 9,             # terrain
    23: 10,            # sky
    24: 11,            # person
    25: 12,            # rider
    26: 13,            # car
    27: 14,            # truck
    28: 15,            # bus
    29: IGNORE_INDEX,  # caravan
    30: IGNORE_INDEX,  # trailer
    31: 16,            # train
    32: 17,            # motorcycle
    33: 18,            # bicycle
}

# Names of train ids 0..18.
CITYSCAPES_CLASSES: tuple[str, ...] = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light",
    "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car",
    "truck", "bus", "train", "motorcycle", "bicycle",
)

# 256-entry lookup table for uint8 PNG values; values above 33 are not
# Cityscapes ids and are ignored rather than silently becoming a class.
_LUT = torch.full((256,), IGNORE_INDEX, dtype=torch.int64)
for _label_id, _train_id in CITYSCAPES_LABEL_TO_TRAIN_ID.items():
    if _label_id >= 0:
        _LUT[_label_id] = _train_id


# Values a labelIds PNG may hold: the Cityscapes ids and the generic ignore value.
_KNOWN = torch.zeros(256, dtype=torch.bool)
_KNOWN[[i for i in CITYSCAPES_LABEL_TO_TRAIN_ID if i >= 0] + [IGNORE_INDEX]] = True


def label_ids_to_train_ids(label_ids: torch.Tensor) -> torch.Tensor:
    """Map raw Cityscapes label ids (0..255) to train ids (0..18, 255 ignore).

    Args:
        label_ids: Integer tensor of any shape with values in 0..255.

    Returns:
        int64 tensor of the same shape.
    """
    if label_ids.is_floating_point():
        raise TypeError(f"label ids must be an integer tensor, got {label_ids.dtype}")
    ids = label_ids.long()
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) > 255):
        raise ValueError(
            f"label ids must be in 0..255, got range {int(ids.min())}..{int(ids.max())}"
        )
    return _LUT[ids]


class Cityscapes(Dataset):
    """Cityscapes ``gtFine`` semantic segmentation with 19 train ids.

    ``dataset[i]`` returns ``(image, mask)``: ``(3, H, W)`` uint8 RGB ``tv_tensors.Image`` and
    ``(H, W)`` int64 train ids (255 = ignore) ``tv_tensors.Mask``, then the joint ``transform``
    (e.g. :func:`frostnet.data.transforms.segmentation_train_transform`).
    """

    classes = CITYSCAPES_CLASSES
    num_classes = len(CITYSCAPES_CLASSES)

    def __init__(
        self,
        root: PathLike,
        split: str = "train",
        transform: Optional[Callable[[torch.Tensor, torch.Tensor], tuple[Any, Any]]] = None,
    ) -> None:
        """Index a split, pairing every image with its ``labelIds`` mask.

        Args:
            root: Directory containing ``leftImg8bit/`` and ``gtFine/``.
            split: One of :data:`CITYSCAPES_SPLITS`.
            transform: Joint ``(image, mask) -> (image, mask)`` callable.

        Raises:
            ValueError: Unknown split.
            FileNotFoundError: Missing split directory, no images, or an
                image without its ``_gtFine_labelIds.png``.
        """
        if split not in CITYSCAPES_SPLITS:
            raise ValueError(
                f"unknown Cityscapes split {split!r}; valid: {', '.join(CITYSCAPES_SPLITS)}"
            )
        self.root, self.split, self.transform = Path(root), split, transform
        image_dir = self.root / "leftImg8bit" / split
        mask_dir = self.root / "gtFine" / split
        for d in (image_dir, mask_dir):
            if not d.is_dir():
                raise FileNotFoundError(
                    f"Cityscapes directory {d} not found (expected "
                    f"{self.root}/leftImg8bit/<split>/<city>/ and "
                    f"{self.root}/gtFine/<split>/<city>/)"
                )
        suffix = "_leftImg8bit.png"
        self.images = sorted(image_dir.glob(f"*/*{suffix}"))
        if not self.images:
            raise FileNotFoundError(f"no *{suffix} files under {image_dir}/<city>/")
        self.masks = []
        for img in self.images:
            stem = img.name[: -len(suffix)]
            mask = mask_dir / img.parent.name / f"{stem}_gtFine_labelIds.png"
            if not mask.is_file():
                raise FileNotFoundError(f"mask {mask} for image {img} not found")
            self.masks.append(mask)

    def __len__(self) -> int:
        return len(self.images)

    def load_mask(self, index: int) -> tv_tensors.Mask:
        """Train-id mask ``(H, W)`` int64 of sample ``index``.

        Raises:
            ValueError: A value that is neither a Cityscapes label id nor 255 (names the file).
        """
        path = self.masks[index]
        with Image.open(path) as img:
            if img.mode not in ("L", "P", "I", "I;16"):
                raise ValueError(
                    f"{path}: labelIds PNG has mode {img.mode!r}; expected single-channel ids "
                    f"(the *_color.png files are not label ids)"
                )
            ids = torch.from_numpy(np.array(img).astype(np.int64))
        bad = ~_KNOWN[ids.clamp(0, 255)] | (ids < 0) | (ids > 255)
        if bool(bad.any()):
            raise ValueError(f"{path}: label id(s) {sorted(set(ids[bad].tolist()))[:5]} are not Cityscapes "
                             f"label ids (valid: 0..33, or {IGNORE_INDEX} = ignore)")
        return tv_tensors.Mask(label_ids_to_train_ids(ids))

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        with Image.open(self.images[index]) as img:
            image = tv_tensors.Image(TF.pil_to_tensor(img.convert("RGB")))
        mask = self.load_mask(index)
        check_mask_size(image, mask, str(self.images[index]), str(self.masks[index]))
        if self.transform is not None:
            return self.transform(image, mask)
        return image, mask

    def __repr__(self) -> str:
        return f"Cityscapes(split={self.split!r}, n={len(self)}, root={str(self.root)!r})"
