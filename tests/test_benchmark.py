"""optimize_for_inference (trace + freeze of INT8 models) and tools/benchmark.py in a smoke configuration.

No timing is asserted: these tests check that every code path runs and that the outputs have the
documented structure.
"""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

import frostnet
from frostnet import hub, quant
from frostnet.serialization import save_fp32, save_int8

ROOT = Path(__file__).resolve().parents[1]
ARCH = "frostnet_small_0_35"
BACKENDS = ["x86", "qnnpack"]


def _tool(name):
    spec = importlib.util.spec_from_file_location(f"frostnet_tools_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


bench = _tool("benchmark")


# one intra-op thread: tiny tensors on 2 shared cores (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_thread")


def _int8(backend, size=32):
    torch.manual_seed(0)
    model = frostnet.get_model(ARCH, num_classes=10).eval()
    g = torch.Generator().manual_seed(1)
    return quant.quantize_ptq(model, [torch.randn(4, 3, size, size, generator=g)], backend)


# --------------------------------------------------------------------------- optimize_for_inference


@pytest.mark.parametrize("backend", BACKENDS)
def test_optimize_for_inference_is_bitwise_equal(backend):
    # Measured: the traced + frozen model runs the same INT8 kernels on the same packed weights,
    # so its outputs are bitwise equal (not merely within one quantization step) on both engines.
    int8 = _int8(backend)
    g = torch.Generator().manual_seed(2)
    example = torch.randn(2, 3, 32, 32, generator=g)
    fast = quant.optimize_for_inference(int8, example, backend=backend)
    assert isinstance(fast, torch.jit.ScriptModule)
    with quant.use_engine(backend), torch.no_grad():
        for x in (example, torch.randn(2, 3, 32, 32, generator=g), 3 * torch.randn(2, 3, 32, 32, generator=g)):
            assert torch.equal(fast(x), int8(x))


@pytest.mark.parametrize("backend", BACKENDS)
def test_dilated_depthwise_split_is_bitwise_equal_and_used_on_x86(backend):
    """LR-ASPP's output-stride-16 stage has dilated depthwise convolutions, which x86 runs through a
    slow generic kernel: optimize_for_inference swaps them for undilated ones on phase-split input
    (x86 only; qnnpack's dilated path is faster than the split one) with the same outputs."""
    from frostnet.quant._eager import split_dilated_depthwise

    torch.manual_seed(0)
    model = frostnet.get_model("lraspp_mobilenet_v3_small_re", num_classes=3).eval()
    g = torch.Generator().manual_seed(1)
    int8 = quant.quantize_ptq(model, [torch.randn(2, 3, 64, 96, generator=g)], backend)
    split, names = split_dilated_depthwise(int8)
    assert names and split is not int8
    assert all(type(int8.get_submodule(n)).__name__ in ("Conv2d", "ConvReLU2d") for n in names)
    assert split_dilated_depthwise(split)[1] == []  # nothing dilated is left
    # with examples, a convolution is split only where the split form reproduces its output
    assert split_dilated_depthwise(int8, [(torch.randn(1, 3, 64, 96, generator=g),)])[1] == names
    with quant.use_engine(backend), torch.no_grad():
        # 64x96 gives a 4x6 map at output stride 16; 80x80 a 5x5 one (padded to 6x6, then cropped)
        for shape in ((2, 3, 64, 96), (1, 3, 80, 80)):
            x = torch.randn(*shape, generator=g)
            assert torch.equal(split(x)["out"], int8(x)["out"])
        example = torch.randn(1, 3, 64, 96, generator=g)
        fast = quant.optimize_for_inference(int8, example, backend=backend)
        assert torch.equal(fast(example)["out"], int8(example)["out"])
    assert ("aten::pixel_unshuffle" in str(fast.graph)) == (backend == "x86")


def test_optimize_for_inference_float_model_within_tolerance():
    model = frostnet.get_model(ARCH, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    fast = quant.optimize_for_inference(model, x)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-5)


# one calibration image leaves an observer of the small model's head unused: defaults are fine here
@pytest.mark.filterwarnings("ignore:must run observer before calling calculate_qparams")
def test_optimize_for_inference_dict_outputs():
    seg = frostnet.get_model("lraspp_mobilenet_v3_small_re", num_classes=3).eval()
    int8 = quant.quantize_ptq(seg, [torch.randn(1, 3, 64, 64)], "qnnpack")
    x = torch.randn(1, 3, 64, 64)
    fast = quant.optimize_for_inference(int8, x, backend="qnnpack")
    with quant.use_engine("qnnpack"), torch.no_grad():
        assert torch.equal(fast(x)["out"], int8(x)["out"])


def test_optimize_for_inference_errors():
    model = frostnet.get_model(ARCH, num_classes=10)
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match=r"training mode; call model.eval\(\)"):
        quant.optimize_for_inference(model.train(), x)
    model.eval()
    with pytest.raises(TypeError, match="example_input must be a tensor or a non-empty tuple of tensors"):
        quant.optimize_for_inference(model, [x])
    with pytest.raises(TypeError, match="must be a torch.nn.Module"):
        quant.optimize_for_inference(lambda t: t, x)
    with pytest.raises(ValueError, match="failed on the example input of shape \\(1, 1, 32, 32\\)"):
        quant.optimize_for_inference(model, torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="prepared for quantization but not converted"):
        quant.optimize_for_inference(quant.prepare_ptq(frostnet.get_model(ARCH, num_classes=10), "x86"), x)
    with pytest.raises(ValueError, match="unknown quantization backend 'arm'"):
        quant.optimize_for_inference(model, x, backend="arm")


