"""Compare the QAT methods on Fashion-MNIST: plain STE QAT, + TALR, + EWGS, + OCTAV/MAD, and
StatAssist + GradBoost, each at W8A8 and at W4A4 (simulated inside INT8), same budget per row.

Every run gets EPOCHS epochs, batch size, LR schedule and gradient clipping alike:
  ste                    --mode qat                                   (torch's fake quant, STE)
  talr                   --mode qat --talr                            (transition-rate scheduling)
  ewgs                   --mode qat --qat-method ewgs                 (element-wise gradient scaling)
  octav                  --mode qat --qat-method octav                (optimal clipping, MAD/PWL)
  statassist+gradboost   --mode statassist+gradboost --fp-epochs 1    (1 FP epoch, then QAT)
Extra rows for --rows: statassist+gradboost+talr, statassist+gradboost+ewgs, statassist+gradboost+octav.

    python tools/compare_methods.py --print-commands      # the commands (run them, e.g. with bash)
    python tools/compare_methods.py --run                 # run the missing runs one after another (resumable)
    python tools/compare_methods.py --table               # the markdown table from runs/methods/*/metrics.jsonl
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
#: Row name -> recipe flags.
ROWS: dict[str, list[str]] = {
    "ste": ["--mode", "qat"],
    "talr": ["--mode", "qat", "--talr"],
    "ewgs": ["--mode", "qat", "--qat-method", "ewgs"],
    "octav": ["--mode", "qat", "--qat-method", "octav"],
    "statassist+gradboost": ["--mode", "statassist+gradboost", "--fp-epochs", "1"],
    "statassist+gradboost+talr": ["--mode", "statassist+gradboost", "--fp-epochs", "1", "--talr"],
    "statassist+gradboost+ewgs": ["--mode", "statassist+gradboost", "--fp-epochs", "1", "--qat-method", "ewgs"],
    "statassist+gradboost+octav": ["--mode", "statassist+gradboost", "--fp-epochs", "1", "--qat-method", "octav"],
}
DEFAULT_ROWS = ("ste", "talr", "ewgs", "octav", "statassist+gradboost")
LABELS = {"ste": "plain STE QAT", "talr": "+ TALR (TR scheduling)", "ewgs": "+ EWGS", "octav": "+ OCTAV / MAD",
          "statassist+gradboost": "StatAssist + GradBoost", "statassist+gradboost+talr": "StatAssist + GradBoost + TALR",
          "statassist+gradboost+ewgs": "StatAssist + GradBoost + EWGS",
          "statassist+gradboost+octav": "StatAssist + GradBoost + OCTAV"}
#: Bit setting -> recipe flags (W4A4 is simulated with quant_min/quant_max and still converts to INT8).
BITS: dict[str, list[str]] = {"w8a8": [], "w4a4": ["--weight-bits", "4", "--act-bits", "4"]}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="frostnet_small_0_5", help="model of the comparison")
    p.add_argument("--epochs", type=int, default=5, help="epoch budget of every run")
    p.add_argument("--seeds", default="0,1", help="comma-separated seeds")
    p.add_argument("--rows", default=",".join(DEFAULT_ROWS), help=f"comma-separated rows; choices: {', '.join(ROWS)}")
    p.add_argument("--bits", default="w8a8,w4a4", help=f"comma-separated bit settings; choices: {', '.join(BITS)}")
    p.add_argument("--lr", type=float, default=0.04, help="peak LR of every run (the zoo's; 0.1 diverged there)")
    p.add_argument("--batch-size", type=int, default=128, help="batch size")
    p.add_argument("--train-subset", type=int, default=10000,
                   help="seeded subset of the training images per run (0 = all 55k after the validation hold-out); "
                        "20 runs of full data do not fit a 2-core session")
    p.add_argument("--runs", type=Path, default=Path("runs/methods"), help="where the runs live (relative to the checkout)")
    p.add_argument("--extra", default="--clip-grad 5 --val-size 5000 --no-progress --threads 1",
                   help="flags added to every run (after the others, so they can override them)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--print-commands", action="store_true", help="print the commands of every run")
    g.add_argument("--run", action="store_true", help="run the runs whose final metrics are missing (resumable)")
    g.add_argument("--table", action="store_true", help="print the markdown table from the runs' logs")
    return p


def _choices(value: str, valid: dict[str, Any], flag: str) -> list[str]:
    items = [v for v in value.split(",") if v]
    bad = [v for v in items if v not in valid]
    if bad or not items:
        raise SystemExit(f"{flag}: unknown {', '.join(bad) or '(empty)'}; valid choices: {', '.join(valid)}")
    return items


def _seeds(args: argparse.Namespace) -> list[int]:
    try:
        return [int(s) for s in args.seeds.split(",") if s]
    except ValueError:
        raise SystemExit(f"--seeds must be comma-separated integers, got {args.seeds!r}") from None


def run_dir(args: argparse.Namespace, row: str, bits: str, seed: int) -> Path:
    return args.runs / f"{args.model}.{row.replace('+', '_')}.{bits}.seed{seed}"


def commands(args: argparse.Namespace) -> list[tuple[Path, list[str]]]:
    """(output dir, argv) of every run: seed-major, so that one seed's table fills first."""
    out = []
    for seed in _seeds(args):
        base = [sys.executable, "tools/train.py", "--model", args.model, "--data", "fashion_mnist", "--seed", str(seed),
                "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--lr", str(args.lr),
                "--train-subset", str(args.train_subset)]
        for bits in _choices(args.bits, BITS, "--bits"):
            for row in _choices(args.rows, ROWS, "--rows"):
                d = run_dir(args, row, bits, seed)
                out.append((d, base + ROWS[row] + BITS[bits] + shlex.split(args.extra)
                            + ["--output-dir", str(d), "--resume", "auto"]))
    return out


