"""The checkpoints this checkout publishes (weights/ + weights_manifest.json), used as a user would.

Driven by the real manifest: every published entry's file verifies and loads through
``torch.hub.load(<checkout>, ..., source="local")``, one INT8 checkpoint is re-evaluated on a fixed
part of the real Fashion-MNIST test split against the number its manifest entry records (and one
INT8 detector and one INT8 segmenter on a fixed part of the scene test split, once published), and
a published INT8-ready (QAT-trained) FP32 file is fine-tuned to another class count and converted.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import frostnet
import frostnet.data
from frostnet import hub, quant

ROOT = Path(__file__).resolve().parents[1]
#: The architectures whose Fashion-MNIST checkpoints this checkout publishes (FP32 + INT8 x86 +
#: INT8 qnnpack each); a missing file or entry fails here.
PUBLISHED = ("frostnet_small_1_0", "frostnet_base_1_0", "frostnet_large_1_0")
ENTRIES = sorted(hub.list_weights())
FMNIST = frostnet.data.DEFAULT_FASHION_MNIST_ROOT / "t10k-images-idx3-ubyte.gz"


def _load_tool(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"frostnet_tools_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("arch", PUBLISHED)
def test_every_published_arch_has_fp32_and_both_int8_files(arch):
    manifest = hub.read_manifest()
    for suffix in ("fp32", "int8_x86", "int8_qnnpack"):
        name = f"{arch}.fashion_mnist.{suffix}"
        assert name in manifest, f"{name} missing from weights_manifest.json"
        entry = manifest[name]
        assert (ROOT / "weights" / entry.file).is_file(), f"weights/{entry.file} is not in the checkout"
        assert entry.recipe and "tools/train.py" in entry.recipe and "statassist+gradboost" in entry.recipe
        assert entry.metrics["acc@1"] > 80.0  # a trained model, not random weights (10% on 10 classes)
    fp32 = manifest[f"{arch}.fashion_mnist.fp32"]
    assert {"acc@1", "fake_quant_acc@1"} <= set(fp32.metrics)
    assert hub.default_weights(arch).name == fp32.name
    assert hub.default_weights(arch, quantized=True, backend="qnnpack").name == f"{arch}.fashion_mnist.int8_qnnpack"


def check_loads_through_torch_hub(name: str) -> None:
    """Entry ``name`` loads by name through torch.hub from this checkout and runs on two inputs of
    its size: class logits, ``{"out": (N, C, H, W)}`` masks or per-image detection dicts."""
    entry = hub.get_weights(name)
    kwargs = {"weights": name}
    if entry.format == "int8":
        kwargs.update(quantized=True, backend=entry.backend)
    model = torch.hub.load(str(ROOT), entry.arch, source="local", trust_repo=True, **kwargs)
    assert quant.is_quantized_model(model) == (entry.format == "int8")
    with torch.no_grad():
        out = model.eval()(torch.zeros(2, *entry.input_size))
    classes = len(entry.categories)
    if entry.task == "classification":
        assert out.shape == (2, classes) and torch.isfinite(out).all()
    elif entry.task == "segmentation":
        logits = out["out"] if isinstance(out, dict) else out
        assert logits.shape == (2, classes, *entry.input_size[1:]) and torch.isfinite(logits).all()
    else:
        assert len(out) == 2 and all(set(d) == {"boxes", "scores", "labels"} for d in out)
        assert all(((d["labels"] >= 1) & (d["labels"] < classes)).all() for d in out)


@pytest.mark.parametrize("name", ENTRIES)
def test_published_entry_loads_through_torch_hub(name):
    check_loads_through_torch_hub(name)


@pytest.mark.skipif(not FMNIST.exists(), reason="needs Fashion-MNIST: apt-get install -y dataset-fashion-mnist")
def test_int8_checkpoint_reproduces_its_manifest_accuracy():
    evaluate = _load_tool("evaluate")
    name = f"{PUBLISHED[0]}.fashion_mnist.int8_x86"
    expected = hub.get_weights(name).metrics["acc@1_first2000"]
    res = evaluate.measure(name, subset=2000)
    assert res["n"] == 2000 and res["split"] == "test"
    assert abs(res["acc@1"] - expected) <= 0.3, (res, expected)


#: Preferred dense INT8 entries to re-evaluate, one per task: the FrostNet-backbone models first.
DENSE_PREFERRED = {"detection": ("ssdlite_frostnet_small_1_0", "ssdlite_mobilenet_v2", "tiny_dsod"),
                   "segmentation": ("lraspp_frostnet_small_1_0", "lraspp_mobilenet_v3_large_re", "espnet")}
_SUBSET_KEY = re.compile(r"^(?P<metric>.+)_first(?P<n>\d+)$")


def dense_int8_defaults(entries) -> list[str]:
    """One default INT8 x86 entry per dense task (:data:`DENSE_PREFERRED` order, then by name)."""
    picked = []
    for task, preferred in DENSE_PREFERRED.items():
        names = sorted((n for n, e in entries.items() if e.task == task and e.default and e.backend == "x86"),
                       key=lambda n: (preferred.index(entries[n].arch) if entries[n].arch in preferred else 99, n))
        picked += names[:1]
    return picked


_DENSE = dense_int8_defaults(hub.read_manifest())
DENSE_PARAMS = [pytest.param(n, id=n) for n in _DENSE] or [pytest.param(None, id="none", marks=pytest.mark.skip(
    reason="no dense weights published yet: the manifest has no default INT8 x86 detection or segmentation entry "
           "(python tools/add_weights.py <run>/export --default publishes one)"))]


def remeasure(name: str) -> tuple[str, float, float, dict]:
    """Re-evaluate entry ``name`` on the fixed first part of its test split that its manifest
    records (``<metric>_first<N>``, written by tools/add_weights.py): (metric key, manifest figure,
    measured figure, the full result)."""
    evaluate = _load_tool("evaluate")
    metrics = hub.get_weights(name).metrics
    keys = [m for m in map(_SUBSET_KEY.match, metrics) if m]
    assert len(keys) == 1, f"{name} records {len(keys)} '<metric>_first<N>' figures, expected one: {dict(metrics)}"
    metric, n = keys[0]["metric"], int(keys[0]["n"])
    res = evaluate.measure(name, subset=n)
    assert res["n"] == n and res["split"] == "test", res
    return metric, metrics[keys[0].string], res[metric], res


#: "Within 1 point": 0.01 for the dense metrics (fractions).
DENSE_TOLERANCE = 0.01


@pytest.mark.usefixtures("one_thread")  # INT8 loading and small-batch inference: threads only contend here
@pytest.mark.parametrize("name", DENSE_PARAMS)
def test_dense_int8_checkpoint_reproduces_its_manifest_metric(name):
    metric, expected, measured, res = remeasure(name)
    assert abs(measured - expected) <= DENSE_TOLERANCE, (name, metric, expected, res)


@pytest.mark.usefixtures("one_thread")
def test_dense_int8_defaults_pick_one_per_task_preferring_frostnet(use_published_scenes, monkeypatch):
    """The selection and the comparison above, on the tiny published export of tests/conftest.py."""
    entries = hub.read_manifest()
    picked = dense_int8_defaults(entries)
    assert picked == [use_published_scenes["entries"][t]["int8_x86"] for t in ("detection", "segmentation")]
    for name in picked:
        metric, expected, measured, _ = remeasure(name)
        assert metric == {"detection": "map", "segmentation": "miou"}[entries[name].task]
        assert abs(measured - expected) <= DENSE_TOLERANCE, (name, expected, measured)
    # a manifest figure off by more than a point is caught
    data = json.loads(use_published_scenes["manifest"].read_text())
    name = picked[0]
    key = next(k for k in data["weights"][name]["metrics"] if _SUBSET_KEY.match(k))
    data["weights"][name]["metrics"][key] += 2 * DENSE_TOLERANCE
    use_published_scenes["manifest"].with_name("off.json").write_text(json.dumps(data))
    monkeypatch.setenv("FROSTNET_MANIFEST", str(use_published_scenes["manifest"].with_name("off.json")))
    _, expected, measured, _ = remeasure(name)
    assert abs(measured - expected) > DENSE_TOLERANCE


@pytest.mark.usefixtures("one_thread")
def test_add_weights_publishes_dense_runs_with_their_metrics(use_published_scenes):
    """tools/add_weights.py on the tiny scene runs of tests/conftest.py: every task metric, the
    headline on the fixed first part, the fake-quant figures of the run, the run's canvases."""
    entries = hub.read_manifest()
    for task, names in use_published_scenes["entries"].items():
        fp32, int8 = entries[names["fp32"]], entries[names["int8_x86"]]
        keys = {"detection": ("map", "map_50", "map_75"), "segmentation": ("miou", "pixel_acc")}[task]
        first = f"{keys[0]}_first16"  # the 16-canvas test split of the tiny run: its real size, not 200
        assert list(int8.metrics) == [*keys, first] and int8.default and int8.base == fp32.name
        assert list(fp32.metrics) == [*keys, first, *(f"fake_quant_{k}" for k in keys)]
        assert all(0.0 <= v <= 1.0 for v in fp32.metrics.values())
        assert f"({first}: --subset 16)" in int8.metrics_command and "trained from scratch (no --init)" in int8.notes
        assert (fp32.task, fp32.dataset, fp32.input_size, len(fp32.categories)) == (task, "fashion_scenes", (3, 64, 64), 11)
        assert fp32.categories[0] == "background"
    for names in use_published_scenes["entries"].values():  # as test_published_entry_loads_through_torch_hub
        for name in names.values():
            check_loads_through_torch_hub(name)
    # by manifest name, a dense entry is evaluated on its run's canvases (16 of 64x64), not the default split
    evaluate = _load_tool("evaluate")
    name = use_published_scenes["entries"]["segmentation"]["int8_x86"]
    res = evaluate.measure(name)
    assert res["n"] == 16 and res["miou"] == entries[name].metrics["miou"]