def test_optimize_for_inference_rejects_data_dependent_branches():
    class Branchy(torch.nn.Module):
        def forward(self, x):
            return x * 2 if float(x[0, 0, 0, 0]) > 0 else x - 1

    x = torch.randn(1, 1, 2, 2)
    x[0, 0, 0, 0], x[0, 0, 0, 1] = 1.0, -1.0  # the mirrored copy takes the other branch
    with pytest.raises(ValueError, match="mirrored copy of the example input.*branch on its input data"):
        quant.optimize_for_inference(Branchy().eval(), x)


# --------------------------------------------------------------------------------- benchmark tool


def test_benchmark_quick_run_outputs_and_readme(tmp_path):
    readme = tmp_path / "README.md"
    original = (ROOT / "README.md").read_text()
    if bench.MARK_START in original:  # once the lead has run the tool: test the appending path anyway
        original = original[:original.index(bench.MARK_START)] + original[original.index(bench.MARK_END) + len(bench.MARK_END):]
        original = original.replace("## Performance", "## Performance (before)")
    readme.write_text(original)
    out = tmp_path / "out"
    args = bench.get_args_parser().parse_args([
        "--quick", "--models", ARCH, "--size", "32", "--runs", "2", "--weights", "", "--engines", "x86", "qnnpack",
        "--out-dir", str(out), "--update-readme", str(readme), "--timeout", "600",
    ])
    assert bench.main(args) == 0

    data = json.loads((out / "benchmark.json").read_text())
    assert data["schema"] == bench.SCHEMA and data["quick"] is True
    assert data["command"].startswith(f"python tools/benchmark.py --models {ARCH} --weights '' --size 32")
    m = data["machine"]
    for key in ("cpu_model", "logical_cores", "usable_cores", "torch", "torchvision", "engines", "supported_engines"):
        assert m[key]
    assert m["engines"] == BACKENDS and m["torch"] == torch.__version__
    assert data["settings"]["runs"] == 2 and data["settings"]["batch_sizes"] == [1] and data["settings"]["threads"] == [1]
    (model,) = data["models"]
    assert model["key"] == ARCH and model["input_size"] == [3, 32, 32]
    stats = model["stats"]
    assert stats["params"] == sum(p.numel() for p in frostnet.get_model(ARCH).parameters())
    assert stats["macs"] > 0 and set(stats["int8_bytes"]) == set(BACKENDS)
    assert all(0 < v < stats["fp32_bytes"] for v in stats["int8_bytes"].values())

    results = data["results"]
    combos = {(r["format"], r["engine"], r["path"]) for r in results}
    assert combos == {("fp32", None, p) for p in bench.PATHS} | {("int8", e, p) for e in BACKENDS for p in bench.PATHS}
    for r in results:
        assert "error" not in r, r
        assert r["runs"] == 2 and len(r["times_ms"]) == 2 and r["torch_threads"] == 1
        assert r["q1_ms"] <= r["median_ms"] <= r["q3_ms"] and r["iqr_ms"] >= 0
        assert r["peak_rss_mb"] > 0 and (r["optimize_s"] is not None) == (r["path"] == "optimized")
    red = data["reductions"]
    assert len(red) == 4 and all(r["reduction_vs_fp32_eager"] < 1 for r in red)
    assert data["targets"] == []  # the targets are about the width-1.0 FrostNets

    md = (out / "benchmark.md").read_text()
    assert md.startswith("> **Smoke run") and f"| {ARCH} | 32x32 |" in md
    assert "| model | input | params | MACs | FP32 size | INT8 size (x86) | INT8 size (qnnpack) |" in md
    assert md.count(f"| {ARCH} | INT8 ") == 4 and "<details>" in md
    has_plot = importlib.util.find_spec("matplotlib") is not None
    assert (out / "benchmark.png").exists() == has_plot

    # the README had no markers: a Performance section holding them was appended
    text = readme.read_text()
    assert text.count("## Performance\n") == 1 and text.count(bench.MARK_START) == 1
    section = text[text.index(bench.MARK_START):text.index(bench.MARK_END)]
    assert f"| {ARCH} | 32x32 |" in section and ("(out/benchmark.png)" in section) == has_plot
    assert text.startswith(original.rstrip("\n") + "\n\n## Performance\n\n" + bench.MARK_START)


