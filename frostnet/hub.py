"""Weights of the zoo: the manifest, where files are found, how they are verified and loaded.

This is the layer above :mod:`frostnet.models` that attaches weights (the models know nothing
of files or the Hub). Every published checkpoint has one entry in the manifest that ships inside
the package (``frostnet/weights_manifest.json``), named ``<arch>.<dataset tag>.<fp32 | int8_<backend>>``::

    frostnet.list_weights("frostnet_small_1_0.*")
    model = frostnet.get_model("frostnet_small_1_0", weights="DEFAULT")                  # FP32
    int8 = frostnet.get_model("frostnet_small_1_0", weights="DEFAULT", quantized=True)   # INT8, x86
    model = frostnet.hub.load_weights("frostnet_small_1_0.fashion_mnist.int8_qnnpack")

A file is looked for, in this order (:func:`resolve_file`):

1. an explicit ``path`` (a file, or a directory holding the file);
2. ``$FROSTNET_WEIGHTS_DIR/<file>``, then ``<checkout>/weights/<file>`` when frostnet runs
   from a checkout (or an editable install);
3. the Hugging Face Hub through :func:`huggingface_hub.hf_hub_download` at the entry's pinned
   revision: its cache is used first and ``HF_HUB_OFFLINE=1`` is honoured (cache only);

and otherwise a :class:`WeightsNotFoundError` says where it looked and how to get the file.
The manifest's sha256 is checked before any byte of the file is deserialized.

:func:`get_model` (``frostnet.get_model``) and :func:`entrypoint` (``hubconf.py``) give every
registered model, of every task, ``weights=`` / ``quantized=`` / ``backend=`` through
:func:`build_with_weights`.
"""

from __future__ import annotations

import difflib
import fnmatch
import inspect
import json
import math
import os
import re
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import filelock
import torch
from torch import nn

from .serialization import (
    FP32_FORMAT,
    INT8_FORMAT,
    WeightsError,
    export_int8,
    file_builder_kwargs,
    load_fp32_into,
    load_int8,
    read_metadata,
    sha256_file,
)

__all__ = [
    "DATASETS",
    "FORMATS",
    "HF_ORG",
    "MANIFEST_FORMAT_VERSION",
    "MANIFEST_PATH",
    "WEIGHTS_DIR",
    "HubLocation",
    "ManifestError",
    "WeightsEntry",
    "WeightsError",
    "WeightsNotFoundError",
    "add_manifest_entry",
    "build_with_weights",
    "default_weights",
    "entrypoint",
    "export_int8",
    "get_model",
    "get_weights",
    "list_weights",
    "load_weights",
    "local_weights_dir",
    "local_weights_dirs",
    "machine_paths",
    "make_manifest_entry",
    "portable_recipe",
    "read_manifest",
    "resolve_file",
    "set_hf_revision",
    "validate_entry",
    "validate_manifest",
    "weights_name",
]

PathLike = Union[str, os.PathLike]

MANIFEST_FORMAT_VERSION = 1
#: The manifest ships inside the package (package data), so an installed wheel knows every entry.
MANIFEST_PATH = Path(__file__).resolve().parent / "weights_manifest.json"
#: The checkout this package lives in, or None when it is installed (a wheel in site-packages).
REPO_ROOT: Optional[Path] = (Path(__file__).resolve().parents[1]
                             if (Path(__file__).resolve().parents[1] / "pyproject.toml").is_file() else None)
#: A checkout's weights folder (None for an installed package).
WEIGHTS_DIR: Optional[Path] = REPO_ROOT / "weights" if REPO_ROOT is not None else None
#: Hugging Face organization that default Hub repo ids are created under.
HF_ORG = "frostnet"
FORMATS: tuple[str, ...] = ("fp32", "int8")
_BACKENDS: tuple[str, ...] = ("x86", "fbgemm", "qnnpack")  # == frostnet.quant.BACKENDS (checked in tests)

