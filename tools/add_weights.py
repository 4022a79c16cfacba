"""Publish a finished training run into the checkout: copy its files to weights/ and add manifest entries.

    python tools/add_weights.py <output-dir of tools/train.py>/export --default

Every entry's accuracy is measured here, on the full test split and on its first 2,000 images
(``acc@1_first2000``, which the test suite re-measures), by the same code as
``python tools/evaluate.py <name>`` (the entry's ``metrics_command``; ``--subset 2000`` for the
second figure). FP32 entries of QAT runs also
carry the fake-quant accuracy of the training run's final test evaluation (its ``recipe`` command).
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
SUBSET = 2000  # the fixed part of the test split that tests/test_published.py re-evaluates
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


def main(args: argparse.Namespace) -> int:
    run = json.loads((args.export_dir / "run.json").read_text())
    # the recorded command names the training machine's --output-dir: published as runs/<name>
    final, recipe = run["final"], hub.portable_recipe(run["recipe"])
    dataset = run["data"]["name"]
    args.weights_dir.mkdir(parents=True, exist_ok=True)
    files = sorted(args.export_dir.glob("*.safetensors"), key=lambda p: (".int8_" in p.name, p.name))
    check_run_ids(run, files, allow_missing=args.allow_missing_run_id)
    for src in files:
        dst = args.weights_dir / src.name
        shutil.copyfile(src, dst)
        name = src.name[: -len(".safetensors")]
        meta = read_metadata(dst)
        res = measure(str(dst), data=dataset)
        part = measure(str(dst), data=dataset, subset=SUBSET)
        metrics = {"acc@1": res["acc@1"], f"acc@1_first{SUBSET}": part["acc@1"]}
        notes = [f"trained by the recipe command (mode {final['mode']}, {final['epochs']} epochs) on this project's 2-core CPU machine"]
        if meta.get("format") == "frostnet-fp32" and "fake_quant_top1" in final:
            metrics["fake_quant_acc@1"] = round(final["fake_quant_top1"], 2)
            notes.append("fake_quant_acc@1: the QAT model's final test-split evaluation inside the training run; "
                         "acc@1: these latent FP32 weights run as a float model")
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
            dst, dataset=dataset, metrics=metrics, metrics_command=f"python tools/evaluate.py {name} (acc@1_first{SUBSET}: --subset {SUBSET})",
            recipe=recipe, default=args.default, notes="; ".join(notes))
        hub.add_manifest_entry(entry_name, entry, replace=args.replace)
        print(f"{entry_name}: acc@1 {res['acc@1']:.2f} on {res['n']} test images ({part['acc@1']:.2f} on the first "
              f"{part['n']}), {entry['size'] / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
