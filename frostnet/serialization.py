"""FP32 checkpoint files: the unfused float state dict in safetensors, with string metadata.

No pickle on the loading path: safetensors stores raw tensors and a JSON header only.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from typing import Optional, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

__all__ = ["FP32_FORMAT", "FORMAT_VERSION", "save_fp32", "load_fp32", "sha256_file", "WeightsError"]

FP32_FORMAT = "frostnet-fp32"
FORMAT_VERSION = "1"
PathLike = Union[str, os.PathLike]


class WeightsError(ValueError):
    """A weights file is missing, corrupted, or does not fit the model asked for."""


def sha256_file(path: PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def save_fp32(
    model_or_state_dict: Union[nn.Module, Mapping[str, torch.Tensor]],
    path: PathLike,
    *,
    arch: str,
    num_classes: int,
    metadata: Optional[Mapping[str, str]] = None,
) -> str:
    """Write an FP32 file atomically and return its sha256.

    Args:
        model_or_state_dict: a float (unfused) model or its state dict.
        path: destination ``.safetensors`` file.
        arch: registry name of the model (checked on load).
        num_classes: classifier outputs (checked on load).
        metadata: extra string metadata (dataset, recipe, ...).
    """
    from . import __version__

    sd = model_or_state_dict.state_dict() if isinstance(model_or_state_dict, nn.Module) else model_or_state_dict
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in sd.items()}
    meta = {
        "format": FP32_FORMAT,
        "format_version": FORMAT_VERSION,
        "arch": arch,
        "num_classes": str(num_classes),
        "frostnet_version": __version__,
        "torch_version": torch.__version__.split("+")[0],
    }
    meta.update({k: str(v) for k, v in (metadata or {}).items()})
    tmp = f"{os.fspath(path)}.tmp{os.getpid()}"
    save_file(tensors, tmp, metadata=meta)
    os.replace(tmp, path)
    return sha256_file(path)


def read_safetensors(path: PathLike, *, expected_sha256: Optional[str] = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file; the sha256 is checked before parsing."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise WeightsError(f"weights file {path!r} does not exist")
    if expected_sha256 is not None:
        actual = sha256_file(path)
        if actual != expected_sha256:
            raise WeightsError(
                f"sha256 mismatch for {path!r}: expected {expected_sha256}, got {actual}; "
                "the file is corrupted or not the published one: delete it and fetch it again"
            )
    try:
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            meta = dict(f.metadata() or {})
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise WeightsError(f"{path!r} is not a readable safetensors file ({e})") from e
    return tensors, meta


def load_fp32(
    path: PathLike,
    *,
    expected_sha256: Optional[str] = None,
    arch: Optional[str] = None,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read an FP32 file; checks its sha256 (if given), format and architecture."""
    tensors, meta = read_safetensors(path, expected_sha256=expected_sha256)
    if meta.get("format") != FP32_FORMAT:
        raise WeightsError(f"{os.fspath(path)!r} is not a frostnet FP32 file (format {meta.get('format')!r}, expected {FP32_FORMAT!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise WeightsError(
            f"{os.fspath(path)!r} has format version {meta.get('format_version')!r}; this frostnet reads {FORMAT_VERSION!r}"
        )
    if arch is not None and meta.get("arch") != arch:
        raise WeightsError(f"{os.fspath(path)!r} holds weights for {meta.get('arch')!r}, not {arch!r}")
    return tensors, meta
