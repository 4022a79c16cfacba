"""Publish a finished training run into the checkout: copy its files to weights/ and add manifest entries.

    python tools/add_weights.py <output-dir of tools/train.py>/export --default

Every entry's metrics are measured here, on the full test split and on a fixed first part of it
(the headline metric again, e.g. ``acc@1_first2000`` or ``map_first200``, which the test suite
re-measures), by the same code as ``python tools/evaluate.py <name>`` (the entry's
``metrics_command``; ``--subset N`` for the second figure). Classifiers get ``acc@1`` (%),
detectors ``map``, ``map_50``, ``map_75`` and segmenters ``miou``, ``pixel_acc`` (fractions).
FP32 entries of QAT runs also carry the fake-quant metrics of the training run's final test
evaluation (its ``recipe`` command): ``fake_quant_acc@1``, ``fake_quant_map``, ...
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from frostnet import hub
from frostnet.recipe.engine import converts_directly
from frostnet.serialization import read_metadata

ROOT = Path(__file__).resolve().parents[1]
SUBSET = 2000  # the fixed part of the test split that tests/test_published.py re-evaluates (classifiers)
#: The same for the dense tasks: a scene canvas costs what ~100 Fashion-MNIST images cost to evaluate.
DENSE_SUBSET = 200
#: measure()'s keys that are not metrics.
_NOT_METRICS = ("n", "split", "dataset")
sys.path.insert(0, str(ROOT / "tools"))
from evaluate import measure  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("export_dir", type=Path, help="the run's export folder (run.json + .safetensors files)")
    p.add_argument("--default", action="store_true", help="make these the default weights of their arch/backends")
    p.add_argument("--replace", action="store_true", help="overwrite existing entries of the same names")
    p.add_argument("--note", action="append", default=[],
                   help="add this sentence to every entry's notes (e.g. how the run was interrupted and resumed); repeatable")
    p.add_argument("--weights-dir", type=Path, default=ROOT / "weights", help="destination of the files")
    p.add_argument("--allow-missing-run-id", action="store_true",
                   help="publish an export written before runs had ids (its files cannot be matched to the run)")
    return p


def check_run_ids(run: dict, files: list[Path], *, allow_missing: bool = False) -> None:
    """Raise unless every file carries the run id of ``run`` (run.json): an export directory can
    hold stale files of an earlier run, which must not be published under this run's recipe."""
    run_id = run.get("run_id")
    if run_id is None:
        if allow_missing:
            return
        raise SystemExit("run.json has no run_id (written before runs had ids), so its files cannot be matched to the "
                         "run; re-export the run, or pass --allow-missing-run-id if you know the files are its own")
    stale = [f"{f.name} (run_id {read_metadata(f).get('run_id')!r})" for f in files if read_metadata(f).get("run_id") != run_id]
    if stale:
        raise SystemExit(f"not written by run {run_id} of run.json: {', '.join(stale)}; these are stale files of "
                         "another run: delete them, or re-run into a fresh --output-dir (or with --overwrite)")


def subset_key(metric: str, n: int) -> str:
    """The manifest key of ``metric`` measured on the first ``n`` test samples (``acc@1_first2000``)."""
    return f"{metric}_first{n}"


def entry_metrics(res: dict, part: dict) -> dict[str, float]:
    """Manifest metrics from ``measure`` on the whole split (``res``) and on its first part
    (``part``): every metric of ``res``, and the headline (the first) of ``part`` under
    :func:`subset_key` with the number of samples ``part`` really had (a split smaller than the
    subset is not passed off as a bigger one)."""
    keys = [k for k in res if k not in _NOT_METRICS]
    return {**{k: res[k] for k in keys}, subset_key(keys[0], part["n"]): part[keys[0]]}


def fake_quant_metrics(final: dict) -> dict[str, float]:
    """The fake-quant figures of a QAT run's final test evaluation (``final`` of run.json), under
    the names of the measured metrics: ``fake_quant_top1`` -> ``fake_quant_acc@1`` (%, 2 decimals),
    ``fake_quant_map`` / ``fake_quant_miou`` / ... as they are (fractions, 4 decimals)."""
    out = {}
    for key, value in final.items():
        if key == "fake_quant_top1":
            out["fake_quant_acc@1"] = round(value, 2)
        elif key.startswith("fake_quant_"):
            out[key] = round(value, 4)
    return out


