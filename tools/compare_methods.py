"""Compare the QAT methods on Fashion-MNIST the way their papers do, and keep the results as data.

Experiments (``--protocol``):
  finetune   the papers' protocol: one FP32 model trained on the full training split (shared by every
             row), then QAT fine-tuning from it with the first and last layers at 8 bits
             (--keep-8bit-ends) at W4A4, W3A3 and W2A2 for plain STE, STE + TALR, EWGS and its
             delta = 0 twin, OCTAV-MPH and max-scaling, StatAssist + GradBoost (1 FP epoch, then QAT)
  scratch    the earlier, smaller comparison: QAT from scratch on 10k images, every layer quantized,
             W8A8 and W4A4
  ablation   StatAssist / GradBoost (StatAssist paper, Table 1 in spirit): FP + PTQ, QAT fine-tune,
             QAT from scratch, StatAssist, StatAssist + GradBoost (paper and authors' rule)

Every run is ``tools/train.py`` with the flags printed by ``--dry-run``; its final test-split metrics
(10k images: FP32 latent, fake-quant and INT8 x86 top-1) become one JSON row (method, bits, seed,
metrics, command) in ``docs/experiments/<protocol>.json``, and ``--table`` writes the markdown table
``docs/experiments/<protocol>.md`` from that file::

    python tools/compare_methods.py --protocol finetune --dry-run   # list the runs (done / to do)
    python tools/compare_methods.py --protocol finetune --run       # run what is missing (resumable)
    python tools/compare_methods.py --protocol finetune --table     # docs/experiments/finetune.md

``--run`` skips rows already in the JSON file, records a run whose output directory already holds
final metrics without running it again, and resumes interrupted runs (``--resume auto``).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
#: Bit setting -> recipe flags (simulated inside INT8: the models still convert to INT8).
BITS: dict[str, list[str]] = {f"w{b}a{b}": ([] if b == 8 else ["--weight-bits", str(b), "--act-bits", str(b)])
                              for b in (8, 4, 3, 2)}
#: The metrics of a run's final record that go into its JSON row.
METRICS = ("fp32_top1", "fake_quant_top1", "int8_x86_top1")
#: ``--ewgs-interval`` that never comes: delta stays 0 (EWGS's learned intervals with STE gradients).
NEVER = "1000000000"


@dataclass(frozen=True)
class Row:
    """One method of an experiment: its label and recipe flags (given after the experiment's own)."""

    method: str
    flags: tuple[str, ...]
    #: a prerequisite run (by method name) whose exported FP32 weights this row fine-tunes
    init_from: Optional[str] = None
    #: one shared run (seed 0, no bit setting) instead of one per seed and bit setting
    shared: bool = False
    #: runs only at these bit settings (None: the experiment's)
    bits: Optional[tuple[str, ...]] = None


@dataclass(frozen=True)
class Experiment:
    """An experiment definition: common flags, rows, bit settings, default seeds."""

    name: str
    title: str
    flags: tuple[str, ...]
    rows: tuple[Row, ...]
    bits: tuple[str, ...]
    seeds: tuple[int, ...] = (0, 1, 2)
    notes: tuple[str, ...] = field(default_factory=tuple)


_COMMON = ("--data", "fashion_mnist", "--batch-size", "128", "--clip-grad", "5", "--no-progress", "--threads", "1",
           "--export-backends", "x86")
_FT = ("--mode", "qat-finetune", "--epochs", "3", "--lr", "0.004", "--keep-8bit-ends")

EXPERIMENTS: dict[str, Experiment] = {
    "finetune": Experiment(
        "finetune", "QAT fine-tuning of a trained FP32 model, first/last layers at 8 bits (the papers' protocol)",
        _COMMON + ("--model", "frostnet_small_0_5"),
        (
            Row("fp32", ("--mode", "fp", "--epochs", "15", "--lr", "0.04"), shared=True),
            Row("ste", _FT, init_from="fp32"),
            Row("ste+talr", _FT + ("--talr",), init_from="fp32"),
            Row("ewgs", _FT + ("--qat-method", "ewgs"), init_from="fp32"),
            Row("ewgs delta=0", _FT + ("--qat-method", "ewgs", "--ewgs-interval", NEVER), init_from="fp32"),
            Row("octav-mph", _FT + ("--qat-method", "octav"), init_from="fp32"),
            Row("octav max-scaling", _FT + ("--qat-method", "octav", "--octav-clipping", "max"), init_from="fp32"),
            Row("statassist+gradboost", _FT + ("--mode", "statassist+gradboost", "--fp-epochs", "1", "--epochs", "4"),
                init_from="fp32"),
        ),
        ("w4a4", "w3a3", "w2a2"),
        notes=("FP32: 15 epochs on the full 60k training split at lr 0.04 (seed 0, shared by every row); "
               "fine-tuning: 3 QAT epochs at lr 0.004 (StatAssist + GradBoost: 1 FP epoch, then the same 3 QAT "
               "epochs), every layer but the first and last at the row's bits.",)),
    "scratch": Experiment(
        "scratch", "QAT from scratch, every layer quantized (the recipe's earlier comparison)",
        _COMMON + ("--model", "frostnet_small_0_5", "--epochs", "5", "--lr", "0.04", "--train-subset", "10000",
                   "--val-size", "5000"),
        (
            Row("ste", ("--mode", "qat")),
            Row("ste+talr", ("--mode", "qat", "--talr")),
            Row("ewgs", ("--mode", "qat", "--qat-method", "ewgs")),
            Row("octav-mph", ("--mode", "qat", "--qat-method", "octav")),
            Row("statassist+gradboost", ("--mode", "statassist+gradboost", "--fp-epochs", "1")),
        ),
        ("w8a8", "w4a4"),
        notes=("5 epochs on a seeded 10k subset of the training images, lr 0.04.",)),
    "ablation": Experiment(
        "ablation", "StatAssist / GradBoost ablation at INT8 (StatAssist paper, Table 1 in spirit)",
        _COMMON + ("--model", "frostnet_small_0_5", "--lr", "0.04", "--val-size", "5000"),
        (
            Row("fp (INT8 = PTQ)", ("--mode", "fp", "--epochs", "5", "--ptq-eval")),
            Row("fp 4 epochs", ("--mode", "fp", "--epochs", "4")),
            Row("qat fine-tune", ("--mode", "qat-finetune", "--epochs", "1", "--lr", "0.004"), init_from="fp 4 epochs"),
            Row("qat from scratch", ("--mode", "qat", "--epochs", "5")),
            Row("statassist", ("--mode", "statassist", "--epochs", "5", "--fp-epochs", "1")),
            Row("statassist+gradboost", ("--mode", "statassist+gradboost", "--epochs", "5", "--fp-epochs", "1")),
            Row("statassist+gradboost (authors' rule)",
                ("--mode", "statassist+gradboost", "--epochs", "5", "--fp-epochs", "1", "--gb-rule", "authors")),
        ),
        ("w8a8",),
        notes=("Every row: 5 epochs in all on 55k training images (5k held out), lr 0.04; the QAT fine-tune row "
               "trains 4 FP epochs, then 1 QAT epoch at lr 0.004.",)),
}


@dataclass(frozen=True)
class Run:
    """One ``tools/train.py`` run of an experiment."""

    method: str
    bits: str
    seed: int
    out: Path
    argv: tuple[str, ...]

    @property
    def key(self) -> tuple[str, str, int]:
        return self.method, self.bits, self.seed

    def command(self) -> str:
        return " ".join(shlex.quote(a) for a in ("python", *self.argv))


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--protocol", required=True, choices=sorted(EXPERIMENTS), help="the experiment")
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default: the experiment's, 0,1,2)")
    p.add_argument("--methods", default=None, help="comma-separated subset of the experiment's methods")
    p.add_argument("--bits", default=None, help="comma-separated subset of the experiment's bit settings")
    p.add_argument("--runs", type=Path, default=Path("runs/experiments"), help="run directories (relative to the checkout)")
    p.add_argument("--results", type=Path, default=ROOT / "docs" / "experiments", help="where <protocol>.json/.md live")
    p.add_argument("--extra", default="", help="flags added to every run, after the others (so they override them)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--dry-run", action="store_true", help="list the runs and whether each is done")
    g.add_argument("--run", action="store_true", help="run what is missing, recording each finished run")
    g.add_argument("--table", action="store_true", help="write <protocol>.md from <protocol>.json")
    return p


def _subset(value: Optional[str], valid: list[str], flag: str) -> list[str]:
    if value is None:
        return valid
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in valid]
    if bad or not items:
        raise SystemExit(f"{flag}: unknown {', '.join(bad) or '(empty)'}; valid choices: {', '.join(valid)}")
    return items


