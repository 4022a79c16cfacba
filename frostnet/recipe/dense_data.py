"""Data for dense tasks (segmentation, detection): deterministic, resumable, rank-sharded batches.

:func:`build_dense_data` turns a ``--data`` spec into train batches, eval batches and a
:class:`~frostnet.recipe.data.DataInfo`, with the same contract as ``TensorBatches`` in
:mod:`frostnet.recipe.data`: the order and the augmentation of batch ``b`` of epoch ``e`` depend
only on ``(seed, e, b, rank)``, so a run resumed at ``start_batch`` sees exactly the batches it
would have seen.

Specs::

    fashion_scenes[:key=value,...]          FashionScenes (options: SCENES_OPTIONS)
    voc:<VOCdevkit parent, VOCdevkit or VOC<year> dir>
    cityscapes:<root with leftImg8bit/ and gtFine/>      (segmentation only)
    coco:<images dir>,<annotations json>[,<eval images dir>,<eval annotations json>]  (detection)
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Optional, Union

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from ..data import (
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    SCENES_CATEGORIES,
    Cityscapes,
    CocoDetection,
    FashionScenes,
    VOCDetection,
    VOCSegmentation,
    dense_transform,
    single_thread,
)
from .data import DataInfo

__all__ = ["DENSE_KINDS", "DENSE_TASKS", "SCENES_OPTIONS", "DenseBatches", "build_dense_data"]

DENSE_TASKS = ("segmentation", "detection")
DENSE_KINDS: dict[str, str] = {
    "fashion_scenes": "fashion_scenes[:key=value,...]  (segmentation, detection)",
    "voc": "voc:<VOC root>  (segmentation: ImageSets/Segmentation, detection: ImageSets/Main)",
    "cityscapes": "cityscapes:<root with leftImg8bit/ and gtFine/>  (segmentation)",
    "coco": "coco:<images dir>,<annotations json>[,<eval images dir>,<eval json>]  (detection)",
}
# fashion_scenes option -> meaning; "min-max" values parse to (min, max) tuples.
SCENES_OPTIONS: dict[str, str] = {
    "root": "Fashion-MNIST IDX directory (default: the Debian package path)",
    "size": "canvas side in pixels (default 128)",
    "items": "items per canvas, min-max (default 1-6)",
    "scale": "item scale range, min-max (default 0.8-2.0)",
    "occlusion": "items may overlap, true/false (default true)",
    "background": "plain or texture (default plain)",
    "min_visible": "visible fraction an item needs for a box (default 0.3)",
    "val_items": "Fashion-MNIST train items held out for val canvases (default 5000)",
    "train_images": "train canvases (default 20000)",
    "val_images": "val canvases (default 1000)",
    "test_images": "test canvases (default 2000)",
    "scene_seed": "seed of the canvases, independent of the run's seed (default 0)",
    "scale_jitter": "training scale jitter half-width (default 0.0, off)",
}
EVAL_BATCH_SIZE = 64
Target = Union[torch.Tensor, list[dict[str, torch.Tensor]]]


def _sample_seed(seed: int, epoch: int, batch: int, position: int) -> int:
    # One generator per sample, keyed by its position in the *global* batch: skipping batches needs
    # no replay of draws, and a sample is augmented the same whatever the world size (the rank
    # only decides which positions a process takes).
    return (((seed * 100003 + epoch) * 1_000_003 + batch) * 100_003 + position) % (2**63 - 1)


def _sample_parts(sample: tuple[Any, Any], task: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A loader's ``(image, mask)`` or ``(image, target dict)`` as ``(image, target)`` for ``task``."""
    image, target = sample
    if not isinstance(target, dict):
        target = {"masks": target}
    if task == "segmentation":
        return image, {"masks": target["masks"]}
    return image, {"boxes": target["boxes"], "labels": target["labels"]}


