"""The metric of published weights (a manifest name or a weights file) on a test split.

    python tools/evaluate.py frostnet_large_1_0.fashion_mnist.int8_x86
    python tools/evaluate.py weights/frostnet_small_1_0.fashion_mnist.fp32.safetensors --subset 2000
    python tools/evaluate.py ssdlite_mobilenet_v2.fashion_scenes.int8_x86      # mAP@[.5:.95], mAP@.5, mAP@.75
    python tools/evaluate.py espnet.fashion_scenes.int8_x86                    # mIoU, pixel accuracy

Classifiers report top-1 (``acc@1``, %); detectors COCO mAP (``map``, ``map_50``, ``map_75``) and
segmenters ``miou`` and ``pixel_acc``, as fractions, measured the way the training recipe does.

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
from frostnet.models import get_model_task
from frostnet.recipe.data import build_data
from frostnet.recipe.engine import evaluate
from frostnet.recipe.tasks import get_task
from frostnet.serialization import read_metadata


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
    """Load ``weights`` and return its metrics with "n", "split" and "dataset".

    Classifiers: {"acc@1"} (%); detectors: {"map", "map_50", "map_75"}; segmenters: {"miou",
    "pixel_acc"} (fractions). The data spec is ``data``, else the one the file records (the
    training run's ``--data``; for a manifest entry only for detection and segmentation), else
    the dataset of the manifest entry.
    """
    model = hub.load_weights(weights)
    entry = None if weights.endswith(".safetensors") else hub.get_weights(weights)
    meta = read_metadata(weights) if entry is None else {}
    arch = entry.arch if entry is not None else meta.get("arch", "")
    task_name = get_model_task(arch)
    if entry is not None and task_name != "classification":
        # a scene model's test split is the canvases of its run's --data options (size, counts,
        # background), which the file records and the manifest's dataset name does not
        meta = read_metadata(hub.resolve_file(entry))
    input_size = entry.input_size[-1] if entry is not None else int(meta.get("input_size", 32))
    dataset = data or meta.get("data") or (entry.dataset if entry is not None else meta.get("dataset", "fashion_mnist"))
    if task_name == "classification":
        _, eval_b, info = build_data(dataset, input_size=input_size, batch_size=256, seed=0, rank=0, world=1,
                                     eval_split=split, eval_subset=subset)
        res = evaluate(model, eval_b)
        return {"acc@1": round(res["top1"], 2), "n": res["n"], "split": info.eval_split, "dataset": info.name}
    from frostnet.recipe.dense_data import build_dense_data

    _, eval_b, info = build_dense_data(dataset, task=task_name, input_size=input_size, batch_size=64, seed=0,
                                       eval_split=split, eval_subset=subset)
    task = get_task(task_name)
    res = evaluate(model, eval_b, task=task, num_classes=len(info.categories))
    return {**{k: round(float(res[k]), 4) for k in task.report_keys}, "n": res.get("n", info.eval_size),
            "split": info.eval_split, "dataset": info.name}


def main(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    res = measure(args.weights, data=args.data, split=args.split, subset=args.subset)
    if args.json:
        print(json.dumps({"weights": args.weights, **res}))
    elif "acc@1" in res:
        print(f"{args.weights}: top-1 {res['acc@1']:.2f}% on {res['n']} {res['dataset']} {res['split']} images")
    else:
        figures = ", ".join(f"{k} {v:.4f}" for k, v in res.items() if k not in ("n", "split", "dataset"))
        print(f"{args.weights}: {figures} on {res['n']} {res['dataset']} {res['split']} images")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
