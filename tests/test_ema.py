"""Weight EMA (--ema-decay): the average, its checkpointing, the export choice, the recipe wiring."""

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import frostnet
from frostnet.recipe import get_args_parser, main
from frostnet.recipe.ema import WeightEMA
from frostnet.recipe.engine import Trainer
from frostnet.recipe.tasks import get_task

from test_recipe import ROOT, TINY, needs_data


def test_the_average_follows_the_ema_formula_for_weights_and_bn_statistics_and_copies_other_buffers():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    ema = WeightEMA(0.9)
    ema.start(model, "fp")
    bn = model[1]
    tracked = lambda: [*model.parameters(), bn.running_mean, bn.running_var]  # noqa: E731
    expected = [t.detach().clone() for t in tracked()]
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model.train()(torch.randn(8, 4))  # moves BN's running statistics
        ema.update(model)
        expected = [0.9 * e + 0.1 * t.detach() for e, t in zip(expected, tracked())]
    averaged_bn = ema.module[1]
    for e, q in zip(expected, [*ema.module.parameters(), averaged_bn.running_mean, averaged_bn.running_var]):
        torch.testing.assert_close(q, e)
    assert not torch.equal(averaged_bn.running_mean, bn.running_mean)
    assert torch.equal(averaged_bn.num_batches_tracked, bn.num_batches_tracked)  # other buffers: the live model's
    ema.copy_to(model)
    for e, t in zip(expected, tracked()):
        torch.testing.assert_close(t, e)  # parameters and BN statistics: the averaged ones


def test_state_dict_round_trip_continues_bit_for_bit():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    a = WeightEMA(0.99)
    a.start(model, "qat")
    a.update(model)
    b = WeightEMA(0.99)
    b.load_state_dict(a.state_dict(), model)
    with torch.no_grad():
        model.weight.add_(1.0)
    a.update(model)
    b.update(model)
    assert b.phase == "qat"
    for p, q in zip(a.module.parameters(), b.module.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("decay", [1.0, -0.5, 1.5])
def test_a_decay_outside_the_open_unit_interval_is_refused(decay):
    with pytest.raises(ValueError, match=rf"--ema-decay must lie in \(0, 1\).*{decay}"):
        WeightEMA(decay)


@needs_data
def test_the_recipe_refuses_a_bad_decay_before_any_work(tmp_path):
    args = get_args_parser().parse_args(TINY + ["--epochs", "1", "--ema-decay", "1", "--output-dir", str(tmp_path / "r")])
    with pytest.raises(ValueError, match="--ema-decay must lie in"):
        main(args)
    assert not (tmp_path / "r" / "checkpoint.pt").exists()


def _chooser(live: float, ema_value: float):
    model = torch.nn.Linear(2, 2)
    ema = WeightEMA(0.5)
    ema.start(model, "qat")
    with torch.no_grad():
        model.weight.add_(1.0)  # the live weights move away from the average
    fake = SimpleNamespace(ema=ema, task=get_task("classification"), sa=SimpleNamespace(phase="qat"),
                           history=[{"fake_quant_top1": live, "ema_fake_quant_top1": ema_value}],
                           info=SimpleNamespace(eval_split="val"), model=model)
    return fake, ema


@pytest.mark.parametrize("live, ema_value, taken", [(80.0, 81.0, "ema"), (81.0, 80.0, "live"), (80.0, 80.0, "live")])
def test_the_export_takes_the_ema_weights_only_when_strictly_better_on_validation(live, ema_value, taken):
    fake, ema = _chooser(live, ema_value)
    before = fake.model.weight.detach().clone()
    chosen = Trainer._choose_ema(fake)
    assert chosen["weights"] == taken
    assert chosen["ema_choice"] == {"split": "val", "key": "fake_quant_top1", "live": live, "ema": ema_value}
    expected = ema.module.weight if taken == "ema" else before
    assert torch.equal(fake.model.weight, expected)


@needs_data
def test_recipe_logs_ema_metrics_and_exports_the_chosen_weights(tmp_path):
    out = tmp_path / "run"
    final = main(get_args_parser().parse_args(TINY + ["--mode", "statassist+gradboost", "--epochs", "2", "--fp-epochs", "1",
                                                      "--ema-decay", "0.9", "--export-backends", "x86",
                                                      "--output-dir", str(out)]))
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert "ema_fp32_top1" in lines[0] and "ema_fake_quant_top1" in lines[1]
    choice = final["ema_choice"]
    assert (choice["live"], choice["ema"]) == (lines[1]["fake_quant_top1"], lines[1]["ema_fake_quant_top1"])
    assert final["weights"] == ("ema" if choice["ema"] > choice["live"] else "live")
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["ema"]["phase"] == "qat"
    # the exported FP32 file holds the chosen weights: a conv weight from the EMA copy or the live model
    key = "conv1.0.weight" if "conv1.0.weight" in ckpt["model"] else next(k for k in ckpt["model"] if k.endswith("weight"))
    source = {k.removeprefix("module."): v for k, v in ckpt["ema"]["averaged"].items()} if final["weights"] == "ema" else ckpt["model"]
    exported = load_file(final["files"]["fp32"])
    assert torch.equal(exported[key], source[key].contiguous())
    assert json.loads((out / "export" / "run.json").read_text())["final"]["weights"] == final["weights"]


@needs_data
def test_killed_run_with_ema_resumes_to_the_same_average(tmp_path):
    common = TINY + ["--mode", "statassist+gradboost", "--epochs", "2", "--fp-epochs", "1", "--no-export",
                     "--export-backends", "x86", "--ckpt-interval-steps", "3", "--ema-decay", "0.8"]
    ref = main(get_args_parser().parse_args(common + ["--output-dir", str(tmp_path / "ref")]))
    killed = tmp_path / "killed"
    proc = subprocess.run([sys.executable, str(ROOT / "tools/train.py"), *common, "--output-dir", str(killed),
                           "--exit-at-step", "11"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 3, proc.stderr[-2000:]
    resumed = main(get_args_parser().parse_args(common + ["--output-dir", str(killed), "--resume", "auto"]))
    assert resumed == ref
    a = torch.load(tmp_path / "ref/checkpoint.pt", weights_only=True)["ema"]["averaged"]
    b = torch.load(killed / "checkpoint.pt", weights_only=True)["ema"]["averaged"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
