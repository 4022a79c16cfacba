"""The QAT methods through the recipe CLI (tools/train.py flags): each trains, survives a kill at a
checkpoint and resumes to the uninterrupted result, and exports loadable INT8 files; flags that do
not apply raise; default runs keep the checkpoint layout they had before the methods existed."""

from __future__ import annotations

import importlib.util
import io
import json
import sys
from pathlib import Path

import pytest
import torch

from frostnet import quant
from frostnet.data import FashionMNIST
from frostnet.recipe import engine, get_args_parser, main
from frostnet.recipe.args import METHOD_DEFAULTS, recorded_args
from frostnet.serialization import load_int8


def _has_fashion_mnist() -> bool:
    try:
        FashionMNIST(split="test")
    except FileNotFoundError:
        return False
    return True


ROOT = Path(__file__).resolve().parents[1]
needs_data = pytest.mark.skipif(not _has_fashion_mnist(), reason="apt-get install -y dataset-fashion-mnist")

@pytest.fixture(autouse=True)
def _restore_threads():
    """The runs below set torch's thread count (--threads 1); give the next tests theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


# 128 images in batches of 64: two steps per epoch
TINY = ["--model", "frostnet_small_0_35", "--data", "fashion_mnist", "--train-subset", "128", "--batch-size", "64",
        "--eval-subset", "64", "--calib-batches", "1", "--no-progress", "--lr", "0.05", "--threads", "1",
        "--no-int8-eval", "--epochs", "2", "--ckpt-interval-steps", "1"]


class _Killed(Exception):
    """Stands in for the hard exit of --exit-at-step, so the kill happens in this process."""


def _kill_and_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flags: list[str], kill_at: int):
    """An uninterrupted run and one killed after ``kill_at`` steps then resumed; returns both
    final metrics and the resumed run's directory."""
    ref = main(get_args_parser().parse_args(TINY + flags + ["--output-dir", str(tmp_path / "ref"), "--no-export",
                                                            "--export-backends", "x86"]))
    out = tmp_path / "killed"

    def exit_(code: int) -> None:
        raise _Killed(code)

    with monkeypatch.context() as patch:
        patch.setattr(engine.os, "_exit", exit_)
        with pytest.raises(_Killed):
            main(get_args_parser().parse_args(TINY + flags + ["--output-dir", str(out), "--exit-at-step", str(kill_at)]))
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["global_step"] == kill_at
    resumed = main(get_args_parser().parse_args(TINY + flags + ["--output-dir", str(out), "--resume", "auto",
                                                                "--export-backends", "x86,qnnpack"]))
    for key in ("fp32_top1", "fake_quant_top1", "int8_x86_top1"):
        assert resumed[key] == ref[key], key
    a = torch.load(tmp_path / "ref/checkpoint.pt", weights_only=True)
    b = torch.load(out / "checkpoint.pt", weights_only=True)
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    return resumed, out, b


def _int8_files(final: dict) -> dict[str, torch.nn.Module]:
    models = {b: load_int8(final["files"][f"int8_{b}"], backend=b) for b in ("x86", "qnnpack")}
    for m in models.values():
        assert quant.is_quantized_model(m)
    return models


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@needs_data
def test_cli_ewgs_trains_resumes_and_exports(tmp_path, monkeypatch):
    final, out, ckpt = _kill_and_resume(tmp_path, monkeypatch, ["--mode", "qat", "--qat-method", "ewgs",
                                                                 "--ewgs-interval", "1", "--ewgs-samples", "1",
                                                                 "--ewgs-batches", "1"], kill_at=3)
    assert any(k.endswith("weight_fake_quant.upper") for k in ckpt["model"])
    assert ckpt["model"]["conv1.conv.0.weight_fake_quant.upper"].numel() > 1  # x86: per-channel intervals
    deltas = [float(v) for k, v in ckpt["model"].items() if k.endswith(".delta")]
    assert max(deltas) > 0  # re-estimated every step after the first
    assert len(ckpt["optimizer"]["param_groups"]) == 3 and ckpt["optimizer"]["param_groups"][2]["params"]
    assert ckpt["args"]["qat_method"] == "ewgs"
    # the Conv-BN intervals follow BN's factor (quant.FoldTracker), its references checkpointed
    assert ckpt["fold_tracker"] is not None and all(f is not None for f in ckpt["fold_tracker"]["folds"])
    assert all("ewgs_delta_mean" in rec for rec in _metrics(out) if "epoch" in rec)
    models = _int8_files(final)
    w = models["qnnpack"].conv1.conv[0].weight()
    assert w.qscheme() == torch.per_channel_affine  # qnnpack takes per-channel weights too