def _seeds(args: argparse.Namespace, exp: Experiment) -> list[int]:
    if args.seeds is None:
        return list(exp.seeds)
    try:
        return [int(s) for s in args.seeds.split(",") if s]
    except ValueError:
        raise SystemExit(f"--seeds must be comma-separated integers, got {args.seeds!r}") from None


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text).strip("_")


def runs(args: argparse.Namespace) -> list[Run]:
    """Every run of ``--protocol`` (restricted by ``--methods/--bits/--seeds``), prerequisites first."""
    exp = EXPERIMENTS[args.protocol]
    methods = _subset(args.methods, [r.method for r in exp.rows], "--methods")
    bits_all = _subset(args.bits, list(exp.bits), "--bits")
    by_name = {r.method: r for r in exp.rows}
    wanted = [by_name[m] for m in methods]
    # a fine-tuning row needs its prerequisite
    for r in list(wanted):
        if r.init_from and by_name[r.init_from] not in wanted:
            wanted.insert(0, by_name[r.init_from])
    out: list[Run] = []
    first_seed = _seeds(args, exp)[0]
    for seed in _seeds(args, exp):
        for row in sorted(wanted, key=lambda r: r.init_from is not None):
            if row.shared and seed != first_seed:
                continue  # one shared run, listed with the first seed
            for bits in (["fp32"] if row.shared else [b for b in bits_all if row.bits is None or b in row.bits]):
                run_seed = 0 if row.shared else seed
                out_dir = args.runs / exp.name / f"{_slug(row.method)}.{bits}.seed{run_seed}"
                argv = ["tools/train.py", *exp.flags, "--seed", str(run_seed), *row.flags, *BITS.get(bits, [])]
                if row.init_from:
                    init_row = by_name[row.init_from]
                    init_seed = 0 if init_row.shared else seed
                    init_bits = "fp32" if init_row.shared else bits
                    init_dir = args.runs / exp.name / f"{_slug(init_row.method)}.{init_bits}.seed{init_seed}"
                    model = exp.flags[exp.flags.index("--model") + 1]
                    argv += ["--init", str(init_dir / "export" / f"{model}.fashion_mnist.fp32.safetensors")]
                argv += [*shlex.split(args.extra), "--output-dir", str(out_dir), "--resume", "auto"]
                out.append(Run(row.method, bits, run_seed, out_dir, tuple(argv)))
    return out


