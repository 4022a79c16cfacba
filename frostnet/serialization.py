"""Checkpoint files: FP32 (unfused float state dict) and INT8 (converted model) in safetensors.

No pickle on the loading path: safetensors stores raw tensors and a JSON header only.

FP32 file (``format = "frostnet-fp32"``): the float model's ``state_dict()`` as saved by
:func:`save_fp32` (the QAT-trained latent weights for QAT checkpoints). It loads into the float
model, and a QAT-prepared copy of that model is one :func:`frostnet.quant.prepare_qat` away.

INT8 file (``format = "frostnet-int8"``): the converted model's state, flattened into plain
integer/float tensors by :func:`frostnet.quant._eager.int8_state_to_tensors` (int8/uint8 values,
float64 scales, int64 zero points, float biases) plus a JSON ``layout`` in the metadata. It is
loaded without the float weights: the architecture is rebuilt from ``arch`` and
``builder_kwargs``, converted for the stored ``backend`` into a skeleton, and strictly filled.

String metadata of both formats::

    format, format_version, arch, num_classes, builder_kwargs (JSON), frostnet_version,
    torch_version, content_sha256, + backend, qscheme, layout (JSON) for INT8, + free-form extras

``content_sha256`` hashes the metadata and every tensor, so a file corrupted after it was
written is detected even when it is loaded by path, without a manifest sha256.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Callable, Mapping
from typing import Any, Optional, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .quant.validate import bn_running_var_problems, int8_qparam_problems

__all__ = [
    "FP32_FORMAT",
    "FORMAT_VERSION",
    "INT8_FORMAT",
    "INT8_FORMAT_VERSION",
    "WeightsError",
    "content_sha256",
    "export_int8",
    "file_builder_kwargs",
    "float_state_dict_from_qat",
    "load_fp32",
    "load_fp32_into",
    "load_int8",
    "read_int8",
    "read_metadata",
    "read_safetensors",
    "save_fp32",
    "save_int8",
    "sha256_file",
]

FP32_FORMAT = "frostnet-fp32"
FORMAT_VERSION = "1"
INT8_FORMAT = "frostnet-int8"
INT8_FORMAT_VERSION = "1"
PathLike = Union[str, os.PathLike]
_HASH_KEY = "content_sha256"
# Metadata keys written by this module; extra metadata may not overwrite them.
_RESERVED = frozenset({"format", "format_version", "arch", "num_classes", "builder_kwargs", "frostnet_version",
                       "torch_version", _HASH_KEY, "backend", "qscheme", "layout"})


class WeightsError(ValueError):
    """A weights file is missing, corrupted, or does not fit the model asked for."""


def sha256_file(path: PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def content_sha256(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> str:
    """Hex sha256 over ``metadata`` (without ``content_sha256``) and every tensor's name, dtype,
    shape and bytes, in sorted key order: the integrity check stored inside each file."""
    h = hashlib.sha256()
    meta = {k: v for k, v in metadata.items() if k != _HASH_KEY}
    h.update(json.dumps(meta, sort_keys=True).encode())
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        h.update(json.dumps([key, str(t.dtype), list(t.shape)]).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _base_metadata(fmt: str, version: str, arch: str, num_classes: Optional[int],
                   builder_kwargs: Optional[Mapping[str, Any]], metadata: Optional[Mapping[str, Any]]) -> dict[str, str]:
    from . import __version__

    kwargs = dict(builder_kwargs or {})
    if num_classes is not None:
        if kwargs.get("num_classes", num_classes) != num_classes:
            raise ValueError(f"num_classes={num_classes} conflicts with builder_kwargs num_classes={kwargs['num_classes']}")
        kwargs["num_classes"] = num_classes
    try:
        kwargs_json = json.dumps(kwargs, sort_keys=True)
    except TypeError as e:
        raise ValueError(f"builder_kwargs must be JSON-serializable, got {kwargs!r} ({e})") from None
    meta = {
        "format": fmt,
        "format_version": version,
        "arch": arch,
        "num_classes": str(kwargs.get("num_classes", "")),
        "builder_kwargs": kwargs_json,
        "frostnet_version": __version__,
        "torch_version": torch.__version__.split("+")[0],
    }
    clash = sorted(set(metadata or {}) & _RESERVED)
    if clash:
        raise ValueError(f"metadata keys {clash} are reserved for the file format")
    meta.update({k: str(v) for k, v in (metadata or {}).items()})
    return meta


def _write(tensors: dict[str, torch.Tensor], meta: dict[str, str], path: PathLike) -> str:
    meta[_HASH_KEY] = content_sha256(tensors, meta)
    tmp = f"{os.fspath(path)}.tmp{os.getpid()}"
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return sha256_file(path)


def save_fp32(
    model_or_state_dict: Union[nn.Module, Mapping[str, torch.Tensor]],
    path: PathLike,
    *,
    arch: str,
    num_classes: int,
    metadata: Optional[Mapping[str, str]] = None,
    builder_kwargs: Optional[Mapping[str, Any]] = None,
) -> str:
    """Write an FP32 file atomically and return its sha256.

    Args:
        model_or_state_dict: a float (unfused) model, its state dict, or a QAT-prepared model
            (its latent float weights are saved in the unfused layout, see
            :func:`float_state_dict_from_qat`; ``arch``/``num_classes``/``builder_kwargs`` must
            describe its float architecture).
        path: destination ``.safetensors`` file.
        arch: registry name of the model (checked on load).
        num_classes: classifier outputs (checked on load).
        metadata: extra string metadata (dataset, recipe, ...).
        builder_kwargs: other keyword arguments of the builder that shape the weights (e.g.
            ``{"in_channels": 1}``); stored as JSON together with ``num_classes``.

    Example::

        sha = save_fp32(model, "weights/x.fp32.safetensors", arch="frostnet_small_1_0", num_classes=10)
    """
    if isinstance(model_or_state_dict, nn.Module):
        model = model_or_state_dict
        if _is_qat_prepared(model):
            from .models import get_model

            kwargs = {**dict(builder_kwargs or {}), "num_classes": num_classes}
            sd = float_state_dict_from_qat(model, get_model(arch, **kwargs))
        elif any(".activation_post_process." in k for k in model.state_dict()) or _is_int8(model):
            raise ValueError("save_fp32 takes a float or QAT-prepared model; this one is PTQ-prepared or converted "
                             "(its BatchNorms are folded): save the float model, or use save_int8 / export_int8")
        else:
            sd = model.state_dict()
    else:
        sd = model_or_state_dict
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in sd.items()}
    meta = _base_metadata(FP32_FORMAT, FORMAT_VERSION, arch, num_classes, builder_kwargs, metadata)
    return _write(tensors, meta, path)


def _is_qat_prepared(model: nn.Module) -> bool:
    from .quant import _eager

    return any(_eager.is_fake_quant_module(m) for m in model.modules())


def _is_int8(model: nn.Module) -> bool:
    from .quant import _eager

    return _eager.is_quantized_model(model)


def float_state_dict_from_qat(model: nn.Module, reference: nn.Module) -> dict[str, torch.Tensor]:
    """The unfused float state dict (the latent weights) of a QAT-prepared ``model``.

    ``reference`` is a fresh float model of the same architecture (it gets QAT-prepared in
    place): QAT preparation keeps every parameter and buffer object, so matching objects before
    and after preparing the reference maps each prepared name (``conv.0.bn.weight``) back to its
    float name (``conv.1.weight``) for any model family with ``fuse_model``. Fake-quantization
    state is dropped.

    Raises:
        ValueError: the models do not match (a tensor of the float layout has no counterpart).
    """
    from .quant import _eager

    unfused = {id(v): k for k, v in reference.state_dict(keep_vars=True).items()}
    backend = next(b for b in _eager.BACKENDS if b in torch.backends.quantized.supported_engines)
    _eager.prepare_qat(reference, backend)  # names do not depend on the backend
    fused = {k: unfused[id(v)] for k, v in reference.state_dict(keep_vars=True).items() if id(v) in unfused}
    state = model.state_dict()
    missing = [k for k in fused if k not in state]
    if missing or len(fused) != len(unfused):
        lost = sorted(set(unfused.values()) - set(fused.values()))
        raise ValueError(f"the QAT model does not match its float architecture: missing {_short(missing or lost)}")
    ref_state = reference.state_dict()
    out = {}
    for fused_key, float_key in fused.items():
        t = state[fused_key]
        if t.shape != ref_state[fused_key].shape:
            raise ValueError(f"{fused_key!r} has shape {list(t.shape)} in the QAT model, "
                             f"{list(ref_state[fused_key].shape)} in the float architecture")
        out[float_key] = t
    return out


def read_metadata(path: PathLike) -> dict[str, str]:
    """The string metadata of a safetensors file (parses the header only)."""
    from safetensors import safe_open

    path = os.fspath(path)
    _check_exists(path)
    try:
        with safe_open(path, framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise WeightsError(f"{path!r} is not a readable safetensors file ({e})") from e


def _check_exists(path: str) -> None:
    if not os.path.isfile(path):
        raise WeightsError(f"weights file {path!r} does not exist")
    if os.path.getsize(path) == 0:
        raise WeightsError(f"weights file {path!r} is empty (an interrupted download or copy?)")


def read_safetensors(path: PathLike, *, expected_sha256: Optional[str] = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file; the sha256 is checked before parsing."""
    path = os.fspath(path)
    _check_exists(path)
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
    if _HASH_KEY in meta:
        actual = content_sha256(tensors, meta)
        if actual != meta[_HASH_KEY]:
            raise WeightsError(
                f"{path!r} is corrupted: its content hash is {actual} but the file says {meta[_HASH_KEY]} "
                "(tensors or metadata changed after the file was written); fetch it again"
            )
    return tensors, meta