def _records(d: Path) -> list[dict[str, Any]]:
    log = (d if d.is_absolute() else ROOT / d) / "metrics.jsonl"
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def final_metrics(d: Path) -> Optional[dict[str, Any]]:
    """The ``final`` record of a run's metrics.jsonl, or None while it is unfinished."""
    for rec in reversed(_records(d)):
        if "final" in rec:
            return rec["final"]
    return None


def qat_epoch_seconds(d: Path) -> Optional[float]:
    """Mean training time of the run's QAT epochs (the last record of each epoch: resumed epochs
    log again), or None."""
    by_epoch = {rec["epoch"]: rec for rec in _records(d) if rec.get("phase") == "qat" and "train_time_s" in rec}
    return statistics.mean(rec["train_time_s"] for rec in by_epoch.values()) if by_epoch else None


def _fmt(values: list[float], digits: int = 2) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def table(args: argparse.Namespace) -> str:
    seeds = _seeds(args)
    lines = [f"{args.model}, Fashion-MNIST test split (10k), {args.epochs} epochs per run on "
             f"{f'{args.train_subset} training images' if args.train_subset else 'the full training split'}, lr {args.lr:g}, "
             f"seeds {args.seeds} (mean ± std); W4A4 = 4-bit weights and activations simulated inside INT8:", "",
             "| method | bits | FP32 latent top-1 | fake-quant top-1 | INT8 x86 top-1 | INT8 qnnpack top-1 "
             "| s / QAT epoch | runs |",
             "|---|---|---|---|---|---|---|---|"]
    for row in _choices(args.rows, ROWS, "--rows"):
        for bits in _choices(args.bits, BITS, "--bits"):
            dirs = [run_dir(args, row, bits, s) for s in seeds]
            done = [d for d in dirs if final_metrics(d)]
            finals = [final_metrics(d) for d in done]
            times = [t for t in map(qat_epoch_seconds, done) if t is not None]
            col = lambda k: _fmt([f[k] for f in finals if k in f])  # noqa: E731
            lines.append(f"| {LABELS[row]} | {bits.upper()} | {col('fp32_top1')} | {col('fake_quant_top1')} | "
                         f"{col('int8_x86_top1')} | {col('int8_qnnpack_top1')} | {_fmt(times, 1)} | "
                         f"{len(finals)}/{len(seeds)} |")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    if args.print_commands:
        for _, argv in commands(args):
            print(" ".join(shlex.quote(a) for a in ["python", *argv[1:]]))
    elif args.run:
        for d, argv in commands(args):
            if final_metrics(d) is None:
                print("running:", " ".join(shlex.quote(a) for a in argv[1:]), flush=True)
                subprocess.run(argv, cwd=ROOT, check=True)
    else:
        print(table(args))
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
