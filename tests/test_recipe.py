"""The training recipe: StatAssist carry-over, kill-and-resume, DDP agreement, the CLI."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import frostnet
from frostnet.data import FashionMNIST
from frostnet.optim import GradBoost
from frostnet.recipe import StatAssist, get_args_parser, main

ROOT = Path(__file__).resolve().parents[1]


def _has_fashion_mnist() -> bool:
    try:
        FashionMNIST(split="test")
    except FileNotFoundError:
        return False
    return True


needs_data = pytest.mark.skipif(not _has_fashion_mnist(), reason="apt-get install -y dataset-fashion-mnist")

TINY = ["--model", "frostnet_small_0_35", "--data", "fashion_mnist", "--train-subset", "512", "--batch-size", "64",
        "--eval-subset", "256", "--calib-batches", "1", "--no-progress", "--lr", "0.05"]


def _step(model, opt, x, y):
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()


@pytest.mark.parametrize("gradboost", [False, True])
def test_statassist_carries_fp_momentum_into_qat(gradboost):
    model = frostnet.get_model("frostnet_small_0_35", num_classes=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    if gradboost:
        opt = GradBoost(opt, seed=1)
    sa = StatAssist(model, opt, backend="x86", fp_epochs=1)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    assert not sa.on_epoch_start(0) and sa.phase == "fp"
    for _ in range(3):
        _step(model, opt, x, y)
    w = model.layer4[0].squeeze_conv.conv[0].weight
    buf = opt.state[w]["momentum_buffer"]
    fp_momentum = buf.clone()
    assert fp_momentum.abs().sum() > 0

    assert sa.on_epoch_start(1) and sa.phase == "qat"
    assert model.layer4[0].squeeze_conv.conv[0].weight is w  # the QAT module trains the same tensor
    assert opt.state[w]["momentum_buffer"] is buf and torch.equal(buf, fp_momentum)
    if gradboost:
        assert opt.phase == "boost"
    # the first QAT step continues the FP momentum: new buffer = 0.9 * old + grad
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    grad = w.grad.clone()
    if not gradboost:
        opt.step()
        torch.testing.assert_close(opt.state[w]["momentum_buffer"], 0.9 * fp_momentum + grad)


def test_statassist_float_view_follows_qat_training():
    model = frostnet.get_model("frostnet_small_0_35", num_classes=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sa = StatAssist(model, opt, fp_epochs=0)
    sa.on_epoch_start(0)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    for _ in range(2):
        _step(model, opt, x, y)
    view = sa.float_state_dict()
    fused = model.conv1.conv[0]  # ConvBnReLU2d (QAT)
    assert torch.equal(view["conv1.conv.0.weight"], fused.weight)
    assert torch.equal(view["conv1.conv.1.running_mean"], fused.bn.running_mean)
    assert int(view["conv1.conv.1.num_batches_tracked"]) == 2
    float_model = frostnet.get_model("frostnet_small_0_35", num_classes=10)
    float_model.load_state_dict(view, strict=True)


def test_statassist_errors():
    model = frostnet.get_model("frostnet_small_0_35")
    with pytest.raises(ValueError, match="fp_epochs must be a non-negative integer, got -1"):
        StatAssist(model, fp_epochs=-1)
    with pytest.raises(ValueError, match="unknown quantization backend"):
        StatAssist(model, backend="cuda")
    with pytest.raises(ValueError, match="unknown StatAssist phase 'int4'"):
        StatAssist(model).load_state_dict({"phase": "int4"})


def test_help_documents_every_flag():
    text = get_args_parser().format_help()
    for action in get_args_parser()._actions:
        for opt in action.option_strings:
            assert opt in text
        assert action.help, action.option_strings


@needs_data
def test_cli_run_writes_fp32_fake_quant_and_int8_metrics(tmp_path):
    out = tmp_path / "run"
    args = get_args_parser().parse_args(TINY + ["--mode", "statassist+gradboost", "--epochs", "2",
                                                "--output-dir", str(out), "--no-export", "--export-backends", "x86,qnnpack"])
    final = main(args)
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["phase"] == "fp" and "fp32_top1" in lines[0]
    assert lines[1]["phase"] == "qat" and {"fake_quant_top1", "int8_top1"} <= set(lines[1])
    assert {"fp32_top1", "fake_quant_top1", "int8_x86_top1", "int8_qnnpack_top1"} <= set(final)
    assert lines[-1] == {"final": final}
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["statassist"]["phase"] == "qat"
    assert "boost_state" in json.dumps(list(ckpt["optimizer"].keys())) or ckpt["optimizer"]


@needs_data
def test_killed_run_resumes_to_the_same_result(tmp_path):
    common = TINY + ["--mode", "statassist+gradboost", "--epochs", "2", "--fp-epochs", "1", "--no-export",
                     "--export-backends", "x86", "--ckpt-interval-steps", "3"]
    # uninterrupted
    ref = main(get_args_parser().parse_args(common + ["--output-dir", str(tmp_path / "ref")]))
    # killed hard at global step 11 (epoch 1, batch 3: the QAT phase, right after a checkpoint at batch 3)
    killed = tmp_path / "killed"
    proc = subprocess.run([sys.executable, str(ROOT / "tools/train.py"), *common, "--output-dir", str(killed),
                           "--exit-at-step", "11"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 3, proc.stderr[-2000:]
    ckpt = torch.load(killed / "checkpoint.pt", weights_only=True)
    assert (ckpt["epoch"], ckpt["batch"], ckpt["statassist"]["phase"]) == (1, 3, "qat")
    resumed = main(get_args_parser().parse_args(common + ["--output-dir", str(killed), "--resume", "auto"]))
    for key in ("fp32_top1", "fake_quant_top1", "int8_x86_top1"):
        assert resumed[key] == ref[key], key
    a = torch.load(tmp_path / "ref/checkpoint.pt", weights_only=True)
    b = torch.load(killed / "checkpoint.pt", weights_only=True)
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    assert torch.equal(a["rng"], b["rng"])


@needs_data
def test_ddp_two_processes_stay_bitwise_identical(tmp_path, torchrun):
    proc = torchrun([*TINY, "--mode", "statassist+gradboost", "--epochs", "2", "--no-export", "--no-int8-eval",
                     "--export-backends", "x86", "--threads", "1", "--output-dir", tmp_path / "ddp"], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(l) for l in (tmp_path / "ddp/metrics.jsonl").read_text().splitlines()]
    assert [l.get("replicas_in_sync") for l in lines[:2]] == [True, True]


@needs_data
def test_a_backend_that_refuses_the_model_does_not_lose_the_run(tmp_path, monkeypatch):
    """qnnpack refuses adds whose scale ratio is out of its range (a diverged run's model): the
    final record keeps the other figures and names the error, and that backend is not exported."""
    from frostnet.recipe import engine

    real_evaluate = engine.evaluate

    def evaluate(model, batches, **kwargs):
        if torch.backends.quantized.engine == "qnnpack" and frostnet.quant.is_quantized_model(model):
            raise RuntimeError("Error in QNNPACK\nfailed to create QNNPACK Add operator")
        return real_evaluate(model, batches, **kwargs)

    monkeypatch.setattr(engine, "evaluate", evaluate)
    out = tmp_path / "run"
    args = get_args_parser().parse_args(TINY + ["--mode", "qat", "--epochs", "1", "--output-dir", str(out),
                                                "--export-backends", "x86,qnnpack"])
    final = main(args)
    assert "int8_x86_top1" in final and "int8_qnnpack_top1" not in final
    assert final["int8_qnnpack_error"] == "failed to create QNNPACK Add operator"
    assert set(final["files"]) == {"fp32", "int8_x86"}


@pytest.mark.parametrize("bits", [8, 4])
def test_qat_models_convert_directly_for_an_engine_whose_range_holds_theirs(bits):
    """An x86-trained QAT model converts for qnnpack as it is (same integer weights), and below 8
    activation bits for every engine; a qnnpack-trained 8-bit model is re-calibrated for x86, whose
    kernels need 7-bit activations."""
    from frostnet.recipe import engine

    args = get_args_parser().parse_args(["--model", "frostnet_small_0_35", "--data", "fashion_mnist", "--mode", "qat",
                                         "--weight-bits", str(bits), "--act-bits", str(bits)])
    assert engine.converts_directly(args, "x86", "qnnpack")
    assert engine.converts_directly(args, "qnnpack", "x86") == (bits < 8)
    torch.manual_seed(0)
    model = frostnet.get_model("frostnet_small_0_35", num_classes=10)
    float_model = frostnet.get_model("frostnet_small_0_35", num_classes=10)
    float_model.load_state_dict(model.state_dict())
    wr, ar = ((-8, 7), (0, 15)) if bits == 4 else (None, None)
    sa = StatAssist(model, None, backend="x86", fp_epochs=0, weight_quant_range=wr, act_quant_range=ar)
    sa.switch_to_qat()
    x = torch.randn(8, 3, 32, 32)
    model(x)
    model.eval()
    x86 = engine.int8_for_backend(model, float_model, sa, "x86", args, [x])
    qnnpack = engine.int8_for_backend(model, float_model, sa, "qnnpack", args, [x])
    a, b = x86.conv1.conv[0].weight(), qnnpack.conv1.conv[0].weight()
    assert torch.equal(a.int_repr(), b.int_repr()) and torch.equal(a.q_per_channel_scales(), b.q_per_channel_scales())
    assert qnnpack.conv1.conv[0].scale == x86.conv1.conv[0].scale


@needs_data
def test_a_failing_evaluation_loses_no_training_and_the_resume_evaluates_it(tmp_path, monkeypatch):
    """The epoch is checkpointed before it is evaluated: an evaluation that crashes (a corrupt
    validation image, an engine error) leaves the trained epoch on disk, and the resumed run
    evaluates it first, logging the same record an uninterrupted run logs."""
    from frostnet.recipe import engine

    common = TINY + ["--mode", "fp", "--epochs", "2", "--no-export"]
    ref = main(get_args_parser().parse_args(common + ["--output-dir", str(tmp_path / "ref")]))
    real_evaluate = engine.evaluate

    def failing(*args, **kwargs):
        raise OSError("image file is truncated")

    out = tmp_path / "run"
    monkeypatch.setattr(engine, "evaluate", failing)
    with pytest.raises(OSError, match="truncated"):
        main(get_args_parser().parse_args(common + ["--output-dir", str(out)]))
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["pending_eval"]["epoch"] == 0
    monkeypatch.setattr(engine, "evaluate", real_evaluate)
    resumed = main(get_args_parser().parse_args(common + ["--output-dir", str(out), "--resume", "auto"]))
    assert resumed["fp32_top1"] == ref["fp32_top1"]
    def epochs(d):
        records = [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if not k.endswith("time_s")} for r in records if "epoch" in r]

    assert epochs(out) == epochs(tmp_path / "ref")


@needs_data
def test_exports_carry_the_run_id_that_run_json_records(tmp_path):
    from frostnet.serialization import read_metadata

    out = tmp_path / "run"
    final = main(get_args_parser().parse_args(TINY + ["--mode", "qat", "--epochs", "1", "--output-dir", str(out),
                                                      "--export-backends", "x86"]))
    run = json.loads((out / "export/run.json").read_text())
    assert len(run["run_id"]) == 32
    for path in final["files"].values():
        assert read_metadata(path)["run_id"] == run["run_id"]
    assert torch.load(out / "checkpoint.pt", weights_only=True)["run_id"] == run["run_id"]