class DenseBatches:
    """Batches of ``(x, targets)`` from a dense dataset, reproducible per ``(seed, epoch, batch, rank)``.

    ``x`` is float32 ``(N, 3, input_size, input_size)``, normalised (gray images are replicated
    to 3 channels). ``targets`` is int64 ``(N, input_size, input_size)`` masks for segmentation,
    or a list of ``N`` dicts ``{"boxes": float32 (K, 4) xyxy pixels of x, "labels": int64 (K,)}``
    for detection. Each global batch of ``batch_size`` is split across ranks (rank ``r`` takes
    every ``world``-th sample of it); ``start_batch`` skips batches without changing later ones.

    Samples are read in the main process, or by a ``DataLoader`` with ``workers`` processes that
    is handed this epoch's batches of indices; either way the random augmentation runs here, in
    the main process, each sample from a generator seeded by ``(seed, epoch, batch, position in
    the global batch)`` (so by ``rank`` too), so neither the worker count nor the world size
    changes what a sample becomes. Augmentation uses ``dense_transform``, which draws from that
    generator instead of the global RNG.
    """

    def __init__(self, dataset: Dataset, *, task: str, input_size: int, mean: Sequence[float],
                 std: Sequence[float], batch_size: int, shuffle: bool, train: bool, seed: int,
                 rank: int = 0, world: int = 1, drop_last: bool = False, workers: int = 0,
                 scale_jitter: float = 0.0) -> None:
        """Wrap a dataset.

        Args:
            dataset: ``dataset[i] -> (uint8 image (C, H, W), mask (H, W) or target dict)``.
            task: ``"segmentation"`` or ``"detection"``.
            input_size: Side of the square model input.
            mean: Per-channel normalisation mean (3 values).
            std: Per-channel normalisation std (3 values).
            batch_size: Global batch size (split across ``world`` ranks).
            shuffle: Shuffle the order per epoch.
            train: Apply the training augmentation (flip, scale jitter).
            seed: Run seed.
            rank: This process's rank.
            world: Number of ranks.
            drop_last: Drop the last incomplete global batch.
            workers: ``DataLoader`` worker processes reading samples (0: main process).
            scale_jitter: Training scale jitter half-width (see ``dense_transform``).
        """
        if task not in DENSE_TASKS:
            raise ValueError(f"unknown task {task!r}; valid: {', '.join(DENSE_TASKS)}")
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} must be in 0..{world - 1} for world {world}")
        if batch_size < world:
            raise ValueError(f"batch_size {batch_size} must be at least world {world} (one sample per rank)")
        self.dataset, self.task, self.input_size = dataset, task, input_size
        self.mean = torch.tensor(list(mean), dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(list(std), dtype=torch.float32).view(3, 1, 1)
        self.batch_size, self.shuffle, self.train, self.seed = batch_size, shuffle, train, seed
        self.rank, self.world, self.drop_last = rank, world, drop_last
        self.workers, self.scale_jitter = workers, scale_jitter

    def __len__(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _indices(self, epoch: int, start_batch: int) -> list[list[int]]:
        n = len(self.dataset)
        gen = torch.Generator().manual_seed(self.seed * 100003 + epoch)
        order = torch.randperm(n, generator=gen) if self.shuffle else torch.arange(n)
        return [order[b * self.batch_size:(b + 1) * self.batch_size][self.rank::self.world].tolist()
                for b in range(start_batch, len(self))]

    def _samples(self, batches: list[list[int]]) -> Iterator[list[tuple[Any, Any]]]:
        if self.workers <= 0:
            return ([self.dataset[i] for i in idx] for idx in batches)
        # list collate: images differ in size and detection targets in length before the resize
        return iter(DataLoader(self.dataset, batch_sampler=batches, collate_fn=list,
                               num_workers=self.workers))

    def _prepare(self, samples: list[tuple[Any, Any]], epoch: int, batch: int) -> tuple[torch.Tensor, Target]:
        images, targets = [], []
        for k, sample in enumerate(samples):
            gen = torch.Generator().manual_seed(_sample_seed(self.seed, epoch, batch, self.rank + k * self.world))
            image, target = _sample_parts(sample, self.task)
            image, target = dense_transform(torch.as_tensor(image), target, size=self.input_size,
                                            train=self.train, generator=gen, scale_jitter=self.scale_jitter)
            x = image.as_subclass(torch.Tensor).float().div_(255)
            images.append(x.expand(3, -1, -1) if x.shape[0] == 1 else x)
            if self.task == "segmentation":
                targets.append(target["masks"].as_subclass(torch.Tensor).long())
            else:
                targets.append({"boxes": target["boxes"].as_subclass(torch.Tensor).float(),
                                "labels": target["labels"].long()})
        x = (torch.stack(images) - self.mean) / self.std
        return x, (torch.stack(targets) if self.task == "segmentation" else targets)

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[torch.Tensor, Target]]:
        """Yield the batches of ``epoch`` from ``start_batch`` on."""
        batches = self._indices(epoch, start_batch)
        for b, samples in enumerate(self._samples(batches), start=start_batch):
            with single_thread():  # per-sample ops on small tensors: see single_thread
                batch = self._prepare(samples, epoch, b)
            yield batch


def _parse_bool(key: str, value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"fashion_scenes option {key}={value!r}: expected true or false")


def _parse_pair(key: str, value: str, kind: Callable[[str], Any]) -> tuple[Any, Any]:
    lo, sep, hi = value.partition("-")
    try:
        return (kind(lo), kind(hi)) if sep else (kind(lo), kind(lo))
    except ValueError:
        raise ValueError(f"fashion_scenes option {key}={value!r}: expected min-max, e.g. {key}=1-6") from None


def _scenes_options(arg: str) -> dict[str, Any]:
    """Parse ``key=value,...`` into typed options (unknown keys raise listing the valid ones)."""
    opts: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in arg.split(","))):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or key not in SCENES_OPTIONS:
            valid = "; ".join(f"{k}: {v}" for k, v in SCENES_OPTIONS.items())
            raise ValueError(f"fashion_scenes option {part!r} is not key=value with a known key; valid: {valid}")
        value = value.strip()
        try:
            if key in ("items",):
                opts[key] = _parse_pair(key, value, int)
            elif key == "scale":
                opts[key] = _parse_pair(key, value, float)
            elif key == "occlusion":
                opts[key] = _parse_bool(key, value)
            elif key in ("root", "background"):
                opts[key] = value
            elif key in ("min_visible", "scale_jitter"):
                opts[key] = float(value)
            else:
                opts[key] = int(value)
        except ValueError as exc:
            if "fashion_scenes option" in str(exc):
                raise
            raise ValueError(f"fashion_scenes option {key}={value!r}: not a valid number") from None
    return opts


