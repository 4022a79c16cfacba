"""Dataset loaders for frostnet: Fashion-MNIST, FashionScenes, ImageFolder, Pascal VOC, Cityscapes, COCO.

All loaders read local files only (no downloads). Use :func:`build_dataset`
to go from a command-line style spec such as ``fashion_mnist`` or
``imagefolder:/data/imagenet`` to a dataset.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from torch.utils.data import Dataset

from .cityscapes import (
    CITYSCAPES_CLASSES,
    CITYSCAPES_LABEL_TO_TRAIN_ID,
    Cityscapes,
    label_ids_to_train_ids,
)
from .coco import CocoDetection
from .fashion_mnist import (
    DEFAULT_FASHION_MNIST_ROOT,
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    BatchPipeline,
    FashionMNIST,
    FashionMNISTTransform,
    IDXFormatError,
    TensorBatchLoader,
    compute_mean_std,
    fashion_mnist_train_val,
    prepare_batch,
    random_crop_flip,
    read_idx,
    subset_indices,
    train_val_split,
    write_idx,
)
from .imagefolder import (
    ImageFolderSplit,
    build_imagefolder,
    imagenet_eval_transform,
    imagenet_train_transform,
)
from .scenes import (
    EDGE_THRESHOLD,
    FOREGROUND_THRESHOLD,
    SCENES_CATEGORIES,
    SCENES_DEFAULT_NUM_IMAGES,
    FashionScenes,
    SceneItem,
)
from .transforms import (
    IGNORE_INDEX,
    IMAGENET_MEAN,
    IMAGENET_STD,
    SegCenterCrop,
    SegCompose,
    SegNormalize,
    SegRandomCrop,
    SegRandomHorizontalFlip,
    SegRandomScale,
    SegResize,
    check_mask_ids,
    check_mask_size,
    clean_boxes,
    dense_transform,
    segmentation_eval_transform,
    segmentation_train_transform,
    single_thread,
)
from .voc import (
    VOC_CLASSES,
    VOC_CLASSES_WITH_BACKGROUND,
    VOCAnnotationError,
    VOCDetection,
    VOCSegmentation,
    detection_collate,
    parse_voc_xml,
    read_voc_classes,
    voc_palette,
)

__all__ = [
    "DATASET_SPECS",
    "build_dataset",
    # Fashion-MNIST
    "DEFAULT_FASHION_MNIST_ROOT", "FASHION_MNIST_CLASSES", "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD", "BatchPipeline", "FashionMNIST", "FashionMNISTTransform",
    "IDXFormatError", "TensorBatchLoader", "compute_mean_std", "fashion_mnist_train_val",
    "prepare_batch", "random_crop_flip", "read_idx", "subset_indices", "train_val_split",
    "write_idx",
    # ImageFolder
    "ImageFolderSplit", "build_imagefolder", "imagenet_eval_transform",
    "imagenet_train_transform",
    # Segmentation transforms
    "IGNORE_INDEX", "IMAGENET_MEAN", "IMAGENET_STD", "SegCenterCrop", "SegCompose",
    "SegNormalize", "SegRandomCrop", "SegRandomHorizontalFlip", "SegRandomScale",
    "SegResize", "segmentation_eval_transform", "segmentation_train_transform",
    # Dense-task helpers (torchvision.transforms.v2)
    "check_mask_ids", "check_mask_size", "clean_boxes", "dense_transform", "single_thread",
    # FashionScenes
    "EDGE_THRESHOLD", "FOREGROUND_THRESHOLD", "SCENES_CATEGORIES", "SCENES_DEFAULT_NUM_IMAGES",
    "FashionScenes", "SceneItem",
    # COCO
    "CocoDetection",
    # VOC
    "VOC_CLASSES", "VOC_CLASSES_WITH_BACKGROUND", "VOCAnnotationError", "VOCDetection",
    "VOCSegmentation", "detection_collate", "parse_voc_xml", "read_voc_classes", "voc_palette",
    # Cityscapes
    "CITYSCAPES_CLASSES", "CITYSCAPES_LABEL_TO_TRAIN_ID", "Cityscapes",
    "label_ids_to_train_ids",
]

# spec name -> (needs a path after ':', one-line description)
DATASET_SPECS: dict[str, tuple[bool, str]] = {
    "fashion_mnist": (False, "fashion_mnist[:<dir with IDX files>]  (default Debian path)"),
    "imagefolder": (True, "imagefolder:<root with train/ and val/ class folders>"),
    "voc": (True, "voc:<VOCdevkit parent or VOCdevkit dir>  (detection, VOC2007)"),
    "voc_seg": (True, "voc_seg:<VOCdevkit parent or VOCdevkit dir>  (segmentation, VOC2012)"),
    "cityscapes": (True, "cityscapes:<root with leftImg8bit/ and gtFine/>"),
    "fashion_scenes": (False, "fashion_scenes[:<dir with IDX files>]  (canvases of Fashion-MNIST items)"),
}


def build_dataset(
    spec: str,
    split: str = "train",
    transform: Optional[Callable[..., Any]] = None,
    **kwargs: Any,
) -> Dataset:
    """Build a dataset from a ``name[:path]`` spec.

    Args:
        spec: One of ``fashion_mnist``, ``fashion_mnist:<root>``,
            ``imagefolder:<path>``, ``voc:<root>``, ``voc_seg:<root>``,
            ``cityscapes:<root>`` (see :data:`DATASET_SPECS`). Only the first
            ``:`` separates name from path.
        split: Split name, validated by the underlying loader.
        transform: Forwarded as the loader's ``transform`` (joint for
            VOC/Cityscapes); ``None`` keeps each loader's default.
        **kwargs: Extra loader arguments, e.g. ``subset=2000`` or
            ``val_size=5000`` for Fashion-MNIST, ``year="2012"`` for VOC.

    Raises:
        ValueError: Unknown name (the message lists the valid specs) or a
            missing/unexpected path.
    """
    name, sep, path = spec.partition(":")
    name = name.strip().lower()
    if name not in DATASET_SPECS:
        choices = "; ".join(desc for _, desc in DATASET_SPECS.values())
        raise ValueError(f"unknown dataset spec {spec!r}; valid choices: {choices}")
    needs_path, desc = DATASET_SPECS[name]
    if needs_path and not path:
        raise ValueError(f"dataset spec {spec!r} needs a path: {desc}")
    if sep and not path:
        raise ValueError(f"dataset spec {spec!r} has an empty path after ':'")

    if name == "fashion_mnist":
        return FashionMNIST(root=path or None, split=split, transform=transform, **kwargs)
    if name == "imagefolder":
        return build_imagefolder(path, split=split, transform=transform, **kwargs)
    if name == "voc":
        return VOCDetection(path, split=split, transform=transform, **kwargs)
    if name == "voc_seg":
        return VOCSegmentation(path, split=split, transform=transform, **kwargs)
    if name == "fashion_scenes":
        if transform is not None:
            raise ValueError("fashion_scenes takes no transform; use frostnet.recipe.dense_data for batches")
        return FashionScenes(path or None, split, **kwargs)

    return Cityscapes(path, split=split, transform=transform, **kwargs)
