"""FP32 vs INT8 CPU latency, size and memory of FrostNets beside torchvision's quantized models.

    python tools/benchmark.py --update-readme          # the README's tables, JSON and plot (@default)
    python tools/benchmark.py --models @frostnets --models @peers --out-dir runs/bench-all   # every width
    python tools/benchmark.py --models @dense --out-dir runs/bench-dense   # segmentation/detection baselines
    python tools/benchmark.py --models @none --out-dir runs/bench-published  # the published checkpoints alone
    python tools/benchmark.py --models frostnet_small_1_0 --models tv:mobilenet_v3_large \\
        --threads 1 --batch-sizes 1 --engines x86 --profile 15 --out-dir runs/profile   # which ops dominate
    python tools/benchmark.py --quick --models frostnet_small_0_35 --size 64 --out-dir /tmp/bench  # smoke run

Model groups: ``@default`` = FrostNet-Small/Base/Large 1.0 + torchvision's quantizable
MobileNetV2, MobileNetV3-Large, ShuffleNetV2 1.0 and ResNet-18 (168 configurations at the default
batch 1/8, threads 1/2, engines x86/qnnpack); ``@frostnets`` = all 15 FrostNets; ``@peers``;
``@dense`` = the LR-ASPP/ESPNet segmentation baselines at ``--seg-size`` (default 512x1024, a
quarter of Cityscapes' 1024x2048, for time) and the SSDLite/Tiny-DSOD detectors at ``--det-size``
(default 300, the papers'), at ``--dense-batch-sizes`` (default 1). ``--dry-run`` lists the
configurations.

Every configuration (model x FP32/INT8 x eager/optimized x batch x threads x engine) runs in its own
Python process, so thread settings, the global quantized engine, caches and memory are isolated:
``torch.set_num_threads`` (and ``OMP_NUM_THREADS``) = threads, the model built and (for INT8)
quantized in the process, ``--warmup`` untimed runs, then ``--runs`` (>= 30) timed runs of one
forward pass each; the median and the interquartile range are reported. Configurations run one
after another, never in parallel: run on an otherwise idle machine (the load average before and
after is recorded in the JSON).

- Models: ``--models`` patterns over ``frostnet.list_models()`` (random weights, 224x224 for
  classification, ``--seg-size`` for segmentation, ``--det-size`` for detection) and ``tv:<name>``
  over ``torchvision.models.quantization`` (random weights, 224x224). Every model is quantized the
  same way: its own ``fuse_model`` through :func:`frostnet.quant.quantize_ptq` (the backend's
  qconfig; one random calibration image: latency does not depend on calibration). Published
  checkpoints (FP32 manifest entries, ``--weights``) run at their native input size with their INT8
  files and add accuracy vs INT8 latency to the plot.
- Paths: ``eager`` (the ``nn.Module``) and ``optimized``
  (:func:`frostnet.quant.optimize_for_inference`: TorchScript trace + freeze, checked equal to the
  eager model); with ``--paths ... pt2e onnxruntime`` also the export paths
  (:mod:`frostnet.quant.pt2e` quantized and ``torch.compile``d with freezing, INT8 only; and
  :mod:`frostnet.quant.onnx_export` run by onnxruntime with ``threads`` intra-op threads, FP32 and
  INT8 QDQ), timed as ``x86`` configurations, e.g.
  ``python tools/benchmark.py --models frostnet_small_1_0 --models tv:mobilenet_v3_large --weights ''
  --threads 1 --batch-sizes 1 --engines x86 --paths eager optimized pt2e onnxruntime``. Detectors are timed on their network (``model.body``, INT8 up to the FP32 last
  layers); prior decoding and NMS run in FP32 outside it and are the same for FP32 and INT8.
- Reduction rate: ``1 - INT8 latency / FP32 latency``. The headline (and the FrostNet paper's
  comparison) is INT8 optimized vs FP32 eager; the JSON also has the same-path rates.
- Params and MACs (``torch.utils.flop_counter``, MACs = FLOPs / 2, one image, float model); FP32
  and INT8 sizes are ``torch.save`` of the state dicts (the published files' sizes for
  checkpoints). Peak memory is the process's peak resident set size (``VmHWM``; ``ru_maxrss``
  where /proc is missing, which in a child also counts the parent) over the whole configuration,
  and over the warm-up + timed runs alone (high-water mark reset after building the model).

Outputs in ``--out-dir``: ``benchmark.json`` (machine, settings, every configuration with its raw
times), ``benchmark.md`` (the tables) and ``benchmark.png`` (needs matplotlib: ``pip install
-e ".[bench]"``; skipped with a message without it). ``--update-readme`` writes the tables and the
plot between ``<!-- benchmark:start -->`` and ``<!-- benchmark:end -->`` in README.md (adding a
"## Performance" section with the markers if they are missing).
"""

from __future__ import annotations

import argparse
import datetime
import fnmatch
import gc
import io
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run from a checkout without installing

SCHEMA = "frostnet-benchmark/1"
MARK_START = "<!-- benchmark:start -->"
MARK_END = "<!-- benchmark:end -->"
RESULT_PREFIX = "@@frostnet-benchmark-result "
TV_PREFIX = "tv:"
#: torchvision's quantizable peers the FrostNet paper compares against (Table 3 and Fig. 1).
TV_PEERS: tuple[str, ...] = ("mobilenet_v2", "mobilenet_v3_large", "shufflenet_v2_x1_0", "resnet18")
#: ``--models @name`` expands to these patterns.
GROUPS: dict[str, tuple[str, ...]] = {
    "default": ("frostnet_*_1_0",) + tuple(TV_PREFIX + p for p in TV_PEERS),  # FrostNets at width 1.0 + peers
    "frostnets": ("frostnet_*",),  # every FrostNet size
    "peers": tuple(TV_PREFIX + p for p in TV_PEERS),
    # the quantization-friendly segmentation and detection baselines (StatAssist paper, Appendix B)
    "dense": ("lraspp_*", "espnet*", "ssdlite_*", "tiny_dsod"),
    "none": (),  # no registry model: with --weights, the published checkpoints alone
}
DEFAULT_MODELS: tuple[str, ...] = ("@default",)
FORMATS: tuple[str, ...] = ("fp32", "int8")
PATHS: tuple[str, ...] = ("eager", "optimized")
#: Deployment paths beyond the eager API (``--paths``; need ``pip install -e ".[export]"``):
#: ``pt2e`` = torch.export + torchao's X86InductorQuantizer + torch.compile with freezing (INT8
#: only), ``onnxruntime`` = dynamo ONNX export run by onnxruntime (FP32, and INT8 as static QDQ).
#: Neither uses the eager quantized engine: they run as the ``x86`` engine's configurations.
EXPORT_PATHS: tuple[str, ...] = ("pt2e", "onnxruntime")
ALL_PATHS: tuple[str, ...] = PATHS + EXPORT_PATHS
#: The export issue's targets: FrostNet-Small 1.0's fastest INT8 path (any path) vs its FP32
#: eager latency, and vs MobileNetV3-Large's fastest INT8 path (1 thread, batch 1).
TARGET_FASTEST_REDUCTION = 0.80
ENGINES: tuple[str, ...] = ("x86", "fbgemm", "qnnpack")
MIN_RUNS = 30
#: The issue's targets: INT8 (optimized) vs FP32 (eager) reduction of the FrostNets at 1 thread on
#: x86, and FrostNet-Small 1.0's INT8 latency relative to MobileNetV3-Large's on the same path.
TARGET_REDUCTION = 0.70
TARGET_RATIO = 0.90
TARGET_FROSTNETS: tuple[str, ...] = ("frostnet_small_1_0", "frostnet_base_1_0", "frostnet_large_1_0")
TARGET_PEER = TV_PREFIX + "mobilenet_v3_large"
#: The FrostNet paper's figures for these targets (Tables 1 and 3), shown beside the measurements.
PAPER_REDUCTION = "66.5-69.9%"
PAPER_RATIO = "62 vs 80 ms = 0.78x"


