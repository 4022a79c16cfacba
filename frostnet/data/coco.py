"""COCO-format object detection on ``torchvision.datasets.CocoDetection``.

Any detection dataset written as a COCO ``instances`` JSON (``images``, ``annotations`` with
``bbox = [x, y, width, height]`` in pixels, ``categories``) plus an image folder loads here.
torchvision reads the JSON (through pycocotools) and ``wrap_dataset_for_transforms_v2`` turns the
annotations into ``tv_tensors.BoundingBoxes`` (XYXY) and labels; this class adds what the wrapper
leaves to the user:

* **Contiguous labels**: COCO category ids need not be 1..C (COCO itself uses 1..90 for 80
  classes); label ``k`` is the ``k``-th category in id order, 0 is background.
* **Empty images**: the wrapper returns no ``boxes`` for an image without annotations; here it
  gets ``(0, 4)`` boxes and ``(0,)`` labels.
* **Bad input**: boxes are clipped to the image and boxes fully outside or degenerate (under 1 px
  after clipping) are dropped (:func:`frostnet.data.transforms.clean_boxes`); crowd
  annotations (``iscrowd=1``) are dropped unless ``keep_crowd``; an annotation whose
  ``category_id`` is not among the JSON's categories raises naming the file and the id.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from torch.utils.data import Dataset
from torchvision import datasets, tv_tensors
from torchvision.transforms.v2 import functional as TF

from .transforms import clean_boxes

__all__ = ["CocoDetection"]

PathLike = Union[str, os.PathLike]


class CocoDetection(Dataset):
    """COCO-format detection: ``dataset[i] -> (image, target)``.

    ``image`` is a ``(3, H, W)`` uint8 ``tv_tensors.Image``; ``target`` holds ``boxes``
    (``tv_tensors.BoundingBoxes`` float32 ``(K, 4)`` XYXY pixels), ``labels`` (int64 ``(K,)``
    in 1..C) and ``image_id`` (the COCO image id). Then the joint ``transform`` is applied.

    Attributes:
        classes: ``("background", *category names)``: index == label.
        category_ids: COCO category id of each label 1..C (``category_ids[k - 1]``).
        ids: COCO image id of each index.
    """

    def __init__(
        self,
        images: PathLike,
        annotations: PathLike,
        *,
        transform: Optional[Callable[[Any, dict], tuple[Any, dict]]] = None,
        keep_crowd: bool = False,
    ) -> None:
        """Read the annotation file and index its images.

        Args:
            images: Folder the JSON's ``file_name`` entries are relative to.
            annotations: COCO ``instances`` JSON file.
            transform: Joint ``(image, target) -> (image, target)`` callable, e.g. a
                ``torchvision.transforms.v2`` pipeline.
            keep_crowd: Keep ``iscrowd=1`` annotations (dropped by default: they mark regions,
                not single objects, and COCO evaluation ignores them).

        Raises:
            FileNotFoundError: ``images`` or ``annotations`` does not exist.
            ValueError: An annotation names a category id the JSON does not define.
        """
        images, annotations = Path(images), Path(annotations)
        if not images.is_dir():
            raise FileNotFoundError(f"COCO image folder {images} not found")
        if not annotations.is_file():
            raise FileNotFoundError(f"COCO annotation file {annotations} not found")
        base = datasets.CocoDetection(str(images), str(annotations))
        cats = base.coco.cats
        self.category_ids = sorted(cats)
        self.classes = ("background", *(cats[c]["name"] for c in self.category_ids))
        lut_size = max(self.category_ids, default=0) + 1
        self._label_of = torch.zeros(lut_size, dtype=torch.int64)
        self._label_of[self.category_ids] = torch.arange(1, len(self.category_ids) + 1)
        for ann in base.coco.anns.values():
            if ann.get("category_id") not in cats:
                raise ValueError(
                    f"{annotations}: annotation {ann.get('id')} of image {ann.get('image_id')} has "
                    f"category_id {ann.get('category_id')!r}; the file defines {self.category_ids}")
        self.images, self.annotations = images, annotations
        self.ids: list[int] = list(base.ids)
        self.transform, self.keep_crowd = transform, keep_crowd
        self._dataset = datasets.wrap_dataset_for_transforms_v2(
            base, target_keys=("image_id", "boxes", "labels", "iscrowd"))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[Any, dict[str, Any]]:
        pil, raw = self._dataset[index]
        image = TF.to_image(pil)
        canvas = tuple(image.shape[-2:])
        if "boxes" in raw:
            boxes, labels = raw["boxes"], self._label_of[torch.as_tensor(raw["labels"], dtype=torch.int64)]
            if not self.keep_crowd:
                single = torch.as_tensor(raw["iscrowd"], dtype=torch.bool).logical_not()
                boxes, labels = tv_tensors.wrap(boxes[single], like=boxes), labels[single]
        else:  # the v2 wrapper gives an image without annotations no boxes at all
            boxes = tv_tensors.BoundingBoxes(torch.zeros(0, 4), format="XYXY", canvas_size=canvas)
            labels = torch.zeros(0, dtype=torch.int64)
        target: dict[str, Any] = clean_boxes(boxes, labels)
        target["image_id"] = self.ids[index]
        if self.transform is not None:
            return self.transform(image, target)
        return image, target

    def __repr__(self) -> str:
        return f"CocoDetection(n={len(self)}, classes={len(self.classes) - 1}, annotations={str(self.annotations)!r})"
