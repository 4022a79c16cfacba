"""Learning curves of recipe runs, drawn from their metrics.jsonl.

    python tools/plot_curves.py runs/frostnet_small_1_0 runs/frostnet_base_1_0 runs/frostnet_large_1_0 \
        --output docs/curves/fashion_mnist.png

One line per run and evaluation kind: the float model during the FP (StatAssist) phase, the
fake-quant model and its converted INT8 copy during QAT, all on the run's per-epoch split (the
validation slice when the run held one out). ``--metric`` picks the task's headline (top1 for
classifiers, miou or map for dense models). Needs matplotlib (``pip install -e ".[bench]"``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

KINDS = (("fp32", "FP32", "-"), ("fake_quant", "fake-quant", "--"), ("int8", "INT8", ":"))
#: Drawn with --ema: the weight EMA's evaluation (tools/train.py --ema-decay) in either phase.
EMA_KINDS = (("ema_fp32", "EMA FP32", "-."), ("ema_fake_quant", "EMA fake-quant", "-."))


def read_curves(run_dir: Path, metric: str) -> dict[str, list[tuple[int, float]]]:
    """``{kind: [(epoch, value), ...]}`` from ``run_dir/metrics.jsonl`` (kinds: fp32, fake_quant,
    int8, ema_fp32, ema_fake_quant)."""
    log = run_dir / "metrics.jsonl"
    if not log.is_file():
        raise FileNotFoundError(f"{log} does not exist; pass the --output-dir of a tools/train.py run")
    curves: dict[str, list[tuple[int, float]]] = {k: [] for k, _, _ in KINDS + EMA_KINDS}
    for n, line in enumerate(log.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec: dict[str, Any] = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{log}:{n} is not JSON ({e}); is the file truncated?") from None
        if "epoch" not in rec:
            continue  # the final record
        for kind, _, _ in KINDS + EMA_KINDS:
            if f"{kind}_{metric}" in rec:
                curves[kind].append((int(rec["epoch"]), float(rec[f"{kind}_{metric}"])))
    if not any(curves.values()):
        raise ValueError(f"{log} holds no '*_{metric}' entries; valid --metric for this run: "
                         + ", ".join(sorted({k.split('_', 1)[1] for line in log.read_text().splitlines() if line.strip()
                                             for k in json.loads(line) if k.startswith("fp32_")})))
    return curves


def plot(runs: list[Path], metric: str, output: Path, title: str = "", *, ema: bool = False,
         ymin: float | None = None) -> None:
    """Draw every run's curves into one PNG, written atomically (``ema``: the EMA curves too;
    ``ymin``: cut the y axis there, so early epochs do not squash the end of training)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, run in enumerate(runs):
        curves = read_curves(run, metric)
        for kind, label, style in KINDS + (EMA_KINDS if ema else ()):
            if curves[kind]:
                xs, ys = zip(*curves[kind])
                ax.plot([x + 1 for x in xs], ys, style, color=colours[i % len(colours)], label=f"{run.name} {label}")
    if ymin is not None:
        ax.set_ylim(bottom=ymin)
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title(title or f"{metric} per epoch (per-epoch evaluation split)")
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".png", dir=output.parent)
    os.close(fd)
    try:
        fig.savefig(tmp)
        os.replace(tmp, output)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
        plt.close(fig)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="run directories (tools/train.py --output-dir)")
    p.add_argument("--metric", default="top1", help="metric key without its prefix: top1, miou, pixel_acc, map, map_50")
    p.add_argument("--output", type=Path, required=True, help="PNG to write")
    p.add_argument("--title", default="", help="plot title")
    p.add_argument("--ema", action="store_true", help="also draw the weight EMA's curves (runs with --ema-decay)")
    p.add_argument("--ymin", type=float, default=None, help="lower end of the y axis (default: fit the data)")
    return p


def main(args: argparse.Namespace) -> int:
    plot(args.runs, args.metric, args.output, args.title, ema=args.ema, ymin=args.ymin)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