def test_finetune_published_int8_ready_weights_to_other_classes(tmp_path):
    """The documented path: published QAT-trained FP32 -> QAT-prepared model with a new head ->
    one epoch -> INT8."""
    from test_finetune import _imagefolder

    from frostnet.recipe import get_args_parser, main

    _imagefolder(tmp_path / "data")
    arch = PUBLISHED[0]
    fp32 = hub.resolve_file(hub.get_weights(f"{arch}.fashion_mnist.fp32"))
    args = get_args_parser().parse_args([
        "--model", arch, "--data", f"imagefolder:{tmp_path / 'data'}", "--input-size", "32",
        "--mode", "qat-finetune", "--init", str(fp32), "--reset-head", "--epochs", "1",
        "--batch-size", "6", "--lr", "0.01", "--workers", "0", "--calib-batches", "1", "--no-progress",
        "--export-backends", "x86", "--output-dir", str(tmp_path / "ft")])
    final = main(args)
    int8 = hub.load_weights(final["files"]["int8_x86"])
    assert quant.is_quantized_model(int8)
    assert int8(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    # the backbone is the published one, trained one epoch further from it; the head is new
    tuned = hub.load_weights(final["files"]["fp32"]).state_dict()
    published = hub.load_weights(str(fp32)).state_dict()
    assert tuned["classifier.2.weight"].shape == (3, 1280, 1, 1)
    stem = next(k for k in published if k.endswith("weight") and published[k].dim() == 4)
    # close (a fresh init would differ by more than its own norm) but moved: three SGD steps move the stem by
    # a few % of its norm, how many depends on the epoch's random crops (seed 0: 6% here, 3% with the crops drawn
    # before LoaderBatches seeded each sample)
    moved = ((tuned[stem] - published[stem]).norm() / published[stem].norm()).item()
    assert 0 < moved < 0.15, moved