_NAME_RE = re.compile(r"^(?P<arch>[a-z0-9_]+)\.(?P<tag>[A-Za-z0-9_-]+)\.(?P<fmt>fp32|int8_(?P<backend>[a-z0-9]+))$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_REVISION_RE = re.compile(r"^[0-9a-f]{40}$")
_REPO_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


def _imagenet_categories() -> list[str]:
    from torchvision.models._meta import _IMAGENET_CATEGORIES  # the class names torchvision ships

    return list(_IMAGENET_CATEGORIES)


def _fashion_mnist_categories() -> list[str]:
    from .data import FASHION_MNIST_CLASSES

    return list(FASHION_MNIST_CLASSES)


def _fmnist_norm() -> tuple[list[float], list[float]]:
    from .data import FASHION_MNIST_MEAN, FASHION_MNIST_STD

    return [FASHION_MNIST_MEAN] * 3, [FASHION_MNIST_STD] * 3


def _imagenet_norm() -> tuple[list[float], list[float]]:
    from .data import IMAGENET_MEAN, IMAGENET_STD

    return list(IMAGENET_MEAN), list(IMAGENET_STD)


@dataclass(frozen=True)
class DatasetInfo:
    """Defaults :func:`make_manifest_entry` fills in for a known dataset."""

    task: str
    categories: Callable[[], list[str]]
    input_size: tuple[int, int, int]
    norm: Callable[[], tuple[list[float], list[float]]]
    hf_dataset: Optional[str]  # the dataset's id on the Hugging Face Hub, for model cards


#: Datasets whose categories, input size and normalization are known.
DATASETS: dict[str, DatasetInfo] = {
    # prepare_batch/BatchPipeline: 28x28 gray zero-padded to 32x32, replicated to 3 channels
    "fashion_mnist": DatasetInfo("classification", _fashion_mnist_categories, (3, 32, 32), _fmnist_norm,
                                 "zalando-datasets/fashion_mnist"),
    "imagenet": DatasetInfo("classification", _imagenet_categories, (3, 224, 224), _imagenet_norm, "ILSVRC/imagenet-1k"),
}


class ManifestError(ValueError):
    """``weights_manifest.json`` (or an entry for it) breaks the manifest format."""


class WeightsNotFoundError(WeightsError):
    """A weights file was found in none of the places it is looked for."""


@dataclass(frozen=True)
class HubLocation:
    """Where a file lives on the Hugging Face Hub; ``revision`` is a pinned commit (None: main)."""

    repo_id: str
    filename: str
    revision: Optional[str] = None


@dataclass(frozen=True)
class WeightsEntry:
    """One manifest entry: a weights file and everything a user needs to know about it.

    Attributes mirror the manifest fields (see ``frostnet/weights_manifest.schema.json``).
    """

    name: str
    arch: str
    task: str
    dataset: str
    categories: tuple[str, ...]
    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    format: str
    backend: Optional[str]
    file: str
    sha256: str
    size: int
    num_params: int
    builder_kwargs: Mapping[str, Any]
    metrics: Mapping[str, float]
    metrics_command: Optional[str]
    recipe: Optional[str]
    base: Optional[str]
    license: str
    default: bool
    hf: HubLocation
    notes: Optional[str] = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def quantized(self) -> bool:
        """True for INT8 entries."""
        return self.format == "int8"

    @property
    def num_classes(self) -> int:
        return int(self.builder_kwargs.get("num_classes", len(self.categories)))

    def transforms(self) -> Any:
        """The eval preprocessing these weights expect (torchvision's ``weights.transforms()``):
        a ``torchvision.transforms.v2.Compose`` from a PIL image or image tensor to a normalized
        ``(C, H, W)`` float tensor of ``input_size`` (see :func:`frostnet.transforms.weights_transforms`)."""
        from .transforms import weights_transforms

        return weights_transforms(self.dataset, self.input_size, self.mean, self.std)

    @property
    def meta(self) -> dict[str, Any]:
        """The entry as a plain dict (torchvision's ``weights.meta``), including its name."""
        return {"name": self.name, **self.to_dict()}

    def to_dict(self) -> dict[str, Any]:
        """The JSON form stored in the manifest (without the name, which is the key)."""
        d: dict[str, Any] = {
            "arch": self.arch,
            "task": self.task,
            "dataset": self.dataset,
            "categories": list(self.categories),
            "input_size": list(self.input_size),
            "mean": list(self.mean),
            "std": list(self.std),
            "format": self.format,
            "backend": self.backend,
            "file": self.file,
            "sha256": self.sha256,
            "size": self.size,
            "num_params": self.num_params,
            "builder_kwargs": dict(self.builder_kwargs),
            "metrics": dict(self.metrics),
            "metrics_command": self.metrics_command,
            "recipe": self.recipe,
            "base": self.base,
            "license": self.license,
            "default": self.default,
            "hf": {"repo_id": self.hf.repo_id, "filename": self.hf.filename, "revision": self.hf.revision},
        }
        if self.notes is not None:
            d["notes"] = self.notes
        return d

    @classmethod
    def from_dict(cls, name: str, d: Mapping[str, Any]) -> "WeightsEntry":
        """Build from a manifest entry (validated first; raises :class:`ManifestError`)."""
        problems = validate_entry(name, d)
        if problems:
            raise ManifestError(f"manifest entry {name!r} is invalid: " + "; ".join(problems))
        return cls(
            name=name,
            arch=d["arch"],
            task=d["task"],
            dataset=d["dataset"],
            categories=tuple(d["categories"]),
            input_size=tuple(d["input_size"]),  # type: ignore[arg-type]
            mean=tuple(float(v) for v in d["mean"]),
            std=tuple(float(v) for v in d["std"]),
            format=d["format"],
            backend=d["backend"],
            file=d["file"],
            sha256=d["sha256"],
            size=d["size"],
            num_params=d["num_params"],
            builder_kwargs=dict(d["builder_kwargs"]),
            metrics=dict(d["metrics"]),
            metrics_command=d["metrics_command"],
            recipe=d["recipe"],
            base=d["base"],
            license=d["license"],
            default=d["default"],
            hf=HubLocation(**d["hf"]),
            notes=d.get("notes"),
        )


# ------------------------------------------------------------------------------- validation

_FIELDS: dict[str, tuple[type, ...]] = {
    "arch": (str,), "task": (str,), "dataset": (str,), "categories": (list,), "input_size": (list,),
    "mean": (list,), "std": (list,), "format": (str,), "backend": (str, type(None)), "file": (str,),
    "sha256": (str,), "size": (int,), "num_params": (int,), "builder_kwargs": (dict,), "metrics": (dict,),
    "metrics_command": (str, type(None)), "recipe": (str, type(None)), "base": (str, type(None)),
    "license": (str,), "default": (bool,), "hf": (dict,),
}
_OPTIONAL_FIELDS: dict[str, tuple[type, ...]] = {"notes": (str,)}


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# Flags whose value is where a run writes: recorded as runs/<name>, the README's convention.
_OUTPUT_FLAGS = ("--output-dir",)
# Flags that only steer a resumption (which checkpoint to trust, which changed flags to accept):
# a fresh run of the published command does not need them. The value-taking ones drop their value.
_RESUME_ONLY_FLAGS = {"--override-resume": True, "--allow-unverified-checkpoint": False}
# System data packages (Debian's dataset-fashion-mnist) are the same path on every machine.
_PORTABLE_PREFIXES = ("/usr/share/",)


def portable_recipe(command: str) -> str:
    """``command`` without the paths of the machine that ran it: ``--output-dir /root/x/run``
    becomes ``--output-dir runs/run`` (also ``--output-dir=...``). Other absolute paths are kept
    (:func:`machine_paths` lists them). Flags that only steer a resumption
    (``--override-resume X``, ``--allow-unverified-checkpoint``) are dropped."""
    tokens = command.split(" ")
    out: list[str] = []
    skip_value = False
    for i, tok in enumerate(tokens):
        flag, eq, value = tok.partition("=")
        if skip_value:
            skip_value = False
            continue
        if flag in _RESUME_ONLY_FLAGS:
            skip_value = _RESUME_ONLY_FLAGS[flag] and not eq
            continue
        if eq and flag in _OUTPUT_FLAGS and value.startswith("/"):
            tok = f"{flag}=runs/{Path(value).name}"
        elif i > 0 and tokens[i - 1] in _OUTPUT_FLAGS and tok.startswith("/"):
            tok = f"runs/{Path(tok).name}"
        out.append(tok)
    return " ".join(out)


def machine_paths(command: str) -> list[str]:
    """The absolute paths in ``command`` that only exist on the machine that ran it (system
    data packages under ``/usr/share/`` are the same everywhere). Published recipes have none
    (a test checks the packaged manifest)."""
    paths = [t.partition("=")[2] if "=" in t else t for t in command.split()]
    return [p for p in paths if p.startswith(("/", "~")) and not p.startswith(_PORTABLE_PREFIXES)]


def validate_entry(name: str, entry: Mapping[str, Any], *, check_registry: bool = True) -> list[str]:
    """Problems of one manifest entry (empty list: valid). Cross-entry rules are in
    :func:`validate_manifest`."""
    if not isinstance(entry, Mapping):
        return [f"entry must be a JSON object, got {type(entry).__name__}"]
    problems: list[str] = []
    missing = [k for k in _FIELDS if k not in entry]
    unknown = [k for k in entry if k not in _FIELDS and k not in _OPTIONAL_FIELDS]
    if missing:
        problems.append(f"missing fields {missing}")
    if unknown:
        problems.append(f"unknown fields {unknown} (valid: {', '.join([*_FIELDS, *_OPTIONAL_FIELDS])})")
    for key, types in {**_FIELDS, **_OPTIONAL_FIELDS}.items():
        if key in entry and (not isinstance(entry[key], types) or (bool not in types and isinstance(entry[key], bool))):
            problems.append(f"{key} must be {' or '.join('null' if t is type(None) else t.__name__ for t in types)}, "
                            f"got {entry[key]!r}")
    if problems:
        return problems

    m = _NAME_RE.match(name)
    if not m:
        problems.append(f"name {name!r} must look like '<arch>.<dataset tag>.<fp32|int8_<backend>>'")
    else:
        if m["arch"] != entry["arch"]:
            problems.append(f"name starts with arch {m['arch']!r} but arch is {entry['arch']!r}")
        fmt = "fp32" if m["fmt"] == "fp32" else "int8"
        if fmt != entry["format"] or m["backend"] != entry["backend"]:
            problems.append(f"name ends with {m['fmt']!r} but format is {entry['format']!r} and backend {entry['backend']!r}")
    if check_registry:
        from .models import get_model_task, list_models

        if entry["arch"] not in list_models():
            close = difflib.get_close_matches(entry["arch"], list_models(), n=3)
            problems.append(f"arch {entry['arch']!r} is not a registered model" + (f" (did you mean {close}?)" if close else ""))
        elif entry["task"] != get_model_task(entry["arch"]):
            problems.append(f"task {entry['task']!r} is not the task of {entry['arch']} ({get_model_task(entry['arch'])!r})")
    if entry["task"] not in ("classification", "segmentation", "detection"):
        problems.append(f"task {entry['task']!r} is not one of classification, segmentation, detection")
    if not entry["dataset"]:
        problems.append("dataset is empty")
    cats = entry["categories"]
    if not cats or not all(isinstance(c, str) and c for c in cats):
        problems.append("categories must be a non-empty list of non-empty strings")
    elif len(set(cats)) != len(cats):
        problems.append("categories has duplicates")
    size = entry["input_size"]
    if len(size) != 3 or not all(_is_int(v) and v > 0 for v in size):
        problems.append(f"input_size must be [channels, height, width] positive integers, got {size!r}")
    else:
        for key in ("mean", "std"):
            vals = entry[key]
            if len(vals) != size[0] or not all(_is_number(v) for v in vals):
                problems.append(f"{key} must be {size[0]} numbers (one per input channel), got {vals!r}")
        if all(_is_number(v) for v in entry["std"]) and any(v <= 0 for v in entry["std"]):
            problems.append(f"std must be positive, got {entry['std']!r}")
    if entry["format"] not in FORMATS:
        problems.append(f"format {entry['format']!r} is not one of {', '.join(FORMATS)}")
    elif entry["format"] == "fp32":
        if entry["backend"] is not None:
            problems.append(f"an fp32 entry has backend null, got {entry['backend']!r}")
        if entry["base"] is not None:
            problems.append(f"an fp32 entry has base null, got {entry['base']!r}")
    else:
        if entry["backend"] not in _BACKENDS:
            problems.append(f"an int8 entry needs backend one of {', '.join(_BACKENDS)}, got {entry['backend']!r}")
        if entry["base"] is None:
            problems.append("an int8 entry needs base: the name of the fp32 entry it was converted from")
    if entry["file"] != f"{name}.safetensors":
        problems.append(f"file must be {name + '.safetensors'!r}, got {entry['file']!r}")
    if not _SHA_RE.match(entry["sha256"]):
        problems.append(f"sha256 must be 64 lowercase hex digits, got {entry['sha256']!r}")
    if entry["size"] <= 0:
        problems.append(f"size must be a positive number of bytes, got {entry['size']!r}")
    if entry["num_params"] <= 0:
        problems.append(f"num_params must be positive, got {entry['num_params']!r}")
    nc = entry["builder_kwargs"].get("num_classes")
    if nc is not None and (not _is_int(nc) or nc != len(cats)):
        problems.append(f"builder_kwargs num_classes={nc!r} does not match the {len(cats)} categories")
    bad_metrics = {k: v for k, v in entry["metrics"].items() if not _is_number(v)}
    if bad_metrics:
        problems.append(f"metrics must map names to finite numbers, got {bad_metrics!r}")
    if entry["metrics"] and not entry["metrics_command"]:
        problems.append("metrics need metrics_command: the exact command that measured them")
    if not entry["license"]:
        problems.append("license is empty")
    hf = entry["hf"]
    if set(hf) != {"repo_id", "filename", "revision"}:
        problems.append(f"hf must have exactly repo_id, filename, revision; got {sorted(hf)}")
    else:
        rid = hf["repo_id"]
        if not isinstance(rid, str) or not _REPO_ID_RE.match(rid) or "--" in rid or ".." in rid:
            problems.append(f"hf.repo_id {rid!r} is not a valid '<org>/<name>' Hub repo id")
        if not isinstance(hf["filename"], str) or not hf["filename"] or hf["filename"].startswith("/") or ".." in hf["filename"]:
            problems.append(f"hf.filename {hf['filename']!r} must be a relative path in the repo")
        if hf["revision"] is not None and (not isinstance(hf["revision"], str) or not _REVISION_RE.match(hf["revision"])):
            problems.append(f"hf.revision must be null (not published yet) or a 40-hex commit id, got {hf['revision']!r}")
    return problems


def validate_manifest(data: Any, *, check_registry: bool = True) -> list[str]:
    """Every problem of a parsed manifest (empty list: valid), including cross-entry rules:
    an int8 entry's ``base`` is an fp32 entry of the same arch and dataset, and there is at most
    one ``default`` per (arch, format, backend)."""
    if not isinstance(data, Mapping):
        return [f"the manifest must be a JSON object, got {type(data).__name__}"]
    problems = []
    unknown = [k for k in data if k not in ("format_version", "weights", "$comment")]
    if unknown:
        problems.append(f"unknown top-level keys {unknown} (valid: format_version, weights, $comment)")
    if data.get("format_version") != MANIFEST_FORMAT_VERSION:
        problems.append(f"format_version must be {MANIFEST_FORMAT_VERSION}, got {data.get('format_version')!r}")
    weights = data.get("weights")
    if not isinstance(weights, Mapping):
        return problems + [f"weights must be a JSON object of name -> entry, got {type(weights).__name__}"]
    defaults: dict[tuple, str] = {}
    for name, entry in weights.items():
        entry_problems = validate_entry(name, entry, check_registry=check_registry)
        problems += [f"{name}: {p}" for p in entry_problems]
        if entry_problems:
            continue
        if entry["base"] is not None:
            base = weights.get(entry["base"])
            if not isinstance(base, Mapping):
                problems.append(f"{name}: base {entry['base']!r} is not an entry of the manifest")
            elif (base.get("format"), base.get("arch"), base.get("dataset")) != ("fp32", entry["arch"], entry["dataset"]):
                problems.append(f"{name}: base {entry['base']!r} must be an fp32 entry of {entry['arch']} on {entry['dataset']}")
        if entry["default"]:
            key = (entry["arch"], entry["format"], entry["backend"])
            if key in defaults:
                problems.append(f"{name}: {defaults[key]} is already the default for {key}")
            defaults[key] = name
    return problems


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        raise ManifestError(f"duplicate keys {dup}")
    return dict(pairs)


def _manifest_path(path: Optional[PathLike]) -> Path:
    if path is not None:
        return Path(path)
    return Path(os.environ.get("FROSTNET_MANIFEST", MANIFEST_PATH))


def _load_json(path: Path) -> Any:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ManifestError(f"weights manifest {str(path)!r} does not exist (set FROSTNET_MANIFEST or pass manifest=)") from None
    try:
        return json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except ManifestError as e:
        raise ManifestError(f"{str(path)!r}: {e}") from None
    except json.JSONDecodeError as e:
        raise ManifestError(f"{str(path)!r} is not valid JSON ({e})") from None


def read_manifest(path: Optional[PathLike] = None) -> dict[str, WeightsEntry]:
    """Read and validate a manifest (default: ``$FROSTNET_MANIFEST`` or the packaged
    ``weights_manifest.json``); returns name -> :class:`WeightsEntry`.

    Raises:
        ManifestError: listing every problem found.
    """
    p = _manifest_path(path)
    data = _load_json(p)
    problems = validate_manifest(data)
    if problems:
        raise ManifestError(f"{str(p)!r} is invalid:\n  " + "\n  ".join(problems))
    return {name: WeightsEntry.from_dict(name, e) for name, e in data["weights"].items()}


Manifest = Union[None, PathLike, Mapping[str, WeightsEntry]]


def _entries(manifest: Manifest) -> Mapping[str, WeightsEntry]:
    if isinstance(manifest, Mapping):
        return manifest
    return read_manifest(manifest)


# ---------------------------------------------------------------------------------- queries


def list_weights(
    pattern: Optional[str] = None,
    *,
    arch: Optional[str] = None,
    format: Optional[str] = None,
    backend: Optional[str] = None,
    manifest: Manifest = None,
) -> list[str]:
    """Sorted names of manifest entries, filtered by a shell-style ``pattern`` on the name,
    ``arch``, ``format`` (fp32/int8) and/or ``backend``.

    Example::

        frostnet.list_weights("frostnet_small_*.int8_*")
    """
    if format is not None and format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; valid choices: {', '.join(FORMATS)}")
    names = []
    for name, e in _entries(manifest).items():
        if pattern and not fnmatch.fnmatchcase(name, pattern):
            continue
        if (arch and e.arch != arch) or (format and e.format != format) or (backend and e.backend != backend):
            continue
        names.append(name)
    return sorted(names)


def get_weights(name: str, *, manifest: Manifest = None) -> WeightsEntry:
    """The manifest entry ``name``; unknown names raise a ValueError with close matches."""
    entries = _entries(manifest)
    try:
        return entries[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(entries), n=5, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown weights {name!r}{hint} (frostnet.list_weights() lists all {len(entries)} entries)") from None


def default_weights(arch: str, *, quantized: bool = False, backend: Optional[str] = None, manifest: Manifest = None) -> WeightsEntry:
    """The entry marked ``default`` for ``arch``: FP32, or INT8 for ``backend`` (default x86)."""
    entries = _entries(manifest)
    fmt, be = ("int8", backend or "x86") if quantized else ("fp32", None)
    for e in entries.values():
        if e.arch == arch and e.default and e.format == fmt and e.backend == be:
            return e
    available = sorted(n for n, e in entries.items() if e.arch == arch)
    what = f"INT8 ({be})" if quantized else "FP32"
    raise ValueError(
        f"no default {what} weights exist for {arch!r}"
        + (f"; its weights are: {', '.join(available)} (pass one as weights=)" if available else "")
        + ". Use weights=None for random initialization"
        + (" (with quantized=True: a random INT8 model)" if quantized else "")
    )


def weights_name(arch: str, tag: str, format: str, backend: Optional[str] = None) -> str:
    """The manifest name ``<arch>.<tag>.<fp32|int8_<backend>>`` (the file adds ``.safetensors``)."""
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; valid choices: {', '.join(FORMATS)}")
    if format == "int8" and backend not in _BACKENDS:
        raise ValueError(f"int8 weights need a backend; valid choices: {', '.join(_BACKENDS)}")
    name = f"{arch}.{tag}.{'fp32' if format == 'fp32' else 'int8_' + str(backend)}"
    if not _NAME_RE.match(name):
        raise ValueError(f"{name!r} is not a valid weights name (tag may use letters, digits, '_' and '-')")
    return name


# ------------------------------------------------------------------------------- resolution


def local_weights_dirs() -> list[Path]:
    """The local weights folders, in lookup order: ``$FROSTNET_WEIGHTS_DIR`` (if set), then the
    checkout's ``weights/`` (when frostnet runs from a checkout or an editable install)."""
    dirs = [Path(os.environ["FROSTNET_WEIGHTS_DIR"])] if os.environ.get("FROSTNET_WEIGHTS_DIR") else []
    if WEIGHTS_DIR is not None and WEIGHTS_DIR not in dirs:
        dirs.append(WEIGHTS_DIR)
    return dirs


def local_weights_dir() -> Path:
    """Where new weights files go: ``$FROSTNET_WEIGHTS_DIR``, else the checkout's ``weights/``.

    Raises:
        WeightsNotFoundError: neither is available (an installed package without the variable).
    """
    dirs = local_weights_dirs()
    if not dirs:
        raise WeightsNotFoundError("no local weights folder: set FROSTNET_WEIGHTS_DIR=<folder> "
                                   "(frostnet is installed, not run from a checkout with a weights/ folder)")
    return dirs[0]


def _env_offline() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:  # pragma: no cover - very old huggingface_hub
        return False


def resolve_file(
    entry: WeightsEntry,
    *,
    path: Optional[PathLike] = None,
    weights_dir: Optional[PathLike] = None,
    cache_dir: Optional[PathLike] = None,
    local_files_only: Optional[bool] = None,
) -> Path:
    """Find the file of ``entry`` (explicit path -> weights dir -> Hugging Face Hub).

    This does not verify the file; the loaders check the sha256 before parsing it.

    Args:
        entry: the manifest entry.
        path: an explicit file, or a directory holding ``entry.file``.
        weights_dir: the local weights folder (default: ``$FROSTNET_WEIGHTS_DIR``, then the
            checkout's ``weights/``; see :func:`local_weights_dirs`).
        cache_dir: the Hugging Face Hub cache (default: huggingface_hub's, i.e. ``HF_HUB_CACHE``
            or ``HF_HOME/hub``).
        local_files_only: only look in the Hub cache, never on the network (default: True when
            ``HF_HUB_OFFLINE`` is set).

    Raises:
        WeightsNotFoundError: listing every place looked at and how to get the file.
    """
    looked: list[str] = []
    if path is not None:
        p = Path(path)
        candidate = p / entry.file if p.is_dir() else p
        if candidate.is_file():
            return candidate
        looked.append(f"the explicit path {str(candidate)!r} (no such file)")
    wdirs = [Path(weights_dir)] if weights_dir is not None else local_weights_dirs()
    for wdir in wdirs:
        local = wdir / entry.file
        if local.is_file():
            return local
        looked.append(f"the weights folder {str(local)!r} (no such file)")
    if not wdirs:
        looked.append("no local weights folder (FROSTNET_WEIGHTS_DIR is not set and frostnet is not a checkout)")
    offline = _env_offline() if local_files_only is None else local_files_only
    revision = entry.hf.revision or "main"
    where = f"Hugging Face Hub {entry.hf.repo_id}/{entry.hf.filename} at revision {revision}"
    try:
        from huggingface_hub import hf_hub_download

        from . import __version__

        return Path(hf_hub_download(
            entry.hf.repo_id,
            entry.hf.filename,
            revision=revision,
            cache_dir=os.fspath(cache_dir) if cache_dir is not None else None,
            local_files_only=offline,
            library_name="frostnet",
            library_version=__version__,
        ))
    except Exception as e:  # network, auth, missing repo/file/revision, offline cache miss
        mode = "cache only (offline)" if offline else "cache, then network"
        looked.append(f"the {where}, {mode}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    target = wdirs[0] if wdirs else Path("<folder>")
    how = [
        f"hf download {entry.hf.repo_id} {entry.hf.filename} --revision {revision} --local-dir {target}"
        + ("" if weights_dir is not None or os.environ.get("FROSTNET_WEIGHTS_DIR") else
           f" and set FROSTNET_WEIGHTS_DIR={target}" if not wdirs else ""),
        "or put the file in a folder and set FROSTNET_WEIGHTS_DIR=<that folder>",
        "or pass path=<the file> if you have it elsewhere",
    ]
    if entry.recipe:
        how.append(f"or reproduce it: {entry.recipe}")
    raise WeightsNotFoundError(
        f"weights {entry.name!r} (file {entry.file!r}, sha256 {entry.sha256}) not found. Looked in:\n  "
        + "\n  ".join(f"{i}. {w}" for i, w in enumerate(looked, 1))
        + "\nTo get the file: " + "; ".join(how)
    )


# ---------------------------------------------------------------------------------- loading


def _random_int8(model: nn.Module, backend: str, in_channels: int) -> nn.Module:
    """Quick PTQ of a (randomly initialized) float model with one fixed random batch."""
    from . import quant

    g = torch.Generator().manual_seed(0)
    batch = torch.randn(2, in_channels, 64, 64, generator=g)
    return quant.quantize_ptq(model.eval(), [batch], backend)


def _builder_params(build: Callable[..., nn.Module]) -> dict[str, inspect.Parameter]:
    """The keyword arguments ``build`` takes (for error messages and stored-kwargs checks)."""
    return dict(inspect.signature(build).parameters)


def _merge_kwargs(kwargs: dict[str, Any], stored: Mapping[str, Any], source: str, categories: Optional[int],
                  params: Mapping[str, inspect.Parameter]) -> tuple[dict[str, Any], Optional[int]]:
    """The builder arguments for loading weights: the file's, overridden by none of the user's.

    Returns ``(merged, new_num_classes)``: a ``num_classes`` that differs from the weights is not
    an error but a new head (timm's behaviour); ``merged`` builds the weights' architecture.
    """
    merged = {k: v for k, v in kwargs.items() if v is not None}
    new_classes: Optional[int] = None
    for key, value in stored.items():
        if key not in params:
            raise ValueError(f"weights {source} were built with {key}={value!r}, which this builder does not take")
        given = kwargs.get(key)
        if given is not None and given != value:
            if key != "num_classes":
                raise ValueError(f"{key}={given!r} conflicts with weights {source}, built with {key}={value!r}; "
                                 f"pass {key}={value!r} or omit it")
            new_classes = given
        merged[key] = value
    if "num_classes" not in merged and categories is not None and "num_classes" in params:
        merged["num_classes"] = categories
    given = kwargs.get("num_classes")
    if given is not None and merged.get("num_classes") not in (None, given):
        new_classes = given
    return merged, new_classes


def _is_path(weights: object) -> bool:
    if isinstance(weights, os.PathLike):
        return True
    return isinstance(weights, str) and (weights.endswith(".safetensors") or os.sep in weights)


def _check_kwargs(arch: str, kwargs: Mapping[str, Any], params: Mapping[str, inspect.Parameter]) -> None:
    from .models._registry import check_foreign_kwargs

    check_foreign_kwargs(dict(kwargs))
    unknown = sorted(k for k in kwargs if k not in params)
    if unknown:
        valid = ["weights", "quantized", "backend", *params]
        raise TypeError(f"{arch} got unexpected keyword arguments {unknown}; valid: {', '.join(valid)}")


def _new_head(model: nn.Module, build: Callable[[], nn.Module], source: str, num_classes: int) -> nn.Module:
    """``build()`` (the same architecture with ``num_classes`` outputs) holding every tensor of
    ``model`` whose shape still fits: all but the classifier head, which keeps its fresh init."""
    target = build()
    loaded, state = model.state_dict(), target.state_dict()
    reset = sorted(k for k, v in state.items() if k not in loaded or loaded[k].shape != v.shape)
    target.load_state_dict({k: (state[k] if k in reset else loaded[k]) for k in state}, strict=True)
    warnings.warn(f"loaded weights {source} except the classifier head for num_classes={num_classes} "
                  f"(randomly initialized: {', '.join(reset)}); fine-tune before use", UserWarning, stacklevel=4)
    target.reset_keys = reset  # type: ignore[assignment]
    return target


def build_with_weights(
    arch: str,
    build: Callable[..., nn.Module],
    *,
    weights: Union[None, str, PathLike, WeightsEntry],
    quantized: bool = False,
    backend: Optional[str] = None,
    manifest: Manifest = None,
    path: Optional[PathLike] = None,
    weights_dir: Optional[PathLike] = None,
    cache_dir: Optional[PathLike] = None,
    local_files_only: Optional[bool] = None,
    **kwargs: Any,
) -> nn.Module:
    """Build ``arch`` with ``build`` (an architecture builder), load weights, quantize: the one
    place that attaches weights to a model of any task (timm's ``_builder.py``).

    Args:
        arch: registry name of the model.
        build: builds the float model from ``**kwargs`` (its signature says which it takes).
        weights: None (random init), ``"DEFAULT"`` (the manifest default for ``arch``: FP32, or
            INT8 for ``backend`` if ``quantized``), a manifest name, or a ``.safetensors`` path.
        quantized: return a converted INT8 model. With ``weights=None`` the random float model
            is quantized by a quick PTQ on one fixed random batch (as torchvision does): useful
            for benchmarks and shape checks, not for predictions. With weights, they must be an
            INT8 entry (FP32 weights need a calibration set: use ``tools/convert.py``).
        backend: INT8 engine (x86, fbgemm, qnnpack), only with ``quantized=True``; default: the
            backend of the INT8 weights, else ``x86``. The global quantized engine is set to it.
        manifest: a manifest path or parsed entries (default: the packaged manifest).
        path, weights_dir, cache_dir, local_files_only: see :func:`resolve_file`.
        **kwargs: builder arguments; None means "from the weights" (or the builder's default).
            A ``num_classes`` other than the FP32 weights' loads all but the classifier head
            and warns (timm's behaviour); other conflicts raise.

    Raises:
        ValueError: conflicting arguments (naming both values) or unknown weights/backend.
        TypeError: an argument the builder does not take (naming the valid ones).
        WeightsError: the file is missing, corrupted or does not fit.
    """
    from . import quant

    if not isinstance(quantized, bool):
        raise TypeError(f"quantized must be True or False, got {quantized!r}")
    if backend is not None:
        quant.check_backend(backend)
        if not quantized:
            raise ValueError(f"backend={backend!r} only applies with quantized=True (it picks the INT8 engine); "
                             "pass quantized=True, or drop backend")
    params = _builder_params(build)
    _check_kwargs(arch, kwargs, params)
    features_only = bool(kwargs.get("features_only"))
    if features_only and quantized and weights is not None:
        raise ValueError("INT8 weights hold a whole network and cannot be loaded into a features_only model; "
                         "load FP32 weights with features_only=True and quantize the backbone yourself")
    if weights is None:
        model = build(**{k: v for k, v in kwargs.items() if v is not None})
        if quantized:
            model = _random_int8(model, backend or "x86", int(kwargs.get("in_channels") or getattr(model, "in_channels", 3)))
        return model

    file_path: Optional[Path] = None
    if isinstance(weights, WeightsEntry):
        entry: Optional[WeightsEntry] = weights
    elif _is_path(weights):
        entry, file_path = None, Path(weights)  # type: ignore[arg-type]
    elif not isinstance(weights, str):
        raise TypeError(f"weights must be None, 'DEFAULT', a manifest name or a .safetensors path, got {weights!r}")
    elif weights == "DEFAULT":
        entry = default_weights(arch, quantized=quantized, backend=backend, manifest=manifest)
    else:
        entry = get_weights(weights, manifest=manifest)

    if entry is not None:
        source = repr(entry.name)
        fmt, file_backend, file_arch, stored = entry.format, entry.backend, entry.arch, dict(entry.builder_kwargs)
        categories: Optional[int] = len(entry.categories)
    else:
        assert file_path is not None
        source = repr(str(file_path))
        meta = read_metadata(file_path)
        fmt = {FP32_FORMAT: "fp32", INT8_FORMAT: "int8"}.get(meta.get("format", ""))
        if fmt is None:
            raise WeightsError(f"{str(file_path)!r} is not a frostnet weights file (format {meta.get('format')!r})")
        file_backend, file_arch = meta.get("backend"), meta.get("arch")
        stored, categories = file_builder_kwargs(file_path, meta), None

    if file_arch != arch:
        raise ValueError(f"weights {source} are for {file_arch!r}, not {arch!r}; build {file_arch!r} or pick weights "
                         f"from frostnet.list_weights('{arch}.*')")
    if fmt == "int8" and not quantized:
        raise ValueError(f"weights {source} are INT8 ({file_backend}); pass quantized=True to load them")
    if fmt == "fp32" and quantized:
        derived = [] if entry is None else [n for n, e in _entries(manifest).items() if e.base == entry.name]
        raise ValueError(
            f"weights {source} are FP32 but quantized=True needs INT8 weights"
            + (f": use one of {', '.join(sorted(derived))}" if derived else "")
            + "; or convert them with tools/convert.py (PTQ with a calibration set), or load them with "
            "quantized=False and quantize the model yourself"
        )
    if fmt == "int8" and backend is not None and backend != file_backend:
        others = [] if entry is None else list_weights(arch=arch, format="int8", backend=backend, manifest=manifest)
        raise ValueError(f"backend={backend!r} conflicts with weights {source}, converted for {file_backend!r}"
                         + (f"; the {backend} weights are {', '.join(others)}" if others else ""))

    if features_only:
        stored.pop("num_classes", None)
        kwargs.pop("num_classes", None)
        categories = None
    merged, new_classes = _merge_kwargs(kwargs, stored, source, categories, params)
    if new_classes is not None and fmt == "int8":
        raise ValueError(
            f"num_classes={new_classes} conflicts with the {merged['num_classes']} classes of INT8 weights {source}: "
            f"an INT8 head cannot be retrained; omit num_classes, or load the FP32 weights "
            f"(quantized=False) to fine-tune a {new_classes}-class head")

    def make() -> nn.Module:
        return build(**merged)

    sha = None
    if entry is not None:
        file_path = resolve_file(entry, path=path, weights_dir=weights_dir, cache_dir=cache_dir,
                                 local_files_only=local_files_only)
        sha = entry.sha256
    assert file_path is not None
    if fmt == "fp32":
        model = make()
        meta = load_fp32_into(model, file_path, expected_sha256=sha, arch=arch, allow_unexpected=features_only)
        if new_classes is not None:
            model = _new_head(model, lambda: build(**{**merged, "num_classes": new_classes}), source, new_classes)
    else:
        model = load_int8(file_path, expected_sha256=sha, arch=arch, backend=file_backend, build=make)
        meta = read_metadata(file_path) if entry is None else {}
    weights_meta = entry.meta if entry is not None else {"file": str(file_path), **{
        k: v for k, v in meta.items() if k != "layout"}}
    if new_classes is not None:  # the categories and metrics belong to the old head
        weights_meta = {**weights_meta, "categories": None, "metrics": {}, "num_classes": new_classes}
    model.weights_meta = weights_meta
    return model


def get_model(
    name: str,
    *,
    weights: Union[None, str, PathLike, WeightsEntry] = None,
    quantized: bool = False,
    backend: Optional[str] = None,
    **kwargs: Any,
) -> nn.Module:
    """Build the registered model ``name``, with weights if asked: every task, one way.

    Args:
        name: a name from :func:`frostnet.list_models`.
        weights: None (random init), ``"DEFAULT"``, a name from :func:`list_weights` or a
            ``.safetensors`` path.
        quantized: return the converted INT8 model (INT8 weights, or a quick PTQ of random ones).
        backend: INT8 engine (x86, fbgemm, qnnpack); only with ``quantized=True``.
        **kwargs: the architecture's arguments (``num_classes``, ``in_channels``,
            ``features_only``, ...); see the builder's docstring.

    Example::

        model = frostnet.get_model("frostnet_small_1_0", weights="DEFAULT", quantized=True)
        seg = frostnet.get_model("lraspp_mobilenet_v3_large_re", num_classes=19)
    """
    from .models import get_model_builder

    return build_with_weights(name, get_model_builder(name), weights=weights, quantized=quantized, backend=backend,
                              **kwargs)


_ENTRYPOINT_DOC = """

    Weights (added by ``frostnet.get_model``, as for every frostnet model):
        weights: None (random initialization), ``"DEFAULT"`` (the default weights of this
            model: FP32, or INT8 for ``backend`` with ``quantized=True``), a name from
            ``frostnet.list_weights("{name}.*")`` or a ``.safetensors`` path.
        quantized: return a converted INT8 model.
        backend: INT8 engine, ``x86``, ``fbgemm`` or ``qnnpack`` (only with ``quantized=True``).
"""


def entrypoint(name: str) -> Callable[..., nn.Module]:
    """A ``torch.hub`` entrypoint for model ``name``: :func:`get_model` with ``name`` bound and
    the builder's docstring (what ``torch.hub.help`` shows) plus the weights arguments."""
    from .models import get_model_builder

    builder = get_model_builder(name)

    def load(*, weights: Union[None, str, PathLike] = None, quantized: bool = False, backend: Optional[str] = None,
             **kwargs: Any) -> nn.Module:
        return get_model(name, weights=weights, quantized=quantized, backend=backend, **kwargs)

    load.__name__ = load.__qualname__ = name
    load.__doc__ = (builder.__doc__ or name).rstrip() + _ENTRYPOINT_DOC.format(name=name)
    return load


def load_weights(
    weights: Union[str, PathLike, WeightsEntry],
    *,
    manifest: Manifest = None,
    path: Optional[PathLike] = None,
    weights_dir: Optional[PathLike] = None,
    cache_dir: Optional[PathLike] = None,
    local_files_only: Optional[bool] = None,
) -> nn.Module:
    """The model a manifest entry (or a weights file) holds: float for FP32, converted for INT8.

    The architecture and its builder arguments come from the entry (or the file's metadata).

    Example::

        int8 = frostnet.hub.load_weights("frostnet_small_1_0.fashion_mnist.int8_x86")
        model = frostnet.hub.load_weights("weights/my_run.fp32.safetensors")
    """
    from .models import get_model_builder

    if isinstance(weights, WeightsEntry):
        entry: Optional[WeightsEntry] = weights
    elif _is_path(weights):
        entry = None
    else:
        entry = get_weights(str(weights), manifest=manifest)
    if entry is not None:
        arch, quantized = entry.arch, entry.quantized
    else:
        meta = read_metadata(weights)  # type: ignore[arg-type]
        if meta.get("format") not in (FP32_FORMAT, INT8_FORMAT):
            raise WeightsError(f"{os.fspath(weights)!r} is not a frostnet weights file (format {meta.get('format')!r})")
        arch, quantized = meta.get("arch", ""), meta["format"] == INT8_FORMAT
    try:
        builder = get_model_builder(arch)
    except ValueError as e:
        raise WeightsError(f"weights {getattr(entry, 'name', weights)!r} name an unknown architecture: {e}") from None
    # everything comes from the weights (backend too: the file's)
    return build_with_weights(arch, builder, weights=entry if entry is not None else weights, quantized=quantized,
                              manifest=manifest, path=path, weights_dir=weights_dir, cache_dir=cache_dir,
                              local_files_only=local_files_only)


# -------------------------------------------------------------------------- writing entries


def make_manifest_entry(
    path: PathLike,
    *,
    dataset: str,
    tag: Optional[str] = None,
    task: Optional[str] = None,
    categories: Optional[Sequence[str]] = None,
    input_size: Optional[Sequence[int]] = None,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    metrics: Optional[Mapping[str, float]] = None,
    metrics_command: Optional[str] = None,
    recipe: Optional[str] = None,
    base: Optional[str] = None,
    license: str = "MIT",
    default: bool = False,
    hf_repo_id: Optional[str] = None,
    hf_revision: Optional[str] = None,
    notes: Optional[str] = None,
) -> tuple[str, dict[str, Any]]:
    """A manifest entry for a weights file written by ``save_fp32`` / ``save_int8``.

    Format, arch, backend and builder arguments are read from the file; sha256, size and the
    number of parameters are computed; categories, input size and mean/std default to those of
    a known ``dataset`` (:data:`DATASETS`).

    Args:
        path: the file; it must be named ``<name>.safetensors`` (see :func:`weights_name`).
        dataset: dataset the weights were trained on (``fashion_mnist``, ``imagenet``, ...).
        tag: the middle part of the name (default: ``dataset``), e.g. ``fashion_mnist_statassist``.
        metrics: measured metrics, e.g. ``{"acc@1": 93.2}``; needs ``metrics_command``.
        metrics_command: the exact command that measured them.
        recipe: the exact command that produced the file (``--output-dir`` becomes
            ``runs/<name>``: see :func:`portable_recipe`).
        base: for INT8 files, the name of the FP32 entry they were converted from.
        default: make it the default for its (arch, format, backend).
        hf_repo_id: Hub repo (default ``<HF_ORG>/<arch>.<tag>``, plus ``.int8`` for INT8 files).
        hf_revision: pinned commit (None until published; ``tools/publish.py`` pins it).

    Returns:
        ``(name, entry)``, ready for :func:`add_manifest_entry`.

    Example::

        name, entry = make_manifest_entry("weights/frostnet_small_1_0.fashion_mnist.fp32.safetensors",
                                          dataset="fashion_mnist", recipe="python tools/train.py ...",
                                          metrics={"acc@1": 93.1}, metrics_command="python tools/evaluate.py ...")
        add_manifest_entry(name, entry)
    """
    from .models import get_model, get_model_task

    path = Path(path)
    meta = read_metadata(path)
    fmt = {FP32_FORMAT: "fp32", INT8_FORMAT: "int8"}.get(meta.get("format", ""))
    if fmt is None:
        raise WeightsError(f"{str(path)!r} is not a frostnet weights file (format {meta.get('format')!r})")
    arch = meta.get("arch", "")
    backend = meta.get("backend") if fmt == "int8" else None
    kwargs = file_builder_kwargs(path, meta)
    name = weights_name(arch, tag or dataset, fmt, backend)
    if path.name != f"{name}.safetensors":
        raise ValueError(f"{str(path)!r} must be named {name + '.safetensors'!r} for manifest entry {name!r}")
    info = DATASETS.get(dataset)
    if info is None and None in (categories, input_size, mean, std):
        raise ValueError(f"unknown dataset {dataset!r}: pass categories, input_size, mean and std "
                         f"(known datasets: {', '.join(DATASETS)})")
    if categories is None:
        categories = info.categories()  # type: ignore[union-attr]
    if input_size is None:
        input_size = info.input_size  # type: ignore[union-attr]
    if mean is None or std is None:
        dmean, dstd = info.norm()  # type: ignore[union-attr]
        mean = dmean if mean is None else mean
        std = dstd if std is None else std
    if fmt == "int8" and base is None:
        base = weights_name(arch, tag or dataset, "fp32")
    model = get_model(arch, **kwargs)
    entry: dict[str, Any] = {
        "arch": arch,
        "task": task or get_model_task(arch),
        "dataset": dataset,
        "categories": list(categories),
        "input_size": [int(v) for v in input_size],
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
        "format": fmt,
        "backend": backend,
        "file": path.name,
        "sha256": sha256_file(path),
        "size": path.stat().st_size,
        "num_params": sum(p.numel() for p in model.parameters()),
        "builder_kwargs": kwargs,
        "metrics": {k: float(v) for k, v in (metrics or {}).items()},
        "metrics_command": metrics_command,
        "recipe": portable_recipe(recipe) if recipe is not None else None,
        "base": base,
        "license": license,
        "default": default,
        "hf": {
            "repo_id": hf_repo_id or f"{HF_ORG}/{arch}.{tag or dataset}{'.int8' if fmt == 'int8' else ''}",
            "filename": path.name,
            "revision": hf_revision,
        },
    }
    if notes is not None:
        entry["notes"] = notes
    problems = validate_entry(name, entry)
    if problems:
        raise ManifestError(f"entry {name!r} for {str(path)!r} is invalid: " + "; ".join(problems))
    return name, entry


def add_manifest_entry(
    name: str,
    entry: Mapping[str, Any],
    *,
    manifest_path: Optional[PathLike] = None,
    replace: bool = False,
) -> Path:
    """Add (or with ``replace=True`` overwrite) an entry and rewrite the manifest atomically.

    A missing manifest is created. The whole manifest is validated before it is written.
    If ``entry`` is ``default``, other entries that were default for the same (arch, format,
    backend) stop being default.

    Returns:
        The manifest path.
    """
    p = _manifest_path(manifest_path)
    with _manifest_lock(p):
        return _add_manifest_entry(p, name, entry, replace)


def _manifest_lock(p: Path) -> filelock.FileLock:
    """The lock held across every read-modify-write of the manifest at ``p``: without it,
    concurrent writers (three ``add_weights`` runs) each wrote back what they had read and the
    others' entries were lost."""
    return filelock.FileLock(p.with_name(p.name + ".lock"), timeout=600)


def _write_manifest(p: Path, data: Mapping[str, Any]) -> None:
    tmp = p.with_name(f"{p.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, p)
    finally:
        tmp.unlink(missing_ok=True)


def _add_manifest_entry(p: Path, name: str, entry: Mapping[str, Any], replace: bool) -> Path:
    data = _load_json(p) if p.exists() else {"format_version": MANIFEST_FORMAT_VERSION, "weights": {}}
    weights = dict(data.get("weights", {}))
    if name in weights and not replace:
        raise ValueError(f"{str(p)!r} already has an entry {name!r}; pass replace=True to overwrite it")
    if entry.get("default"):
        for other_name, other in weights.items():
            if (other_name != name and isinstance(other, dict) and other.get("default")
                    and (other.get("arch"), other.get("format"), other.get("backend"))
                    == (entry.get("arch"), entry.get("format"), entry.get("backend"))):
                weights[other_name] = {**other, "default": False}
    weights[name] = dict(entry)
    data = {**data, "weights": dict(sorted(weights.items()))}
    problems = validate_manifest(data)
    if problems:
        raise ManifestError(f"adding {name!r} would make {str(p)!r} invalid:\n  " + "\n  ".join(problems))
    _write_manifest(p, data)
    return p


def set_hf_revision(names: Iterable[str], revision: str, *, manifest_path: Optional[PathLike] = None) -> None:
    """Pin the Hub revision (a 40-hex commit id) of the entries ``names``; used after publishing."""
    p = _manifest_path(manifest_path)
    with _manifest_lock(p):
        data = _load_json(p)
        for name in names:
            if name not in data["weights"]:
                raise ValueError(f"{str(p)!r} has no entry {name!r}")
            data["weights"][name]["hf"]["revision"] = revision
        problems = validate_manifest(data)
        if problems:
            raise ManifestError(f"{str(p)!r} would become invalid:\n  " + "\n  ".join(problems))
        _write_manifest(p, data)