def _dataset_fields(data: dict) -> dict:
    """make_manifest_entry's categories/input_size/mean/std from run.json's ``data`` (for datasets
    hub.DATASETS does not know, e.g. fashion_scenes: the run's canvas size and classes)."""
    if data["name"] in hub.DATASETS:
        return {}
    size = int(data["input_size"])
    return {"categories": data["categories"], "input_size": (int(data.get("in_channels", 3)), size, size),
            "mean": data["mean"], "std": data["std"]}


def main(args: argparse.Namespace) -> int:
    run = json.loads((args.export_dir / "run.json").read_text())
    # the recorded command names the training machine's --output-dir: published as runs/<name>
    final, recipe = run["final"], hub.portable_recipe(run["recipe"])
    dataset = run["data"]["name"]
    dense = final.get("task", "classification") != "classification"
    subset = DENSE_SUBSET if dense else SUBSET
    args.weights_dir.mkdir(parents=True, exist_ok=True)
    files = sorted(args.export_dir.glob("*.safetensors"), key=lambda p: (".int8_" in p.name, p.name))
    check_run_ids(run, files, allow_missing=args.allow_missing_run_id)
    for src in files:
        dst = args.weights_dir / src.name
        shutil.copyfile(src, dst)
        name = src.name[: -len(".safetensors")]
        meta = read_metadata(dst)
        # a dense file records its --data (the scene options); measure() evaluates that spec's test split
        res = measure(str(dst), data=None if dense else dataset)
        part = measure(str(dst), data=None if dense else dataset, subset=subset)
        metrics = entry_metrics(res, part)
        headline = next(iter(metrics))
        notes = [f"trained by the recipe command (mode {final['mode']}, {final['epochs']} epochs) on this project's 2-core CPU machine"]
        init = run["args"].get("init")
        if dense:
            notes.append(f"backbone initialised from {Path(init).name} (--init)" if init else "trained from scratch (no --init)")
        fake_quant = fake_quant_metrics(final)
        if meta.get("format") == "frostnet-fp32" and fake_quant:
            metrics.update(fake_quant)
            notes.append(f"fake_quant_*: the QAT model's final test-split evaluation inside the training run; "
                         f"{headline}: these latent FP32 weights run as a float model")
        backend = meta.get("backend")
        trained = run["args"]["backend"]
        if backend and final["mode"] != "fp" and backend != trained:
            if converts_directly(argparse.Namespace(**run["args"]), trained, backend):
                notes.append(f"INT8 for {backend}: the QAT model (trained fake-quantized for {trained}) converted as it "
                             f"is, its activation ranges fit {backend}'s")
            else:
                notes.append(f"INT8 for {backend}: the QAT-trained latent weights re-calibrated for {backend}'s "
                             f"activation ranges (the run trained fake-quantized for {trained})")
        if backend and final["mode"] == "fp":
            notes.append("INT8 by post-training quantization of the FP32 weights")
        if final.get("weights") == "ema":
            c = final["ema_choice"]
            notes.append(f"the weight EMA (decay {final['ema_decay']}) of the last phase, exported because it beat the live "
                         f"weights on the {c['split']} split ({c['key']} {c['ema']:.2f} vs {c['live']:.2f})")
        elif final.get("weights") == "live" and final.get("ema_choice"):
            c = final["ema_choice"]
            notes.append(f"the live weights: the weight EMA (decay {final['ema_decay']}) was not better on the {c['split']} "
                         f"split ({c['key']} {c['ema']:.2f} vs {c['live']:.2f})")
        notes.extend(args.note)
        entry_name, entry = hub.make_manifest_entry(
            dst, dataset=dataset, metrics=metrics,
            metrics_command=f"python tools/evaluate.py {name} ({subset_key(headline, part['n'])}: --subset {part['n']})",
            recipe=recipe, default=args.default, notes="; ".join(notes), **_dataset_fields(run["data"]))
        hub.add_manifest_entry(entry_name, entry, replace=args.replace)
        print(f"{entry_name}: {headline} {res[headline]:g} on {res['n']} test samples ({part[headline]:g} on the "
              f"first {part['n']}), {entry['size'] / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