@needs_data
def test_cli_octav_w4a4_trains_resumes_and_exports(tmp_path, monkeypatch):
    final, out, ckpt = _kill_and_resume(tmp_path, monkeypatch, ["--mode", "qat", "--qat-method", "octav",
                                                                 "--weight-bits", "4", "--act-bits", "4"], kill_at=3)
    assert "conv1.conv.0.weight_fake_quant.activation_post_process.max_val" in ckpt["model"]
    for backend, model in _int8_files(final).items():
        ints = model.conv1.conv[0].weight().int_repr()
        assert -8 <= int(ints.min()) and int(ints.max()) <= 7, backend  # 4-bit weights inside INT8
    assert final["int8_qnnpack_top1"] >= 0


@needs_data
def test_cli_talr_with_statassist_gradboost_trains_resumes_and_exports(tmp_path, monkeypatch):
    # epoch 0 float (the wrapper acts as the plain optimizer), epoch 1 QAT with TALR; killed in QAT
    final, out, ckpt = _kill_and_resume(tmp_path, monkeypatch, ["--mode", "statassist+gradboost", "--talr",
                                                                 "--tr-target", "0.05"], kill_at=3)
    state = ckpt["optimizer"]
    assert {"gradboost", "transition"} <= set(state)
    assert state["transition"]["steps"] == 2 and len(state["transition"]["layers"]) > 10
    assert state["transition"]["config"]["target"] == 0.05
    qat = [rec for rec in _metrics(out) if rec.get("phase") == "qat"]
    assert qat and {"tr_target", "tr_running", "talr_mean"} <= set(qat[-1])
    assert int(ckpt["model"]["conv1.conv.0.weight_fake_quant.observer_enabled"]) == 0  # frozen grid
    _int8_files(final)


def test_method_flags_that_do_not_apply_raise(tmp_path):
    parse = get_args_parser().parse_args
    with pytest.raises(ValueError, match="--qat-method ewgs needs a QAT phase: use --mode qat"):
        engine.check_method_args(parse(["--mode", "fp", "--qat-method", "ewgs"]))
    with pytest.raises(ValueError, match="--talr needs a QAT phase"):
        engine.check_method_args(parse(["--mode", "fp", "--talr"]))
    with pytest.raises(ValueError, match="--ewgs-interval 5 only applies with --qat-method ewgs"):
        engine.check_method_args(parse(["--mode", "qat", "--ewgs-interval", "5"]))
    with pytest.raises(ValueError, match="--tr-target 0.1 only applies with --talr"):
        engine.check_method_args(parse(["--mode", "qat", "--tr-target", "0.1"]))
    with pytest.raises(ValueError, match="--octav-calib-batches must be >= 1, got 0"):
        engine.check_method_args(parse(["--mode", "qat", "--qat-method", "octav", "--octav-calib-batches", "0"]))
    engine.check_method_args(parse(["--mode", "statassist+gradboost", "--qat-method", "octav", "--talr"]))
    with pytest.raises(SystemExit):
        parse(["--qat-method", "lsq"])
    # resuming a checkpoint with another method is refused
    from frostnet.recipe.checkpoint import save_checkpoint

    (tmp_path / "run").mkdir()
    state = {"model": {}, "optimizer": {}, "scheduler": {}, "statassist": {}, "epoch": 1, "batch": 0, "global_step": 8,
             "rng": torch.get_rng_state(),
             "args": recorded_args(parse(TINY + ["--mode", "qat", "--output-dir", str(tmp_path / "run")]))}
    save_checkpoint(tmp_path / "run/checkpoint.pt", state)
    with pytest.raises(ValueError, match="changed flags would mix two runs: --qat-method 'octav' \\(the checkpoint's: 'ste'\\)\\. "):
        main(parse(TINY + ["--mode", "qat", "--qat-method", "octav", "--output-dir", str(tmp_path / "run"),
                           "--resume", "auto"]))


