"""ImageNet-layout image folders: ``root/{train,val}/<class>/*.JPEG``."""

from __future__ import annotations

import os
from pathlib import Path
import warnings
from typing import Any, Callable, Optional, Union

from torchvision import datasets
from torchvision import transforms as T

from .transforms import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "IMAGEFOLDER_SPLITS",
    "CorruptImagesError",
    "ImageFolderSplit",
    "imagenet_train_transform",
    "imagenet_eval_transform",
    "build_imagefolder",
]

PathLike = Union[str, os.PathLike]

IMAGEFOLDER_SPLITS = ("train", "val", "test")


def imagenet_train_transform(
    size: int = 224,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
) -> T.Compose:
    """Standard ImageNet training transform: RandomResizedCrop + flip + normalize."""
    return T.Compose([
        T.RandomResizedCrop(size),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])


def imagenet_eval_transform(
    size: int = 224,
    resize_size: int = 256,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
) -> T.Compose:
    """Standard ImageNet evaluation transform: Resize(256) + CenterCrop(224)."""
    return T.Compose([
        T.Resize(resize_size),
        T.CenterCrop(size),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])


class CorruptImagesError(RuntimeError):
    """More images of a split failed to load than its ``max_bad_fraction`` allows."""


class ImageFolderSplit(datasets.ImageFolder):
    """``torchvision.datasets.ImageFolder`` that can share another split's classes and survives
    a few unreadable images.

    torchvision derives class indices from the sorted sub-folders of each
    directory separately, so a val folder missing one class would silently
    shift every later label. Passing the train split's ``class_to_idx`` keeps
    labels consistent; classes absent from this split are simply empty.

    An image that cannot be decoded (truncated download, not an image) used to crash the run
    mid-epoch, or after a whole epoch had trained when it sat in ``val/``. It is now skipped
    with a warning naming the file: the next readable image of the split takes its place (a
    deterministic choice, so resumed runs see the same batches). Bad files are counted
    (:attr:`bad_files`); more than ``max_bad_fraction`` of the split (default 1%, at least one
    file) is an error, since a folder that broken needs repairing, not training on. The check is
    lazy rather than a scan before training: decoding every image of ImageNet up front takes
    longer than an epoch. With DataLoader workers each worker process counts the files it met.
    """

    def __init__(
        self,
        root: PathLike,
        transform: Optional[Callable] = None,
        target_transform: Optional[Callable] = None,
        class_to_idx: Optional[dict[str, int]] = None,
        max_bad_fraction: float = 0.01,
    ) -> None:
        """Index ``root``.

        Args:
            root: Directory with one sub-folder per class.
            transform: Image transform (input is a PIL RGB image).
            target_transform: Label transform.
            class_to_idx: Fixed class mapping (e.g. from the train split).
            max_bad_fraction: Largest fraction of unreadable images that is skipped with a
                warning; one more raises :class:`CorruptImagesError`.
        """
        if not 0 <= max_bad_fraction < 1:
            raise ValueError(f"max_bad_fraction must be in [0, 1), got {max_bad_fraction}")
        self._fixed_class_to_idx = class_to_idx
        self.max_bad_fraction = max_bad_fraction
        self.bad_files: set[str] = set()
        super().__init__(str(root), transform=transform, target_transform=target_transform,
                         allow_empty=class_to_idx is not None)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        n = len(self.samples)
        for step in range(n):
            path, target = self.samples[(index + step) % n]
            try:
                sample = self.loader(path)
            except (OSError, SyntaxError) as e:  # PIL's UnidentifiedImageError and truncation errors are OSErrors
                self._record_bad(path, e)
                continue
            # transforms run outside the try: their errors are bugs, not bad files
            if self.transform is not None:
                sample = self.transform(sample)
            if self.target_transform is not None:
                target = self.target_transform(target)
            return sample, target
        raise CorruptImagesError(f"no image of {self.root} could be read")

    def _record_bad(self, path: str, error: Exception) -> None:
        if path not in self.bad_files:
            self.bad_files.add(path)
            warnings.warn(f"skipping unreadable image {path} ({type(error).__name__}: {error}); "
                          f"{len(self.bad_files)} bad file(s) in {self.root} so far", stacklevel=3)
        allowed = max(1, int(self.max_bad_fraction * len(self.samples)))
        if len(self.bad_files) > allowed:
            raise CorruptImagesError(
                f"{len(self.bad_files)} of {len(self.samples)} images in {self.root} cannot be read (more than "
                f"{self.max_bad_fraction:.0%}), e.g. {sorted(self.bad_files)[:3]}: repair or remove them and resume")

    def find_classes(self, directory: Union[str, Path]) -> tuple[list[str], dict[str, int]]:
        if self._fixed_class_to_idx is None:
            return super().find_classes(directory)
        mapping = dict(self._fixed_class_to_idx)
        present = {e.name for e in os.scandir(directory) if e.is_dir()}
        unknown = sorted(present - set(mapping))
        if unknown:
            raise ValueError(
                f"{directory}: class folders {unknown} are not in the reference classes "
                f"({len(mapping)} classes, e.g. {sorted(mapping)[:5]})"
            )
        return sorted(mapping, key=mapping.__getitem__), mapping


def build_imagefolder(
    root: PathLike,
    split: str = "train",
    transform: Optional[Callable] = None,
    image_size: int = 224,
    resize_size: int = 256,
) -> ImageFolderSplit:
    """Build an ImageFolder dataset for one split of an ImageNet-style tree.

    Args:
        root: Directory containing ``train/``, ``val/`` (and optionally ``test/``).
        split: ``"train"``, ``"val"`` or ``"test"``.
        transform: Image transform; defaults to :func:`imagenet_train_transform`
            for ``train`` and :func:`imagenet_eval_transform` otherwise.
        image_size: Crop size for the default transforms.
        resize_size: Resize size for the default eval transform.

    Returns:
        An :class:`ImageFolderSplit` yielding ``(image, class_index)``. Non-train
        splits reuse ``root/train``'s class mapping when it exists.

    Raises:
        ValueError: Unknown ``split``.
        FileNotFoundError: The split directory is missing or holds no images.
    """
    if split not in IMAGEFOLDER_SPLITS:
        raise ValueError(
            f"unknown imagefolder split {split!r}; valid: {', '.join(IMAGEFOLDER_SPLITS)}"
        )
    root = Path(root)
    split_dir = root / split
    if not split_dir.is_dir():
        found = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        raise FileNotFoundError(
            f"image folder split directory {split_dir} not found (expected layout "
            f"{root}/<split>/<class>/*.JPEG; sub-directories present: {found or 'none'})"
        )
    if transform is None:
        transform = (imagenet_train_transform(image_size) if split == "train"
                     else imagenet_eval_transform(image_size, resize_size))
    class_to_idx = None
    train_dir = root / "train"
    if split != "train" and train_dir.is_dir():
        class_to_idx = datasets.folder.find_classes(str(train_dir))[1]
    dataset = ImageFolderSplit(split_dir, transform=transform, class_to_idx=class_to_idx)
    if not dataset.samples:
        # a val/ without images used to report top-1 0.0 for every epoch
        raise FileNotFoundError(f"image folder split {split_dir} holds no images (expected {split_dir}/<class>/*.JPEG, "
                                f"class folders found: {sorted(e.name for e in os.scandir(split_dir) if e.is_dir()) or 'none'})")
    return dataset
