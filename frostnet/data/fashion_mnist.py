"""Fashion-MNIST: IDX reader, in-memory dataset and fast tensor pipelines.

The data comes from the Debian package ``dataset-fashion-mnist`` which installs
the four original IDX files under ``/usr/share/datasets/fashion-mnist``.
Everything is kept as one ``uint8`` tensor in memory (47 MB for train), and the
CPU training pipeline works on whole batches of tensors instead of per-sample
PIL transforms, which is what makes CPU epochs fast.
"""

from __future__ import annotations

import gzip
import inspect
import math
import os
import zlib
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

PathLike = Union[str, os.PathLike]

__all__ = [
    "DEFAULT_FASHION_MNIST_ROOT",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "FASHION_MNIST_FILES",
    "IDXFormatError",
    "read_idx",
    "write_idx",
    "FashionMNIST",
    "fashion_mnist_train_val",
    "compute_mean_std",
    "subset_indices",
    "train_val_split",
    "prepare_batch",
    "random_crop_flip",
    "FashionMNISTTransform",
    "BatchPipeline",
    "TensorBatchLoader",
]

DEFAULT_FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")

FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

# Per-pixel mean/std of the 60k *training* images scaled to [0, 1], over the
# original 28x28 pixels (before any zero padding), computed once with
# ``compute_mean_std(FashionMNIST(split="train").images)`` on the Debian
# package files: mean=0.28604059..., std=0.35302424...  Test images were not
# used so no test statistics leak into training.
FASHION_MNIST_MEAN: float = 0.2860406
FASHION_MNIST_STD: float = 0.3530242

# split -> (images file, labels file), Debian/original file names.
FASHION_MNIST_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

_NUM_CLASSES = len(FASHION_MNIST_CLASSES)
_IMAGE_SIZE = 28


# --------------------------------------------------------------------------- #
# IDX format
# --------------------------------------------------------------------------- #


class IDXFormatError(ValueError):
    """Raised when a file is not a well-formed IDX file."""


# IDX type code -> (big-endian numpy dtype, torch dtype of the returned tensor).
_IDX_DTYPES: dict[int, tuple[str, torch.dtype]] = {
    0x08: (">u1", torch.uint8),
    0x09: (">i1", torch.int8),
    0x0B: (">i2", torch.int16),
    0x0C: (">i4", torch.int32),
    0x0D: (">f4", torch.float32),
    0x0E: (">f8", torch.float64),
}
_GZIP_MAGIC = b"\x1f\x8b"


def _read_bytes(path: Path) -> bytes:
    """Return the decompressed content of ``path``, gzip detected by content.

    Detection uses the gzip magic instead of the ``.gz`` suffix so renamed or
    already-decompressed files are read correctly either way.
    """
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"IDX file not found: {path}") from None
    if raw[:2] != _GZIP_MAGIC:
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as exc:
        raise IDXFormatError(
            f"{path}: corrupt or truncated gzip stream ({exc})"
        ) from exc


