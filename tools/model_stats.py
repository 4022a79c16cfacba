"""Parameters and MACs of registered models, beside the papers' and the specs' figures.

    python tools/model_stats.py --models 'lraspp_mobilenet_v3_*' --size 1024x2048 --num-classes 20
    python tools/model_stats.py --models 'espnet*' --size 768 --num-classes 20
    python tools/model_stats.py --models 'frostnet_*_1_0' --size 224
    python tools/model_stats.py --models 'ssdlite_*' --models 'frostnet_small_*' --size 300

Prints a markdown table. MACs = FLOPs / 2 as ``torch.utils.flop_counter`` counts them for one
image (convolutions and matrix products; pooling, interpolation and elementwise ops are free),
the convention of the specs. Models are built and run on the meta device, so a 1024x2048 input
costs neither memory nor time; a model whose forward cannot run there is measured on the CPU.

Each reference figure is compared only where it is comparable: parameters at the same number of
classes, MACs at the same input size as well. Keep :data:`REFERENCES` in sync with
``shared/specs`` when adding a model family.
"""

from __future__ import annotations

import argparse
import fnmatch
import inspect
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import frostnet  # noqa: E402


@dataclass(frozen=True)
class Reference:
    """A published or specified figure for one model.

    Args:
        source: where it comes from, e.g. ``"spec"`` or ``"paper Table 3"``.
        params: parameter count, or None.
        macs: multiply-accumulates for one image at ``size``, or None.
        size: input (H, W) of ``macs``.
        num_classes: classes the figures were measured with (None: not stated).
        note: shown after the figures (e.g. what the source calls its unit).
    """

    source: str
    params: Optional[float] = None
    macs: Optional[float] = None
    size: Optional[tuple[int, int]] = None
    num_classes: Optional[int] = None
    note: str = ""


def _frostnet_refs() -> dict[str, tuple[Reference, ...]]:
    # shared/specs/frostnet.md (a faithful build, 224x224, 1000 classes) and the paper's Table 3.
    spec = {
        ("small", "0_5"): (2.35e6, 101e6), ("small", "0_75"): (3.48e6, 212e6),
        ("small", "1_0"): (4.86e6, 315e6), ("small", "1_25"): (6.75e6, 504e6),
        ("base", "0_5"): (2.38e6, 113e6), ("base", "0_75"): (3.53e6, 245e6),
        ("base", "1_0"): (5.00e6, 363e6), ("base", "1_25"): (6.94e6, 582e6),
        ("large", "0_5"): (2.60e6, 132e6), ("large", "0_75"): (4.04e6, 286e6),
        ("large", "1_0"): (5.81e6, 431e6), ("large", "1_25"): (8.22e6, 693e6),
    }
    paper = {
        ("small", "1_0"): (4.8e6, 315e6), ("base", "1_0"): (5.0e6, 362e6), ("large", "1_0"): (5.8e6, 449e6),
        ("small", "0_5"): (2.3e6, 100e6), ("base", "0_5"): (2.3e6, 112e6), ("large", "0_5"): (2.6e6, 141e6),
        ("base", "1_25"): (6.9e6, 582e6), ("large", "1_25"): (8.2e6, 717e6),
    }
    refs: dict[str, tuple[Reference, ...]] = {}
    for key, (p, m) in spec.items():
        entries = [Reference("spec", p, m, (224, 224), 1000)]
        if key in paper:
            pp, pm = paper[key]
            entries.append(Reference("FrostNet paper Table 3", pp, pm, (224, 224), 1000))
        refs[f"frostnet_{key[0]}_{key[1]}"] = tuple(entries)
    return refs


def _paper(table: str, params: float, madds: float, size: tuple[int, int], num_classes: Optional[int]) -> Reference:
    # The StatAssist/GradBoost paper's "MAdds" (Tables 2-3) are twice the MACs the reference
    # builds measure at the same input (Mv3-LRASPP-Large: 7.21B vs 3.60G at 768x768): they are
    # FLOPs, so they are compared as madds / 2.
    return Reference(f"paper {table}", params, madds / 2, size, num_classes,
                     f"the paper's {madds / 1e9:.2f}B 'MAdds' read as FLOPs")