def test_default_runs_record_exactly_the_old_args():
    args = get_args_parser().parse_args([])
    recorded = recorded_args(args)
    assert not set(METHOD_DEFAULTS) & set(recorded)  # checkpoints/run.json of default runs are unchanged
    assert set(recorded) | set(METHOD_DEFAULTS) == set(vars(args))
    assert quant.QAT_METHODS == tuple(get_args_parser()._option_string_actions["--qat-method"].choices)
    tuned = recorded_args(get_args_parser().parse_args(["--qat-method", "octav", "--talr"]))
    assert tuned["qat_method"] == "octav" and tuned["talr"] is True and "tr_target" not in tuned


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(f"frostnet_tools_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_compare_methods_dry_run_lists_the_protocol_and_records_resumably(tmp_path, capsys):
    tool = _tool("compare_methods")
    parse = tool.get_args_parser().parse_args
    results, run_root = tmp_path / "results", tmp_path / "runs"
    base = ["--protocol", "finetune", "--runs", str(run_root), "--results", str(results)]
    args = parse(base + ["--dry-run"])
    runs = tool.runs(args)
    # one shared FP32 run first, then 7 methods x 3 bit settings x 3 seeds
    assert len(runs) == 1 + 7 * 3 * 3 and runs[0].method == "fp32" and runs[0].bits == "fp32"
    assert {r.bits for r in runs[1:]} == {"w4a4", "w3a3", "w2a2"} and {r.seed for r in runs} == {0, 1, 2}
    fp32_file = str(run_root / "finetune" / "fp32.fp32.seed0" / "export" / "frostnet_small_0_5.fashion_mnist.fp32.safetensors")
    by_key = {r.key: r for r in runs}
    ewgs0 = by_key[("ewgs delta=0", "w2a2", 1)].argv
    assert {"--mode", "qat-finetune", "--keep-8bit-ends", "--qat-method", "ewgs", "--resume"} <= set(ewgs0)
    assert ewgs0[ewgs0.index("--init") + 1] == fp32_file and ewgs0[ewgs0.index("--weight-bits") + 1] == "2"
    assert ewgs0[ewgs0.index("--ewgs-interval") + 1] == tool.NEVER
    octav_max = by_key[("octav max-scaling", "w3a3", 2)].argv
    assert octav_max[octav_max.index("--octav-clipping") + 1] == "max"
    sagb = by_key[("statassist+gradboost", "w4a4", 0)].argv
    assert sagb[len(sagb) - 1 - sagb[::-1].index("--mode") + 1] == "statassist+gradboost"  # the last --mode wins
    # a finished run (its metrics.jsonl has a final record) is recorded without running again
    done = by_key[("ste", "w4a4", 0)]
    (done.out).mkdir(parents=True)
    final = {"fp32_top1": 91.0, "fake_quant_top1": 88.5, "int8_x86_top1": 88.25, "extra": 1}
    (done.out / "metrics.jsonl").write_text(json.dumps({"epoch": 0}) + "\n" + json.dumps({"final": final}) + "\n")
    tool.main(parse(base + ["--dry-run", "--methods", "ste", "--bits", "w4a4", "--seeds", "0"]))
    out = capsys.readouterr().out
    assert "[finished, unrecorded] ste w4a4 seed 0" in out and "[to do] fp32 fp32 seed 0" in out
    tool.record(results / "finetune.json", "finetune", done, final)
    tool.record(results / "finetune.json", "finetune", by_key[("ste", "w4a4", 1)], {**final, "fake_quant_top1": 86.5})
    tool.main(parse(base + ["--dry-run", "--methods", "ste", "--bits", "w4a4", "--seeds", "0,1"]))
    out = capsys.readouterr().out
    assert "[done] ste w4a4 seed 0" in out and "[done] ste w4a4 seed 1" in out and "3 runs, 1 to do" in out
    rows = tool.load_results(results / "finetune.json")
    assert rows[0] == {"method": "ste", "bits": "w4a4", "seed": 0, "command": done.command(),
                       "metrics": {"fp32_top1": 91.0, "fake_quant_top1": 88.5, "int8_x86_top1": 88.25}}
    tool.main(parse(base + ["--table"]))
    table = (results / "finetune.md").read_text().splitlines()
    assert "| ste | W4A4 | 91.00 ± 0.00 | 87.50 ± 1.41 | 88.25 ± 0.00 | 0,1 |" in table
    with pytest.raises(SystemExit, match="unknown lsq"):
        tool.runs(parse(base + ["--dry-run", "--methods", "lsq"]))
    (results / "bad.json").write_text("[]")
    with pytest.raises(SystemExit, match="is not a results file"):
        tool.load_results(results / "bad.json")


def _saved(state: dict) -> "io.BytesIO":
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


class _TinyNet(torch.nn.Module):
    """QuantStub -> Conv-BN-ReLU -> pool -> Linear: the recipe's optimizer pieces on a small model."""

    def __init__(self) -> None:
        super().__init__()
        self.quant, self.dequant = quant.QuantStub(), quant.DeQuantStub()
        self.conv, self.bn, self.relu = torch.nn.Conv2d(3, 8, 3, bias=False), torch.nn.BatchNorm2d(8), torch.nn.ReLU()
        self.fc = torch.nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn(self.conv(self.quant(x))))
        return self.dequant(self.fc(x.mean((2, 3))))

    def fuse_model(self, is_qat=None) -> None:
        quant.fuse_modules(self, [["conv", "bn", "relu"]], is_qat=bool(is_qat))