def _holdout(dataset: Dataset, val_size: int) -> tuple[Subset, Subset]:
    """Last ``val_size`` samples as val, the rest as train (stable, like ``train_val_split``)."""
    n = len(dataset)
    if not 0 < val_size < n:
        raise ValueError(f"val_size {val_size} must be in 1..{n - 1} for a training set of {n} samples")
    return Subset(dataset, range(n - val_size)), Subset(dataset, range(n - val_size, n))


def _categories(classes: Sequence[str]) -> list[str]:
    return ["background", *classes[1:]]


def _build_datasets(kind: str, arg: str, task: str, val_size: int, eval_split: Optional[str],
                    ) -> tuple[Dataset, Dataset, str, list[str], dict[str, Any]]:
    """Train and eval datasets, the eval split's name, categories and kind-specific settings."""
    if kind == "fashion_scenes":
        opts = _scenes_options(arg)
        jitter = opts.pop("scale_jitter", 0.0)
        counts = {s: opts.pop(f"{s}_images", None) for s in ("train", "val", "test")}
        if val_size:
            counts["val"] = val_size  # for scenes, val_size is the number of val canvases
        common = dict(opts)
        common["val_size"] = common.pop("val_items", 5000)
        common["seed"] = common.pop("scene_seed", 0)
        root = common.pop("root", None)
        split = eval_split or ("val" if common["val_size"] > 0 else "test")
        train = FashionScenes(root, "train", num_images=counts["train"], **common)
        evals = FashionScenes(root, split, num_images=counts[split], **common)
        gray = f"{train.size}x{train.size} grayscale canvas"
        return train, evals, split, list(SCENES_CATEGORIES), {
            "mean": [FASHION_MNIST_MEAN] * 3, "std": [FASHION_MNIST_STD] * 3, "scale_jitter": jitter,
            "source": f"{gray}, background={train.background}, seed={train.seed}"}
    if not arg:
        raise ValueError(f"--data {kind} needs a path: {DENSE_KINDS[kind]}")
    imagenet = {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "scale_jitter": 0.0}
    eval_file: Optional[Dataset] = None
    if kind == "voc":
        if task == "segmentation":
            make: Callable[..., Dataset] = functools.partial(VOCSegmentation, arg)
        else:
            # difficult objects are left out: the target format has no field to mark them ignored
            make = functools.partial(VOCDetection, arg, transform=_keep_uint8, keep_difficult=False)
        train = make(split="train")
        classes = train.classes
    elif kind == "cityscapes":
        if task != "segmentation":
            raise ValueError(f"--data cityscapes has segmentation labels only, not task {task!r}; "
                             f"for detection use: {DENSE_KINDS['coco']}")
        make = functools.partial(Cityscapes, arg)
        train = make(split="train")
        # Cityscapes train id 0 is "road", a real class: there is no background label to prepend.
        classes = Cityscapes.classes
    else:  # coco
        if task != "detection":
            raise ValueError(f"--data coco loads detection boxes only, not task {task!r}; for segmentation "
                             f"use {DENSE_KINDS['voc']} or {DENSE_KINDS['fashion_scenes']}")
        parts = [p.strip() for p in arg.split(",")]
        if len(parts) not in (2, 4) or not all(parts):
            raise ValueError(f"--data coco:{arg} must be {DENSE_KINDS['coco']}")
        train = CocoDetection(parts[0], parts[1])
        eval_file = CocoDetection(parts[2], parts[3]) if len(parts) == 4 else None
        classes = train.classes
    if val_size:
        if eval_split not in (None, "val"):
            raise ValueError(f"val_size={val_size} holds out a val split; it cannot be combined with "
                             f"eval_split={eval_split!r}")
        train, evals = _holdout(train, val_size)
        split = "val"
    elif kind == "coco":
        # the second pair is the eval set; with one pair, evaluate on that file (the form for
        # evaluating a file; training needs val_size or a second pair)
        split = eval_split or ("val" if eval_file is not None else "test")
        evals = eval_file if eval_file is not None else train
    else:
        split = eval_split or "val"
        evals = make(split=split)
    categories = list(classes) if kind == "cityscapes" else _categories(classes)
    return train, evals, split, categories, imagenet