def _check_common(path: str, meta: dict[str, str], fmt: str, version: str, arch: Optional[str]) -> None:
    if meta.get("format") != fmt:
        kind = "FP32" if fmt == FP32_FORMAT else "INT8"
        raise WeightsError(f"{path!r} is not a frostnet {kind} file (format {meta.get('format')!r}, expected {fmt!r})")
    if meta.get("format_version") != version:
        raise WeightsError(f"{path!r} has format version {meta.get('format_version')!r}; this frostnet reads {version!r}")
    if arch is not None and meta.get("arch") != arch:
        raise WeightsError(f"{path!r} holds weights for {meta.get('arch')!r}, not {arch!r}")


def _builder_kwargs(path: str, meta: dict[str, str]) -> dict[str, Any]:
    raw = meta.get("builder_kwargs")
    if raw is None:  # files written before builder_kwargs existed
        try:
            return {"num_classes": int(meta["num_classes"])}
        except (KeyError, ValueError):
            raise WeightsError(f"{path!r} has no valid num_classes metadata ({meta.get('num_classes')!r})") from None
    try:
        kwargs = json.loads(raw)
    except json.JSONDecodeError as e:
        raise WeightsError(f"{path!r} has unreadable builder_kwargs metadata {raw!r} ({e})") from None
    if not isinstance(kwargs, dict):
        raise WeightsError(f"{path!r} has builder_kwargs metadata {raw!r}, expected a JSON object")
    if "num_classes" in kwargs and meta.get("num_classes") != str(kwargs["num_classes"]):
        raise WeightsError(f"{path!r} has inconsistent metadata: num_classes={meta.get('num_classes')!r} but "
                           f"builder_kwargs num_classes={kwargs['num_classes']!r}")
    return kwargs


