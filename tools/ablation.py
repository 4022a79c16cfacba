"""The StatAssist/GradBoost ablation (StatAssist paper, Table 1 spirit) on Fashion-MNIST.

Every row gets the same budget of EPOCHS epochs:
  FP training            --mode fp, EPOCHS epochs (FP32 accuracy, and INT8 by post-training quantization)
  QAT fine-tune          --mode fp for EPOCHS-FT epochs, then --mode qat-finetune for FT epochs at LR/10
  QAT from scratch       --mode qat, EPOCHS epochs, no FP phase
  StatAssist only        --mode statassist, 1 FP epoch + EPOCHS-1 QAT epochs
  StatAssist + GradBoost --mode statassist+gradboost, the same with GradBoost

    python tools/ablation.py --print-commands            # the commands (run them, e.g. with bash)
    python tools/ablation.py --run                       # run the missing runs one after another
    python tools/ablation.py --table                     # the markdown table from runs/ablation/*/metrics.jsonl
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
ROWS = ("fp", "qat-finetune", "qat", "statassist", "statassist+gradboost")
LABELS = {"fp": "FP training (INT8 = PTQ)", "qat-finetune": "QAT fine-tune", "qat": "QAT from scratch",
          "statassist": "StatAssist only", "statassist+gradboost": "StatAssist + GradBoost"}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="frostnet_small_0_5", help="model of the ablation")
    p.add_argument("--epochs", type=int, default=5, help="epoch budget of every row")
    p.add_argument("--ft-epochs", type=int, default=1, help="QAT fine-tune epochs (taken from the budget)")
    p.add_argument("--seeds", default="0,1", help="comma-separated seeds")
    p.add_argument("--lr", type=float, default=0.04, help="peak LR (QAT fine-tune uses LR/10); the zoo's, 0.1 diverged there")
    p.add_argument("--batch-size", type=int, default=128, help="batch size")
    p.add_argument("--runs", type=Path, default=Path("runs/ablation"), help="where the runs live (relative to the checkout)")
    p.add_argument("--extra", default="--clip-grad 5 --val-size 5000 --no-progress --threads 1",
                   help="flags added to every run (one thread: two runs side by side use the 2 cores best)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--print-commands", action="store_true", help="print the commands of every run")
    g.add_argument("--run", action="store_true", help="run the runs whose final metrics are missing (resumable)")
    g.add_argument("--table", action="store_true", help="print the markdown table from the runs' logs")
    return p


def run_dir(args: argparse.Namespace, row: str, seed: int, suffix: str = "") -> Path:
    return args.runs / f"{args.model}.{row.replace('+', '_')}{suffix}.seed{seed}"


def commands(args: argparse.Namespace) -> list[tuple[Path, list[str]]]:
    """(output dir, argv) of every run, in an order that satisfies dependencies."""
    out = []
    for seed in (int(s) for s in args.seeds.split(",")):
        base = [sys.executable, "tools/train.py", "--model", args.model, "--data", "fashion_mnist", "--seed", str(seed),
                "--batch-size", str(args.batch_size), *shlex.split(args.extra)]
        for row in ROWS:
            d = run_dir(args, row, seed)
            if row == "fp":
                out.append((d, base + ["--mode", "fp", "--epochs", str(args.epochs), "--lr", str(args.lr), "--output-dir", str(d)]))
            elif row == "qat-finetune":
                pre = run_dir(args, "fp", seed, f".{args.epochs - args.ft_epochs}ep")
                out.append((pre, base + ["--mode", "fp", "--epochs", str(args.epochs - args.ft_epochs), "--lr", str(args.lr),
                                         "--export-backends", "x86", "--output-dir", str(pre)]))
                init = pre / "export" / f"{args.model}.fashion_mnist.fp32.safetensors"
                out.append((d, base + ["--mode", "qat-finetune", "--init", str(init), "--epochs", str(args.ft_epochs),
                                       "--lr", str(args.lr / 10), "--output-dir", str(d)]))
            else:
                out.append((d, base + ["--mode", row, "--epochs", str(args.epochs), "--fp-epochs", "1", "--lr", str(args.lr),
                                       "--output-dir", str(d)]))
    for _, argv in out:
        argv += ["--resume", "auto"]
    return out


def final_metrics(d: Path) -> Optional[dict[str, Any]]:
    log = (d if d.is_absolute() else ROOT / d) / "metrics.jsonl"
    if not log.exists():
        return None
    for line in reversed(log.read_text().splitlines()):
        rec = json.loads(line)
        if "final" in rec:
            return rec["final"]
    return None


def _fmt(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def table(args: argparse.Namespace) -> str:
    seeds = [int(s) for s in args.seeds.split(",")]
    lines = [f"{args.model}, Fashion-MNIST test split (10k), {args.epochs} epochs per row, lr {args.lr:g}, seeds {args.seeds} (mean ± std):", "",
             "| row | FP32 top-1 | fake-quant top-1 | INT8 x86 top-1 | INT8 qnnpack top-1 | runs |", "|---|---|---|---|---|---|"]
    for row in ROWS:
        finals = [f for f in (final_metrics(run_dir(args, row, s)) for s in seeds) if f]
        col = lambda k: _fmt([f[k] for f in finals if k in f])  # noqa: E731
        lines.append(f"| {LABELS[row]} | {col('fp32_top1')} | {col('fake_quant_top1')} | {col('int8_x86_top1')} | "
                     f"{col('int8_qnnpack_top1')} | {len(finals)}/{len(seeds)} |")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    if args.print_commands:
        for _, argv in commands(args):
            print(" ".join(shlex.quote(a) for a in ["python", *argv[1:]]))
    elif args.run:
        for d, argv in commands(args):
            if final_metrics(d) is None:
                print("running:", " ".join(argv[1:]), flush=True)
                subprocess.run(argv, cwd=ROOT, check=True)
    else:
        print(table(args))
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