REFERENCES: dict[str, tuple[Reference, ...]] = {
    **_frostnet_refs(),
    # shared/specs/baselines.md (the authors' reference builds, 20 classes) and Table 3 (768x768)
    "lraspp_mobilenet_v3_large_re": (
        Reference("spec", 2.42e6, 12.80e9, (1024, 2048), 20),
        Reference("spec", 2.42e6, 3.60e9, (768, 768), 20),
        _paper("Table 3", 2.42e6, 7.21e9, (768, 768), None),
    ),
    "lraspp_mobilenet_v3_small_re": (
        Reference("spec", 0.75e6, 3.94e9, (1024, 2048), 20),
        Reference("spec", 0.75e6, 1.11e9, (768, 768), 20),
        _paper("Table 3", 0.75e6, 2.22e9, (768, 768), None),
    ),
    "espnet": (
        Reference("spec", 0.60e6, 30.21e9, (1024, 2048), 20),
        Reference("spec", 0.60e6, 8.50e9, (768, 768), 20),
        _paper("Table 3", 0.60e6, 16.8e9, (768, 768), None),
    ),
    "espnet_v2": (
        Reference("spec", 3.43e6, 48.60e9, (1024, 2048), 20),
        _paper("Table 3", 3.43e6, 27.2e9, (768, 768), None),
    ),
    # detection (Table 2 at 300x300, VOC 21 classes; the spec's reference-build figures)
    "ssdlite_mobilenet_v2": (
        _paper("Table 2", 2.95e6, 1.60e9, (300, 300), 21),
        Reference("spec (reference build, not lite)", 4.61e6, None, (300, 300), 21),
    ),
    "tiny_dsod": (
        _paper("Table 2", 2.17e6, 2.24e9, (300, 300), 21),
        Reference("spec (reference build)", 1.69e6, 1.32e9, (300, 300), 21),
    ),
}


@dataclass
class Measurement:
    name: str
    num_classes: Optional[int]
    params: Optional[int] = None
    macs: Optional[float] = None
    device: str = "meta"
    error: str = ""


def parse_size(text: str) -> tuple[int, int]:
    """``"768"`` -> (768, 768); ``"1024x2048"`` -> (1024, 2048)."""
    m = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+))?\s*", text)
    if not m or int(m.group(1)) < 1 or (m.group(2) is not None and int(m.group(2)) < 1):
        raise argparse.ArgumentTypeError(
            f"size must be N or HxW with positive integers (e.g. 768, 1024x2048), got {text!r}"
        )
    h = int(m.group(1))
    return h, int(m.group(2)) if m.group(2) else h


def select_models(patterns: Sequence[str]) -> list[str]:
    """Registered names matching any of the shell-style ``patterns``, sorted; raises if none."""
    names = frostnet.list_models()
    chosen = sorted({n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)})
    if not chosen:
        raise ValueError(
            f"no registered model matches {list(patterns)}; frostnet.list_models() has {len(names)} models"
        )
    return chosen


def _build(name: str, num_classes: Optional[int]) -> nn.Module:
    builder = frostnet.models.get_model_builder(name)
    kwargs: dict[str, Any] = {}
    if num_classes is not None:
        if "num_classes" not in inspect.signature(builder).parameters:
            raise TypeError(f"{name} takes no num_classes argument")
        kwargs["num_classes"] = num_classes
    return builder(**kwargs)


def _count(model: nn.Module, x: torch.Tensor) -> float:
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(x)
    except (TypeError, ValueError, RuntimeError, AssertionError) as batch_error:
        # torchvision-style detectors take a list of (C, H, W) images
        try:
            with FlopCounterMode(display=False) as counter, torch.no_grad():
                model([x[0]])
        except Exception:
            raise batch_error from None
    return counter.get_total_flops() / 2