def load_fp32(
    path: PathLike,
    *,
    expected_sha256: Optional[str] = None,
    arch: Optional[str] = None,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read an FP32 file; checks its sha256 (if given), content hash, format and architecture."""
    tensors, meta = read_safetensors(path, expected_sha256=expected_sha256)
    _check_common(os.fspath(path), meta, FP32_FORMAT, FORMAT_VERSION, arch)
    if "builder_kwargs" in meta:
        _builder_kwargs(os.fspath(path), meta)
    _check_values(os.fspath(path), bn_running_var_problems(tensors))
    return tensors, meta


def file_builder_kwargs(path: PathLike, meta: Mapping[str, str]) -> dict[str, Any]:
    """The builder keyword arguments recorded in a file's metadata (at least ``num_classes``)."""
    return _builder_kwargs(os.fspath(path), dict(meta))


def load_fp32_into(
    model: nn.Module,
    path: PathLike,
    *,
    expected_sha256: Optional[str] = None,
    arch: Optional[str] = None,
    allow_unexpected: bool = False,
) -> dict[str, str]:
    """Load an FP32 file into a float ``model`` strictly; returns the file's metadata.

    Every key, shape and dtype must match (no silent casting), floats must be finite.

    Args:
        model: the float (unfused, not QAT-prepared) model.
        path: the FP32 file.
        expected_sha256: checked before the file is parsed.
        arch: the registry name the file must hold.
        allow_unexpected: ignore file tensors the model has no slot for (a ``features_only``
            backbone loading classifier weights); missing tensors still raise.

    Raises:
        WeightsError: naming the file and what does not fit.
    """
    path = os.fspath(path)
    tensors, meta = load_fp32(path, expected_sha256=expected_sha256, arch=arch)
    model_classes = getattr(model, "num_classes", None)
    if isinstance(model_classes, int) and meta.get("num_classes", "") not in ("", str(model_classes)):
        raise WeightsError(f"{path!r} holds a {meta['num_classes']}-class {meta.get('arch')} ({meta['num_classes']} classes) "
                           f"but the model has {model_classes}; build it with num_classes={meta['num_classes']}")
    target = model.state_dict()
    missing = [k for k in target if k not in tensors]
    extra = [k for k in tensors if k not in target]
    if missing or (extra and not allow_unexpected):
        parts = [f"missing keys {_short(missing)}"] if missing else []
        if extra and not allow_unexpected:
            parts.append(f"unexpected keys {_short(extra)}")
        hint = ""
        if any(".activation_post_process." in k or "fake_quant" in k for k in target):
            hint = "; load FP32 weights into the float model, then call frostnet.quant.prepare_qat"
        raise WeightsError(f"{path!r} does not fit {type(model).__name__} ({meta.get('arch')}): {'; '.join(parts)}{hint}")
    bad = []
    for key, ref in target.items():
        t = tensors[key]
        if t.dtype != ref.dtype:
            bad.append(f"{key!r} has dtype {str(t.dtype).replace('torch.', '')}, expected {str(ref.dtype).replace('torch.', '')}")
        elif t.shape != ref.shape:
            bad.append(f"{key!r} has shape {list(t.shape)}, expected {list(ref.shape)}")
        elif t.is_floating_point() and not torch.isfinite(t).all():
            bad.append(f"{key!r} holds NaN or infinite values")
    if bad:
        more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
        raise WeightsError(f"{path!r} does not fit {type(model).__name__} ({meta.get('arch')}): {'; '.join(bad[:3])}{more}")
    model.load_state_dict({k: tensors[k] for k in target}, strict=True)
    return meta


def _short(keys: list[str], n: int = 5) -> str:
    shown = ", ".join(repr(k) for k in keys[:n])
    return f"[{shown}{', ...' if len(keys) > n else ''}] ({len(keys)} in all)"


# ------------------------------------------------------------------------------------- INT8


def save_int8(
    model: nn.Module,
    path: PathLike,
    *,
    arch: str,
    backend: str,
    builder_kwargs: Optional[Mapping[str, Any]] = None,
    metadata: Optional[Mapping[str, str]] = None,
) -> str:
    """Write a converted INT8 model to an INT8 file atomically and return its sha256.

    Args:
        model: the converted model (:func:`frostnet.quant.convert` / ``quantize_ptq``).
        path: destination ``.safetensors`` file.
        arch: registry name of the float architecture.
        backend: the engine it was converted for (``x86``, ``fbgemm``, ``qnnpack``).
        builder_kwargs: the builder keyword arguments the float model was built with, at least
            ``num_classes`` when it differs from the builder's default.
        metadata: extra string metadata (dataset, recipe, ...).
    """
    from .quant import _eager

    _eager.check_backend(backend)
    tensors, layout = _eager.int8_state_to_tensors(model)
    kwargs = dict(builder_kwargs or {})
    if "num_classes" not in kwargs and isinstance(getattr(model, "num_classes", None), int):
        kwargs["num_classes"] = model.num_classes
    meta = _base_metadata(INT8_FORMAT, INT8_FORMAT_VERSION, arch, None, kwargs, metadata)
    meta["backend"] = backend
    meta["qscheme"] = _eager.weight_qscheme(model)
    meta["layout"] = json.dumps(layout, sort_keys=True, separators=(",", ":"))
    return _write(tensors, meta, path)


def read_int8(
    path: PathLike,
    *,
    expected_sha256: Optional[str] = None,
    arch: Optional[str] = None,
    backend: Optional[str] = None,
) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, Any]]:
    """Read and check an INT8 file: returns ``(tensors, metadata, layout)``.

    Checks the sha256 (if given) before parsing, then the content hash, format, version,
    architecture, backend (known, and equal to ``backend`` if given) and the layout JSON.
    """
    from .quant import _eager

    path = os.fspath(path)
    tensors, meta = read_safetensors(path, expected_sha256=expected_sha256)
    _check_common(path, meta, INT8_FORMAT, INT8_FORMAT_VERSION, arch)
    if _HASH_KEY not in meta:
        raise WeightsError(f"{path!r} has no {_HASH_KEY} metadata; every frostnet INT8 file carries one")
    file_backend = meta.get("backend")
    if file_backend not in _eager.BACKENDS:
        raise WeightsError(f"{path!r} names unknown backend {file_backend!r}; valid choices: {', '.join(_eager.BACKENDS)}")
    if backend is not None and backend != file_backend:
        raise WeightsError(f"{path!r} holds INT8 weights for backend {file_backend!r}, not {backend!r}; "
                           f"load it with backend={file_backend!r} or use the {backend} file")
    try:
        layout = json.loads(meta.get("layout", ""))
    except json.JSONDecodeError as e:
        raise WeightsError(f"{path!r} has an unreadable layout in its metadata ({e})") from None
    if not isinstance(layout, dict):
        raise WeightsError(f"{path!r} has layout metadata of type {type(layout).__name__}, expected a JSON object")
    _builder_kwargs(path, meta)
    _check_values(path, int8_qparam_problems(tensors, layout))
    return tensors, meta, layout