def test_update_readme_replaces_between_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n## Performance\n\n{bench.MARK_START}\nold table\n{bench.MARK_END}\n\n## After\n")
    bench.update_readme(readme, "new table\n")
    assert readme.read_text() == f"# x\n\n## Performance\n\n{bench.MARK_START}\nnew table\n{bench.MARK_END}\n\n## After\n"
    bench.update_readme(readme, "newer")  # idempotent layout
    assert readme.read_text().count("## Performance") == 1 and "newer" in readme.read_text()
    readme.write_text(f"# x\n{bench.MARK_END}\n{bench.MARK_START}\n")
    with pytest.raises(ValueError, match="exactly once each"):
        bench.update_readme(readme, "t")


def test_benchmark_rejects_too_few_runs_and_unknown_models(capsys):
    parser = bench.get_args_parser()
    with pytest.raises(SystemExit, match="too few for a measurement"):
        bench.main(parser.parse_args(["--runs", "5", "--dry-run"]))
    with pytest.raises(SystemExit, match="matches no registered model"):
        bench.main(parser.parse_args(["--models", "nosuchnet", "--dry-run"]))
    with pytest.raises(SystemExit, match="matches no torchvision quantizable model"):
        bench.main(parser.parse_args(["--models", "tv:nosuchnet", "--dry-run"]))
    assert bench.main(parser.parse_args(["--dry-run", "--weights", ""])) == 0
    out = capsys.readouterr().out
    # the default run: FrostNets at width 1.0 and torchvision's peers; FP32 x {eager, optimized} x
    # batch {1, 8} x threads {1, 2} and INT8 the same for x86 and qnnpack
    assert out.startswith("7 models, 168 configurations (30 runs after 10 warm-up runs each)")
    assert "tv:mobilenet_v3_large int8/qnnpack optimized b8 t2" in out
    with pytest.raises(SystemExit, match="nothing to benchmark"):
        bench.main(parser.parse_args(["--models", "@none", "--weights", "", "--dry-run"]))


def test_dense_num_classes_sizes_the_dense_heads_only(capsys):
    targets = bench.resolve_targets(["espnet", "ssdlite_mobilenet_v2", "frostnet_small_0_35"], size=(32, 32),
                                    seg_size=(64, 64), det_size=(64, 64), dense_num_classes=11)
    assert [(t.key, t.num_classes) for t in targets] == [("espnet", 11), ("ssdlite_mobilenet_v2", 11),
                                                         ("frostnet_small_0_35", None)]
    seg = bench._build_float(targets[0], None)
    assert seg.num_classes == 11 and bench._build_float(targets[2], None).classifier[-1].out_channels == 1000
    default = bench.resolve_targets(["espnet"], size=(32, 32), seg_size=(64, 64), det_size=(64, 64))[0]
    assert default.num_classes is None and bench._build_float(default, None).num_classes == 19
    parser = bench.get_args_parser()
    with pytest.raises(SystemExit, match="--dense-num-classes must be at least 2 .*got 1"):
        bench.main(parser.parse_args(["--models", "espnet", "--dense-num-classes", "1", "--dry-run"]))
    assert "--dense-num-classes 11" in bench.command_line(parser.parse_args(["--dense-num-classes", "11"]))


