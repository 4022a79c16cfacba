"""Measure what each QAT method adds to a training step (forward, backward, optimizer step) over
plain STE QAT (torch's default fake quantization with SGD).

Variants, each on its own copy of the model prepared for QAT, fed the same synthetic batch:
  ste    torch's fake quantization (the baseline)
  talr   the same with transition-rate scheduling (SGDT): level counting and rescaled updates
  ewgs   EWGS fake quantizers; the periodic delta re-estimate (one forward, a double backward)
         is timed separately and reported amortized over --ewgs-interval steps
  octav  OCTAV clipping recomputed every step, MAD/PWL gradients
The variants take turns step by step, so that load from other processes hits them alike, and the
median over the timed steps is reported (wall clock and process CPU time).

    python tools/bench_methods.py                                   # frostnet_small_1_0, batch 64, 32x32
    python tools/bench_methods.py --iters 30 --threads 1 --bits 4
    python tools/bench_methods.py --model frostnet_small_0_35 --batch-size 16 --iters 3 --warmup 1   # quick look
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from frostnet import quant
from frostnet.models import get_model
from frostnet.optim import TransitionRateScheduler

METHODS = ("ste", "talr", "ewgs", "octav")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """Command-line options of the benchmark."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], add_help=add_help)
    p.add_argument("--model", default="frostnet_small_1_0", help="registered frostnet model (default: frostnet_small_1_0)")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--image-size", type=int, default=32, help="square input side (default 32)")
    p.add_argument("--backend", default="x86", help="INT8 backend the QAT targets (x86, fbgemm or qnnpack)")
    p.add_argument("--bits", type=int, choices=(8, 4), default=8, help="simulated weight and activation bits")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                   help="variants to measure; ste (the baseline) is always included")
    p.add_argument("--iters", type=int, default=20, help="timed steps per variant (default 20)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per variant (default 5)")
    p.add_argument("--ewgs-interval", type=int, default=100,
                   help="steps between EWGS delta re-estimates, for the amortized figure (default 100)")
    p.add_argument("--ewgs-refreshes", type=int, default=3, help="timed EWGS delta re-estimates (default 3)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=False,
                   help="model and images in the channels-last memory format, as tools/train.py trains by default")
    return p


def _ranges(bits: int) -> tuple[Any, Any]:
    return ((-8, 7), (0, 15)) if bits == 4 else (None, None)


def build_variant(method: str, model: nn.Module,
                  args: argparse.Namespace) -> tuple[nn.Module, torch.optim.Optimizer, Optional[quant.FoldTracker]]:
    """A QAT copy of ``model`` for ``method``, its optimizer (Nesterov SGD, as the recipe's) and,
    for EWGS, the recipe's :class:`~frostnet.quant.FoldTracker` (TALR's is inside its scheduler)."""
    wrange, arange = _ranges(args.bits)
    replica = quant.prepare_qat(
        copy.deepcopy(model), args.backend,
        qconfig=quant.get_method_qconfig("ste" if method == "talr" else method, args.backend,
                                         weight_quant_range=wrange, act_quant_range=arange))
    bounds = quant.ewgs_parameters(replica)
    ids = {id(p) for p in bounds}
    groups: list[dict[str, Any]] = [{"params": [p for p in replica.parameters() if id(p) not in ids]}]
    if bounds:
        groups.append({"params": bounds, "lr": args.lr * 1e-2})
    opt: torch.optim.Optimizer = torch.optim.SGD(groups, lr=args.lr, momentum=0.9, nesterov=True, weight_decay=4e-5)
    if method == "talr":
        opt = TransitionRateScheduler(opt, target=0.02, schedule="constant", model=replica)
    return replica, opt, quant.FoldTracker(replica) if method == "ewgs" else None


def _median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1e3


def main(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Run the benchmark and print per variant the median step time and the overhead over STE.

    Returns:
        Per ``"<method>_<clock>"`` (clock ``"wall"`` or ``"cpu"``): median full-step and
        optimizer-step times in ms and the overhead over ``ste`` in percent; for ``ewgs`` also the
        median delta re-estimate and the overhead amortized over ``--ewgs-interval`` steps.
    """
    if args.iters < 1 or args.warmup < 0 or args.ewgs_interval < 1 or args.ewgs_refreshes < 0:
        raise ValueError(f"need --iters >= 1, --warmup >= 0, --ewgs-interval >= 1 and --ewgs-refreshes >= 0, got "
                         f"{args.iters}, {args.warmup}, {args.ewgs_interval} and {args.ewgs_refreshes}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = get_model(args.model, num_classes=args.num_classes).train()
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)  # deep-copied into every variant
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, args.num_classes, (args.batch_size,))
    criterion = nn.CrossEntropyLoss()
    methods = ["ste"] + [m for m in args.methods if m != "ste"]
    print(f"model {args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, batch "
          f"{args.batch_size}x3x{args.image_size}x{args.image_size}, W{args.bits}A{args.bits} for {args.backend}, "
          f"{torch.get_num_threads()} threads, median of {args.iters} steps after {args.warmup} warm-up")
    clocks: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}
    variants = {}
    for method in methods:
        replica, opt, tracker = build_variant(method, model, args)
        variants[method] = (replica, opt, tracker, {f"{c}_{part}": [] for c in clocks for part in ("step", "opt")})

    for i in range(args.warmup + args.iters):
        for replica, opt, tracker, samples in variants.values():
            start = {n: c() for n, c in clocks.items()}
            opt.zero_grad(set_to_none=True)
            criterion(replica(images), labels).backward()
            mid = {n: c() for n, c in clocks.items()}
            opt.step()
            if tracker is not None:
                tracker.update()
            end = {n: c() for n, c in clocks.items()}
            if i >= args.warmup:
                for n in clocks:
                    samples[f"{n}_step"].append(end[n] - start[n])
                    samples[f"{n}_opt"].append(end[n] - mid[n])

    refresh: dict[str, list[float]] = {n: [] for n in clocks}
    if "ewgs" in variants:
        replica = variants["ewgs"][0]
        for _ in range(args.ewgs_refreshes):
            start = {n: c() for n, c in clocks.items()}
            quant.update_ewgs_deltas(replica, lambda: criterion(replica(images), labels))
            for n, c in clocks.items():
                refresh[n].append(c() - start[n])

    results: dict[str, dict[str, float]] = {}
    for n in clocks:
        base = _median_ms(variants["ste"][3][f"{n}_step"])
        for method, (_, _, _, samples) in variants.items():
            step, opt_ms = _median_ms(samples[f"{n}_step"]), _median_ms(samples[f"{n}_opt"])
            row = {"step_ms": step, "optimizer_ms": opt_ms, "overhead_percent": (step / base - 1.0) * 100.0}
            line = (f"{method:>6} {n:>4}: step {step:8.2f} ms (optimizer.step {opt_ms:6.2f} ms) -> "
                    f"{row['overhead_percent']:+7.2f}% over ste")
            if method == "ewgs" and refresh[n]:
                per = _median_ms(refresh[n])
                row["delta_refresh_ms"] = per
                row["amortized_overhead_percent"] = ((step + per / args.ewgs_interval) / base - 1.0) * 100.0
                line += (f"; delta re-estimate {per:.1f} ms -> {row['amortized_overhead_percent']:+.2f}% "
                         f"with one every {args.ewgs_interval} steps")
            results[f"{method}_{n}"] = row
            print(line)
    if args.json:
        path = Path(args.json)
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps({"config": vars(args), "results": results}, indent=2))
        os.replace(tmp, path)  # never leave a half-written file behind
    return results


if __name__ == "__main__":
    main(get_args_parser().parse_args())
