"""FP32 checkpoint -> INT8 file for a backend, plus its weights_manifest.json entry.

Post-training quantization with a calibration set (the FP32 weights are untouched):

    python tools/convert.py frostnet_small_1_0.fashion_mnist.fp32 --backend x86 --calib fashion_mnist
    python tools/convert.py frostnet_small_1_0.fashion_mnist.fp32 --backend qnnpack --calib fashion_mnist \\
        --calib-batches 16 --batch-size 64 --eval
    python tools/convert.py weights/run7.fp32.safetensors --backend x86 --calib random --no-manifest \\
        --output /tmp/run7.int8_x86.safetensors

The first argument is a manifest name (its file is resolved and sha256-checked like any weights)
or a path to an FP32 file. The INT8 file goes to ``weights/<name>.safetensors`` where ``<name>``
is ``<arch>.<tag>.int8_<backend>``, and its entry (base = the FP32 entry, recipe = this command,
metrics with ``--eval``) is added to the manifest.

QAT-trained checkpoints are converted in the training recipe, from the QAT-prepared model
object, with :func:`convert_qat_model` below (``frostnet.serialization.export_int8`` + the
manifest entry); the FP32 file of a QAT run holds the latent float weights (``save_fp32``
accepts the QAT-prepared model).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from frostnet import hub, quant
from frostnet.serialization import export_int8, file_builder_kwargs, read_metadata, save_int8

def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("fp32", help="manifest name of an fp32 entry, or path to an FP32 .safetensors file")
    parser.add_argument("--backend", default="x86", choices=quant.BACKENDS, help="INT8 engine to convert for")
    parser.add_argument("--calib", default="fashion_mnist",
                        help="calibration data: fashion_mnist[:<dir>] (train split) or 'random' (smoke tests only)")
    parser.add_argument("--calib-batches", type=int, default=8, help="number of calibration batches")
    parser.add_argument("--batch-size", type=int, default=64, help="calibration batch size")
    parser.add_argument("--seed", type=int, default=0, help="seed of the calibration subset")
    parser.add_argument("--eval", action="store_true",
                        help="measure top-1 of the INT8 model on the test split and record it in the manifest")
    parser.add_argument("--dataset", default=None, help="dataset of an FP32 file given by path (default: its metadata)")
    parser.add_argument("--tag", default=None, help="middle part of the INT8 name (default: that of the FP32 entry)")
    parser.add_argument("--manifest", type=Path, default=None, help="manifest to update (default: the checkout's)")
    parser.add_argument("--weights-dir", type=Path, default=None, help="where the INT8 file goes (default: $FROSTNET_WEIGHTS_DIR or <checkout>/weights)")
    parser.add_argument("--output", type=Path, default=None, help="explicit INT8 file (with --no-manifest)")
    parser.add_argument("--no-manifest", action="store_true", help="only write the file")
    parser.add_argument("--default", action="store_true", help="mark the entry default for its arch and backend")
    parser.add_argument("--replace", action="store_true", help="overwrite an existing manifest entry")
    return parser


def calibration_batches(spec: str, input_size: tuple[int, int, int], mean: list[float], std: list[float],
                        batches: int, batch_size: int, seed: int = 0) -> Iterator[torch.Tensor]:
    """Normalized model-input batches for PTQ calibration.

    ``fashion_mnist[:<dir>]`` draws a seeded subset of the train split through
    :class:`frostnet.data.BatchPipeline` (the evaluation pipeline: no augmentation); ``random``
    yields standard normal batches (only for smoke tests).
    """
    if batches < 1 or batch_size < 1:
        raise ValueError(f"--calib-batches and --batch-size must be positive, got {batches} and {batch_size}")
    c, h, w = input_size
    if spec == "random":
        g = torch.Generator().manual_seed(seed)
        for _ in range(batches):
            yield torch.randn(batch_size, c, h, w, generator=g)
        return
    name = spec.partition(":")[0]
    if name != "fashion_mnist":
        raise ValueError(f"unsupported calibration set {spec!r}; valid choices: fashion_mnist[:<dir>], random")
    if h != w or len(set(mean)) != 1 or len(set(std)) != 1:
        raise ValueError(f"fashion_mnist calibration needs a square input and one mean/std, got {input_size}, {mean}, {std}")
    from frostnet.data import BatchPipeline, build_dataset

    ds = build_dataset(spec, split="train", subset=batches * batch_size, seed=seed)
    pipeline = BatchPipeline(size=h, train=False, mean=mean[0], std=std[0], channels=c)
    for i in range(batches):
        yield pipeline(ds.images[i * batch_size:(i + 1) * batch_size])


@torch.no_grad()
def evaluate_top1(model: nn.Module, spec: str, input_size: tuple[int, int, int], mean: list[float], std: list[float],
                  batch_size: int = 256) -> float:
    """Top-1 accuracy (%) of ``model`` on the test split of a Fashion-MNIST spec."""
    from frostnet.data import BatchPipeline, build_dataset

    c, h, _ = input_size
    ds = build_dataset(spec, split="test")
    pipeline = BatchPipeline(size=h, train=False, mean=mean[0], std=std[0], channels=c)
    model.eval()
    correct = 0
    for i in range(0, len(ds), batch_size):
        logits = model(pipeline(ds.images[i:i + batch_size]))
        correct += int((logits.argmax(1) == ds.targets[i:i + batch_size]).sum())
    return 100.0 * correct / len(ds)


def _manifest_entry_for(
    int8_path: Path, fp32_entry: hub.WeightsEntry, *, recipe: str, metrics: Optional[Mapping[str, float]],
    metrics_command: Optional[str], default: bool, tag: str,
) -> tuple[str, dict[str, Any]]:
    return hub.make_manifest_entry(
        int8_path,
        dataset=fp32_entry.dataset,
        tag=tag,
        task=fp32_entry.task,
        categories=fp32_entry.categories,
        input_size=fp32_entry.input_size,
        mean=fp32_entry.mean,
        std=fp32_entry.std,
        metrics=metrics,
        metrics_command=metrics_command,
        recipe=recipe,
        base=fp32_entry.name,
        license=fp32_entry.license,
        default=default,
    )


def convert_qat_model(
    model_qat: nn.Module,
    backend: str,
    fp32_name: str,
    *,
    recipe: str,
    metrics: Optional[Mapping[str, float]] = None,
    metrics_command: Optional[str] = None,
    default: bool = False,
    weights_dir: Optional[Path] = None,
    manifest: Optional[Path] = None,
    replace: bool = False,
) -> tuple[nn.Module, str]:
    """Convert a QAT-trained model, write its INT8 file and manifest entry (for the recipe).

    Args:
        model_qat: the QAT-prepared, trained model (left untouched).
        backend: the backend it was prepared for.
        fp32_name: the manifest entry of the FP32 (latent weights) file of the same run.
        recipe: the exact training command.
        metrics, metrics_command: measured INT8 metrics and the command that measured them.

    Returns:
        ``(int8_model, manifest name)``.
    """
    fp32 = hub.get_weights(fp32_name, manifest=manifest)
    tag = fp32.name.split(".")[1]
    name = hub.weights_name(fp32.arch, tag, "int8", backend)
    out_dir = Path(weights_dir) if weights_dir is not None else hub.local_weights_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.safetensors"
    int8, _ = export_int8(model_qat, backend, path, arch=fp32.arch, builder_kwargs=fp32.builder_kwargs,
                          metadata={"dataset": fp32.dataset, "base": fp32.name})
    name, entry = _manifest_entry_for(path, fp32, recipe=recipe, metrics=metrics, metrics_command=metrics_command,
                                      default=default, tag=tag)
    hub.add_manifest_entry(name, entry, manifest_path=manifest, replace=replace)
    return int8, name


def main(args: argparse.Namespace) -> int:
    argv = getattr(args, "argv", None) or []
    command = "python tools/convert.py " + " ".join(shlex.quote(a) for a in argv)
    manifest = args.manifest
    fp32_entry: Optional[hub.WeightsEntry] = None
    if args.fp32.endswith(".safetensors") or "/" in args.fp32:
        if not args.no_manifest:
            raise SystemExit("an FP32 file given by path has no manifest entry to be the INT8 entry's base: add it "
                             "with frostnet.hub.make_manifest_entry/add_manifest_entry, or pass --no-manifest")
        fp32_path = Path(args.fp32)
        meta = read_metadata(fp32_path)
        kwargs = file_builder_kwargs(fp32_path, meta)
        model = hub.load_weights(fp32_path)
        arch = meta["arch"]
        dataset = args.dataset or meta.get("dataset")
        if dataset in hub.DATASETS:
            info = hub.DATASETS[dataset]
            input_size, (mean, std) = info.input_size, info.norm()
        else:
            c = int(kwargs.get("in_channels", 3))
            input_size, mean, std = (c, 32, 32), [0.0] * c, [1.0] * c
        tag = args.tag or dataset or "custom"
    else:
        fp32_entry = hub.get_weights(args.fp32, manifest=manifest)
        if fp32_entry.format != "fp32":
            raise SystemExit(f"{fp32_entry.name} is an {fp32_entry.format} entry; give the fp32 entry it came from")
        model = hub.load_weights(fp32_entry, manifest=manifest, weights_dir=args.weights_dir)
        arch, kwargs = fp32_entry.arch, dict(fp32_entry.builder_kwargs)
        input_size, mean, std = fp32_entry.input_size, list(fp32_entry.mean), list(fp32_entry.std)
        tag = args.tag or fp32_entry.name.split(".")[1]

    batches = list(calibration_batches(args.calib, tuple(input_size), list(mean), list(std), args.calib_batches,
                                       args.batch_size, args.seed))
    int8 = quant.quantize_ptq(model, batches, args.backend)
    name = hub.weights_name(arch, tag, "int8", args.backend)
    if args.output is not None:
        if not args.no_manifest:
            raise SystemExit("--output is for --no-manifest; manifest files live in --weights-dir as <name>.safetensors")
        out = args.output
    else:
        out_dir = args.weights_dir or hub.local_weights_dir()
        out_dir.mkdir(parents=True, exist_ok=True)
        out = out_dir / f"{name}.safetensors"
    extra = {"calibration": f"{args.calib} x {args.calib_batches} batches of {args.batch_size} (seed {args.seed})"}
    if fp32_entry is not None:
        extra.update(dataset=fp32_entry.dataset, base=fp32_entry.name)
    sha = save_int8(int8, out, arch=arch, backend=args.backend, builder_kwargs=kwargs, metadata=extra)
    print(f"{args.fp32} -> {out} ({args.backend}, sha256 {sha})")

    metrics = None
    if args.eval:
        if not args.calib.startswith("fashion_mnist"):
            raise SystemExit("--eval measures Fashion-MNIST test top-1; use --calib fashion_mnist[:<dir>]")
        metrics = {"acc@1": round(evaluate_top1(int8, args.calib, tuple(input_size), list(mean), list(std)), 2)}
        print(f"INT8 ({args.backend}) top-1 on the test split: {metrics['acc@1']:.2f}%")
    if not args.no_manifest:
        assert fp32_entry is not None
        name, entry = _manifest_entry_for(out, fp32_entry, recipe=command, metrics=metrics,
                                          metrics_command=command if metrics else None, default=args.default, tag=tag)
        path = hub.add_manifest_entry(name, entry, manifest_path=manifest, replace=args.replace)
        print(f"manifest entry {name} written to {path}")
    return 0


def cli(argv: Optional[list[str]] = None) -> int:
    """Parse ``argv`` (default: the command line) and run :func:`main`."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = get_args_parser().parse_args(argv)
    args.argv = argv
    return main(args)


if __name__ == "__main__":
    sys.exit(cli())
