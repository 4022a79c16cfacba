"""The recipe on segmentation and detection models: tiny StatAssist+GradBoost runs on Fashion-MNIST
scenes, exports, kill-and-resume, DDP, backbone initialisation.

Without the Debian Fashion-MNIST package the scene loader raises FileNotFoundError naming the
install command, which tests/conftest.py turns into a skip (a failure in CI)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import frostnet
from frostnet.recipe import get_args_parser, main
from frostnet.serialization import load_fp32, load_int8, save_fp32  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]


def _evaluate_tool():
    import importlib.util

    spec = importlib.util.spec_from_file_location("frostnet_tools_evaluate", ROOT / "tools/evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


#: small canvases and few of them: the tests check the plumbing, not the accuracy
SCENES = "fashion_scenes:size=64,train_images=96,val_images=32,test_images=32"


def _tiny(model: str, out: Path, *extra: str) -> list[str]:
    return ["--model", model, "--data", SCENES, "--input-size", "64", "--batch-size", "16", "--epochs", "2",
            "--fp-epochs", "1", "--mode", "statassist+gradboost", "--opt", "sgd", "--lr", "0.01", "--calib-batches", "1",
            "--no-progress", "--threads", "1", "--output-dir", str(out), *extra]


DENSE = {"ssdlite_mobilenet_v2": ("map", "map_50"), "tiny_dsod": ("map", "map_50"),
         "lraspp_mobilenet_v3_large_re": ("miou", "pixel_acc"), "espnet": ("miou", "pixel_acc")}


@pytest.mark.parametrize("model", sorted(DENSE))
def test_dense_statassist_gradboost_run_writes_fake_quant_and_int8_metrics(tmp_path, model):
    out = tmp_path / "run"
    final = main(get_args_parser().parse_args(_tiny(model, out, "--export-backends", "x86,qnnpack")))
    keys = DENSE[model]
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["phase"] == "fp" and f"fp32_{keys[0]}" in lines[0]
    assert lines[1]["phase"] == "qat" and {f"fake_quant_{k}" for k in keys} | {f"int8_{k}" for k in keys} <= set(lines[1])
    for k in keys:
        for prefix in ("fp32", "fake_quant", "int8_x86", "int8_qnnpack"):
            value = final[f"{prefix}_{k}"]
            assert 0.0 <= value <= 1.0, (prefix, k, value)
    assert final["task"] == frostnet.models.get_model_task(model) and final["split"] == "test"
    assert set(final["files"]) == {"fp32", "int8_x86", "int8_qnnpack"}
    # the exported INT8 file rebuilds a model that runs on the scene inputs
    # tools/evaluate.py rebuilds the INT8 model from its file and the split from the recorded --data
    res = _evaluate_tool().measure(final["files"]["int8_x86"])
    assert res["split"] == "test" and res["dataset"] == "fashion_scenes"
    for k in keys:
        assert res[k] == pytest.approx(final[f"int8_x86_{k}"], abs=1e-4), k


def test_dense_killed_run_resumes_bit_for_bit(tmp_path):
    common = ["--ckpt-interval-steps", "2", "--no-export", "--export-backends", "x86"]
    ref = main(get_args_parser().parse_args(_tiny("ssdlite_mobilenet_v2", tmp_path / "ref", *common)))
    killed = tmp_path / "killed"
    # 96 canvases / batch 16 = 6 steps per epoch; step 8 is epoch 1 (QAT), batch 2, right after a checkpoint
    proc = subprocess.run([sys.executable, str(ROOT / "tools/train.py"), *_tiny("ssdlite_mobilenet_v2", killed, *common),
                           "--exit-at-step", "8"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 3, proc.stderr[-2000:]
    ckpt = torch.load(killed / "checkpoint.pt", weights_only=True)
    assert (ckpt["epoch"], ckpt["batch"], ckpt["statassist"]["phase"]) == (1, 2, "qat")
    resumed = main(get_args_parser().parse_args(_tiny("ssdlite_mobilenet_v2", killed, *common, "--resume", "auto")))
    for key in ("fp32_map", "fake_quant_map", "int8_x86_map", "fake_quant_map_50"):
        assert resumed[key] == ref[key], key
    a = torch.load(tmp_path / "ref/checkpoint.pt", weights_only=True)
    b = torch.load(killed / "checkpoint.pt", weights_only=True)
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    # the interrupted epoch's train loss covers all its batches, before and after the kill
    ra, rb = ([r for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines()) if "epoch" in r]
              for d in (tmp_path / "ref", killed))
    assert [r["epoch"] for r in rb] == [0, 1]
    assert ra[1]["train_loss"] == rb[1]["train_loss"]


def test_dense_ddp_keeps_ranks_identical(tmp_path, torchrun):
    proc = torchrun(_tiny("lraspp_mobilenet_v3_large_re", tmp_path / "ddp", "--no-export", "--no-int8-eval",
                          "--export-backends", "x86"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(l) for l in (tmp_path / "ddp/metrics.jsonl").read_text().splitlines()]
    assert [l.get("replicas_in_sync") for l in lines[:2]] == [True, True]


def test_backbone_init_loads_the_classifier_backbone_and_reports_the_rest(tmp_path, capsys):
    from frostnet.recipe.engine import load_backbone

    torch.manual_seed(1)
    cls = frostnet.get_model("frostnet_small_1_0", num_classes=10)
    path = tmp_path / "cls.safetensors"
    save_fp32(cls, path, arch="frostnet_small_1_0", num_classes=10)
    for name, prefix in (("lraspp_frostnet_small_1_0", "backbone."), ("ssdlite_frostnet_small_1_0", "body.backbone.")):
        dense = frostnet.get_model(name, num_classes=11)
        before = {k: v.clone() for k, v in dense.state_dict().items()}
        report = load_backbone(dense, str(path))
        tensors, _ = load_fp32(path)
        state = dense.state_dict()
        assert report["loaded"] and all(k.startswith(prefix) for k in report["loaded"])
        for k in report["loaded"]:
            assert torch.equal(state[k], tensors[k[len(prefix):]]), k
        assert "classifier.2.weight" in report["unused"]
        for k in report["initialised"]:
            assert torch.equal(state[k], before[k]), k
        assert "loaded" in capsys.readouterr().out


def test_backbone_init_refuses_another_backbone(tmp_path):
    from frostnet.recipe.engine import load_backbone

    cls = frostnet.get_model("frostnet_base_1_0", num_classes=10)
    path = tmp_path / "base.safetensors"
    save_fp32(cls, path, arch="frostnet_base_1_0", num_classes=10)
    with pytest.raises(ValueError, match="backbone of LRASPP"):
        load_backbone(frostnet.get_model("lraspp_frostnet_small_1_0", num_classes=11), str(path), verbose=False)


def test_classification_only_flags_are_refused_for_dense_models(tmp_path):
    args = get_args_parser().parse_args(_tiny("espnet", tmp_path / "x", "--label-smoothing", "0.1"))
    with pytest.raises(ValueError, match="--label-smoothing 0.1 applies to classification models only"):
        main(args)


@pytest.mark.parametrize("model", ["tiny_dsod", "ssdlite_mobilenet_v2"])
def test_qat_detector_int8_file_rebuilds_the_converted_model_bit_for_bit(tmp_path, model):
    """Tiny-DSOD's FP32 last layers are Conv-BN: QAT trains them as a float ConvBn2d, and convert
    folds them so that the file (rebuilt by an eval-mode fusion) holds the same modules."""
    from frostnet import quant
    from frostnet.serialization import save_int8

    torch.manual_seed(0)
    m = frostnet.get_model(model, num_classes=11)
    quant.prepare_qat(m, "x86")
    images = [torch.rand(3, 64, 64) for _ in range(4)]
    targets = [{"boxes": torch.tensor([[5.0, 5.0, 30.0, 30.0]]), "labels": torch.tensor([1])} for _ in range(4)]
    m.train()
    sum(m(images, targets).values()).backward()
    int8 = quant.convert(m, "x86")
    save_int8(int8, tmp_path / "m.safetensors", arch=model, backend="x86", builder_kwargs={"num_classes": 11})
    rebuilt = load_int8(tmp_path / "m.safetensors")
    x = torch.stack(images)
    for a, b in zip(int8.raw_outputs(x), rebuilt.raw_outputs(x)):
        assert torch.equal(a, b)