def final_metrics(out: Path) -> Optional[dict[str, Any]]:
    """The ``final`` record of a run's metrics.jsonl, or None while it is unfinished."""
    log = (out if out.is_absolute() else ROOT / out) / "metrics.jsonl"
    if not log.exists():
        return None
    for line in reversed(log.read_text().splitlines()):
        if line.strip():
            rec = json.loads(line)
            if "final" in rec:
                return rec["final"]
    return None


def load_results(path: Path) -> list[dict[str, Any]]:
    """The rows of a results file (empty if it does not exist yet)."""
    if not path.exists():
        return []
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
        raise SystemExit(f"{path} is not a results file (a JSON object with a 'rows' list); move it away and rerun")
    return data["rows"]


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def record(path: Path, experiment: str, run: Run, final: dict[str, Any]) -> None:
    """Add ``run``'s row to the results file (replacing an older row of the same method/bits/seed)."""
    rows = [r for r in load_results(path) if (r["method"], r["bits"], r["seed"]) != run.key]
    rows.append({"method": run.method, "bits": run.bits, "seed": run.seed,
                 "metrics": {k: final[k] for k in METRICS if k in final}, "command": run.command()})
    _write_atomic(path, json.dumps({"experiment": experiment, "rows": rows}, indent=1) + "\n")


def _fmt(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def table(experiment: str, rows: list[dict[str, Any]]) -> str:
    """The markdown table of an experiment's results: one line per method and bit setting."""
    exp = EXPERIMENTS[experiment]
    order = {r.method: i for i, r in enumerate(exp.rows)}
    bit_order = {b: i for i, b in enumerate(("fp32", *BITS))}
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["bits"]), []).append(r)
    lines = [f"# {exp.title}", "", *exp.notes, "",
             "Fashion-MNIST test split (10k images), top-1 % as mean ± std over seeds; "
             f"generated by `python tools/compare_methods.py --protocol {experiment} --table` from "
             f"`docs/experiments/{experiment}.json` (every row's command is there).", "",
             "| method | bits | FP32 latent | fake-quant | INT8 x86 | seeds |", "|---|---|---|---|---|---|"]
    for (method, bits), group in sorted(groups.items(), key=lambda kv: (bit_order.get(kv[0][1], 99),
                                                                        order.get(kv[0][0], 99), kv[0][0])):
        col = lambda k: _fmt([g["metrics"][k] for g in group if k in g["metrics"]])  # noqa: E731
        seeds = ",".join(str(s) for s in sorted(g["seed"] for g in group))
        lines.append(f"| {method} | {bits.upper()} | {col('fp32_top1')} | {col('fake_quant_top1')} | "
                     f"{col('int8_x86_top1')} | {seeds} |")
    return "\n".join(lines) + "\n"


def main(args: argparse.Namespace) -> int:
    results = args.results / f"{args.protocol}.json"
    if args.table:
        out = args.results / f"{args.protocol}.md"
        _write_atomic(out, table(args.protocol, load_results(results)))
        print(f"wrote {out}")
        return 0
    done = {(r["method"], r["bits"], r["seed"]) for r in load_results(results)}
    todo = runs(args)
    for run in todo:
        if args.dry_run:
            state = "done" if run.key in done else ("finished, unrecorded" if final_metrics(run.out) else "to do")
            print(f"[{state}] {run.method} {run.bits} seed {run.seed}: {run.command()}")
            continue
        if run.key in done:
            continue
        final = final_metrics(run.out)
        if final is None:
            print("running:", run.command(), flush=True)
            subprocess.run([sys.executable, *run.argv], cwd=ROOT, check=True)
            final = final_metrics(run.out)
            if final is None:
                raise SystemExit(f"{run.out}/metrics.jsonl has no final record after the run; see its log")
        record(results, args.protocol, run, final)
    if args.dry_run:
        left = sum(run.key not in done for run in todo)
        print(f"{len(todo)} runs, {left} to do")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
