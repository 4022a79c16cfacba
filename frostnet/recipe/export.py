"""Export of a finished run: the FP32 file and INT8 files, with manifest-ready metadata."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from torch import nn

from ..serialization import save_fp32, save_int8
from .args import recorded_args
from .data import DataInfo


def recipe_command(args: argparse.Namespace) -> str:
    """The command line that reproduces this run."""
    return "python tools/train.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def export_run(args: argparse.Namespace, float_model: nn.Module, int8_models: dict[str, nn.Module], info: DataInfo,
               final: dict[str, Any], out: Path, *, run_id: str = "") -> dict[str, str]:
    """Write ``<arch>.<dataset>.fp32.safetensors`` and one INT8 file per backend into ``out``.

    ``run_id`` (the run directory's id) goes into every file and run.json, so publishing tools can
    refuse files another run left behind.
    """
    out.mkdir(parents=True, exist_ok=True)
    base = f"{args.model}.{info.name}"
    # "data" is the full --data spec (scene options included), so tools/evaluate.py rebuilds the split
    meta = {"dataset": info.name, "data": args.data, "task": info.extra.get("task", "classification"),
            "categories": json.dumps(info.categories), "input_size": str(info.input_size),
            "mean": json.dumps(info.mean), "std": json.dumps(info.std), "recipe": recipe_command(args), "mode": args.mode,
            "run_id": run_id, "weights": str(final.get("weights", "live"))}
    files = {"fp32": str(out / f"{base}.fp32.safetensors")}
    save_fp32(float_model, files["fp32"], arch=args.model, num_classes=len(info.categories), metadata=meta)
    for backend, int8 in int8_models.items():
        path = out / f"{base}.int8_{backend}.safetensors"
        save_int8(int8, path, arch=args.model, backend=backend, builder_kwargs={"num_classes": len(info.categories)}, metadata=meta)
        files[f"int8_{backend}"] = str(path)
    run = {"final": {k: v for k, v in final.items() if k != "files"}, "recipe": recipe_command(args), "run_id": run_id,
           "args": recorded_args(args), "data": info.__dict__}
    tmp = out / f"run.json.tmp{os.getpid()}"
    tmp.write_text(json.dumps(run, indent=2))
    os.replace(tmp, out / "run.json")  # atomic: a reader never sees half a file
    return files