def read_idx(
    path: PathLike,
    expected_ndim: Optional[int] = None,
    expected_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """Read an IDX file (raw or gzip-compressed) into a tensor.

    Layout: two zero bytes, a type code byte, a dimension-count byte, one
    big-endian uint32 per dimension, then the big-endian data in C order.

    Args:
        path: File to read; gzip compression is detected from the content.
        expected_ndim: If given, the number of dimensions the file must have.
        expected_dtype: If given, the torch dtype the file must decode to.

    Returns:
        A tensor with the file's shape, in native byte order.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        IDXFormatError: Bad magic, unknown type code, unexpected ndim/dtype,
            or a data size that does not match the header; the message names
            the file and what is wrong.
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise IDXFormatError(
            f"{path}: file has {len(data)} bytes, too short for the 4-byte IDX magic"
        )
    if data[0] != 0 or data[1] != 0:
        raise IDXFormatError(
            f"{path}: bad IDX magic {data[:4].hex()} (the first two bytes must be 00 00)"
        )
    code, ndim = data[2], data[3]
    if code not in _IDX_DTYPES:
        valid = ", ".join(f"0x{c:02X}" for c in _IDX_DTYPES)
        raise IDXFormatError(
            f"{path}: unknown IDX type code 0x{code:02X}; valid codes are {valid}"
        )
    np_dtype, torch_dtype = _IDX_DTYPES[code]
    if expected_ndim is not None and ndim != expected_ndim:
        raise IDXFormatError(
            f"{path}: IDX file has {ndim} dimensions, expected {expected_ndim}"
        )
    if expected_dtype is not None and torch_dtype != expected_dtype:
        raise IDXFormatError(
            f"{path}: IDX data type is {torch_dtype}, expected {expected_dtype}"
        )
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise IDXFormatError(
            f"{path}: truncated header, {ndim} dimensions need {header_len} bytes "
            f"but the file has {len(data)}"
        )
    shape = tuple(
        int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)
    )
    itemsize = np.dtype(np_dtype).itemsize
    expected_len = math.prod(shape) * itemsize
    actual_len = len(data) - header_len
    if actual_len != expected_len:
        what = "truncated" if actual_len < expected_len else "has trailing bytes"
        raise IDXFormatError(
            f"{path}: data {what}: header shape {shape} needs {expected_len} bytes "
            f"of {np_dtype[1:]} data, found {actual_len}"
        )
    arr = np.frombuffer(data, dtype=np_dtype, count=math.prod(shape), offset=header_len)
    # astype(native) both fixes byte order and gives a writable copy, which
    # torch.from_numpy needs to avoid aliasing an immutable bytes object.
    arr = arr.astype(np.dtype(np_dtype).newbyteorder("="))
    return torch.from_numpy(arr.reshape(shape))


def write_idx(path: PathLike, tensor: torch.Tensor, compress: Optional[bool] = None) -> None:
    """Write ``tensor`` as an IDX file (the inverse of :func:`read_idx`).

    Args:
        path: Destination file.
        tensor: Tensor of a dtype IDX supports (uint8, int8, int16, int32,
            float32, float64).
        compress: gzip the output; defaults to ``True`` iff path ends in ``.gz``.

    Raises:
        ValueError: The dtype has no IDX type code.
    """
    path = Path(path)
    by_dtype = {td: (code, nd) for code, (nd, td) in _IDX_DTYPES.items()}
    if tensor.dtype not in by_dtype:
        valid = ", ".join(str(d) for d in by_dtype)
        raise ValueError(f"dtype {tensor.dtype} cannot be stored in IDX; valid: {valid}")
    code, np_dtype = by_dtype[tensor.dtype]
    header = bytes([0, 0, code, tensor.dim()]) + b"".join(
        int(s).to_bytes(4, "big") for s in tensor.shape
    )
    payload = header + tensor.detach().cpu().contiguous().numpy().astype(np_dtype).tobytes()
    if compress is None:
        compress = path.suffix == ".gz"
    path.write_bytes(gzip.compress(payload) if compress else payload)


# --------------------------------------------------------------------------- #
# Index helpers
# --------------------------------------------------------------------------- #


def subset_indices(n_total: int, n: int, seed: int = 0) -> torch.Tensor:
    """Pick a deterministic random subset of ``range(n_total)``.

    Args:
        n_total: Size of the population.
        n: Subset size, ``0 < n <= n_total``.
        seed: Seed of the private generator (the global RNG is not touched).

    Returns:
        Sorted int64 indices (sorted for memory locality when slicing).
    """
    if not 0 < n <= n_total:
        raise ValueError(f"subset size {n} must be in 1..{n_total}")
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(n_total, generator=gen)[:n].sort().values


def train_val_split(
    n_total: int, val_size: int = 5000, seed: Optional[int] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministically split ``range(n_total)`` into train and validation.

    Args:
        n_total: Number of training samples to split.
        val_size: Number of held-out samples, ``0 < val_size < n_total``.
        seed: ``None`` holds out the last ``val_size`` samples (stable across
            library versions); an int draws a seeded random hold-out.

    Returns:
        ``(train_indices, val_indices)``, both sorted int64, disjoint, and
        together covering ``range(n_total)``.
    """
    if not 0 < val_size < n_total:
        raise ValueError(f"val_size {val_size} must be in 1..{n_total - 1}")
    if seed is None:
        idx = torch.arange(n_total)
        return idx[: n_total - val_size], idx[n_total - val_size :]
    perm = torch.randperm(n_total, generator=torch.Generator().manual_seed(seed))
    return perm[val_size:].sort().values, perm[:val_size].sort().values


# --------------------------------------------------------------------------- #
# Dataset
# --------------------------------------------------------------------------- #

_SPLITS = ("train", "val", "test")


class FashionMNIST(Dataset):
    """Fashion-MNIST held fully in memory as a ``uint8`` tensor.

    Attributes:
        images: ``(N, 28, 28)`` uint8 tensor (after split/subset selection).
        targets: ``(N,)`` int64 labels in ``0..9``.
        indices: Positions of the kept samples in the underlying IDX file.
        classes: :data:`FASHION_MNIST_CLASSES`.

    ``dataset[i]`` returns ``(transform(image), label)`` where ``image`` is a
    ``(1, 28, 28)`` uint8 tensor; with ``transform=None`` that tensor itself.
    For fast CPU training skip per-sample transforms and iterate with
    :class:`TensorBatchLoader` instead.
    """

    classes = FASHION_MNIST_CLASSES

    def __init__(
        self,
        root: Optional[PathLike] = None,
        split: str = "train",
        transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
        target_transform: Optional[Callable[[int], object]] = None,
        subset: Optional[int] = None,
        indices: Optional[Sequence[int]] = None,
        seed: int = 0,
        val_size: int = 0,
        val_seed: Optional[int] = None,
    ) -> None:
        """Load a split.

        Args:
            root: Directory holding the four IDX files; defaults to
                :data:`DEFAULT_FASHION_MNIST_ROOT` (Debian package location).
            split: ``"train"``, ``"val"`` or ``"test"``. With ``val_size > 0``
                ``"train"`` excludes the held-out slice and ``"val"`` is that
                slice (see :func:`train_val_split`); ``"val"`` needs ``val_size``.
            transform: Applied to the ``(1, 28, 28)`` uint8 image tensor.
            target_transform: Applied to the int label.
            subset: Keep a deterministic random subset of this many samples
                (drawn with ``seed``) of the selected split.
            indices: Explicit positions to keep, relative to the selected split.
                Mutually exclusive with ``subset``.
            seed: Seed for ``subset``.
            val_size: Size of the validation slice held out of the train file.
            val_seed: ``None`` holds out the last ``val_size`` samples, an int
                a seeded random slice.

        Raises:
            FileNotFoundError: The IDX files are missing (message says where it
                looked and how to install them).
            ValueError: Bad ``split``/``subset``/``indices`` values.
            IDXFormatError: A file is corrupt.
        """
        if split not in _SPLITS:
            raise ValueError(f"unknown Fashion-MNIST split {split!r}; valid: {', '.join(_SPLITS)}")
        if split == "val" and val_size <= 0:
            raise ValueError("split='val' needs val_size > 0 (e.g. val_size=5000)")
        if subset is not None and indices is not None:
            raise ValueError("pass either subset or indices, not both")
        self.root = Path(root) if root is not None else DEFAULT_FASHION_MNIST_ROOT
        self.split = split
        self.transform = transform
        self.target_transform = target_transform

        file_split = "test" if split == "test" else "train"
        images, targets = _load_split(self.root, file_split)

        keep = torch.arange(len(targets))
        if file_split == "train" and val_size > 0:
            train_idx, val_idx = train_val_split(len(targets), val_size, val_seed)
            keep = val_idx if split == "val" else train_idx
        if subset is not None:
            keep = keep[subset_indices(len(keep), subset, seed)]
        elif indices is not None:
            rel = torch.as_tensor(indices, dtype=torch.long)
            if rel.dim() != 1:
                raise ValueError(f"indices must be 1-D, got shape {tuple(rel.shape)}")
            if len(rel) and (rel.min() < 0 or rel.max() >= len(keep)):
                raise ValueError(
                    f"indices must lie in 0..{len(keep) - 1} for split {split!r}, "
                    f"got min {int(rel.min())} max {int(rel.max())}"
                )
            keep = keep[rel]
        self.indices = keep
        if len(keep) == len(targets):
            self.images, self.targets = images, targets
        else:
            self.images, self.targets = images[keep], targets[keep]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[object, object]:
        image = self.images[index].unsqueeze(0)
        target: object = int(self.targets[index])
        if self.transform is not None:
            image = self.transform(image)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return image, target

    def __repr__(self) -> str:
        return f"FashionMNIST(split={self.split!r}, n={len(self)}, root={str(self.root)!r})"


def _load_split(root: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Read and cross-check the image and label IDX files of one split."""
    image_name, label_name = FASHION_MNIST_FILES[split]
    image_path, label_path = _find_file(root, image_name), _find_file(root, label_name)
    missing = [str(p) for p in (image_path, label_path) if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST {split} files not found under {root}: missing "
            f"{', '.join(missing)} (also tried without .gz). Install them with "
            f"`apt-get install -y dataset-fashion-mnist` (files go to "
            f"{DEFAULT_FASHION_MNIST_ROOT}) or pass root=<dir with the IDX files>."
        )
    images = read_idx(image_path, expected_ndim=3, expected_dtype=torch.uint8)
    labels = read_idx(label_path, expected_ndim=1, expected_dtype=torch.uint8)
    if tuple(images.shape[1:]) != (_IMAGE_SIZE, _IMAGE_SIZE):
        raise IDXFormatError(
            f"{image_path}: images are {tuple(images.shape[1:])}, expected (28, 28)"
        )
    if len(images) != len(labels):
        raise IDXFormatError(
            f"{image_path} has {len(images)} images but {label_path} has {len(labels)} labels"
        )
    if len(labels) and int(labels.max()) >= _NUM_CLASSES:
        raise IDXFormatError(
            f"{label_path}: label {int(labels.max())} out of range 0..{_NUM_CLASSES - 1}"
        )
    return images, labels.long()


def _find_file(root: Path, name: str) -> Path:
    """Prefer ``name``; fall back to the decompressed name without ``.gz``."""
    path = root / name
    if not path.is_file() and path.suffix == ".gz":
        plain = path.with_suffix("")
        if plain.is_file():
            return plain
    return path


def fashion_mnist_train_val(
    root: Optional[PathLike] = None,
    val_size: int = 5000,
    val_seed: Optional[int] = None,
    **kwargs: object,
) -> tuple[FashionMNIST, FashionMNIST]:
    """Return disjoint ``(train, val)`` datasets held out of the train file.

    Args:
        root: IDX directory (defaults to the Debian location).
        val_size: Validation samples held out.
        val_seed: ``None`` for the last ``val_size`` samples, else seeded.
        **kwargs: Forwarded to both :class:`FashionMNIST` constructors.
    """
    train = FashionMNIST(root, "train", val_size=val_size, val_seed=val_seed, **kwargs)
    val = FashionMNIST(root, "val", val_size=val_size, val_seed=val_seed, **kwargs)
    return train, val


def compute_mean_std(images: torch.Tensor, chunk: int = 10000) -> tuple[float, float]:
    """Pixel mean and std of uint8 images scaled to ``[0, 1]``.

    Works in float64 chunks so 60k images neither lose precision nor need a
    full float copy in memory.

    Args:
        images: uint8 tensor of any shape ``(N, ...)``.
        chunk: Images per chunk.

    Returns:
        ``(mean, std)`` population statistics over every pixel.
    """
    total = sq = 0.0
    count = 0
    for start in range(0, len(images), chunk):
        x = images[start : start + chunk].double() / 255.0
        total += float(x.sum())
        sq += float((x * x).sum())
        count += x.numel()
    if count == 0:
        raise ValueError("compute_mean_std needs at least one image")
    mean = total / count
    return mean, math.sqrt(max(sq / count - mean * mean, 0.0))


# --------------------------------------------------------------------------- #
# Batched tensor transforms
# --------------------------------------------------------------------------- #


def prepare_batch(
    images: torch.Tensor,
    size: int = 32,
    resize: bool = False,
    mean: float = FASHION_MNIST_MEAN,
    std: float = FASHION_MNIST_STD,
    channels: int = 3,
    normalize: bool = True,
) -> torch.Tensor:
    """Turn uint8 grayscale images into normalized float model input.

    Args:
        images: ``(N, H, W)`` or ``(N, 1, H, W)`` uint8 (or float in [0, 1]).
        size: Output side length.
        resize: ``False`` zero-pads (centered) to ``size`` which keeps pixels
            exact; ``True`` bilinearly resizes to ``size``.
        mean: Normalization mean (in [0, 1] units).
        std: Normalization std.
        channels: Output channels; the gray plane is replicated because the
            zoo's models take RGB-shaped input.
        normalize: Apply ``(x - mean) / std``.

    Returns:
        ``(N, channels, size, size)`` float32 tensor.
    """
    x = _to_float_nchw(images)
    x = _fit(x, size, resize)
    if normalize:
        x = (x - mean) / std
    return x.expand(-1, channels, -1, -1).contiguous() if channels != 1 else x


def _to_float_nchw(images: torch.Tensor) -> torch.Tensor:
    if images.dim() == 3:
        images = images.unsqueeze(1)
    if images.dim() != 4 or images.shape[1] != 1:
        raise ValueError(
            f"expected (N, H, W) or (N, 1, H, W) grayscale images, got {tuple(images.shape)}"
        )
    if images.dtype == torch.uint8:
        return images.float().div_(255.0)
    return images.float()


def _fit(x: torch.Tensor, size: int, resize: bool) -> torch.Tensor:
    """Zero-pad (centered) or resize ``(N, C, H, W)`` to ``size`` x ``size``."""
    h, w = x.shape[-2:]
    if (h, w) == (size, size):
        return x
    if resize:
        return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                             antialias=size < max(h, w))
    if size < h or size < w:
        raise ValueError(f"cannot zero-pad {h}x{w} images to smaller size {size}; use resize=True")
    top, left = (size - h) // 2, (size - w) // 2
    return F.pad(x, (left, size - w - left, top, size - h - top))


def random_crop_flip(
    x: torch.Tensor,
    padding: int = 4,
    flip_p: float = 0.5,
    fill: float = 0.0,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Per-sample random crop (after padding) and horizontal flip, batched.

    Each sample gets its own offset and flip decision, but the work is two
    vectorized gathers over the whole batch instead of a Python loop.

    Args:
        x: ``(N, C, H, W)`` float batch.
        padding: Pixels of ``fill`` added on each side before cropping back to
            ``H x W`` (0 disables the crop).
        flip_p: Probability of a horizontal flip per sample.
        fill: Padding value. Use the *unnormalized* background (0) by calling
            this before normalization, as :class:`BatchPipeline` does.
        generator: Optional RNG for reproducibility.

    Returns:
        Augmented tensor of the same shape.
    """
    n, _, h, w = x.shape
    if padding > 0:
        padded = F.pad(x, (padding,) * 4, value=fill)
        oy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
        ox = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
        rows = (oy[:, None] + torch.arange(h))[:, :, None]  # (N, H, 1)
        cols = (ox[:, None] + torch.arange(w))[:, None, :]  # (N, 1, W)
        batch = torch.arange(n)[:, None, None]
        # Advanced indices around a slice put the indexed dims first: (N, H, W, C).
        x = padded[batch, :, rows, cols].permute(0, 3, 1, 2).contiguous()
    if flip_p > 0:
        flip = torch.rand(n, generator=generator) < flip_p
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    return x


def random_erasing(
    x: torch.Tensor,
    p: float = 0.25,
    scale: tuple[float, float] = (0.02, 0.33),
    ratio: tuple[float, float] = (0.3, 3.3),
    value: float = 0.0,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Random erasing (Zhong et al., 2020) per sample, batched: with probability ``p`` a rectangle
    of area ``scale`` x the image and aspect ``ratio`` (log-uniform) is set to ``value``.

    torchvision's ``v2.RandomErasing`` draws one rectangle per call from the global RNG, so on a
    batch every sample would lose the same box and a resumed run could not redraw it; this draws
    one box per sample from ``generator`` and applies all of them with one mask.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"random erasing probability must be in [0, 1], got {p}")
    n, _, h, w = x.shape
    u = torch.rand(n, 4, generator=generator)  # always drawn, so p does not shift the stream
    if p == 0:
        return x
    area = (scale[0] + (scale[1] - scale[0]) * u[:, 0]) * h * w
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[:, 1]
    eh = (area * log_r.exp()).sqrt().round().clamp(1, h).long()
    ew = (area / log_r.exp()).sqrt().round().clamp(1, w).long()
    top = (u[:, 2] * (h - eh + 1).float()).floor().long()
    left = (u[:, 3] * (w - ew + 1).float()).floor().long()
    on = torch.rand(n, generator=generator) < p
    rows = torch.arange(h)[None, :]
    cols = torch.arange(w)[None, :]
    in_rows = (rows >= top[:, None]) & (rows < (top + eh)[:, None])  # (N, H)
    in_cols = (cols >= left[:, None]) & (cols < (left + ew)[:, None])  # (N, W)
    mask = (in_rows[:, :, None] & in_cols[:, None, :] & on[:, None, None])[:, None]  # (N, 1, H, W)
    return x.masked_fill(mask, value)


class BatchPipeline:
    """Batched uint8 -> float input pipeline with optional train augmentation.

    Order: scale to [0, 1], pad/resize to ``size``, augment (crop with
    zero-padding + flip), normalize, replicate channels. Augmenting before
    normalization means the crop padding is true black background.
    """

    def __init__(
        self,
        size: int = 32,
        train: bool = False,
        resize: bool = False,
        padding: int = 4,
        flip_p: float = 0.5,
        mean: float = FASHION_MNIST_MEAN,
        std: float = FASHION_MNIST_STD,
        channels: int = 3,
        erase_p: float = 0.0,
    ) -> None:
        """See :func:`prepare_batch`, :func:`random_crop_flip` and :func:`random_erasing` (``erase_p``,
        training only, applied after the crop so an erased box is black like the background)."""
        self.erase_p = erase_p
        self.size, self.train, self.resize = size, train, resize
        self.padding, self.flip_p = padding, flip_p
        self.mean, self.std, self.channels = mean, std, channels

    def __call__(
        self, images: torch.Tensor, generator: Optional[torch.Generator] = None
    ) -> torch.Tensor:
        """Transform ``(N, H, W)``/``(N, 1, H, W)`` images to ``(N, C, S, S)`` floats."""
        x = _fit(_to_float_nchw(images), self.size, self.resize)
        if self.train:
            x = random_crop_flip(x, self.padding, self.flip_p, 0.0, generator)
            if self.erase_p > 0:
                x = random_erasing(x, self.erase_p, generator=generator)
        x = (x - self.mean) / self.std
        return x.expand(-1, self.channels, -1, -1).contiguous() if self.channels != 1 else x

    def __repr__(self) -> str:
        return (f"BatchPipeline(size={self.size}, train={self.train}, resize={self.resize}, "
                f"padding={self.padding}, flip_p={self.flip_p}, channels={self.channels}, erase_p={self.erase_p})")


class FashionMNISTTransform(BatchPipeline):
    """Per-sample version of :class:`BatchPipeline` for use as ``transform=``.

    Maps a ``(1, 28, 28)`` (or ``(28, 28)``) uint8 tensor to a
    ``(channels, size, size)`` float tensor. Prefer :class:`TensorBatchLoader`
    for training speed; this exists for DataLoader-based code.
    """

    def __call__(
        self, image: torch.Tensor, generator: Optional[torch.Generator] = None
    ) -> torch.Tensor:
        if image.dim() == 2:
            image = image.unsqueeze(0)
        return super().__call__(image.unsqueeze(0), generator)[0]


class TensorBatchLoader:
    """Iterate ``(inputs, labels)`` batches straight from in-memory tensors.

    Replaces ``DataLoader`` for in-memory datasets: slicing a tensor and
    running one batched pipeline is much cheaper than collating thousands of
    per-sample tensors on a 2-core CPU.
    """

    def __init__(
        self,
        dataset: Union[FashionMNIST, tuple[torch.Tensor, torch.Tensor]],
        batch_size: int = 128,
        pipeline: Optional[Callable[..., torch.Tensor]] = None,
        shuffle: bool = False,
        drop_last: bool = False,
        seed: int = 0,
    ) -> None:
        """Create the loader.

        Args:
            dataset: A :class:`FashionMNIST` or an ``(images, targets)`` pair.
            batch_size: Samples per batch.
            pipeline: Batch transform, e.g. ``BatchPipeline(train=True)``;
                ``None`` means ``BatchPipeline()`` (eval preprocessing).
            shuffle: Reshuffle every epoch (epoch ``e`` uses seed ``seed + e``
                so runs are reproducible).
            drop_last: Drop the final incomplete batch.
            seed: Base seed for shuffling and augmentation.
        """
        if isinstance(dataset, FashionMNIST):
            self.images, self.targets = dataset.images, dataset.targets
        else:
            self.images, self.targets = dataset
        if len(self.images) != len(self.targets):
            raise ValueError(
                f"{len(self.images)} images but {len(self.targets)} targets"
            )
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.batch_size = batch_size
        self.pipeline = pipeline if pipeline is not None else BatchPipeline()
        self.shuffle, self.drop_last, self.seed = shuffle, drop_last, seed
        self.epoch = 0
        # Feed our seeded generator to pipelines that accept one, so the
        # augmentation is reproducible too; plain callables still work.
        try:
            params = inspect.signature(self.pipeline).parameters
        except (TypeError, ValueError):
            params = {}
        self._pass_generator = "generator" in params

    def __len__(self) -> int:
        n = len(self.targets)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        self.epoch += 1
        n = len(self.targets)
        order = torch.randperm(n, generator=gen) if self.shuffle else None
        for b in range(len(self)):
            sl = slice(b * self.batch_size, min((b + 1) * self.batch_size, n))
            idx = order[sl] if order is not None else sl
            images = self.images[idx]
            if self._pass_generator:
                x = self.pipeline(images, generator=gen)
            else:
                x = self.pipeline(images)
            yield x, self.targets[idx]