def load_int8(
    path: PathLike,
    *,
    expected_sha256: Optional[str] = None,
    arch: Optional[str] = None,
    backend: Optional[str] = None,
    build: Optional[Callable[[], nn.Module]] = None,
) -> nn.Module:
    """Rebuild the converted INT8 model stored in ``path`` (no float weights needed).

    The float architecture is built from the file's ``arch`` and ``builder_kwargs`` (or by
    ``build``), fused, converted for the file's backend into a skeleton and filled strictly.
    Sets ``torch.backends.quantized.engine`` to that backend, as :func:`frostnet.quant.convert`
    does: outputs are bitwise those of the saved model on the same engine.

    Args:
        path: the INT8 file.
        expected_sha256: checked before the file is parsed.
        arch: the registry name the file must hold.
        backend: the backend the file must be for (default: whatever it says).
        build: returns the float model to convert (default: ``get_model(arch, **builder_kwargs)``).

    Raises:
        WeightsError: naming the file and what is wrong with it.
    """
    from .quant import _eager

    path = os.fspath(path)
    tensors, meta, layout = read_int8(path, expected_sha256=expected_sha256, arch=arch, backend=backend)
    file_backend = meta["backend"]
    _eager.check_backend(file_backend)
    if build is None:
        from .models import get_model

        kwargs = _builder_kwargs(path, meta)
        try:
            float_model = get_model(meta["arch"], **kwargs)
        except (TypeError, ValueError) as e:
            raise WeightsError(f"{path!r}: cannot build {meta.get('arch')!r} with {kwargs} from its metadata ({e})") from e
    else:
        float_model = build()
    skeleton = _eager.quantized_skeleton(float_model, file_backend)
    try:
        _eager.int8_state_from_tensors(skeleton, tensors, layout)
    except ValueError as e:
        raise WeightsError(f"{path!r} does not fit a {file_backend} INT8 {meta.get('arch')} "
                           f"(builder kwargs {meta.get('builder_kwargs')}): {e}") from e
    return skeleton


