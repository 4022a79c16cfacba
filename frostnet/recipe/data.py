"""Data for the recipe: deterministic, resumable, rank-sharded batch iteration."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch.utils.data import DataLoader

from ..data import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    BatchPipeline,
    FashionMNIST,
    build_imagefolder,
    imagenet_eval_transform,
    imagenet_train_transform,
)


@dataclass
class DataInfo:
    """What the exported weights need to know about the data."""

    name: str
    categories: list[str]
    input_size: int
    mean: list[float]
    std: list[float]
    in_channels: int = 3
    train_size: int = 0
    eval_size: int = 0
    eval_split: str = "test"
    extra: dict[str, str] = field(default_factory=dict)


class TensorBatches:
    """In-memory (uint8 images, labels) batches; epoch-seeded so any batch can be reproduced.

    Each global batch of ``batch_size`` is split across ranks (rank ``r`` takes every
    ``world``-th sample of it), and ``start_batch`` skips batches when resuming mid-epoch.
    """

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, pipeline: BatchPipeline, *,
                 batch_size: int, shuffle: bool, seed: int, rank: int = 0, world: int = 1, drop_last: bool = False) -> None:
        self.images, self.targets, self.pipeline = images, targets, pipeline
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.rank, self.world, self.drop_last = rank, world, drop_last

    def __len__(self) -> int:
        n = len(self.targets)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        gen = torch.Generator().manual_seed(self.seed * 100003 + epoch)
        n = len(self.targets)
        order = torch.randperm(n, generator=gen) if self.shuffle else torch.arange(n)
        aug = torch.Generator().manual_seed((self.seed * 100003 + epoch) * 31 + self.rank + 1)
        for b in range(len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size][self.rank::self.world]
            x = self.pipeline(self.images[idx], generator=aug)  # always drawn: skipping keeps the stream
            if b >= start_batch:
                yield x, self.targets[idx]


class _SeededSamples(torch.utils.data.Dataset):
    """Loads sample ``index`` with the torch RNG seeded by ``seed``: the sampler yields
    ``(index, seed)`` pairs, so an image's random augmentation depends only on (run seed, epoch,
    index), not on which worker loads it, how many workers there are, or what ran before."""

    def __init__(self, dataset: torch.utils.data.Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, item: tuple[int, int]) -> Any:
        index, seed = item
        # fork_rng: with workers=0 this runs in the training process, whose RNG (dropout, ...)
        # must not move; torchvision's v1 random transforms draw from the global torch RNG.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[index]


class LoaderBatches:
    """A DataLoader over an on-disk dataset with the same ``epoch(epoch, start_batch)`` interface.

    Resumable bit for bit, with any number of workers: the epoch's order is a permutation seeded
    by (seed, epoch), each global batch of ``batch_size`` is split across ranks like
    :class:`TensorBatches`, and each sample's augmentation is seeded by (seed, epoch, index).
    ``start_batch`` skips batches without loading them, and the batches after it are exactly the
    tail of the full epoch. The global torch RNG is neither read nor advanced (the DataLoader
    gets its own generator), so the training's own random stream does not depend on the data.
    """

    def __init__(self, dataset: torch.utils.data.Dataset, *, batch_size: int, shuffle: bool, seed: int,
                 rank: int, world: int, workers: int, drop_last: bool = False) -> None:
        self.dataset = _SeededSamples(dataset)
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.rank, self.world, self.workers, self.drop_last = rank, world, workers, drop_last

    def __len__(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _samples(self, epoch: int, start_batch: int) -> list[tuple[int, int]]:
        epoch_seed = self.seed * 100003 + epoch
        n = len(self.dataset)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(epoch_seed)) if self.shuffle else torch.arange(n)
        out = []
        for b in range(start_batch, len(self)):
            for i in order[b * self.batch_size:(b + 1) * self.batch_size][self.rank::self.world].tolist():
                out.append((i, (epoch_seed * 1_000_003 + i) % (2**63)))
        return out

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        loader = DataLoader(self.dataset, batch_size=max(1, self.batch_size // self.world),
                            sampler=self._samples(epoch, start_batch), num_workers=self.workers,
                            generator=torch.Generator().manual_seed(self.seed * 100003 + epoch))
        return iter(loader)


def build_data(spec: str, *, input_size: int, batch_size: int, seed: int, rank: int, world: int,
               train_subset: int = 0, val_size: int = 0, eval_subset: int = 0, workers: int = 2,
               eval_split: Optional[str] = None, erase_p: float = 0.0) -> tuple[TensorBatches | LoaderBatches, TensorBatches | LoaderBatches, DataInfo]:
    """Train batches, eval batches and a :class:`DataInfo` for a ``--data`` spec.

    The eval split is the held-out validation slice when ``val_size > 0``, else the test split
    (``eval_split`` overrides it).
    """
    kind, _, arg = spec.partition(":")
    if kind == "fashion_mnist":
        root = arg or None
        train = FashionMNIST(root, "train", val_size=val_size, subset=train_subset or None, seed=seed)
        split = eval_split or ("val" if val_size else "test")
        evals = FashionMNIST(root, split, val_size=val_size if split != "test" else 0)
        if eval_subset:
            evals.images, evals.targets = evals.images[:eval_subset], evals.targets[:eval_subset]
        train_b = TensorBatches(train.images, train.targets, BatchPipeline(size=input_size, train=True, erase_p=erase_p),
                                batch_size=batch_size, shuffle=True, seed=seed, rank=rank, world=world, drop_last=True)
        # evaluation runs on the full split in every rank (it is cheap), so rank 0 reports it alone
        eval_b = TensorBatches(evals.images, evals.targets, BatchPipeline(size=input_size, train=False),
                               batch_size=256, shuffle=False, seed=seed)
        info = DataInfo("fashion_mnist", list(FASHION_MNIST_CLASSES), input_size,
                        [FASHION_MNIST_MEAN] * 3, [FASHION_MNIST_STD] * 3, train_size=len(train.targets),
                        eval_size=len(evals.targets), eval_split=split,
                        extra={"preprocessing": f"28x28 grayscale, zero-padded to {input_size}x{input_size}, replicated to 3 channels"})
        return train_b, eval_b, info
    if erase_p:
        raise ValueError(f"--random-erasing {erase_p} applies to fashion_mnist only, not --data {spec!r}")
    if kind == "imagefolder":
        if not arg:
            raise ValueError("--data imagefolder needs a path: imagefolder:<root with train/ and val/>")
        train_ds = build_imagefolder(arg, "train", imagenet_train_transform(input_size))
        split = eval_split or "val"
        eval_ds = build_imagefolder(arg, split, imagenet_eval_transform(input_size, int(input_size * 256 / 224)))
        if train_subset:
            g = torch.Generator().manual_seed(seed)
            train_ds = torch.utils.data.Subset(train_ds, torch.randperm(len(train_ds), generator=g)[:train_subset].tolist())
        if eval_subset:
            eval_ds = torch.utils.data.Subset(eval_ds, list(range(min(eval_subset, len(eval_ds)))))
        classes = train_ds.dataset.classes if isinstance(train_ds, torch.utils.data.Subset) else train_ds.classes
        train_b = LoaderBatches(train_ds, batch_size=batch_size, shuffle=True, seed=seed, rank=rank, world=world, workers=workers, drop_last=True)
        eval_b = LoaderBatches(eval_ds, batch_size=256, shuffle=False, seed=seed, rank=0, world=1, workers=workers)
        info = DataInfo("imagefolder", list(classes), input_size, list(IMAGENET_MEAN), list(IMAGENET_STD),
                        train_size=len(train_ds), eval_size=len(eval_ds), eval_split=split)
        return train_b, eval_b, info
    raise ValueError(f"unknown --data {spec!r}; valid choices: fashion_mnist[:<root>], imagefolder:<path>")