def test_published_checkpoint_in_process(tmp_path, monkeypatch):
    """A manifest checkpoint runs at its native input size with its own INT8 file, and its
    accuracy reaches the tables (child code paths called in this process)."""
    weights, manifest = tmp_path / "weights", tmp_path / "weights_manifest.json"
    weights.mkdir()
    monkeypatch.setenv("FROSTNET_WEIGHTS_DIR", str(weights))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fp32_name = f"{ARCH}.fashion_mnist.fp32"
    torch.manual_seed(0)
    model = frostnet.get_model(ARCH, num_classes=10).eval()
    save_fp32(model, weights / f"{fp32_name}.safetensors", arch=ARCH, num_classes=10)
    name, entry = hub.make_manifest_entry(weights / f"{fp32_name}.safetensors", dataset="fashion_mnist",
                                          metrics={"acc@1": 91.0}, metrics_command="python tools/evaluate.py ...")
    hub.add_manifest_entry(name, entry, manifest_path=manifest)
    int8 = _int8("x86")
    save_int8(int8, weights / f"{ARCH}.fashion_mnist.int8_x86.safetensors", arch=ARCH, backend="x86",
              builder_kwargs={"num_classes": 10})
    name, entry = hub.make_manifest_entry(weights / f"{ARCH}.fashion_mnist.int8_x86.safetensors",
                                          dataset="fashion_mnist", metrics={"acc@1": 90.5},
                                          metrics_command="python tools/evaluate.py ...")
    hub.add_manifest_entry(name, entry, manifest_path=manifest)

    (target,) = bench.resolve_targets([], size=(224, 224), seg_size=(64, 64), det_size=(64, 64),
                                      weights_patterns=["*"], manifest=str(manifest))
    assert target.key == f"{ARCH}.fashion_mnist" and target.input_size == (3, 32, 32)
    assert target.int8_weights == {"x86": f"{ARCH}.fashion_mnist.int8_x86"}
    assert target.metrics == {"fp32": {"acc@1": 91.0}, "int8_x86": {"acc@1": 90.5}}
    configs = bench.plan([target], formats=bench.FORMATS, paths=["optimized"], batch_sizes=[1], threads=[1],
                         engines=BACKENDS)
    assert [(c.format, c.engine) for c in configs] == [("fp32", None), ("int8", "x86")]  # no qnnpack file

    from dataclasses import asdict

    stats = bench.run_stats({"target": asdict(target), "engines": BACKENDS, "manifest": str(manifest)})
    assert stats["int8_file_bytes"] == {"x86": (weights / f"{ARCH}.fashion_mnist.int8_x86.safetensors").stat().st_size}
    results = []
    for c in configs:
        r = bench.run_latency({"config": asdict(c), "target": asdict(target), "runs": 2, "warmup": 1,
                               "manifest": str(manifest), "profile": 3 if c.format == "int8" else 0})
        results.append({**asdict(c), **r})
    assert len(results[1]["profile"]) == 3 and results[1]["profile"][0]["op"]
    data = {
        "command": "python tools/benchmark.py", "created": "now", "quick": True, "load_before": None,
        "load_after": None, "machine": bench.machine_info(BACKENDS),
        "settings": {"runs": 2, "warmup": 1, "batch_sizes": [1], "threads": [1], "engines": BACKENDS},
        "models": [{**asdict(target), "stats": stats}], "results": results,
    }
    data["reductions"] = bench.reductions(results)
    data["targets"] = bench.target_checks(results, data["reductions"])
    md = bench.markdown(data)
    assert f"| {ARCH}.fashion_mnist | 32x32 | acc@1 90.5 |" in md  # an INT8 x86 column only: no qnnpack file
    assert "profile" not in bench.profile_markdown({"results": results[:1]}).split("\n", 1)[1]


