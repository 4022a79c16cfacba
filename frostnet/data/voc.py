"""Pascal VOC detection and segmentation loaders (VOCdevkit layout).

Expected tree (``root`` may be the directory containing ``VOCdevkit``, the
``VOCdevkit`` directory itself, or the ``VOC<year>`` directory)::

    VOCdevkit/VOC2007/Annotations/<id>.xml
    VOCdevkit/VOC2007/JPEGImages/<id>.jpg      (.jpeg or .png are accepted too)
    VOCdevkit/VOC2007/ImageSets/Main/{train,val,trainval,test}.txt
    VOCdevkit/VOC2007/ImageSets/Segmentation/{train,val,trainval}.txt
    VOCdevkit/VOC2007/SegmentationClass/<id>.png
    VOCdevkit/VOC2007/classes.txt              (optional: class names for ids 1..C, one a line)

These loaders are our own rather than ``torchvision.datasets.VOCDetection``/``VOCSegmentation``:
those accept only ``.jpg`` images and the years 2007-2012 and return the raw XML dict, while
datasets written in VOC layout by other tools (``tools/make_scenes.py``) use PNG images and
their own classes. Samples are ``tv_tensors`` so ``torchvision.transforms.v2`` moves boxes and
masks with the image.

Bad input: boxes are clipped to the image and boxes that are fully outside or degenerate
(inverted, or under 1 px after clipping) are dropped (:func:`frostnet.data.transforms.clean_boxes`);
an image without objects has ``(0, 4)`` boxes; a mask value that is neither a class id nor 255,
or a mask whose size differs from its image, raises naming the file.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as TF

from .transforms import check_mask_ids, check_mask_size, clean_boxes

__all__ = [
    "VOC_CLASSES",
    "VOC_CLASSES_WITH_BACKGROUND",
    "VOC_SPLITS",
    "VOCAnnotationError",
    "parse_voc_xml",
    "find_voc_dir",
    "read_voc_classes",
    "voc_palette",
    "VOCDetection",
    "VOCSegmentation",
    "detection_collate",
]

PathLike = Union[str, os.PathLike]

# The 20 VOC object classes in the official order. Detection labels and
# segmentation mask values are ``VOC_CLASSES.index(name) + 1``; 0 is background.
VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle",
    "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person",
    "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
# Index == label id, handy for torchvision detectors (num_classes=21).
VOC_CLASSES_WITH_BACKGROUND: tuple[str, ...] = ("__background__",) + VOC_CLASSES
VOC_SPLITS = ("train", "val", "trainval", "test")
VOC_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


class VOCAnnotationError(ValueError):
    """Raised for a malformed VOC XML annotation."""


def _text(node: ET.Element, tag: str, path: Path, default: Optional[str] = None) -> str:
    child = node.find(tag)
    if child is None or child.text is None:
        if default is not None:
            return default
        raise VOCAnnotationError(f"{path}: missing <{tag}> in <{node.tag}>")
    return child.text.strip()


def _number(node: ET.Element, tag: str, path: Path) -> float:
    value = _text(node, tag, path)
    try:
        return float(value)
    except ValueError:
        raise VOCAnnotationError(f"{path}: <{tag}> is {value!r}, not a number") from None


def parse_voc_xml(path: PathLike, classes: Sequence[str] = VOC_CLASSES) -> dict[str, Any]:
    """Parse one VOC annotation file.

    VOC stores 1-based, inclusive pixel indices: a box with ``xmin=1, xmax=10``
    covers the first ten pixel columns. They are converted to 0-based
    continuous ``xyxy`` pixel-edge coordinates, ``(xmin - 1, ymin - 1, xmax,
    ymax)``, the convention of torchvision's box ops (``width = x2 - x1`` is
    the true pixel extent and boxes lie within ``[0, W] x [0, H]``).

    Args:
        path: Annotation XML file.
        classes: Class names for labels 1..C (default the 20 VOC classes).

    Returns:
        Dict with ``filename`` (str), ``size`` (``(height, width)``),
        ``boxes`` (float32 ``(K, 4)``, as written: not clipped), ``labels`` (int64 ``(K,)``, 1..C),
        ``difficult`` (bool ``(K,)``) and ``names`` (list of class names).

    Raises:
        VOCAnnotationError: Unparsable XML, missing fields or an unknown class
            name; the message names the file. (Inverted boxes are returned as
            they are and dropped by the datasets as degenerate.)
    """
    path = Path(path)
    class_to_label = {name.lower(): i + 1 for i, name in enumerate(classes)}
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        raise VOCAnnotationError(f"{path}: invalid XML ({exc})") from exc
    size = root.find("size")
    hw = None
    if size is not None:
        hw = (int(_number(size, "height", path)), int(_number(size, "width", path)))
    boxes, labels, difficult, names = [], [], [], []
    for obj in root.iter("object"):
        name = _text(obj, "name", path).lower()
        if name not in class_to_label:
            raise VOCAnnotationError(
                f"{path}: unknown class {name!r}; valid: {', '.join(classes)}"
            )
        bb = obj.find("bndbox")
        if bb is None:
            raise VOCAnnotationError(f"{path}: object {name!r} has no <bndbox>")
        xmin, ymin, xmax, ymax = (_number(bb, t, path) for t in ("xmin", "ymin", "xmax", "ymax"))
        boxes.append((xmin - 1.0, ymin - 1.0, xmax, ymax))
        labels.append(class_to_label[name])
        difficult.append(_text(obj, "difficult", path, default="0") == "1")
        names.append(name)
    return {
        "filename": _text(root, "filename", path, default=path.stem + ".jpg"),
        "size": hw,
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(labels, dtype=torch.int64),
        "difficult": torch.tensor(difficult, dtype=torch.bool),
        "names": names,
    }


def voc_palette() -> list[int]:
    """The Pascal VOC colour map as a flat ``[r, g, b] * 256`` list for ``PIL.Image.putpalette``.

    Colour of label ``i``: the bits of ``i`` dealt round-robin to r, g, b from the top bit down,
    so masks written with it look like VOC's ``SegmentationClass`` PNGs (loading needs only the
    indices, never the colours).
    """
    palette = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette


def find_voc_dir(root: PathLike, year: str = "2007") -> Path:
    """Locate the ``VOC<year>`` directory from any of the accepted roots."""
    root = Path(root)
    candidates = [root, root / f"VOC{year}", root / "VOCdevkit" / f"VOC{year}"]
    for cand in candidates:
        if (cand / "JPEGImages").is_dir():
            return cand
    raise FileNotFoundError(
        f"no VOC{year} directory found; looked for JPEGImages/ under "
        f"{', '.join(str(c) for c in candidates)}"
    )


def _read_ids(voc_dir: Path, kind: str, split: str) -> list[str]:
    if split not in VOC_SPLITS:
        raise ValueError(f"unknown VOC split {split!r}; valid: {', '.join(VOC_SPLITS)}")
    path = voc_dir / "ImageSets" / kind / f"{split}.txt"
    if not path.is_file():
        folder = path.parent
        present = (sorted(p.name for p in folder.glob("*.txt") if "_" not in p.name)
                   if folder.is_dir() else [])
        raise FileNotFoundError(f"VOC split file {path} not found (present: {present or 'none'})")
    # First token only: per-class lists ("<id>  1") share this reader.
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


def read_voc_classes(voc_dir: PathLike) -> tuple[str, ...]:
    """Class names for labels 1..C: ``<voc_dir>/classes.txt`` if present, else :data:`VOC_CLASSES`.

    ``classes.txt`` holds one name a line, in label order, without the background (the layout
    ``tools/make_scenes.py`` writes).
    """
    path = Path(voc_dir) / "classes.txt"
    if not path.is_file():
        return VOC_CLASSES
    names = tuple(line.strip() for line in path.read_text().splitlines() if line.strip())
    if not names or names[0].lower() in ("background", "__background__"):
        raise ValueError(f"{path}: expected class names for labels 1..C, one a line, without the "
                         f"background, got {list(names[:3])}...")
    return names


def _image_path(voc_dir: Path, image_id: str) -> Path:
    for suffix in VOC_IMAGE_SUFFIXES:
        path = voc_dir / "JPEGImages" / f"{image_id}{suffix}"
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"VOC image {voc_dir / 'JPEGImages' / image_id}{{{','.join(VOC_IMAGE_SUFFIXES)}}} not found"
    )


def _load_rgb(path: Path) -> tv_tensors.Image:
    with Image.open(path) as img:
        return tv_tensors.Image(TF.pil_to_tensor(img.convert("RGB")))


class VOCDetection(Dataset):
    """Pascal VOC object detection in torchvision detection conventions.

    ``dataset[i]`` returns ``(image, target)``:

    * ``image``: ``(3, H, W)`` float32 in [0, 1] by default (uint8 before the
      transform),
    * ``target["boxes"]``: ``tv_tensors.BoundingBoxes`` float32 ``(K, 4)`` in
      XYXY format (see :func:`parse_voc_xml` for the coordinate convention),
      clipped to the image, degenerate boxes dropped,
    * ``target["labels"]``: int64 ``(K,)`` in 1..C (0 is background),
    * ``target["difficult"]``: bool ``(K,)``,
    * ``target["image_id"]``: int index; ``dataset.ids[i]`` is the VOC id.

    Because boxes are ``BoundingBoxes``, ``torchvision.transforms.v2``
    pipelines transform image and boxes jointly. Transforms that drop boxes
    (``SanitizeBoundingBoxes``) need ``labels_getter=lambda s: (s[1]["labels"],
    s[1]["difficult"])`` so ``difficult`` stays aligned.
    """

    def __init__(
        self,
        root: PathLike,
        year: str = "2007",
        split: str = "trainval",
        transform: Optional[Callable[[Any, dict], tuple[Any, dict]]] = None,
        keep_difficult: bool = True,
        classes: Optional[Sequence[str]] = None,
    ) -> None:
        """Index a split.

        Args:
            root: ``VOCdevkit`` parent, ``VOCdevkit`` or ``VOC<year>`` directory.
            year: Dataset year, e.g. ``"2007"`` or ``"2012"``.
            split: One of :data:`VOC_SPLITS`.
            transform: Joint ``(image, target) -> (image, target)`` callable
                applied to the uint8 image; ``None`` converts to float [0, 1].
            keep_difficult: Keep objects flagged ``difficult`` (needed for the
                official VOC mAP, which ignores them instead of counting misses).
            classes: Names of labels 1..C; default :func:`read_voc_classes`.
        """
        self.voc_dir = find_voc_dir(root, year)
        self.split, self.year = split, year
        self.ids = _read_ids(self.voc_dir, "Main", split)
        self.transform = transform
        self.keep_difficult = keep_difficult
        self.names = tuple(classes) if classes is not None else read_voc_classes(self.voc_dir)
        self.classes = ("__background__", *self.names)

    def __len__(self) -> int:
        return len(self.ids)

    def get_annotation(self, index: int) -> dict[str, Any]:
        """Parsed annotation of sample ``index`` (no image decoding; boxes as written)."""
        ann = parse_voc_xml(self.voc_dir / "Annotations" / f"{self.ids[index]}.xml", self.names)
        if not self.keep_difficult:
            keep = ~ann["difficult"]
            ann["boxes"], ann["labels"], ann["difficult"] = (
                ann["boxes"][keep], ann["labels"][keep], ann["difficult"][keep])
            ann["names"] = [n for n, k in zip(ann["names"], keep.tolist()) if k]
        return ann

    def __getitem__(self, index: int) -> tuple[Any, dict[str, Any]]:
        ann = self.get_annotation(index)
        image = _load_rgb(_image_path(self.voc_dir, self.ids[index]))
        boxes = tv_tensors.BoundingBoxes(ann["boxes"], format="XYXY", canvas_size=tuple(image.shape[-2:]))
        target: dict[str, Any] = clean_boxes(boxes, ann["labels"], difficult=ann["difficult"])
        target["image_id"] = index
        if self.transform is not None:
            return self.transform(image, target)
        return TF.to_dtype(image, torch.float32, scale=True), target

    def __repr__(self) -> str:
        return f"VOCDetection(year={self.year!r}, split={self.split!r}, n={len(self)})"


def detection_collate(batch: Sequence[tuple[Any, dict]]) -> tuple[list[Any], list[dict]]:
    """Collate detection samples into ``(images, targets)`` lists.

    Detection images differ in size and carry a variable number of boxes, so
    they cannot be stacked; torchvision detectors take lists of both.
    """
    images, targets = zip(*batch) if batch else ((), ())
    return list(images), list(targets)


class VOCSegmentation(Dataset):
    """Pascal VOC semantic segmentation (``SegmentationClass`` palette PNGs).

    ``dataset[i]`` returns ``(image, mask)``: a ``(3, H, W)`` uint8
    ``tv_tensors.Image`` and an ``(H, W)`` int64 ``tv_tensors.Mask`` with 0 =
    background, 1..C = the classes (:data:`VOC_CLASSES` unless ``classes.txt``
    says otherwise) and 255 = object boundary / ignore. The palette PNG's pixel
    values are the class indices, so the palette colours are never needed.
    """

    def __init__(
        self,
        root: PathLike,
        year: str = "2012",
        split: str = "train",
        transform: Optional[Callable[[torch.Tensor, torch.Tensor], tuple[Any, Any]]] = None,
        classes: Optional[Sequence[str]] = None,
    ) -> None:
        """Index a split.

        Args:
            root: ``VOCdevkit`` parent, ``VOCdevkit`` or ``VOC<year>`` directory.
            year: Dataset year.
            split: One of ``train``, ``val``, ``trainval`` (``test`` if present).
            transform: Joint ``(image, mask)`` transform, e.g.
                :func:`frostnet.data.transforms.segmentation_train_transform`.
            classes: Names of labels 1..C; default :func:`read_voc_classes`.
        """
        self.voc_dir = find_voc_dir(root, year)
        self.split, self.year = split, year
        self.ids = _read_ids(self.voc_dir, "Segmentation", split)
        self.transform = transform
        self.names = tuple(classes) if classes is not None else read_voc_classes(self.voc_dir)
        self.classes = ("__background__", *self.names)

    def __len__(self) -> int:
        return len(self.ids)

    def mask_path(self, index: int) -> Path:
        """The ``SegmentationClass`` PNG of sample ``index``."""
        return self.voc_dir / "SegmentationClass" / f"{self.ids[index]}.png"

    def load_mask(self, index: int) -> tv_tensors.Mask:
        """Read the class-index mask of sample ``index`` as int64 ``(H, W)``."""
        path = self.mask_path(index)
        if not path.is_file():
            raise FileNotFoundError(f"VOC segmentation mask {path} not found")
        with Image.open(path) as img:
            # Converting a "P" image to "L" would map palette colours to
            # luminance and destroy the class ids, so only the raw indices count.
            if img.mode not in ("P", "L"):
                raise ValueError(
                    f"{path}: mask mode is {img.mode!r}; expected a palette ('P') or "
                    f"grayscale ('L') PNG holding class indices"
                )
            mask = torch.from_numpy(np.array(img, dtype=np.uint8)).long()
        check_mask_ids(mask, len(self.names), str(path))
        return tv_tensors.Mask(mask)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        image_path = _image_path(self.voc_dir, self.ids[index])
        image = _load_rgb(image_path)
        mask = self.load_mask(index)
        check_mask_size(image, mask, str(image_path), str(self.mask_path(index)))
        if self.transform is not None:
            return self.transform(image, mask)
        return image, mask

    def __repr__(self) -> str:
        return f"VOCSegmentation(year={self.year!r}, split={self.split!r}, n={len(self)})"