def measure(name: str, size: tuple[int, int], num_classes: Optional[int] = None) -> Measurement:
    """Parameters and MACs of the registered model ``name`` for one ``size`` image."""
    result = Measurement(name, num_classes)
    errors = []
    for device in ("meta", "cpu"):
        try:
            with torch.device(device):
                model = _build(name, num_classes)
                result.params = sum(p.numel() for p in model.parameters())
                in_channels = int(getattr(model, "in_channels", 3))
                result.macs = _count(model, torch.randn(1, in_channels, *size))
            result.device, result.error = device, ""
            if result.num_classes is None:
                result.num_classes = getattr(model, "num_classes", None)
            return result
        except Exception as e:  # noqa: BLE001 - report the failure in the table instead of aborting
            errors.append(f"{device}: {type(e).__name__}: {e}")
    result.error = "; ".join(errors)
    return result


def _fmt_params(p: float) -> str:
    return f"{p / 1e6:.3f}M" if p < 1e6 else f"{p / 1e6:.2f}M"


def _fmt_macs(m: float) -> str:
    return f"{m / 1e9:.2f}G" if m >= 1e9 else f"{m / 1e6:.1f}M"


def _delta(measured: float, ref: float) -> str:
    d = round(100 * (measured / ref - 1), 1)
    return f"{d:+.1f}%" if d else "±0.0%"


def describe_references(m: Measurement, size: tuple[int, int]) -> str:
    """The reference figures of ``m.name``, each with the deviation where comparable."""
    parts = []
    for ref in REFERENCES.get(m.name, ()):
        same_classes = ref.num_classes is None or ref.num_classes == m.num_classes
        bits = []
        if ref.params is not None:
            delta = f" ({_delta(m.params, ref.params)})" if same_classes and m.params else ""
            bits.append(_fmt_params(ref.params) + delta)
        if ref.macs is not None and ref.size is not None:
            at = f"{ref.size[0]}x{ref.size[1]}"
            comparable = same_classes and ref.size == size and m.macs is not None
            bits.append(f"{_fmt_macs(ref.macs)} MACs @{at}" + (f" ({_delta(m.macs, ref.macs)})" if comparable else ""))
        classes = f", {ref.num_classes} classes" if ref.num_classes else ""
        note = f"; {ref.note}" if ref.note else ""
        parts.append(f"{ref.source}{classes}: {', '.join(bits)}{note}")
    return " / ".join(parts) if parts else "-"


def markdown_table(rows: Sequence[Measurement], size: tuple[int, int]) -> str:
    """The measurements as a markdown table."""
    lines = [
        "| model | input | classes | params | MACs | reference figures (deviation where comparable) |",
        "|---|---|---|---|---|---|",
    ]
    for m in rows:
        classes = str(m.num_classes) if m.num_classes is not None else "-"
        if m.error:
            lines.append(f"| {m.name} | {size[0]}x{size[1]} | {classes} | - | - | failed: {m.error} |")
            continue
        macs = _fmt_macs(m.macs) + (" (cpu)" if m.device == "cpu" else "")
        lines.append(
            f"| {m.name} | {size[0]}x{size[1]} | {classes} | {_fmt_params(m.params)} | {macs} | "
            f"{describe_references(m, size)} |"
        )
    return "\n".join(lines)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", action="append", default=None,
                        help="shell-style pattern over frostnet.list_models(); repeatable (default: all)")
    parser.add_argument("--size", type=parse_size, default=(224, 224), help="input size: N or HxW (default 224)")
    parser.add_argument("--num-classes", type=int, default=None,
                        help="build with this many classes (default: each builder's default)")
    return parser


def main(args: argparse.Namespace) -> int:
    if args.num_classes is not None and args.num_classes < 1:
        raise SystemExit(f"--num-classes must be a positive integer, got {args.num_classes}")
    try:
        names = select_models(args.models or ["*"])
    except ValueError as e:
        raise SystemExit(str(e)) from None
    rows = [measure(name, args.size, args.num_classes) for name in names]
    print(markdown_table(rows, args.size))
    return 1 if any(m.error for m in rows) else 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