# ------------------------------------------------------------------------------------------ targets


@dataclass(frozen=True)
class Target:
    """One model to benchmark.

    Args:
        key: the name in the outputs: a registry name, ``tv:<name>``, or ``<arch>.<tag>`` for a
            published checkpoint.
        source: ``registry``, ``torchvision`` or ``weights``.
        name: registry/torchvision builder name, or the FP32 manifest entry of a checkpoint.
        task: classification, segmentation or detection.
        input_size: (C, H, W) of one image.
        int8_weights: engine -> INT8 manifest entry (published checkpoints only).
        metrics: accuracy figures of the checkpoint: ``{"fp32": {...}, "int8_x86": {...}}``.
        num_classes: the builder's ``num_classes`` for registry models (None: its default).
    """

    key: str
    source: str
    name: str
    task: str
    input_size: tuple[int, int, int]
    int8_weights: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    num_classes: Optional[int] = None


def parse_size(text: str) -> tuple[int, int]:
    """``"224"`` -> (224, 224); ``"512x1024"`` -> (512, 1024)."""
    m = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+))?\s*", text)
    if not m or int(m.group(1)) < 1 or (m.group(2) is not None and int(m.group(2)) < 1):
        raise argparse.ArgumentTypeError(f"size must be N or HxW with positive integers (e.g. 224, 512x1024), got {text!r}")
    h = int(m.group(1))
    return h, int(m.group(2)) if m.group(2) else h


def tv_models() -> list[str]:
    """Names of torchvision's quantizable classification builders (``resnet18``, ...)."""
    import torchvision

    return sorted(n.removeprefix("quantized_") for n in torchvision.models.list_models(module=torchvision.models.quantization))


def resolve_targets(
    patterns: Sequence[str],
    *,
    size: tuple[int, int],
    seg_size: tuple[int, int],
    det_size: tuple[int, int],
    weights_patterns: Sequence[str] = (),
    manifest: Optional[str] = None,
    dense_num_classes: Optional[int] = None,
) -> list[Target]:
    """The models that ``patterns`` (registry globs and ``tv:`` globs) and ``weights_patterns``
    (globs over FP32 manifest entries) select, in a stable order; raises if a pattern matches nothing.
    Registry segmentation and detection models are built with ``dense_num_classes`` classes when
    given (the head's size changes their params and MACs), else with their builder's default."""
    import frostnet
    from frostnet import hub

    targets: list[Target] = []
    seen: set[str] = set()
    registry, peers = frostnet.list_models(), tv_models()
    sizes = {"classification": size, "segmentation": seg_size, "detection": det_size}
    expanded = []
    for pattern in patterns:
        if pattern.startswith("@"):
            if pattern[1:] not in GROUPS:
                raise ValueError(f"unknown model group {pattern!r}; groups: {', '.join('@' + g for g in GROUPS)}")
            expanded += GROUPS[pattern[1:]]
        else:
            expanded.append(pattern)
    for pattern in expanded:
        if pattern.startswith(TV_PREFIX):
            names = [n for n in peers if fnmatch.fnmatchcase(n, pattern[len(TV_PREFIX):])]
            if not names:
                raise ValueError(f"{pattern!r} matches no torchvision quantizable model; available: "
                                 f"{', '.join(TV_PREFIX + n for n in peers)}")
            new = [Target(TV_PREFIX + n, "torchvision", n, "classification", (3, *size)) for n in names]
        else:
            names = [n for n in registry if fnmatch.fnmatchcase(n, pattern)]
            if not names:
                raise ValueError(f"{pattern!r} matches no registered model (frostnet.list_models() has "
                                 f"{len(registry)}; prefix torchvision models with {TV_PREFIX!r})")
            new = []
            for n in names:
                task = frostnet.models.get_model_task(n)
                classes = dense_num_classes if task != "classification" else None
                new.append(Target(n, "registry", n, task, (3, *sizes[task]), num_classes=classes))
        for t in new:
            if t.key not in seen:
                seen.add(t.key)
                targets.append(t)

    entries = hub.read_manifest(manifest)
    for pattern in weights_patterns:
        fp32 = [n for n in hub.list_weights(pattern, format="fp32", manifest=entries)]
        for name in fp32:
            e = entries[name]
            key = name.removesuffix(".fp32")
            if key in seen:
                continue
            int8 = {d.backend: n for n, d in sorted(entries.items()) if d.format == "int8" and d.base == name}
            metrics = {"fp32": dict(e.metrics), **{f"int8_{b}": dict(entries[n].metrics) for b, n in int8.items()}}
            seen.add(key)
            targets.append(Target(key, "weights", name, e.task, tuple(e.input_size), int8, metrics))  # type: ignore[arg-type]
    return targets


# --------------------------------------------------------------------------------- configurations


@dataclass(frozen=True)
class Config:
    """One timed configuration (``engine`` is None for FP32)."""

    model: str
    format: str
    path: str
    batch: int
    threads: int
    engine: Optional[str]

    def label(self) -> str:
        fmt = f"int8/{self.engine}" if self.format == "int8" else "fp32"
        return f"{self.model} {fmt} {self.path} b{self.batch} t{self.threads}"