def test_ewgs_bounds_get_their_own_adam_at_1e_5():
    from frostnet.optim import CombinedOptimizer, GradBoost
    from frostnet.recipe.optimizer import EWGS_GROUP, build_optimizer, build_scheduler
    from frostnet.recipe.statassist import StatAssist

    args = get_args_parser().parse_args(["--mode", "statassist+gradboost", "--qat-method", "ewgs", "--epochs", "2"])
    model = _TinyNet()
    opt = build_optimizer(model, args, steps_per_epoch=4)
    assert isinstance(opt, GradBoost) and isinstance(opt.optimizer, CombinedOptimizer)
    combined = opt.optimizer
    assert isinstance(combined.optimizer, torch.optim.SGD) and isinstance(combined.extra, torch.optim.Adam)
    assert opt.param_groups[EWGS_GROUP] is combined.extra.param_groups[0]
    assert opt.param_groups[EWGS_GROUP]["lr"] == 1e-5 and METHOD_DEFAULTS["ewgs_lr"] == 1e-5
    sa = StatAssist(model, opt, fp_epochs=0, qconfig=quant.get_ewgs_qconfig("x86"), qparam_group=EWGS_GROUP)
    sa.on_epoch_start(0)
    bounds = {id(p) for p in quant.ewgs_parameters(model)}
    assert {id(p) for p in combined.extra.param_groups[0]["params"]} == bounds
    assert not bounds & {id(p) for g in combined.optimizer.param_groups for p in g["params"]}
    sched = build_scheduler(opt, args, steps_per_epoch=4)
    model.train()
    x, y = torch.randn(4, 3, 6, 6), torch.tensor([1, 2, 3, 4])
    with torch.no_grad():
        model(x)  # the first forward pass sets the intervals from the data
    before = [p.detach().clone() for p in quant.ewgs_parameters(model)]
    for _ in range(2):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        sched.step()
    moved = [float((p.detach() - b).abs().max()) for p, b in zip(quant.ewgs_parameters(model), before)]
    assert max(moved) <= 2 * 1e-5 * (1 + 1e-3) and max(moved) > 0  # Adam: at most lr per step
    assert opt.param_groups[EWGS_GROUP]["lr"] < 1e-5  # the cosine schedule reaches the bounds' group too
    # checkpoint round trip through the whole chain
    state = opt.state_dict()
    assert set(state) >= {"main", "extra", "param_groups", "gradboost"}
    with pytest.raises(ValueError, match="not a CombinedOptimizer state dict"):
        combined.load_state_dict(combined.optimizer.state_dict())
    saved = {k: (v.clone() if torch.is_tensor(v) else v)
             for k, v in combined.extra.state[quant.ewgs_parameters(model)[0]].items()}
    opt.load_state_dict(torch.load(_saved(state), weights_only=True))
    for k, v in combined.extra.state[quant.ewgs_parameters(model)[0]].items():
        torch.testing.assert_close(v, saved[k])
    old = build_optimizer(_TinyNet(),
                          get_args_parser().parse_args(["--mode", "qat", "--qat-method", "ewgs", "--ewgs-bound-opt", "main"]))
    assert isinstance(old, torch.optim.SGD) and len(old.param_groups) == 3


def test_recipe_method_helpers():
    from frostnet.recipe.methods import end_layers_qconfig, method_qconfig, quant_ranges

    parse = get_args_parser().parse_args
    assert end_layers_qconfig(parse([]), "x86") is None
    ends = end_layers_qconfig(parse(["--keep-8bit-ends", "--qat-method", "octav", "--octav-clipping", "max"]), "x86")
    weight = ends.weight()
    assert (weight.activation_post_process.quant_min, weight.activation_post_process.quant_max) == (-128, 127)
    assert weight.activation_post_process.clipping == "max"
    args = parse(["--qat-method", "octav", "--octav-clipping", "max", "--weight-bits", "3", "--act-bits", "3"])
    assert quant_ranges(args) == ((-4, 3), (0, 7))
    assert method_qconfig(args, "x86").weight().activation_post_process.clipping == "max"
    with pytest.raises(ValueError, match="--weight-bits must be in 2..8, got 1"):
        quant_ranges(parse(["--weight-bits", "1"]))
    d = METHOD_DEFAULTS
    assert (d["tr_relative"], d["tr_target"], d["gb_rule"], d["keep_8bit_ends"]) == (True, 1.0, "paper", False)
    assert (d["ewgs_samples"], d["ewgs_batches"], d["ewgs_per_quantizer"], d["ewgs_bound_opt"]) == (4, 2, True, "adam")


