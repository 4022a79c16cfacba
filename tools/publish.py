"""Publish manifest entries to Hugging Face Hub repos, with a generated model card.

    python tools/publish.py "frostnet_small_1_0.fashion_mnist.*" --dry-run --out /tmp/hub   # write the repo folders
    HF_TOKEN=... python tools/publish.py "frostnet_small_1_0.fashion_mnist.*"               # upload + pin revisions

Entries are grouped by their ``hf.repo_id``: by default an FP32 checkpoint lives in
``<org>/<arch>.<tag>`` and its INT8 conversions in ``<org>/<arch>.<tag>.int8``, whose card
declares the FP32 repo as ``base_model`` with ``base_model_relation: quantized``. Each repo
folder holds the weights files (sha256-checked against the manifest), ``README.md`` (the model
card: YAML metadata with license, datasets, tags, base model and model-index metrics; usage,
preprocessing, recipe and measuring commands) and ``weights_manifest.json`` (the entries).

``--dry-run --out DIR`` writes exactly the folder that would be uploaded to ``DIR/<repo_id>``.
Without it, :class:`huggingface_hub.HfApi` creates the repo (``create_repo(exist_ok=True)``),
uploads the folder in one commit (``upload_folder``) and the commit id is written into the
manifest entries' ``hf.revision`` so downloads are pinned (``--no-pin`` skips that). The upload
path needs network access and a token (``HF_TOKEN`` or ``hf auth login``).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Optional

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from frostnet import __version__, hub
from frostnet.serialization import read_metadata, sha256_file

_PIPELINE_TAGS = {"classification": "image-classification", "segmentation": "image-segmentation",
                  "detection": "object-detection"}
_LICENSES = {"mit", "apache-2.0", "bsd-3-clause", "cc-by-4.0", "cc-by-nc-4.0"}
_METRIC_TYPES = {"acc@1": "accuracy", "acc@5": "accuracy", "miou": "mean_iou", "map": "mean_average_precision"}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("patterns", nargs="+", help="manifest names or shell patterns (frostnet.list_weights)")
    parser.add_argument("--manifest", type=Path, default=None, help="manifest (default: the checkout's)")
    parser.add_argument("--weights-dir", type=Path, default=None,
                        help="where the files are (default: $FROSTNET_WEIGHTS_DIR or <checkout>/weights)")
    parser.add_argument("--dry-run", action="store_true", help="write the repo folders to --out instead of uploading")
    parser.add_argument("--out", type=Path, default=None, help="output directory of --dry-run")
    parser.add_argument("--overwrite", action="store_true", help="replace existing folders under --out")
    parser.add_argument("--private", action="store_true", help="create private repos")
    parser.add_argument("--no-pin", action="store_true", help="do not write the commit ids into the manifest")
    parser.add_argument("--commit-message", default=None, help="commit message of the upload")
    return parser


def select_entries(patterns: Sequence[str], entries: Mapping[str, hub.WeightsEntry]) -> list[hub.WeightsEntry]:
    """Entries whose names match any pattern; a pattern that matches nothing raises."""
    chosen: dict[str, hub.WeightsEntry] = {}
    for pattern in patterns:
        hits = [n for n in entries if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise ValueError(f"{pattern!r} matches no manifest entry (entries: {', '.join(sorted(entries)) or 'none'})")
        chosen.update({n: entries[n] for n in hits})
    return [chosen[n] for n in sorted(chosen)]


def _format_label(e: hub.WeightsEntry) -> str:
    return "FP32" if e.format == "fp32" else f"INT8 ({e.backend})"


def model_card(repo_id: str, repo_entries: Sequence[hub.WeightsEntry],
               all_entries: Mapping[str, hub.WeightsEntry]) -> ModelCard:
    """The README.md model card of one Hub repo holding ``repo_entries``."""
    first = repo_entries[0]
    info = hub.DATASETS.get(first.dataset)
    hf_dataset = info.hf_dataset if info else None
    bases = sorted({all_entries[e.base].hf.repo_id for e in repo_entries if e.base and e.base in all_entries})
    base_model = [b for b in bases if b != repo_id]
    license_id = first.license.lower()
    tags = ["frostnet", "pytorch", "safetensors", first.task, first.dataset, first.arch]
    if any(e.quantized for e in repo_entries):
        tags += ["int8", "quantized"] + sorted({str(e.backend) for e in repo_entries if e.backend})
    eval_results = [
        EvalResult(
            task_type=_PIPELINE_TAGS.get(e.task, e.task),
            dataset_type=hf_dataset or e.dataset,
            dataset_name=e.dataset,
            dataset_split="test",
            metric_type=_METRIC_TYPES.get(metric.lower(), metric),
            metric_value=value,
            metric_name=f"{metric} ({_format_label(e)})",
        )
        for e in repo_entries for metric, value in e.metrics.items()
    ]
    extra = {"base_model_relation": "quantized"} if base_model else {}
    data = ModelCardData(
        license=license_id if license_id in _LICENSES else "other",
        license_name=None if license_id in _LICENSES else first.license,
        library_name="pytorch",
        tags=list(dict.fromkeys(tags)),
        datasets=[hf_dataset] if hf_dataset else None,
        pipeline_tag=_PIPELINE_TAGS.get(first.task),
        base_model=(base_model[0] if len(base_model) == 1 else base_model) or None,
        model_name=repo_id.split("/")[-1],
        eval_results=eval_results or None,
        **extra,
    )

    lines = [
        f"# {repo_id.split('/')[-1]}",
        "",
        f"{first.arch} ({first.task}) trained on {first.dataset}, from the frostnet INT8 model zoo "
        f"(frostnet {__version__}). Files are safetensors: "
        "nothing is unpickled when they are loaded, and frostnet checks each file's sha256 before reading it.",
        "",
        "| weights | format | file | size | sha256 | metrics |",
        "|---|---|---|---|---|---|",
    ]
    for e in repo_entries:
        metrics = ", ".join(f"{k} {v:g}" for k, v in e.metrics.items()) or "not measured"
        lines.append(f"| `{e.name}` | {_format_label(e)} | `{e.hf.filename}` | {e.size / 1e6:.2f} MB | "
                     f"`{e.sha256[:16]}…` | {metrics} |")
    lines += ["", "## Usage", "", "```python", "import frostnet, torch", ""]
    for e in repo_entries:
        q = f", quantized=True, backend={e.backend!r}" if e.quantized else ""
        lines.append(f"model = frostnet.get_model({e.arch!r}, weights={e.name!r}{q})")
    e = repo_entries[0]
    lines += [
        "",
        "# or with torch.hub, from a frostnet checkout:",
        f"model = torch.hub.load('<frostnet checkout>', {e.arch!r}, source='local', weights={e.name!r}"
        + (", quantized=True" if e.quantized else "") + ")",
        "",
        "# or any file of this repo, by path:",
        "from huggingface_hub import hf_hub_download",
        f"model = frostnet.hub.load_weights(hf_hub_download({repo_id!r}, {e.hf.filename!r}))",
        "```",
        "",
        "INT8 files rebuild the converted model for their backend (the global quantized engine is set to it); "
        "on the same engine their outputs are bitwise those of the model that was converted.",
        "",
        "## Preprocessing",
        "",
        f"Input: {first.input_size[0]} x {first.input_size[1]} x {first.input_size[2]} (C x H x W), "
        f"normalized with mean {list(first.mean)} and std {list(first.std)}.",
        "",
        f"Categories ({len(first.categories)}): " + ", ".join(first.categories[:20])
        + (", ..." if len(first.categories) > 20 else ""),
        "",
        "## Provenance",
        "",
    ]
    for e in repo_entries:
        lines.append(f"- `{e.name}`: {e.num_params / 1e6:.2f}M parameters, builder arguments "
                     f"`{json.dumps(dict(e.builder_kwargs), sort_keys=True)}`")
        if e.base:
            base = all_entries.get(e.base)
            where = f" (`{base.hf.repo_id}`)" if base else ""
            lines.append(f"  - quantized ({e.backend}) from `{e.base}`{where}")
        if e.recipe:
            lines.append(f"  - produced by: `{e.recipe}`")
        if e.metrics_command:
            lines.append(f"  - metrics measured by: `{e.metrics_command}`")
        if e.notes:
            lines.append(f"  - {e.notes}")
    lines += ["", f"License: {first.license}.", ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))


def check_same_run(entries: Sequence[hub.WeightsEntry], all_entries: Mapping[str, hub.WeightsEntry],
                   weights_dir: Optional[Path]) -> None:
    """Raise if an INT8 entry's file and its FP32 base's file were written by different training
    runs (their ``run_id`` metadata differ): a stale INT8 file of an earlier run in the export
    folder would otherwise be published as the quantization of the new FP32 weights. Files
    written before runs had ids are not checked."""
    def run_id(e: hub.WeightsEntry) -> Optional[str]:
        try:
            path = hub.resolve_file(e, weights_dir=weights_dir, local_files_only=True)
        except hub.WeightsNotFoundError:
            return None  # a base that is not here is not published now; its own sha256 is pinned
        return read_metadata(path).get("run_id")

    for e in entries:
        base = all_entries.get(e.base) if e.base else None
        if base is None:
            continue
        mine, theirs = run_id(e), run_id(base)
        if mine and theirs and mine != theirs:
            raise ValueError(f"{e.name} was written by run {mine} but its base {base.name} by run {theirs}: the INT8 "
                             "file is not the quantization of these FP32 weights; re-export both from one run")


def write_repo_folder(folder: Path, repo_id: str, repo_entries: Sequence[hub.WeightsEntry],
                      all_entries: Mapping[str, hub.WeightsEntry], weights_dir: Optional[Path]) -> list[Path]:
    """Write the files of one Hub repo into ``folder``; returns the written paths."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for e in repo_entries:
        src = hub.resolve_file(e, weights_dir=weights_dir, local_files_only=True)
        actual = sha256_file(src)
        if actual != e.sha256:
            raise ValueError(f"{src} has sha256 {actual}, the manifest says {e.sha256} for {e.name}; "
                             "regenerate the entry (make_manifest_entry) or the file before publishing")
        dst = folder / e.hf.filename
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        written.append(dst)
    readme = folder / "README.md"
    model_card(repo_id, repo_entries, all_entries).save(readme)
    manifest = {"format_version": hub.MANIFEST_FORMAT_VERSION,
                "$comment": f"frostnet manifest entries of the files in {repo_id}; hf.revision null means this commit",
                "weights": {e.name: {**e.to_dict(), "hf": {**e.to_dict()["hf"], "revision": None}} for e in repo_entries}}
    (folder / "weights_manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return written + [readme, folder / "weights_manifest.json"]


def main(args: argparse.Namespace) -> int:
    all_entries = hub.read_manifest(args.manifest)
    selected = select_entries(args.patterns, all_entries)
    check_same_run(selected, all_entries, args.weights_dir)
    repos: dict[str, list[hub.WeightsEntry]] = {}
    for e in selected:
        repos.setdefault(e.hf.repo_id, []).append(e)
    if args.dry_run:
        if args.out is None:
            raise SystemExit("--dry-run needs --out DIR")
        for repo_id, entries in repos.items():
            folder = args.out / repo_id
            if folder.exists() and any(folder.iterdir()):
                if not args.overwrite:
                    raise SystemExit(f"{folder} exists and is not empty; pass --overwrite to replace it")
                shutil.rmtree(folder)
            write_repo_folder(folder, repo_id, entries, all_entries, args.weights_dir)
            print(f"[dry run] {repo_id}: {folder} ({', '.join(e.name for e in entries)})")
        return 0

    from huggingface_hub import HfApi

    api = HfApi()
    for repo_id, entries in repos.items():
        with tempfile.TemporaryDirectory() as tmp:
            write_repo_folder(Path(tmp), repo_id, entries, all_entries, args.weights_dir)
            api.create_repo(repo_id, private=args.private, exist_ok=True)
            info = api.upload_folder(repo_id=repo_id, folder_path=tmp,
                                     commit_message=args.commit_message or f"frostnet {__version__}: "
                                     + ", ".join(e.name for e in entries))
        revision = info.oid
        print(f"{repo_id}: uploaded {len(entries)} file(s) at commit {revision}")
        if not args.no_pin:
            hub.set_hf_revision([e.name for e in entries], revision, manifest_path=args.manifest)
            print(f"  pinned hf.revision={revision} in the manifest")
    return 0


def cli(argv: Optional[list[str]] = None) -> int:
    """Parse ``argv`` (default: the command line) and run :func:`main`."""
    return main(get_args_parser().parse_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(cli())