def plan(targets: Sequence[Target], *, formats: Sequence[str], paths: Sequence[str], batch_sizes: Sequence[int],
         threads: Sequence[int], engines: Sequence[str], dense_batch_sizes: Optional[Sequence[int]] = None) -> list[Config]:
    """Every configuration, model by model. FP32 does not depend on the INT8 engine; an engine a
    published checkpoint has no INT8 file for is left out; segmentation and detection models run
    at ``dense_batch_sizes`` (default: ``batch_sizes``)."""
    configs = []
    for t in targets:
        sizes = batch_sizes if t.task == "classification" or dense_batch_sizes is None else dense_batch_sizes
        for fmt in formats:
            for engine in (engines if fmt == "int8" else (None,)):
                if fmt == "int8" and t.source == "weights" and engine not in t.int8_weights:
                    continue
                for path in paths:
                    if path == "pt2e" and fmt == "fp32":
                        continue  # pt2e is a quantization flow: FP32 is timed on the other paths
                    if path in EXPORT_PATHS and fmt == "int8" and engine != "x86":
                        continue  # x86 quantizer / onnxruntime's CPU kernels: not per eager engine
                    for b in sizes:
                        for n in threads:
                            configs.append(Config(t.key, fmt, path, b, n, engine))
    return configs


# ------------------------------------------------------------------------------- child processes
# Everything below up to the parent side runs inside one configuration's process.


def _build_float(target: Target, manifest: Optional[str]):
    import torch

    torch.manual_seed(0)
    if target.source == "torchvision":
        import torchvision

        return getattr(torchvision.models.quantization, target.name)(weights=None, quantize=False).eval()
    if target.source == "weights":
        from frostnet import hub

        return hub.load_weights(target.name, manifest=manifest).eval()
    import frostnet

    kwargs = {} if target.num_classes is None else {"num_classes": target.num_classes}
    return frostnet.get_model(target.name, **kwargs).eval()


def _build_int8(target: Target, engine: str, manifest: Optional[str], float_model=None):
    import torch
    from frostnet import quant

    if target.source == "weights":
        from frostnet import hub

        model = hub.load_weights(target.int8_weights[engine], manifest=manifest).eval()
        torch.backends.quantized.engine = engine
        return model
    if float_model is None:
        float_model = _build_float(target, manifest)
    g = torch.Generator().manual_seed(1)
    calibration = [torch.randn(1, *target.input_size, generator=g)]
    return quant.quantize_ptq(float_model, calibration, engine)


def _network(model, task: str):
    """What is timed: the model, or a detector's tensor network (priors, decoding and NMS are FP32
    outside it), with its per-level ``(loc, conf)`` pairs flattened into one tuple for tracing."""
    from frostnet.quant.onnx_export import tensor_body

    return tensor_body(model, task) if task != "detection" or hasattr(model, "body") else model


def _export_runner(target: Target, cfg: Config, manifest: Optional[str], x):
    """The runner of an export path: the float model quantized by pt2e and compiled, or exported to
    ONNX (INT8 QDQ or FP32) and run by onnxruntime; calibrated on one random batch like the eager
    configurations (latency does not depend on calibration)."""
    import tempfile

    import torch

    from frostnet.quant import onnx_export, pt2e

    body = _network(_build_float(target, manifest), target.task)
    g = torch.Generator().manual_seed(1)
    calibration = [torch.randn(2, *target.input_size, generator=g)]
    if cfg.path == "pt2e":
        runner = pt2e.compile_pt2e(pt2e.quantize_pt2e(body, calibration, backend="x86"))
        with torch.inference_mode():
            runner(x)  # the first call compiles: part of the preparation, not of the warm-up
        return runner
    with tempfile.TemporaryDirectory() as tmp:
        path = onnx_export.export_onnx(body, Path(tmp) / "model.onnx", calibration, int8=cfg.format == "int8")
        return onnx_export.OnnxModule(path, threads=cfg.threads)


def _vm_hwm_mb() -> Optional[float]:
    try:
        with open("/proc/self/status") as f:
            m = re.search(r"^VmHWM:\s+(\d+)\s+kB", f.read(), re.M)
        return int(m.group(1)) / 1024 if m else None
    except OSError:
        return None


def _rss_mb() -> Optional[float]:
    """Current resident set size (Linux), None elsewhere."""
    try:
        with open("/proc/self/status") as f:
            m = re.search(r"^VmRSS:\s+(\d+)\s+kB", f.read(), re.M)
        return int(m.group(1)) / 1024 if m else None
    except OSError:
        return None


def _peak_rss_mb() -> float:
    hwm = _vm_hwm_mb()
    if hwm is not None:
        return hwm
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the resident-set high-water mark (Linux >= 4.0)
        return True
    except OSError:
        return False


def _quiet_warnings() -> None:
    import warnings

    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor, torch\.quantize_per_channel")
    warnings.filterwarnings("ignore", message=r"must run observer before calling calculate_qparams")


def _profile(fn, x, rows: int) -> list[dict[str, Any]]:
    import torch
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            fn(x)
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    return [{"op": e.key, "self_cpu_ms_per_run": e.self_cpu_time_total / 5 / 1e3, "share": e.self_cpu_time_total / total,
             "calls_per_run": e.count / 5} for e in events[:rows]]


def run_latency(spec: dict[str, Any]) -> dict[str, Any]:
    """Build, (quantize,) (optimize,) warm up and time one configuration in this process."""
    import torch

    _quiet_warnings()
    cfg, target = Config(**spec["config"]), Target(**{**spec["target"], "input_size": tuple(spec["target"]["input_size"])})
    torch.set_num_threads(cfg.threads)
    import torchvision  # noqa: F401  (the libraries' resident memory is the baseline)

    import frostnet.quant  # noqa: F401

    baseline = _rss_mb()
    manifest = spec.get("manifest")
    g = torch.Generator().manual_seed(2)
    x = torch.randn(cfg.batch, *target.input_size, generator=g)
    t0 = time.perf_counter()
    if cfg.path in EXPORT_PATHS:
        model = runner = _export_runner(target, cfg, manifest, x)
    elif cfg.format == "int8":
        torch.backends.quantized.engine = cfg.engine
        model = _build_int8(target, cfg.engine, manifest)
    else:
        model = _build_float(target, manifest)
    if cfg.path not in EXPORT_PATHS:
        runner = _network(model, target.task)
        t0 = time.perf_counter()
    if cfg.path == "optimized":
        from frostnet.quant import optimize_for_inference

        runner = optimize_for_inference(runner, x, backend=cfg.engine)
    prepare_s = time.perf_counter() - t0
    del model
    gc.collect()
    build_peak = _peak_rss_mb()
    reset = _reset_peak_rss()
    times = []
    with torch.inference_mode():
        for _ in range(spec["warmup"]):
            runner(x)
        for _ in range(spec["runs"]):
            start = time.perf_counter()
            runner(x)
            times.append((time.perf_counter() - start) * 1e3)
    run_peak = _peak_rss_mb()
    result: dict[str, Any] = {
        "times_ms": [round(t, 4) for t in times],
        **summarize(times),
        "peak_rss_mb": round(max(build_peak, run_peak), 1),
        "run_peak_rss_mb": round(run_peak, 1) if reset else None,
        "baseline_rss_mb": None if baseline is None else round(baseline, 1),
        "optimize_s": round(prepare_s, 2) if cfg.path in ("optimized",) + EXPORT_PATHS else None,
        "torch_threads": torch.get_num_threads(),
    }
    if spec.get("profile"):
        result["profile"] = _profile(runner, x, spec["profile"])
    return result


