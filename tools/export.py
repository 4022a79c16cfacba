"""Export published weights to ONNX (INT8 QDQ), a pt2e INT8 graph or TorchScript, and check them.

    python tools/export.py frostnet_small_1_0.fashion_mnist.fp32 --format onnx --output m.onnx
    python tools/export.py frostnet_small_1_0.fashion_mnist.fp32 --format pt2e --output m.pt2
    python tools/export.py frostnet_small_1_0.fashion_mnist.fp32 --format pt2e --ranges qat --output m.pt2
    python tools/export.py frostnet_small_1_0.fashion_mnist.fp32 --format pt2e --backend xnnpack --output m.pt2
    python tools/export.py weights/my_run.fp32.safetensors --format torchscript --output m.ts

The tool writes the artifact, loads it back the way a user would (onnxruntime; ``torch.export.load``
then, for x86, ``torch.compile`` with freezing; ``torch.jit.load``) and prints its top-1 on the
weights' test split next to the eager INT8 model's on the same images (the published
``.int8_<engine>`` entry of the same run, or eager PTQ of the float weights when there is none)
and the manifest's published figure.

- ``onnx``: dynamo export of the float model + onnxruntime static QDQ quantization
  (``--onnx-method ort``, default) or the dynamo export of the pt2e INT8 graph (``pt2e``). The
  ONNX model takes the same float NCHW input as the PyTorch model (input name ``input``).
- ``pt2e``: ``torch.export`` -> ``prepare_pt2e`` (``--backend x86``: X86InductorQuantizer;
  ``xnnpack``: ExecuTorch's XNNPACKQuantizer) -> calibration -> ``convert_pt2e``, saved with
  ``torch.export.save``. ``--ranges qat`` takes the activation ranges the QAT run learned (from
  the eager INT8 weights) instead of calibrating them.
- ``torchscript``: the eager INT8 model, traced and frozen (``frostnet.quant.optimize_for_inference``).

Calibration: ``--calib-batches`` unaugmented training batches of 128 images (default 8, seeded);
for dense models batches of 32 images (a scene canvas holds 16 Fashion-MNIST frames' pixels).
Dense models (segmentation, detection) export their tensor body (priors/NMS stay in Python); the
tool checks the artifact's outputs against the float model's, and their metric goes through
:func:`dense_metric` (see there).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from frostnet import hub  # noqa: E402
from frostnet.serialization import read_metadata  # noqa: E402

FORMATS: tuple[str, ...] = ("onnx", "pt2e", "torchscript")
BACKENDS: tuple[str, ...] = ("x86", "xnnpack")
#: pt2e backend -> the eager engine whose INT8 model is the reference (XNNPACK's eager sibling is qnnpack).
EAGER_ENGINE = {"x86": "x86", "xnnpack": "qnnpack"}
#: Formats each task can export. Dense models export their tensor body through the torch.export
#: successors; the deprecated TorchScript path stays with classifiers (tools/benchmark.py times
#: dense INT8 models traced in process, where no artifact has to round-trip priors and NMS).
TASK_FORMATS: dict[str, tuple[str, ...]] = {
    "classification": FORMATS,
    "segmentation": ("onnx", "pt2e"),
    "detection": ("onnx", "pt2e"),
}
CALIB_BATCH = 128


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("weights", help="manifest name (frostnet.list_weights()) or path to a .safetensors file")
    p.add_argument("--format", required=True, help=f"artifact format: {', '.join(FORMATS)}")
    p.add_argument("--output", required=True, help="artifact path (.onnx, .pt2, .ts)")
    p.add_argument("--backend", default="x86", help=f"pt2e quantizer / eager engine: {', '.join(BACKENDS)} (default x86)")
    p.add_argument("--calib-batches", type=int, default=8, help=f"calibration batches of {CALIB_BATCH} images (default 8)")
    p.add_argument("--ranges", default="calibrate", choices=("calibrate", "qat"),
                   help="pt2e activation ranges: calibrated (default) or carried over from the QAT run's eager INT8 weights")
    p.add_argument("--onnx-method", default="ort", choices=("ort", "pt2e"),
                   help="ONNX INT8 graph: onnxruntime quantize_static QDQ (default) or the exported pt2e graph")
    p.add_argument("--subset", type=int, default=0, help="evaluate on the first N test images only (0 = all)")
    p.add_argument("--threads", type=int, default=0, help="torch / onnxruntime threads (0 = default)")
    p.add_argument("--no-eval", action="store_true", help="write the artifact only")
    p.add_argument("--json", action="store_true", help="print one JSON line instead of text")
    return p


def check_args(args: argparse.Namespace, task: str) -> None:
    """Raise ValueError naming the bad value and the valid choices."""
    if args.format not in FORMATS:
        raise ValueError(f"unknown --format {args.format!r}; valid choices: {', '.join(FORMATS)}")
    if args.backend not in BACKENDS:
        raise ValueError(f"unknown --backend {args.backend!r}; valid choices: {', '.join(BACKENDS)}")
    if args.format not in TASK_FORMATS[task]:
        raise ValueError(f"--format {args.format} is not supported for {task} models (they export their tensor body); "
                         f"valid choices: {', '.join(TASK_FORMATS[task])}")
    if args.format == "onnx" and args.backend != "x86":
        raise ValueError(f"--backend {args.backend} applies to --format pt2e/torchscript; ONNX INT8 is onnxruntime's "
                         "(--backend x86)")
    if args.ranges == "qat" and args.format != "pt2e":
        raise ValueError(f"--ranges qat applies to --format pt2e, not {args.format}")
    if args.calib_batches < 1:
        raise ValueError(f"--calib-batches must be >= 1, got {args.calib_batches}")


def describe_weights(weights: str) -> dict[str, Any]:
    """arch, task, dataset, input size and the FP32/INT8 manifest entries of ``weights``."""
    if weights.endswith(".safetensors") or Path(weights).is_file():
        meta = read_metadata(weights)
        import frostnet.models

        arch = meta.get("arch", "")
        return {"arch": arch, "task": frostnet.models.get_model_task(arch),
                "dataset": meta.get("data") or meta.get("dataset", "fashion_mnist"),
                "input_size": int(meta.get("input_size", 32)), "fp32": weights if meta.get("format") == "frostnet-fp32" else None,
                "int8": {meta["backend"]: weights} if meta.get("format") == "frostnet-int8" and meta.get("backend") else {},
                "published": {}}
    entry = hub.get_weights(weights)
    fp32 = entry.base if entry.quantized else entry.name
    int8 = {e.backend: n for n, e in hub.read_manifest().items() if e.quantized and e.base == fp32}
    published = {b: hub.get_weights(n).metrics.get("acc@1") for b, n in int8.items()}
    return {"arch": entry.arch, "task": entry.task, "dataset": entry.dataset, "input_size": entry.input_size[-1],
            "fp32": fp32, "int8": int8, "published": published}


def top1(run: Callable[[torch.Tensor], torch.Tensor], batches: Any, pad_to: Optional[int] = None) -> tuple[float, int]:
    """Top-1 (%) and image count of ``run`` over ``batches``; with ``pad_to``, short batches are
    padded to that size (artifacts specialized to one batch size) and the padding is dropped."""
    correct = total = 0
    with torch.inference_mode():
        for x, y in batches.epoch(0):
            n = x.shape[0]
            if pad_to and n < pad_to:
                x = torch.cat([x, x[:1].expand(pad_to - n, *x.shape[1:])])
            correct += (run(x)[:n].argmax(1) == y).sum().item()
            total += n
    return 100.0 * correct / max(1, total), total


#: calibration batch of dense models (their images are 128x128 scenes, not 32x32 items)
DENSE_CALIB_BATCH = 32


class _LevelPairs(nn.Module):
    """Turns an artifact's flat ``(loc0, conf0, loc1, conf1, ...)`` back into the per-level pairs a
    detector's ``body`` returns, so the detector's own priors, decoding and NMS run on it."""

    def __init__(self, run: Callable[[torch.Tensor], Any]) -> None:
        super().__init__()
        self.run = run

    def forward(self, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        flat = _flat(self.run(x))
        return [(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)]


def dense_metric(task: str, run: Callable[[torch.Tensor], Any], float_model: nn.Module, batches: Any,
                 num_classes: int) -> dict[str, float]:
    """mAP (detection) or mIoU and pixel accuracy (segmentation) of an exported tensor body over
    ``batches``, measured by the recipe's metrics.

    A detector's artifact holds its tensor network only: the float detector lends its priors,
    box decoding and NMS (:class:`_LevelPairs`), as the eager INT8 model does.
    """
    import copy

    from frostnet.recipe.engine import evaluate
    from frostnet.recipe.tasks import get_task

    if task == "detection":
        model = copy.deepcopy(float_model).eval()
        model.body = _LevelPairs(run)
    else:
        class _Outputs(nn.Module):  # the artifact returns the logits ({"out": ...} or the tensor)
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return _flat(run(x))[0]

        model = _Outputs()
    t = get_task(task)
    res = evaluate(model, batches, task=t, num_classes=num_classes)
    return {k: round(float(res[k]), 4) for k in t.report_keys}


def _flat(out: Any) -> list[torch.Tensor]:
    """An output structure's tensors in order (onnxruntime returns a dict's values as a tuple)."""
    if isinstance(out, dict):
        return list(out.values())
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _max_difference(a: Any, b: Any) -> float:
    flat_a, flat_b = _flat(a), _flat(b)
    if len(flat_a) != len(flat_b):
        return float("inf")
    return max((x.float() - y.float()).abs().max().item() for x, y in zip(flat_a, flat_b))


def build_artifact(args: argparse.Namespace, info: dict[str, Any], float_model: nn.Module, calibration: list[torch.Tensor],
                   int8_model: Optional[nn.Module]) -> tuple[Callable[[torch.Tensor], Any], Optional[int]]:
    """Write the artifact, load it back and return (runner, the batch size it is specialized to or None)."""
    from frostnet import quant
    from frostnet.quant import onnx_export, pt2e

    body = onnx_export.tensor_body(float_model, info["task"])
    out = Path(args.output)
    if args.format == "onnx":
        onnx_export.export_onnx(body, out, calibration, int8=True, method=args.onnx_method)
        return onnx_export.OnnxModule(out, threads=args.threads), None
    if args.format == "pt2e":
        ranges_from = None
        if args.ranges == "qat":
            if int8_model is None:
                raise ValueError(f"--ranges qat needs the eager INT8 weights of the same QAT run; {args.weights!r} has no "
                                 f".int8_{EAGER_ENGINE[args.backend]} entry (use --ranges calibrate)")
            ranges_from = onnx_export.tensor_body(int8_model, info["task"])
        graph = pt2e.quantize_pt2e(body, calibration, backend=args.backend, ranges_from=ranges_from,
                                   ranges_quant_max=quant.act_quant_max(EAGER_ENGINE[args.backend]))
        pt2e.save_pt2e(graph, out, calibration[0])
        loaded = pt2e.load_pt2e(out)
        return (pt2e.compile_pt2e(loaded) if args.backend == "x86" else loaded), None
    # torchscript: the eager INT8 model traced and frozen at the evaluation batch size
    if int8_model is None:
        raise ValueError(f"--format torchscript needs eager INT8 weights; {args.weights!r} has none for "
                         f"{EAGER_ENGINE[args.backend]}")
    example = torch.cat([calibration[0]] * 2)[:256]
    engine = EAGER_ENGINE[args.backend]
    with quant.use_engine(engine):
        traced = quant.optimize_for_inference(int8_model, example, backend=engine)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.jit.save(traced, str(tmp))
    tmp.replace(out)
    torch.backends.quantized.engine = engine
    return torch.jit.load(str(out)), example.shape[0]


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Export ``args.weights`` and measure the artifact; returns the printed figures."""
    from frostnet import quant
    from frostnet.recipe.data import build_data
    from frostnet.recipe.engine import calibration_batches

    info = describe_weights(args.weights)
    check_args(args, info["task"])
    if info["fp32"] is None and args.format != "torchscript":
        raise ValueError(f"--format {args.format} exports the float model; {args.weights!r} is INT8: pass its FP32 "
                         "weights (the QAT latent weights)")
    if args.threads:
        torch.set_num_threads(args.threads)
    engine = EAGER_ENGINE[args.backend]
    float_model = hub.load_weights(info["fp32"]).eval() if info["fp32"] else None
    int8_name = info["int8"].get(engine)
    int8_model = hub.load_weights(int8_name).eval() if int8_name else None
    result: dict[str, Any] = {"weights": args.weights, "format": args.format, "backend": args.backend,
                              "output": str(args.output), "calib_batches": args.calib_batches}
    if info["task"] != "classification":  # the weights' own scene data: calibration and the metric
        from frostnet.recipe.dense_data import build_dense_data

        train_b, eval_b, data_info = build_dense_data(info["dataset"], task=info["task"], input_size=info["input_size"],
                                                      batch_size=DENSE_CALIB_BATCH, seed=0, eval_split="test",
                                                      eval_subset=args.subset)
        calibration = calibration_batches(train_b, args.calib_batches, seed=0)
        if int8_model is None:  # no INT8 file: the eager reference is PTQ with the same calibration
            import copy

            int8_model = quant.quantize_ptq(copy.deepcopy(float_model), calibration, engine)
        runner, _ = build_artifact(args, info, float_model, calibration, int8_model)
        x = calibration[0]
        from frostnet.quant.onnx_export import tensor_body

        with torch.inference_mode(), quant.use_engine(engine):
            out, ref, fp = runner(x), tensor_body(int8_model, info["task"])(x), tensor_body(float_model, info["task"])(x)
        result["max_abs_diff_vs_eager_int8"] = _max_difference(out, ref)
        result["max_abs_diff_vs_float"] = _max_difference(out, fp)
        result["max_abs_float_output"] = max(t.abs().max().item() for t in _flat(fp))
        num_classes = len(data_info.categories)
        with quant.use_engine(engine):
            result["metric"] = dense_metric(info["task"], runner, float_model, eval_b, num_classes)
            result["eager_int8_metric"] = dense_metric(info["task"], tensor_body(int8_model, info["task"]), float_model,
                                                       eval_b, num_classes)
        return result

    train_b, eval_b, _ = build_data(info["dataset"], input_size=info["input_size"], batch_size=CALIB_BATCH, seed=0,
                                    rank=0, world=1, eval_split="test", eval_subset=args.subset)
    calibration = calibration_batches(train_b, args.calib_batches, seed=0)
    if int8_model is None and float_model is not None:
        int8_model = quant.quantize_ptq(float_model, calibration, engine)  # no published INT8: eager PTQ reference
        result["eager_int8_source"] = "eager PTQ of the float weights"
    else:
        result["eager_int8_source"] = int8_name
    t0 = time.perf_counter()
    runner, pad_to = build_artifact(args, info, float_model, calibration, int8_model)
    result["export_s"] = round(time.perf_counter() - t0, 1)
    if args.no_eval:
        return result
    acc, n = top1(runner, eval_b, pad_to)
    result.update({"acc@1": round(acc, 2), "n": n})
    with quant.use_engine(engine):
        result["eager_int8_acc@1"] = round(top1(int8_model, eval_b)[0], 2)
    result["published_int8_acc@1"] = info["published"].get(engine)
    return result


def main(args: argparse.Namespace) -> int:
    try:
        res = run(args)
    except (ValueError, ImportError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(res))
    elif "acc@1" in res:
        print(f"{res['output']}: {res['format']} ({res['backend']}) top-1 {res['acc@1']:.2f}% on {res['n']} test images; "
              f"eager INT8 ({res['eager_int8_source']}) {res['eager_int8_acc@1']:.2f}% on the same images"
              + (f"; published eager INT8 {res['published_int8_acc@1']:.2f}%" if res.get("published_int8_acc@1") else ""))
    elif "max_abs_diff_vs_float" in res:
        print(f"{res['output']}: {res['format']} tensor body on a calibration batch: max |artifact - eager INT8| "
              f"{res['max_abs_diff_vs_eager_int8']:.4g}, max |artifact - float| {res['max_abs_diff_vs_float']:.4g} "
              f"(outputs up to {res['max_abs_float_output']:.4g}); metric: "
              f"{res['metric']} (eager INT8: {res['eager_int8_metric']})")
    else:
        print(f"wrote {res['output']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
