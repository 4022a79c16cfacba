"""Rewrite the generated tables of README.md and docs/*.md from the data they come from.

    python tools/docs_tables.py            # rewrite every marked section that is out of date
    python tools/docs_tables.py --check    # exit 1 (listing them) if any is out of date

A generated section sits between ``<!-- table:<name>:start -->`` and ``<!-- table:<name>:end -->``
and is never edited by hand. Sources: the packaged weights manifest
(``frostnet/weights_manifest.json``), ``docs/benchmark-published/benchmark.json`` and
``docs/dense-models/benchmark.json`` (from ``tools/benchmark.py``) and
``docs/bench-methods/bits{8,4}.json`` (from ``tools/bench_methods.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing


def _mb(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


def _entries():
    from frostnet import hub

    return hub.read_manifest(hub.MANIFEST_PATH)


def _order(entries) -> list:
    """Published entries by arch (small, base, large; then the rest), FP32 before INT8 x86, qnnpack."""
    rank = {"small": 0, "base": 1, "large": 2}
    fmt = {None: 0, "x86": 1, "fbgemm": 2, "qnnpack": 3}
    return sorted(entries.values(), key=lambda e: (e.task, e.dataset, next((v for k, v in rank.items() if f"_{k}_" in
                                                                           e.arch), 9), e.arch, fmt.get(e.backend, 9)))


def _metric(e) -> str:
    m = e.metrics
    # the headline of each task, under the keys tools/add_weights.py writes
    for key, label in (("acc@1", "top-1"), ("miou", "mIoU"), ("map_50", "mAP@.5")):
        if key in m:
            extra = f" (fake-quant {m['fake_quant_' + key]:.2f})" if f"fake_quant_{key}" in m else ""
            return f"{label} {m[key]:.2f}{extra}"
    return "-"


def weights_summary() -> str:
    """README: one row per published model and dataset, FP32 and INT8 side by side."""
    rows = ["| model | task | dataset | FP32 | INT8 x86 | INT8 qnnpack | INT8 size |", "|---|---|---|---|---|---|---|"]
    groups: dict[tuple[str, str], dict] = {}
    for e in _order(_entries()):
        groups.setdefault((e.arch, e.dataset), {})[e.backend or "fp32"] = e
    for (arch, dataset), g in groups.items():
        any_e = next(iter(g.values()))
        cells = [_metric(g[k]) if k in g else "-" for k in ("fp32", "x86", "qnnpack")]
        int8 = g.get("x86") or g.get("qnnpack")
        rows.append(f"| `{arch}` | {any_e.task} | {dataset} | {' | '.join(cells)} | {_mb(int8.size) if int8 else '-'} |")
    return "\n".join(rows)


def weights_full() -> str:
    """docs/weights-and-format.md: every manifest entry."""
    rows = ["| weights | format | test metrics | size | default |", "|---|---|---|---|---|"]
    for e in _order(_entries()):
        fmt = "FP32 (QAT latent weights)" if e.format == "fp32" else f"INT8, {e.backend}"
        metrics = ", ".join(f"{k} {v:g}" for k, v in e.metrics.items()) or "-"
        rows.append(f"| `{e.name}` | {fmt} | {metrics} | {_mb(e.size)} | {'yes' if e.default else ''} |")
    return "\n".join(rows)


def published_latency() -> str:
    """docs/benchmarks.md: published checkpoints, accuracy vs INT8 latency (batch 1, 1 thread)."""
    data = json.loads((ROOT / "docs" / "benchmark-published" / "benchmark.json").read_text())
    med = {(r["model"], r["format"], r["path"], r["engine"]): r["median_ms"]
           for r in data["results"] if r["batch"] == 1 and r["threads"] == 1}
    entries = _entries()
    rows = ["| checkpoint | FP32 eager ms | INT8 x86 opt. ms | INT8 qnnpack opt. ms | INT8 x86 top-1 | INT8 qnnpack top-1 |",
            "|---|---|---|---|---|---|"]
    rank = {"small": 0, "base": 1, "large": 2}
    for m in sorted(data["models"], key=lambda m: next((v for k, v in rank.items() if f"_{k}_" in m["key"]), 9)):
        key = m["key"]
        acc = [entries[m["int8_weights"][b]].metrics.get("acc@1") if b in m["int8_weights"] else None
               for b in ("x86", "qnnpack")]
        cells = [med.get((key, "fp32", "eager", None)), med.get((key, "int8", "optimized", "x86")),
                 med.get((key, "int8", "optimized", "qnnpack"))]
        rows.append(f"| {key} | " + " | ".join("-" if v is None else f"{v:.2f}" for v in cells + acc) + " |")
    return "\n".join(rows)


#: docs/dense-models.md: the issue's six models, each FrostNet-backbone row right after its
#: MobileNet counterpart (same head, same budget): (task, arch, backbone, the arch it is compared with).
DENSE_ROWS: tuple[tuple[str, str, str, str | None], ...] = (
    ("segmentation", "lraspp_mobilenet_v3_large_re", "MobileNetV3-Large, ReLU (-RE)", None),
    ("segmentation", "lraspp_frostnet_small_1_0", "FrostNet-Small 1.0", "lraspp_mobilenet_v3_large_re"),
    ("segmentation", "espnet", "ESPNet's own", None),
    ("detection", "ssdlite_mobilenet_v2", "MobileNetV2", None),
    ("detection", "ssdlite_frostnet_small_1_0", "FrostNet-Small 1.0", "ssdlite_mobilenet_v2"),
    ("detection", "tiny_dsod", "Tiny-DSOD's own (DDB)", None),
)
#: The two figures per task shown in docs/dense-models.md (keys of the manifest metrics).
DENSE_METRICS = {"segmentation": (("miou", "mIoU"), ("pixel_acc", "pixel acc.")),
                 "detection": (("map", "mAP"), ("map_50", "mAP@.5"))}
DENSE_DATASET = "fashion_scenes"
DENSE_BENCHMARK = ROOT / "docs" / "dense-models" / "benchmark.json"


def _dense_entries(entries) -> dict[str, dict]:
    """arch -> {"fp32": entry, "int8_x86": entry} of the default scene weights that are published."""
    out: dict[str, dict] = {}
    for e in entries.values():
        if e.dataset == DENSE_DATASET and e.default and e.backend in (None, "x86"):
            out.setdefault(e.arch, {})["fp32" if e.backend is None else "int8_x86"] = e
    return out


def _figures(metrics, task: str, prefix: str = "") -> str | None:
    """``mIoU 0.771 / pixel acc. 0.953`` of ``metrics`` (keys with ``prefix``), None if absent."""
    keys = DENSE_METRICS[task]
    if not all(prefix + k in metrics for k, _ in keys):
        return None
    return " / ".join(f"{label} {metrics[prefix + k]:.3f}" for k, label in keys)


def dense_models() -> str:
    """docs/dense-models.md: params, MACs and INT8 latency at 128x128 (docs/dense-models/benchmark.json)
    beside the FP32 / fake-quant / INT8 x86 test metrics of the published scene weights."""
    bench = json.loads(DENSE_BENCHMARK.read_text())
    stats = {m["key"]: m["stats"] for m in bench["models"]}
    latency = {r["model"]: r["median_ms"] for r in bench["results"] if (r["format"], r["path"], r["engine"],
               r["threads"], r["batch"]) == ("int8", "optimized", "x86", 1, 1) and "median_ms" in r}
    published = _dense_entries(_entries())
    missing = "not published"
    rows = ["| task | model | backbone | params | MACs | INT8 x86 ms | FP32 | fake-quant | INT8 x86 | FrostNet vs MobileNet |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for task, arch, backbone, counterpart in DENSE_ROWS:
        st, pub = stats.get(arch, {}), published.get(arch, {})
        fp32, int8 = pub.get("fp32"), pub.get("int8_x86")
        cells = [_figures(fp32.metrics, task) if fp32 else None,
                 _figures(fp32.metrics, task, "fake_quant_") if fp32 else None,
                 _figures(int8.metrics, task) if int8 else None]
        versus = "-"
        if counterpart is not None:
            other, key = published.get(counterpart, {}).get("int8_x86"), DENSE_METRICS[task][0][0]
            parts = [f"MACs {st['macs'] / stats[counterpart]['macs']:.2f}x",
                     f"latency {latency[arch] / latency[counterpart]:.2f}x"]
            if int8 is not None and other is not None:
                parts.append(f"INT8 {DENSE_METRICS[task][0][1]} {int8.metrics[key] - other.metrics[key]:+.3f}")
            versus = ", ".join(parts)
        rows.append(f"| {task} | `{arch}` | {backbone} | {st['params'] / 1e6:.2f} M | {st['macs'] / 1e6:.0f} M | "
                    f"{latency[arch]:.2f} | " + " | ".join(c or missing for c in cells) + f" | {versus} |")
    s, m = bench["settings"], bench["machine"]

    def load(v) -> str:
        return "/".join(f"{x:.1f}" for x in v) if v else "?"

    seg, det = ("x".join(map(str, s[k])) for k in ("seg_size", "det_size"))
    size = seg if seg == det else f"{seg} (segmentation) and {det} (detection)"
    rows += ["", (f"Params and MACs (`torch.utils.flop_counter`, MACs = FLOPs / 2) of the float model with "
                 f"{s['dense_num_classes']} classes at {size}; INT8 x86 ms: median of "
                 f"{s['runs']} runs after {s['warmup']} warm-up runs, batch 1, 1 thread, optimized path "
                 f"(`optimize_for_inference`; a detector's network without decoding and NMS), random weights, "
                 f"measured {bench['created']} on this project's VM ({m['cpu_model']}, {m['logical_cores']} cores) "
                 f"while it was shared with training runs (load average {load(bench['load_before'])} before, "
                 f"{load(bench['load_after'])} after): {bench['command'].replace('|', '&#124;')}. Metrics: the "
                 f"default `{DENSE_DATASET}` manifest entries (FP32 file, the QAT run's fake-quant evaluation, "
                 "the INT8 x86 file) on the scene test split.")]
    return "\n".join(rows)


def method_costs() -> str:
    """docs/training-recipe.md: per-step cost of the QAT methods over plain STE QAT."""
    res = {b: json.loads((ROOT / "docs" / "bench-methods" / f"bits{b}.json").read_text())["results"] for b in (8, 4)}
    label = {"talr": "+ TALR (transition counting, rescaled steps, FoldTracker)",
             "ewgs": "+ EWGS (element-wise gradient scaling, FoldTracker)",
             "octav": "+ OCTAV / MAD (clipping scalar re-solved every step)"}
    rows = ["| method | W8A8 | W4A4 |", "|---|---|---|",
            f"| plain STE QAT (torch's fake quantization) | {res[8]['ste_wall']['step_ms']:.1f} ms | "
            f"{res[4]['ste_wall']['step_ms']:.1f} ms |"]
    for method, text in label.items():
        cells = []
        for b in (8, 4):
            r = res[b][f"{method}_wall"]
            cell = f"+{r['overhead_percent']:.1f}%"
            if "amortized_overhead_percent" in r:
                cell += (f"; +{r['amortized_overhead_percent']:.1f}% with the Hutchinson delta re-estimate "
                         f"({r['delta_refresh_ms'] / 1000:.1f} s) amortized")
            cells.append(cell)
        rows.append(f"| {text} | {' | '.join(cells)} |")
    return "\n".join(rows)


#: section name -> (the files holding it, the function that renders it)
SECTIONS: dict[str, tuple[tuple[str, ...], Callable[[], str]]] = {
    "weights-summary": (("README.md",), weights_summary),
    "weights-full": (("docs/weights-and-format.md",), weights_full),
    "published-latency": (("docs/benchmarks.md",), published_latency),
    "method-costs": (("docs/training-recipe.md",), method_costs),
    "dense-models": (("docs/dense-models.md",), dense_models),
}


def _marker(name: str) -> re.Pattern:
    return re.compile(rf"(<!-- table:{re.escape(name)}:start -->)(.*?)(<!-- table:{re.escape(name)}:end -->)", re.S)


def render(text: str, name: str, table: str, where: str) -> str:
    """``text`` with section ``name`` replaced by ``table``; a missing marker is an error."""
    pattern = _marker(name)
    if not pattern.search(text):
        raise ValueError(f"{where} has no '<!-- table:{name}:start -->' ... '<!-- table:{name}:end -->' section")
    return pattern.sub(lambda m: f"{m.group(1)}\n{table}\n{m.group(3)}", text, count=1)


def outdated(root: Path = ROOT) -> dict[Path, str]:
    """Files whose generated sections differ from their sources: path -> the up-to-date text."""
    texts: dict[Path, str] = {}
    for name, (files, make) in SECTIONS.items():
        table = make()
        for f in files:
            path = root / f
            texts[path] = render(texts.get(path, path.read_text()), name, table, f)
    return {p: t for p, t in texts.items() if p.read_text() != t}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="only report out-of-date files (exit 1 if any)")
    args = p.parse_args(argv)
    stale = outdated()
    for path, text in stale.items():
        if args.check:
            print(f"{path.relative_to(ROOT)} is out of date: run python tools/docs_tables.py")
            continue
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        tmp.write_text(text)
        os.replace(tmp, path)  # atomic: a reader never sees half a file
        print(f"rewrote {path.relative_to(ROOT)}")
    return 1 if (args.check and stale) else 0


if __name__ == "__main__":
    sys.exit(main())