def test_statassist_hands_new_quantizer_parameters_to_the_optimizer():
    import frostnet
    from frostnet.optim import TransitionRateScheduler
    from frostnet.recipe import StatAssist

    model = frostnet.get_model("frostnet_small_0_35", num_classes=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match="learnable quantizer parameters that the optimizer does not train"):
        StatAssist(model, opt, fp_epochs=0, qconfig=quant.get_ewgs_qconfig("x86")).on_epoch_start(0)
    model = frostnet.get_model("frostnet_small_0_35", num_classes=10)
    opt = TransitionRateScheduler(torch.optim.SGD([{"params": list(model.parameters())}, {"params": [], "lr": 1e-4}],
                                                  lr=0.1), schedule="constant")
    sa = StatAssist(model, opt, fp_epochs=0, qconfig=quant.get_ewgs_qconfig("x86"), qparam_group=1)
    assert sa.on_epoch_start(0) and opt.active  # attached to the prepared model at the switch
    assert {id(p) for p in opt.param_groups[1]["params"]} == {id(p) for p in quant.ewgs_parameters(model)}
    with pytest.raises(ValueError, match="qparam_group must index one of the optimizer's 1 parameter groups, got 3"):
        StatAssist(model, torch.optim.SGD(model.parameters(), lr=0.1), qparam_group=3)


def test_ablation_commands_and_table_from_logs(tmp_path):
    tool = _tool("ablation")
    args = tool.get_args_parser().parse_args(["--table", "--runs", str(tmp_path), "--seeds", "0,1"])
    runs = tool.commands(args)
    names = [d.name for d, _ in runs]
    # five rows per seed, plus the FP pre-training of the QAT fine-tune row, which comes first
    assert len(runs) == 2 * 6
    assert names.index("frostnet_small_0_5.fp.4ep.seed1") < names.index("frostnet_small_0_5.qat-finetune.seed1")
    argv = dict(runs)[tmp_path / "frostnet_small_0_5.qat-finetune.seed1"]
    assert argv[argv.index("--init") + 1] == str(
        tmp_path / "frostnet_small_0_5.fp.4ep.seed1" / "export" / "frostnet_small_0_5.fashion_mnist.fp32.safetensors")
    assert argv[argv.index("--epochs") + 1] == "1" and float(argv[argv.index("--lr") + 1]) == pytest.approx(0.004)
    sagb = dict(runs)[tmp_path / "frostnet_small_0_5.statassist_gradboost.seed0"]
    assert {"--mode", "statassist+gradboost", "--fp-epochs", "1", "--clip-grad", "--resume"} <= set(sagb)
    assert sagb[sagb.index("--epochs") + 1] == "5" and sagb[sagb.index("--threads") + 1] == "1"
    for seed, top1 in ((0, 85.0), (1, 87.0)):
        d = tmp_path / f"frostnet_small_0_5.statassist_gradboost.seed{seed}"
        d.mkdir()
        final = {"fp32_top1": 88.0, "fake_quant_top1": top1, "int8_x86_top1": top1 - 1, "int8_qnnpack_top1": top1 - 2}
        (d / "metrics.jsonl").write_text(json.dumps({"epoch": 0}) + "\n" + json.dumps({"final": final}) + "\n")
    d = tmp_path / "frostnet_small_0_5.fp.seed0"
    d.mkdir()
    (d / "metrics.jsonl").write_text(json.dumps({"final": {"fp32_top1": 90.5, "int8_x86_top1": 90.25}}) + "\n")
    lines = tool.table(args).splitlines()
    assert lines[0].startswith("frostnet_small_0_5, Fashion-MNIST test split (10k), 5 epochs per row, lr 0.04, seeds 0,1")
    assert "| StatAssist + GradBoost | 88.00 ± 0.00 | 86.00 ± 1.41 | 85.00 ± 1.41 | 84.00 ± 1.41 | 2/2 |" in lines
    assert "| FP training (INT8 = PTQ) | 90.50 | - | 90.25 | - | 1/2 |" in lines
    assert "| QAT from scratch | - | - | - | - | 0/2 |" in lines