def _synthetic(models, medians):
    """Benchmark data with the given (model, format, engine, path) -> median latency at b1 t1."""
    results = [{"model": m, "format": f, "engine": e, "path": p, "batch": 1, "threads": 1, "median_ms": v,
                "iqr_ms": 0.1, "peak_rss_mb": 500.0, "run_peak_rss_mb": 480.0, "baseline_rss_mb": 400.0}
               for (m, f, e, p), v in medians.items()]
    red = bench.reductions(results)
    return {"command": "python tools/benchmark.py", "created": "now", "quick": False, "load_before": [0.0],
            "load_after": [0.0], "machine": {"cpu_model": "cpu", "usable_cores": 2, "logical_cores": 2,
                                             "cpu_capability": "AVX2", "torch": "t", "torchvision": "tv"},
            "settings": {"runs": 30, "warmup": 10, "batch_sizes": [1], "threads": [1], "engines": ["x86"]},
            "models": [{"key": m, "source": "registry", "input_size": [3, 224, 224], "stats": {}} for m in models],
            "results": results, "reductions": red, "targets": bench.target_checks(results, red)}


def test_targets_report_shortfalls_and_plot_is_optional(tmp_path, monkeypatch, capsys):
    models = ["frostnet_small_1_0", bench.TARGET_PEER]
    data = _synthetic(models, {
        ("frostnet_small_1_0", "fp32", None, "eager"): 20.0, ("frostnet_small_1_0", "int8", "x86", "optimized"): 7.0,
        (bench.TARGET_PEER, "fp32", None, "eager"): 15.0, (bench.TARGET_PEER, "int8", "x86", "optimized"): 7.5,
    })
    reduction, ratio = data["targets"]
    assert reduction["measured"] == pytest.approx(0.65) and not reduction["met"]
    assert reduction["shortfall"] == "5.0 percentage points short"
    assert ratio["measured"] == pytest.approx(7.0 / 7.5) and not ratio["met"]
    assert ratio["shortfall"] == "3.7% slower than the target"
    md = bench.markdown(data)
    assert "| frostnet_small_1_0 | 224x224 |" in md and "**missed**: 5.0 percentage points short" in md
    assert "| 65.0% |" in md and "480 MB (+80)" in md

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    assert bench.write_plot(data, tmp_path / "b.png") is None
    assert "matplotlib is not installed" in capsys.readouterr().out and not (tmp_path / "b.png").exists()


def test_export_paths_plan_x86_only_and_no_fp32_pt2e():
    target = bench.Target("frostnet_small_1_0", "registry", "frostnet_small_1_0", "classification", (3, 224, 224))
    configs = bench.plan([target], formats=bench.FORMATS, paths=list(bench.ALL_PATHS), batch_sizes=[1], threads=[1],
                         engines=BACKENDS)
    combos = {(c.format, c.engine, c.path) for c in configs}
    assert ("fp32", None, "onnxruntime") in combos and ("fp32", None, "pt2e") not in combos
    assert {("int8", "x86", "pt2e"), ("int8", "x86", "onnxruntime")} <= combos
    assert not {("int8", "qnnpack", p) for p in bench.EXPORT_PATHS} & combos  # they do not use the eager engine
    assert {("int8", "qnnpack", p) for p in bench.PATHS} <= combos


def test_fastest_int8_path_targets_over_every_path():
    models = ["frostnet_small_1_0", bench.TARGET_PEER]
    data = _synthetic(models, {
        ("frostnet_small_1_0", "fp32", None, "eager"): 20.0, ("frostnet_small_1_0", "int8", "x86", "optimized"): 7.0,
        ("frostnet_small_1_0", "int8", "x86", "onnxruntime"): 3.0, ("frostnet_small_1_0", "int8", "qnnpack", "eager"): 1.0,
        (bench.TARGET_PEER, "fp32", None, "eager"): 15.0, (bench.TARGET_PEER, "int8", "x86", "pt2e"): 4.0,
        (bench.TARGET_PEER, "int8", "x86", "optimized"): 7.5,
    })
    by_target = {c["target"]: c for c in data["targets"]}
    fastest = by_target["frostnet_small_1_0 fastest INT8 path vs FP32 eager latency reduction >= 80%"]
    assert fastest["measured"] == pytest.approx(1 - 3.0 / 20.0) and fastest["met"]  # x86 only: not the qnnpack row
    assert "onnxruntime" in fastest["shown"]
    ratio = by_target[f"frostnet_small_1_0 fastest INT8 path <= 0.9x {bench.TARGET_PEER}'s fastest INT8 path"]
    assert ratio["measured"] == pytest.approx(3.0 / 4.0) and ratio["met"] and "pt2e" in ratio["shown"]
    md = bench.markdown(data)
    assert "INT8 x86 ORT" in md and "INT8 x86 pt2e+compile" in md and "| 3.00 |" in md
