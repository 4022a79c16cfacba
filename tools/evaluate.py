"""Top-1 accuracy of published weights (a manifest name or a weights file) on a test split.

    python tools/evaluate.py frostnet_large_1_0.fashion_mnist.int8_x86
    python tools/evaluate.py weights/frostnet_small_1_0.fashion_mnist.fp32.safetensors --subset 2000

The model is built from the weights alone (float for FP32 files, the converted model for INT8
files, on the engine they were converted for); the preprocessing is the one the entry records.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import torch

from frostnet import hub
from frostnet.recipe.data import build_data
from frostnet.recipe.engine import evaluate


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("weights", help="manifest name (frostnet.list_weights()) or path to a .safetensors file")
    p.add_argument("--data", default=None, help="dataset spec (default: the weights' dataset, e.g. fashion_mnist)")
    p.add_argument("--split", default="test", choices=("test", "val"), help="evaluation split")
    p.add_argument("--subset", type=int, default=0, help="evaluate on the first N images only (0 = all)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    p.add_argument("--json", action="store_true", help="print one JSON line instead of text")
    return p


def measure(weights: str, *, data: str | None = None, split: str = "test", subset: int = 0) -> dict[str, Any]:
    """Load ``weights`` and return {"acc@1", "n", "split", "dataset"}."""
    model = hub.load_weights(weights)
    entry = None if weights.endswith(".safetensors") else hub.get_weights(weights)
    input_size = entry.input_size[-1] if entry is not None else 32
    dataset = data or (entry.dataset if entry is not None else "fashion_mnist")
    _, eval_b, info = build_data(dataset, input_size=input_size, batch_size=256, seed=0, rank=0, world=1,
                                 eval_split=split, eval_subset=subset)
    res = evaluate(model, eval_b)
    return {"acc@1": round(res["top1"], 2), "n": res["n"], "split": info.eval_split, "dataset": info.name}


def main(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    res = measure(args.weights, data=args.data, split=args.split, subset=args.subset)
    print(json.dumps({"weights": args.weights, **res}) if args.json else
          f"{args.weights}: top-1 {res['acc@1']:.2f}% on {res['n']} {res['dataset']} {res['split']} images")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