def _check_values(path: str, problems: list[str]) -> None:
    # The content hash only proves the file is what its writer signed; anyone can re-sign an
    # edited file, so implausible values are refused here (frostnet.quant.validate).
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise WeightsError(f"{path!r} holds implausible values: {'; '.join(problems[:3])}{more}; the file was "
                           "edited or written by a broken converter: fetch the published file again")


def export_int8(
    model: nn.Module,
    backend: str,
    path: PathLike,
    *,
    arch: str,
    builder_kwargs: Optional[Mapping[str, Any]] = None,
    metadata: Optional[Mapping[str, str]] = None,
) -> tuple[nn.Module, str]:
    """Convert a QAT-trained (or PTQ-calibrated) model and write its INT8 file.

    ``model`` is left untouched (a deep copy is converted).

    Args:
        model: a model prepared by :func:`frostnet.quant.prepare_qat` (and trained) or by
            :func:`frostnet.quant.prepare_ptq` (and calibrated), or an already converted model.
        backend: the engine to convert for; must be the one it was prepared for.
        path: destination ``.safetensors`` file.
        arch: registry name of the float architecture.
        builder_kwargs: builder keyword arguments of the float model (e.g. ``num_classes``).
        metadata: extra string metadata.

    Returns:
        ``(int8_model, sha256)``.

    Example::

        model = frostnet.get_model("frostnet_small_1_0", num_classes=10)
        quant.prepare_qat(model, "x86"); train(model)
        int8, sha = export_int8(model, "x86", "weights/frostnet_small_1_0.fashion_mnist.int8_x86.safetensors",
                                arch="frostnet_small_1_0", builder_kwargs={"num_classes": 10})
    """
    from .quant import _eager

    int8 = model if _eager.is_quantized_model(model) else _eager.convert(copy.deepcopy(model), backend, inplace=True)
    sha = save_int8(int8, path, arch=arch, backend=backend, builder_kwargs=builder_kwargs, metadata=metadata)
    return int8, sha