def run_stats(spec: dict[str, Any]) -> dict[str, Any]:
    """Parameters, MACs and serialized sizes of one model."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    _quiet_warnings()
    target = Target(**{**spec["target"], "input_size": tuple(spec["target"]["input_size"])})
    manifest = spec.get("manifest")
    model = _build_float(target, manifest)
    out: dict[str, Any] = {"params": sum(p.numel() for p in model.parameters())}
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        _network(model, target.task)(torch.randn(1, *target.input_size))
    out["macs"] = counter.get_total_flops() / 2
    out["fp32_bytes"] = _saved_bytes(model)
    out["int8_bytes"] = {}
    for engine in spec["engines"]:
        if target.source == "weights" and engine not in target.int8_weights:
            continue
        torch.backends.quantized.engine = engine
        out["int8_bytes"][engine] = _saved_bytes(_build_int8(target, engine, manifest, float_model=model))
    if target.source == "weights":
        from frostnet import hub

        entries = hub.read_manifest(manifest)
        out["fp32_file_bytes"] = entries[target.name].size
        out["int8_file_bytes"] = {b: entries[n].size for b, n in target.int8_weights.items()}
    return out


def _saved_bytes(model) -> int:
    import torch

    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.tell()


def child_main(spec_json: str) -> int:
    spec = json.loads(spec_json)
    result = run_stats(spec) if spec["kind"] == "stats" else run_latency(spec)
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


# ------------------------------------------------------------------------------------ parent side


def summarize(times_ms: Sequence[float]) -> dict[str, float]:
    """Median, quartiles (inclusive method), IQR, min and max of the timed runs in ms."""
    if len(times_ms) >= 2:
        q1, median, q3 = statistics.quantiles(times_ms, n=4, method="inclusive")
    else:
        q1 = median = q3 = float(times_ms[0])
    return {"median_ms": round(median, 4), "q1_ms": round(q1, 4), "q3_ms": round(q3, 4), "iqr_ms": round(q3 - q1, 4),
            "min_ms": round(min(times_ms), 4), "max_ms": round(max(times_ms), 4), "runs": len(times_ms)}


def run_child(spec: dict[str, Any], *, threads: int, timeout: float) -> dict[str, Any]:
    """Run one configuration (or the stats of one model) in a fresh process; returns its result or
    ``{"error": ...}``."""
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=str(REPO_ROOT))
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s (raise --timeout)"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    tail = "\n".join(proc.stderr.strip().splitlines()[-6:])
    return {"error": f"exit code {proc.returncode}: {tail}"}


def machine_info(engines: Sequence[str]) -> dict[str, Any]:
    """CPU model, cores, ISA, library versions and engines, for the outputs."""
    import torch
    import torchvision

    import frostnet

    cpu, physical, flags = platform.processor() or platform.machine(), set(), set()
    try:
        with open("/proc/cpuinfo") as f:
            phys_id = "0"
            for line in f:
                key, _, value = line.partition(":")
                key, value = key.strip(), value.strip()
                if key == "model name":
                    cpu = value
                elif key == "physical id":
                    phys_id = value
                elif key == "core id":
                    physical.add((phys_id, value))
                elif key == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "cpu_model": cpu,
        "logical_cores": os.cpu_count(),
        "physical_cores": len(physical) or None,
        "usable_cores": usable,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "isa": sorted(f for f in flags if f in {"avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8"}),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "frostnet": frostnet.__version__,
        "supported_engines": list(torch.backends.quantized.supported_engines),
        "engines": list(engines),
    }


def _load() -> Optional[list[float]]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def _find(results: Sequence[dict[str, Any]], **key: Any) -> Optional[dict[str, Any]]:
    for r in results:
        if all(r.get(k) == v for k, v in key.items()) and "median_ms" in r:
            return r
    return None


def reductions(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """FP32 -> INT8 latency reduction per model, engine, batch and threads: INT8 optimized vs FP32
    eager (the headline), and eager vs eager, optimized vs optimized."""
    out = []
    for r in results:
        if r["format"] != "int8" or "median_ms" not in r:
            continue
        same = dict(model=r["model"], batch=r["batch"], threads=r["threads"], format="fp32")
        fp_eager, fp_same = _find(results, **same, path="eager"), _find(results, **same, path=r["path"])
        row = {k: r[k] for k in ("model", "engine", "path", "batch", "threads")}
        row["int8_ms"] = r["median_ms"]
        row["fp32_eager_ms"] = fp_eager["median_ms"] if fp_eager else None
        row["fp32_same_path_ms"] = fp_same["median_ms"] if fp_same else None
        row["reduction_vs_fp32_eager"] = 1 - r["median_ms"] / fp_eager["median_ms"] if fp_eager else None
        row["reduction_same_path"] = 1 - r["median_ms"] / fp_same["median_ms"] if fp_same else None
        out.append(row)
    return out


def target_checks(results: Sequence[dict[str, Any]], red: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets at 1 thread, batch 1, x86, INT8 optimized path, where measured."""
    checks = []
    for model in TARGET_FROSTNETS:
        row = next((r for r in red if r["model"] == model and r["engine"] == "x86" and r["path"] == "optimized"
                    and r["threads"] == 1 and r["batch"] == 1 and r["reduction_vs_fp32_eager"] is not None), None)
        if row is None:
            continue
        value = row["reduction_vs_fp32_eager"]
        checks.append({
            "target": f"{model} INT8 (optimized) vs FP32 eager latency reduction >= {TARGET_REDUCTION:.0%}",
            "measured": value, "shown": f"{value:.1%} ({row['fp32_eager_ms']:.2f} -> {row['int8_ms']:.2f} ms)",
            "paper": PAPER_REDUCTION,
            "met": value >= TARGET_REDUCTION,
            "shortfall": None if value >= TARGET_REDUCTION else f"{100 * (TARGET_REDUCTION - value):.1f} percentage points short",
        })
    for path in PATHS:
        key = dict(format="int8", engine="x86", path=path, batch=1, threads=1)
        ours, peer = _find(results, model="frostnet_small_1_0", **key), _find(results, model=TARGET_PEER, **key)
        if ours is None or peer is None:
            continue
        ratio = ours["median_ms"] / peer["median_ms"]
        checks.append({
            "target": f"frostnet_small_1_0 INT8 latency <= {TARGET_RATIO}x {TARGET_PEER}'s ({path} path)",
            "measured": ratio, "shown": f"{ratio:.2f}x ({ours['median_ms']:.2f} vs {peer['median_ms']:.2f} ms)",
            "paper": PAPER_RATIO,
            "met": ratio <= TARGET_RATIO,
            "shortfall": None if ratio <= TARGET_RATIO else f"{100 * (ratio / TARGET_RATIO - 1):.1f}% slower than the target",
        })
    if any(r["path"] in EXPORT_PATHS for r in results):
        checks += fastest_path_checks(results)
    return checks