def _keep_uint8(image: Any, target: dict) -> tuple[Any, dict]:
    """Joint transform that leaves VOCDetection's sample uint8 (its default converts to float)."""
    return image, target


def build_dense_data(spec: str, *, task: str, input_size: int, batch_size: int, seed: int, rank: int = 0,
                     world: int = 1, train_subset: int = 0, val_size: int = 0, eval_subset: int = 0,
                     workers: int = 0, eval_split: Optional[str] = None,
                     ) -> tuple[DenseBatches, DenseBatches, DataInfo]:
    """Train batches, eval batches and a :class:`DataInfo` for a dense ``--data`` spec.

    Args:
        spec: ``fashion_scenes[:key=value,...]`` (keys: :data:`SCENES_OPTIONS`),
            ``voc:<root>``, ``cityscapes:<root>`` or ``coco:<images>,<json>[,<images>,<json>]``.
        task: ``"segmentation"`` or ``"detection"``.
        input_size: Side of the square model input; samples are resized to it.
        batch_size: Global training batch size (split across ``world`` ranks).
        seed: Run seed: order and augmentation of every batch (not the scenes themselves; those
            use the ``scene_seed`` option so every run sees the same canvases).
        rank: This process's rank.
        world: Number of ranks.
        train_subset: Train on a seeded random subset of this many samples (0: all).
        val_size: fashion_scenes: number of val canvases; other kinds: hold out the last
            ``val_size`` training samples as the val split.
        eval_subset: Evaluate on the first ``eval_subset`` samples only (0: all).
        workers: ``DataLoader`` processes reading the on-disk formats (scenes render in-process).
        eval_split: ``"val"`` or ``"test"``; ``None`` means ``"val"`` when ``val_size > 0`` or the
            dataset has a val split, else ``"test"``.

    Returns:
        ``(train, eval, info)``: training batches (shuffled, augmented, ``drop_last``), evaluation
        batches (the whole eval split in every rank, batch :data:`EVAL_BATCH_SIZE`), and the data
        description for exported weights.

    Raises:
        ValueError: Unknown kind, option or task (the message lists the valid ones), or a task
            the format has no labels for.
    """
    if task not in DENSE_TASKS:
        raise ValueError(f"unknown task {task!r}; valid: {', '.join(DENSE_TASKS)}")
    if eval_split not in (None, "val", "test"):
        raise ValueError(f"eval_split must be 'val', 'test' or None, got {eval_split!r}")
    kind, _, arg = spec.partition(":")
    kind = kind.strip().lower()
    if kind not in DENSE_KINDS:
        raise ValueError(f"unknown dense --data {spec!r}; valid choices: {'; '.join(DENSE_KINDS.values())}")
    train, evals, split, categories, settings = _build_datasets(kind, arg, task, val_size, eval_split)
    if kind == "fashion_scenes" and workers:
        workers = 0  # canvases are cached in this process; worker copies would re-render them
    if train_subset:
        g = torch.Generator().manual_seed(seed)
        train = Subset(train, torch.randperm(len(train), generator=g)[:train_subset].sort().values.tolist())
    if eval_subset:
        evals = Subset(evals, range(min(eval_subset, len(evals))))
    common = dict(task=task, input_size=input_size, mean=settings["mean"], std=settings["std"], workers=workers)
    train_b = DenseBatches(train, batch_size=batch_size, shuffle=True, train=True, seed=seed, rank=rank,
                           world=world, drop_last=True, scale_jitter=settings["scale_jitter"], **common)
    # evaluation runs on the full split in every rank (as in frostnet.recipe.data), rank 0 reports
    eval_b = DenseBatches(evals, batch_size=EVAL_BATCH_SIZE, shuffle=False, train=False, seed=seed, **common)
    source = settings.get("source", "RGB images")
    aug = f"; training: horizontal flip p=0.5, scale jitter {settings['scale_jitter']}"
    info = DataInfo(kind, categories, input_size, list(settings["mean"]), list(settings["std"]),
                    train_size=len(train), eval_size=len(evals), eval_split=split,
                    extra={"preprocessing": f"{source}, resized to {input_size}x{input_size} (masks nearest), "
                                            f"3 channels, normalised with mean/std{aug}",
                           "task": task})
    return train_b, eval_b, info
