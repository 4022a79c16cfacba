"""How stable is EWGS's delta? The sign agreement of two independent Hessian-trace estimates.

EWGS sets ``delta = max(0, (Tr(H)/N) / (3 std(g)))`` per quantizer, so what matters is the sign of
the trace estimate (positive: some scaling; negative: delta = 0, plain STE). This script trains a
small FrostNet briefly on real Fashion-MNIST batches (float, then EWGS QAT at the given bit width),
then draws two estimates from disjoint batches and independent Rademacher vectors with each
setting and prints, per setting, the fraction of quantizers whose two estimates have the same sign,
and the time one estimate took::

    PYTHONPATH=. python tools/ewgs_delta_agreement.py                      # W4A4, the settings below
    PYTHONPATH=. python tools/ewgs_delta_agreement.py --bits 8 --json out.json

Settings (samples per batch, batches, per quantizer): ``1,1,all`` is the recipe's original estimate
(one vector, one batch, all quantizers at once); ``8,4,per`` is today's default.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from frostnet import get_model, quant
from frostnet.recipe.data import build_data


def _settings(text: str) -> list[tuple[int, int, bool]]:
    out = []
    for item in text.split(";"):
        samples, batches, mode = item.split(",")
        if mode not in ("per", "all"):
            raise argparse.ArgumentTypeError(f"setting {item!r}: the third field must be 'per' or 'all'")
        out.append((int(samples), int(batches), mode == "per"))
    return out


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="frostnet_small_0_35")
    p.add_argument("--bits", type=int, default=4, help="weight and activation bits of the EWGS quantizers")
    p.add_argument("--fp-steps", type=int, default=150, help="float SGD steps before QAT")
    p.add_argument("--qat-steps", type=int, default=20, help="EWGS QAT steps before the estimates")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--settings", type=_settings, default=_settings("1,1,all;8,1,all;8,4,all;8,4,per"),
                   help="';'-separated samples,batches,per|all")
    p.add_argument("--same-batches", action="store_true",
                   help="both estimates on the same batches (only the vectors differ): separates the vectors' noise "
                        "from the batch-to-batch variation of the trace")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    return p


def main(args: argparse.Namespace) -> list[dict[str, Any]]:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    train_b, _, info = build_data("fashion_mnist", input_size=32, batch_size=args.batch_size, seed=args.seed, rank=0,
                                  world=1, train_subset=20000)
    batches = iter(x for e in range(100) for x in train_b.epoch(e))
    model = get_model(args.model, num_classes=len(info.categories))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _ in range(args.fp_steps):
        x, y = next(batches)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    n = 2 ** (args.bits - 1)
    qconfig = quant.get_ewgs_qconfig("x86", weight_quant_range=(-n, n - 1), act_quant_range=(0, 2 ** args.bits - 1))
    quant.prepare_qat(model, "x86", qconfig=qconfig)
    quant.keep_8bit_ends(model, quant.get_ewgs_qconfig("x86"))
    bounds = quant.ewgs_parameters(model)
    ids = {id(p) for p in bounds}
    opt = torch.optim.SGD([p for p in model.parameters() if id(p) not in ids], lr=0.005, momentum=0.9)
    bound_opt = torch.optim.Adam(bounds, lr=1e-5)
    for _ in range(args.qat_steps):
        x, y = next(batches)
        opt.zero_grad()
        bound_opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        bound_opt.step()
    rows = []
    for samples, n_batches, per_quantizer in args.settings:
        estimates = []
        t0 = time.perf_counter()
        shared = [next(batches) for _ in range(n_batches)] if args.same_batches else None
        for draw in range(2):
            chosen = shared if shared is not None else [next(batches) for _ in range(n_batches)]
            closures = [(lambda x=x, y=y: F.cross_entropy(model(x), y)) for x, y in chosen]
            gen = torch.Generator().manual_seed(args.seed * 1000 + draw * 7 + samples * 31 + n_batches)
            estimates.append(quant.ewgs_trace_estimates(model, closures, samples=samples, per_quantizer=per_quantizer,
                                                        generator=gen))
        seconds = (time.perf_counter() - t0) / 2
        a, b = estimates
        agree = sum((a[k].mean_trace > 0) == (b[k].mean_trace > 0) for k in a) / len(a)
        positive = sum(a[k].mean_trace > 0 for k in a) / len(a)
        row = {"samples": samples, "batches": n_batches, "per_quantizer": per_quantizer,
               "same_batches": args.same_batches, "quantizers": len(a),
               "sign_agreement": round(agree, 4), "positive_fraction": round(positive, 4),
               "seconds_per_estimate": round(seconds, 2)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_name(args.json.name + ".tmp")
        tmp.write_text(json.dumps({"model": args.model, "bits": args.bits, "fp_steps": args.fp_steps,
                                   "qat_steps": args.qat_steps, "batch_size": args.batch_size, "rows": rows}, indent=1))
        tmp.replace(args.json)
    return rows


if __name__ == "__main__":
    main(get_args_parser().parse_args())