def fastest(results: Sequence[dict[str, Any]], model: str, fmt: str = "int8") -> Optional[dict[str, Any]]:
    """The fastest measured configuration of ``model`` in ``fmt`` at 1 thread, batch 1 (INT8: x86),
    over every path."""
    rows = [r for r in results if r["model"] == model and r["format"] == fmt and r["batch"] == 1 and r["threads"] == 1
            and (fmt == "fp32" or r["engine"] == "x86") and "median_ms" in r]
    return min(rows, key=lambda r: r["median_ms"], default=None)


def fastest_path_checks(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The export issue's targets: FrostNet-Small 1.0's fastest INT8 path vs its FP32 eager latency
    and vs MobileNetV3-Large's fastest INT8 path (1 thread, batch 1)."""
    checks = []
    ours, fp_eager = fastest(results, "frostnet_small_1_0"), _find(results, model="frostnet_small_1_0", format="fp32",
                                                                      path="eager", batch=1, threads=1)
    if ours is not None and fp_eager is not None:
        value = 1 - ours["median_ms"] / fp_eager["median_ms"]
        checks.append({
            "target": f"frostnet_small_1_0 fastest INT8 path vs FP32 eager latency reduction >= {TARGET_FASTEST_REDUCTION:.0%}",
            "measured": value, "paper": PAPER_REDUCTION, "met": value >= TARGET_FASTEST_REDUCTION,
            "shown": f"{value:.1%} ({fp_eager['median_ms']:.2f} -> {ours['median_ms']:.2f} ms, {ours['path']})",
            "shortfall": None if value >= TARGET_FASTEST_REDUCTION
            else f"{100 * (TARGET_FASTEST_REDUCTION - value):.1f} percentage points short",
        })
    peer = fastest(results, TARGET_PEER)
    if ours is not None and peer is not None:
        ratio = ours["median_ms"] / peer["median_ms"]
        checks.append({
            "target": f"frostnet_small_1_0 fastest INT8 path <= {TARGET_RATIO}x {TARGET_PEER}'s fastest INT8 path",
            "measured": ratio, "paper": PAPER_RATIO, "met": ratio <= TARGET_RATIO,
            "shown": f"{ratio:.2f}x ({ours['median_ms']:.2f} ms {ours['path']} vs {peer['median_ms']:.2f} ms {peer['path']})",
            "shortfall": None if ratio <= TARGET_RATIO else f"{100 * (ratio / TARGET_RATIO - 1):.1f}% slower than the target",
        })
    return checks


# -------------------------------------------------------------------------------------- outputs


def _ms(r: Optional[dict[str, Any]], iqr: bool = False) -> str:
    if r is None:
        return "-"
    if "median_ms" not in r:
        return "failed"
    return f"{r['median_ms']:.2f} ± {r['iqr_ms']:.2f}" if iqr else f"{r['median_ms']:.2f}"


def _mb(n: Optional[float]) -> str:
    return "-" if n is None else f"{n / 1e6:.2f} MB"


def _count(n: Optional[float], unit: str = "") -> str:
    if n is None:
        return "-"
    return f"{n / 1e9:.2f}G{unit}" if n >= 1e9 else f"{n / 1e6:.2f}M{unit}"


def _pct(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.1%}"


def _peak_cell(r: dict[str, Any]) -> str:
    peak = r.get("run_peak_rss_mb") or r["peak_rss_mb"]
    base = r.get("baseline_rss_mb")
    return f"{peak:.0f} MB" + (f" (+{peak - base:.0f})" if base is not None and r.get("run_peak_rss_mb") else "")


def _size(t: dict[str, Any]) -> str:
    c, h, w = t["input_size"]
    return f"{h}x{w}" if c == 3 else f"{c}x{h}x{w}"


def _first_batch(results: Sequence[dict[str, Any]], model: str) -> Optional[int]:
    """The smallest batch size measured for ``model`` (the summary's batch)."""
    return min((r["batch"] for r in results if r["model"] == model), default=None)


PATH_LABELS = {"eager": "eager", "optimized": "opt.", "pt2e": "pt2e+compile", "onnxruntime": "ORT"}


def _paths(results: Sequence[dict[str, Any]]) -> list[str]:
    """The paths measured, in :data:`ALL_PATHS` order (eager and optimized always: the headline)."""
    return [p for p in ALL_PATHS if p in PATHS or any(r["path"] == p for r in results)]


def markdown(data: dict[str, Any], *, image: Optional[str] = None) -> str:
    """The tables (and the plot, if ``image`` is given) as markdown."""
    s, m = data["settings"], data["machine"]
    results, models = data["results"], data["models"]
    t0 = min(s["threads"])
    b_all = {_first_batch(results, t["key"]) for t in models} - {None}
    b_text = f"batch {next(iter(b_all))}" if len(b_all) == 1 else "the smallest batch size measured (input column)"
    engines = [e for e in s["engines"] if any(r.get("engine") == e for r in results)]
    paths = _paths(results)
    lines = []
    if data.get("quick"):
        lines += ["> **Smoke run (`--quick`): a few runs, not a measurement.**", ""]
    published = " (published checkpoints: their own)" if any(t["source"] == "weights" for t in models) else ""
    lines += [
        f"Measured with `{data['command']}` on {m['cpu_model']} ({m['usable_cores']} usable of {m['logical_cores']} "
        f"logical cores, {m['cpu_capability']}), torch {m['torch']}, torchvision {m['torchvision']}, INT8 engines "
        f"{', '.join(engines) or '-'}; {data['created']}. Median of {s['runs']} timed runs after {s['warmup']} "
        f"warm-up runs, one process per configuration; load average before/after: {data['load_before']} / "
        f"{data['load_after']}. Random weights{published}; "
        "every model quantized by its own `fuse_model` + PTQ with frostnet's qconfig. `optimized` = "
        "`frostnet.quant.optimize_for_inference` (TorchScript trace + freeze); reduction = 1 - INT8 optimized / "
        "FP32 eager latency."
        + (" `pt2e+compile` = `frostnet.quant.pt2e` (torch.export, torchao X86InductorQuantizer, torch.compile with "
           "freezing); `ORT` = `frostnet.quant.onnx_export` in onnxruntime (INT8: static QDQ)."
           if any(r["path"] in EXPORT_PATHS for r in results) else ""),
        "",
    ]
    if image:
        lines += [f"![INT8 vs FP32 CPU latency]({image})", ""]
    if data["targets"]:
        lines += ["| target (x86, 1 thread, batch 1) | measured | paper | result |", "|---|---|---|---|"]
        for c in data["targets"]:
            verdict = "met" if c["met"] else f"**missed**: {c['shortfall']}"
            lines.append(f"| {c['target']} | {c['shown']} | {c['paper']} | {verdict} |")
        lines.append("")

    head = ["model", "input", "params", "MACs", "FP32 size"]
    for e in engines:
        head.append(f"INT8 size ({e})")
    fp32_paths = [p for p in paths if any(r["path"] == p and r["format"] == "fp32" for r in results)]
    head += [f"FP32 {PATH_LABELS[p]}" for p in fp32_paths]
    int8_paths = {e: [p for p in paths if any(r["path"] == p and r.get("engine") == e for r in results)] for e in engines}
    for e in engines:
        head += [f"INT8 {e} {PATH_LABELS[p]}" for p in int8_paths[e]] + [f"reduction {e}"]
    head.append("peak RSS INT8 opt. (+ over libraries)")
    lines += [f"Latency in ms per batch, {b_text}, {t0} thread{'s' if t0 > 1 else ''}:", "",
              "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    red = data["reductions"]
    for t in models:
        st = t.get("stats", {})
        b0 = _first_batch(results, t["key"])
        k = dict(model=t["key"], batch=b0, threads=t0)
        row = [t["key"], _size(t) + (f", batch {b0}" if len(b_all) > 1 else ""),
               _count(st.get("params")), _count(st.get("macs")),
               _mb(st.get("fp32_file_bytes", st.get("fp32_bytes")))]
        int8_sizes = st.get("int8_file_bytes") or st.get("int8_bytes") or {}
        row += [_mb(int8_sizes.get(e)) for e in engines]
        row += [_ms(_find(results, **k, format="fp32", path=p)) for p in fp32_paths]
        peak = None
        for e in engines:
            row += [_ms(_find(results, **k, format="int8", engine=e, path=p)) for p in int8_paths[e]]
            rr = next((r for r in red if r["model"] == t["key"] and r["engine"] == e and r["path"] == "optimized"
                       and r["batch"] == b0 and r["threads"] == t0), None)
            row.append(_pct(rr["reduction_vs_fp32_eager"]) if rr else "-")
            opt = _find(results, **k, format="int8", engine=e, path="optimized")
            if opt and "median_ms" in opt and peak is None:
                peak = _peak_cell(opt)
        row.append(peak or "-")
        lines.append("| " + " | ".join(row) + " |")

    accuracy = [t for t in models if t["source"] == "weights" and t.get("metrics")]
    if accuracy:
        lines += ["", "Published checkpoints (accuracy from the manifest):", "",
                  "| checkpoint | dataset input | " + " | ".join(f"INT8 {e} metrics" for e in engines) + " |",
                  "|---|---|" + "---|" * len(engines)]
        for t in accuracy:
            cells = [", ".join(f"{k} {v:g}" for k, v in t["metrics"].get(f"int8_{e}", {}).items()) or "-" for e in engines]
            lines.append(f"| {t['key']} | {_size(t)} | " + " | ".join(cells) + " |")

    combos = [(b, n) for b in sorted({r["batch"] for r in results}) for n in s["threads"]]
    lines += ["", "<details><summary>All configurations: median ± IQR latency in ms per batch "
              "(b = batch size, t = threads)</summary>", "",
              "| model | format | path | " + " | ".join(f"b{b} t{n}" for b, n in combos) + " |",
              "|---|---|---|" + "---|" * len(combos)]
    for t in models:
        for fmt in FORMATS:
            for e in (engines if fmt == "int8" else [None]):
                for p in paths:
                    cells = [_find(results, model=t["key"], format=fmt, engine=e, path=p, batch=b, threads=n)
                             or next((r for r in results if r["model"] == t["key"] and r["format"] == fmt
                                      and r["engine"] == e and r["path"] == p and r["batch"] == b
                                      and r["threads"] == n), None) for b, n in combos]
                    if all(c is None for c in cells):
                        continue
                    label = f"INT8 {e}" if fmt == "int8" else "FP32"
                    lines.append(f"| {t['key']} | {label} | {p} | " + " | ".join(_ms(c, iqr=True) for c in cells) + " |")
    lines += ["", "</details>"]
    failed = [r for r in results if "error" in r]
    if failed:
        lines += ["", "Failed configurations:", ""]
        lines += [f"- {Config(**{k: r[k] for k in Config.__dataclass_fields__}).label()}: "
                  f"{r['error'].splitlines()[-1] if r['error'] else ''}" for r in failed]
    return "\n".join(lines) + "\n"


def write_plot(data: dict[str, Any], path: Path) -> Optional[Path]:
    """INT8 vs FP32 latency (and accuracy vs INT8 latency for published checkpoints) as a PNG;
    None (with a message) if matplotlib is missing or nothing was measured."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        print("matplotlib is not installed: no plot (pip install -e \".[bench]\" or pip install matplotlib)")
        return None
    s, results, red = data["settings"], data["results"], data["reductions"]
    t0 = min(s["threads"])
    first = {t["key"]: _first_batch(results, t["key"]) for t in data["models"]}
    rows = [r for r in red if r["batch"] == first[r["model"]] and r["threads"] == t0 and r["path"] == "optimized"
            and r["reduction_vs_fp32_eager"] is not None]
    b_all = {r["batch"] for r in rows}
    if not rows:
        print("no INT8 optimized result with an FP32 eager counterpart: no plot")
        return None
    engines = [e for e in s["engines"] if any(r["engine"] == e for r in rows)]
    models = [t["key"] for t in data["models"] if any(r["model"] == t["key"] for r in rows)]
    accuracy = []
    for t in data["models"]:
        for e in engines:
            metrics = t.get("metrics", {}).get(f"int8_{e}") or {}
            r = _find(results, model=t["key"], format="int8", engine=e, path="optimized", batch=first[t["key"]],
                      threads=t0)
            if metrics and r:
                name, value = next(iter(metrics.items()))
                accuracy.append((t["key"], e, r["median_ms"], value, name))
    panels = 3 if accuracy else 2
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 5.5))
    where = (f"batch {next(iter(b_all))}" if len(b_all) == 1 else "smallest batch") + f", {t0} thread{'s' if t0 > 1 else ''}"

    ax = axes[0]
    width = 0.8 / len(engines)
    for i, e in enumerate(engines):
        values = [next((100 * r["reduction_vs_fp32_eager"] for r in rows if r["model"] == m and r["engine"] == e), 0)
                  for m in models]
        ax.bar([j + (i - (len(engines) - 1) / 2) * width for j in range(len(models))], values, width, label=f"INT8 {e}")
    ax.axhline(100 * TARGET_REDUCTION, color="k", ls="--", lw=1, label=f"target {TARGET_REDUCTION:.0%}")
    ax.set_xticks(range(len(models)), models, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("latency reduction, INT8 optimized vs FP32 eager (%)")
    ax.set_title(f"FP32 -> INT8 latency reduction ({where})")
    ax.legend(fontsize=8)

    ax = axes[1]
    markers = {"x86": "o", "fbgemm": "s", "qnnpack": "^"}
    for e in engines:
        pts = [(r["fp32_eager_ms"], r["int8_ms"], r["model"]) for r in rows if r["engine"] == e]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=markers.get(e, "o"), label=f"INT8 {e}")
        for x, y, name in pts if e == engines[0] else ():
            ax.annotate(name, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    lo = min(min(r["fp32_eager_ms"], r["int8_ms"]) for r in rows) / 1.5
    hi = max(max(r["fp32_eager_ms"], r["int8_ms"]) for r in rows) * 1.5
    for keep, style in ((1.0, "-"), (0.5, ":"), (1 - TARGET_REDUCTION, "--")):
        ax.plot([lo, hi], [lo * keep, hi * keep], color="gray", ls=style, lw=0.8, label=f"{1 - keep:.0%} reduction")
    ax.set_xscale("log")
    ax.set_yscale("log")
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        axis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("FP32 eager latency (ms)")
    ax.set_ylabel("INT8 optimized latency (ms)")
    ax.set_title(f"INT8 vs FP32 latency ({where})")
    ax.legend(fontsize=8)

    if accuracy:
        ax = axes[2]
        for e in engines:
            pts = [a for a in accuracy if a[1] == e]
            ax.scatter([a[2] for a in pts], [a[3] for a in pts], marker=markers.get(e, "o"), label=f"INT8 {e}")
            for a in pts:
                ax.annotate(a[0], (a[2], a[3]), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("INT8 optimized latency (ms, native input size)")
        ax.set_ylabel(accuracy[0][4])
        ax.set_title(f"Published checkpoints: accuracy vs INT8 latency ({where})")
        ax.legend(fontsize=8)
    m = data["machine"]
    fig.suptitle(f"{m['cpu_model']}, torch {m['torch']}{' (smoke run, not a measurement)' if data.get('quick') else ''}",
                 fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:  # atomic, as write_text_atomic
        fig.savefig(tmp, dpi=110, format="png")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        plt.close(fig)
    return path


def update_readme(readme: Path, block: str) -> None:
    """Replace the text between the benchmark markers of ``readme`` with ``block``; append a
    "## Performance" section holding the markers if they are missing."""
    text = readme.read_text(encoding="utf-8")
    start, end = text.find(MARK_START), text.find(MARK_END)
    body = f"{MARK_START}\n{block.rstrip()}\n{MARK_END}"
    if start == -1 and end == -1:
        text = text.rstrip("\n") + "\n\n## Performance\n\n" + body + "\n"
    elif start == -1 or end == -1 or end < start or text.count(MARK_START) > 1 or text.count(MARK_END) > 1:
        raise ValueError(f"{readme} must hold {MARK_START} followed by {MARK_END} exactly once each (or neither); "
                         "fix the markers by hand")
    else:
        text = text[:start] + body + text[end + len(MARK_END):]
    write_text_atomic(readme, text)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path`` and rename it into place: a reader (or
    tools/docs_tables.py) never sees half a benchmark.json."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def command_line(args: argparse.Namespace) -> str:
    """The command that reproduces ``args`` (options left at their defaults omitted)."""
    parts = ["python", "tools/benchmark.py"]
    for action in get_args_parser()._actions:
        if action.help == argparse.SUPPRESS or not action.option_strings or action.dest == "help":
            continue
        value = getattr(args, action.dest, action.default)
        if value == action.default or value is None:
            continue
        flag = action.option_strings[0]
        if action.const is not None and value == action.const:
            parts.append(flag)
            continue
        if isinstance(value, tuple):  # a size
            parts += [flag, f"{value[0]}x{value[1]}" if value[0] != value[1] else str(value[0])]
        elif isinstance(value, list) and action.nargs in ("+", "*"):
            parts += [flag, *map(str, value)]
        elif isinstance(value, list):  # repeatable
            for v in value:
                parts += [flag, str(v)]
        else:
            if action.dest in ("out_dir", "update_readme"):
                value = _repo_relative(value)
            parts += [flag, str(value)]
    return shlex.join(parts)


def _repo_relative(path: str) -> str:
    p = Path(path).resolve()
    try:
        return str(p.relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


# ----------------------------------------------------------------------------------------- main


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", action="append", default=None, metavar="PATTERN",
                        help="shell-style pattern over frostnet.list_models(), tv:<pattern> over "
                             "torchvision.models.quantization, or a group: "
                             + "; ".join(f"@{g} = {' '.join(p)}" for g, p in GROUPS.items())
                             + "; repeatable (default: @default)")
    parser.add_argument("--weights", action="append", default=None, metavar="PATTERN",
                        help="pattern over FP32 manifest entries: published checkpoints to benchmark at their native "
                             "input size with their INT8 files; repeatable (default: all; --weights '' for none)")
    parser.add_argument("--manifest", default=None, help="weights manifest (default: the checkout's)")
    parser.add_argument("--size", type=parse_size, default=(224, 224), help="classification input: N or HxW (default 224)")
    parser.add_argument("--seg-size", type=parse_size, default=(512, 1024),
                        help="segmentation input (default 512x1024: a quarter of Cityscapes' 1024x2048, for time)")
    parser.add_argument("--det-size", type=parse_size, default=(300, 300), help="detection input (default 300, the papers')")
    parser.add_argument("--dense-num-classes", type=int, default=None, metavar="N",
                        help="build registry segmentation/detection models with N classes (default: the builder's, "
                             "19 / 21); 11 = the Fashion-MNIST scenes' background + 10 classes")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="default: 1 8 (--quick: 1)")
    parser.add_argument("--dense-batch-sizes", type=int, nargs="+", default=[1],
                        help="batch sizes of segmentation and detection models (default: 1; batch 8 at 512x1024 takes "
                             "seconds per run)")
    parser.add_argument("--threads", type=int, nargs="+", default=None, help="default: 1 2 (--quick: 1)")
    parser.add_argument("--engines", nargs="+", default=["x86", "qnnpack"], choices=ENGINES, help="INT8 engines")
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS)
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=ALL_PATHS,
                        help="eager nn.Module and/or optimize_for_inference (trace + freeze); pt2e (torch.export + "
                             "torchao + torch.compile, INT8) and onnxruntime (FP32 and INT8 QDQ) need the [export] extra")
    parser.add_argument("--runs", type=int, default=None, help=f"timed runs per configuration (>= {MIN_RUNS}; default "
                                                                f"{MIN_RUNS}, --quick: 3)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed runs first (default 10, --quick: 1)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 3 runs, 1 warm-up, batch 1, 1 thread (unless given); outputs marked as such")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="also profile INT8 configurations with torch.profiler; the top N ops by self CPU time "
                             "go to the JSON and profile.md")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per configuration (default 1800)")
    parser.add_argument("--out-dir", default=str(REPO_ROOT / "docs" / "benchmark"),
                        help="where benchmark.json/.md/.png go (default docs/benchmark)")
    parser.add_argument("--update-readme", nargs="?", const=str(REPO_ROOT / "README.md"), default=None,
                        metavar="README", help="write the tables and plot between the benchmark markers of README.md "
                                               "(or the given file)")
    parser.add_argument("--dry-run", action="store_true", help="list the configurations and exit")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return parser


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    quick = args.quick
    s = {
        "runs": args.runs if args.runs is not None else (3 if quick else MIN_RUNS),
        "warmup": args.warmup if args.warmup is not None else (1 if quick else 10),
        "batch_sizes": args.batch_sizes or ([1] if quick else [1, 8]),
        "dense_batch_sizes": args.dense_batch_sizes,
        "threads": args.threads or ([1] if quick else [1, 2]),
        "engines": list(dict.fromkeys(args.engines)),
        "formats": list(dict.fromkeys(args.formats)),
        "paths": list(dict.fromkeys(args.paths)),
        "size": list(args.size), "seg_size": list(args.seg_size), "det_size": list(args.det_size),
        "dense_num_classes": args.dense_num_classes,
        "profile": args.profile,
    }
    if s["runs"] < 1 or s["warmup"] < 0:
        raise SystemExit(f"--runs must be >= 1 and --warmup >= 0, got {s['runs']} and {s['warmup']}")
    if s["runs"] < MIN_RUNS and not quick:
        raise SystemExit(f"--runs {s['runs']} is too few for a measurement (>= {MIN_RUNS}); use --quick for a smoke run")
    if args.dense_num_classes is not None and args.dense_num_classes < 2:
        raise SystemExit(f"--dense-num-classes must be at least 2 (background + one class), got {args.dense_num_classes}")
    bad = [v for v in s["batch_sizes"] + s["dense_batch_sizes"] + s["threads"] if v < 1]
    if bad:
        raise SystemExit(f"--batch-sizes and --threads must be positive integers, got {bad}")
    return s


def main(args: argparse.Namespace) -> int:
    if args.child is not None:
        return child_main(args.child)
    settings = _settings(args)
    import torch

    unsupported = [e for e in settings["engines"] if e not in torch.backends.quantized.supported_engines]
    if unsupported:
        raise SystemExit(f"engines {unsupported} are not in this torch build "
                         f"(supported: {torch.backends.quantized.supported_engines})")
    weights = [p for p in (args.weights if args.weights is not None else ["*"]) if p]
    try:
        targets = resolve_targets(args.models or list(DEFAULT_MODELS), size=args.size, seg_size=args.seg_size,
                                  det_size=args.det_size, weights_patterns=weights, manifest=args.manifest,
                                  dense_num_classes=args.dense_num_classes)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    if not targets:
        raise SystemExit(f"nothing to benchmark: --models {' '.join(args.models or DEFAULT_MODELS)} and --weights "
                         f"{' '.join(weights) or chr(39) * 2} select no model")
    configs = plan(targets, formats=settings["formats"], paths=settings["paths"], batch_sizes=settings["batch_sizes"],
                   threads=settings["threads"], engines=settings["engines"],
                   dense_batch_sizes=settings["dense_batch_sizes"])
    print(f"{len(targets)} models, {len(configs)} configurations ({settings['runs']} runs after {settings['warmup']} "
          f"warm-up runs each)", flush=True)
    if args.dry_run:
        for c in configs:
            print("  " + c.label())
        return 0

    data: dict[str, Any] = {
        "schema": SCHEMA,
        "command": command_line(args),
        "created": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "quick": args.quick,
        "machine": machine_info(settings["engines"]),
        "settings": settings,
        "load_before": _load(),
        "models": [],
        "results": [],
    }
    by_key = {t.key: t for t in targets}
    started = time.perf_counter()
    for t in targets:
        entry = asdict(t)
        spec = {"kind": "stats", "target": entry, "engines": settings["engines"], "manifest": args.manifest}
        stats = run_child(spec, threads=max(settings["threads"]), timeout=args.timeout)
        if "error" in stats:
            print(f"  {t.key}: stats failed: {stats['error']}", flush=True)
        data["models"].append({**entry, "input_size": list(t.input_size), "stats": stats})
    for i, c in enumerate(configs, 1):
        spec = {"kind": "latency", "config": asdict(c), "target": asdict(by_key[c.model]), "runs": settings["runs"],
                "warmup": settings["warmup"], "manifest": args.manifest,
                "profile": args.profile if c.format == "int8" else 0}
        r = run_child(spec, threads=c.threads, timeout=args.timeout)
        data["results"].append({**asdict(c), **r})
        shown = (f"{r['median_ms']:.2f} ms (IQR {r['iqr_ms']:.2f}, peak RSS {r['peak_rss_mb']:.0f} MB)"
                 if "median_ms" in r else f"FAILED: {r['error']}")
        print(f"[{i}/{len(configs)} {time.perf_counter() - started:.0f}s] {c.label()}: {shown}", flush=True)
    data["load_after"] = _load()
    data["elapsed_s"] = round(time.perf_counter() - started, 1)
    data["reductions"] = reductions(data["results"])
    data["targets"] = target_checks(data["results"], data["reductions"])

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "benchmark.json", json.dumps(data, indent=1) + "\n")
    png = write_plot(data, out / "benchmark.png")
    write_text_atomic(out / "benchmark.md", markdown(data, image=png.name if png else None))
    if args.profile:
        write_text_atomic(out / "profile.md", profile_markdown(data))
    written = ["benchmark.json", "benchmark.md"] + (["benchmark.png"] if png else []) + (["profile.md"] if args.profile else [])
    print(f"wrote {', '.join(str(out / w) for w in written)} in {data['elapsed_s']:.0f} s")
    if args.update_readme:
        readme = Path(args.update_readme)
        image = os.path.relpath(png, readme.resolve().parent) if png else None
        update_readme(readme, markdown(data, image=image.replace(os.sep, "/") if image else None))
        print(f"updated the benchmark section of {readme}")
    for c in data["targets"]:
        print(f"target: {c['target']}: {c['shown']} -> {'met' if c['met'] else 'MISSED, ' + c['shortfall']}")
    return 1 if any("error" in r for r in data["results"]) or any("error" in t["stats"] for t in data["models"]) else 0


def profile_markdown(data: dict[str, Any]) -> str:
    """The top ops by self CPU time of every profiled configuration."""
    lines = ["# INT8 profiles (torch.profiler, 5 runs after the timed runs; self CPU time per run)", ""]
    for r in data["results"]:
        if not r.get("profile"):
            continue
        lines += [f"## {Config(**{k: r[k] for k in Config.__dataclass_fields__}).label()} "
                  f"(median {r['median_ms']:.2f} ms)", "", "| op | self CPU ms/run | share | calls/run |", "|---|---|---|---|"]
        lines += [f"| `{p['op']}` | {p['self_cpu_ms_per_run']:.3f} | {p['share']:.1%} | {p['calls_per_run']:g} |"
                  for p in r["profile"]]
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
