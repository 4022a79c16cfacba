"""Fault injection (issue 18): files that load wrong, runs that resume wrong, writers that race.

Each test reproduces one probe of the issue: it fails on the code before the hardening and
passes after. Tests marked ``xfail(strict=True, reason="needs engine wiring")`` exercise the
training loop (frostnet/recipe/engine.py) and pass once the loop calls the mechanisms; the
lead flips them when wiring (docs/hardening.md lists the calls).
"""

from __future__ import annotations

import argparse
import errno
import json
import multiprocessing
import os
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import frostnet
from frostnet import hub, quant
from frostnet.data.imagefolder import CorruptImagesError, build_imagefolder, imagenet_train_transform
from frostnet.recipe import checkpoint as ckpt
from frostnet.recipe.args import get_args_parser
from frostnet.recipe.data import LoaderBatches
from frostnet.recipe.resume_check import ResumeFlagError, check_resume_flags, parse_override_flags
from frostnet.recipe.rundir import RunDirError, open_run_dir
from frostnet.recipe.validate import validate_run_config
from frostnet.serialization import WeightsError, content_sha256, load_fp32, load_int8, save_fp32, save_int8

ARCH = "frostnet_small_0_35"
ROOT = Path(__file__).resolve().parents[1]


def _resign(src: Path, dst: Path, edit) -> Path:
    """Copy a safetensors file with ``edit(tensors)`` applied and its content hash recomputed:
    what anyone can do to a published file."""
    tensors = dict(load_file(src))
    with safe_open(src, framework="pt") as f:
        meta = dict(f.metadata())
    edit(tensors)
    meta["content_sha256"] = content_sha256(tensors, meta)
    save_file(tensors, dst, metadata=meta)
    return dst


# ------------------------------------------------------------------------------ qparams at load


@pytest.fixture(scope="module")
def int8_file(tmp_path_factory):
    """A PTQ-converted x86 INT8 file of a small FrostNet, and a batch it was calibrated on."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    model = frostnet.get_model(ARCH, num_classes=10).eval()
    int8 = quant.quantize_ptq(model, [x], "x86")
    path = tmp_path_factory.mktemp("int8") / "model.int8_x86.safetensors"
    save_int8(int8, path, arch=ARCH, backend="x86", builder_kwargs={"num_classes": 10})
    return path, x, int8


def _set(key, value):
    def edit(tensors):
        tensors[key] = torch.full_like(tensors[key], value)
    return edit


def _scale_times(key, factor):
    def edit(tensors):
        tensors[key] = tensors[key] * factor
    return edit


@pytest.mark.parametrize("edit, tensor, message", [
    (_set("conv1.conv.0.scale", 0.0), "conv1.conv.0.scale", "scale 0"),
    (_set("conv1.conv.0.scale", -0.05), "conv1.conv.0.scale", "scale -0.05"),
    (_set("last_layer.conv.0.scale", 2e4), "last_layer.conv.0.scale", "scale 20000"),  # 0.02 x 1e6
    (_set("conv1.conv.0.zero_point", 300), "conv1.conv.0.zero_point", "zero point 300, outside the quint8 range"),
    (_set("conv1.conv.0.zero_point", -1), "conv1.conv.0.zero_point", "zero point -1"),
    (_set("quant.zero_point", 256), "quant.zero_point", "zero point 256"),
    (_scale_times("quant.scale", 1e6), "quant.scale", "must be finite and in"),
    (_set("conv1.conv.0.weight@scale", 5e3), "conv1.conv.0.weight@scale", "scale 5000"),
])
def test_int8_implausible_qparams_refused(int8_file, tmp_path, edit, tensor, message):
    src, _, _ = int8_file
    bad = _resign(src, tmp_path / "bad.int8_x86.safetensors", edit)
    with pytest.raises(WeightsError, match="implausible values") as info:
        load_int8(bad)
    text = str(info.value)
    assert repr(tensor) in text and message in text and str(bad) in text


def test_int8_resigned_unchanged_file_still_loads(int8_file, tmp_path):
    """The control: re-signing alone is no fault, and the loaded model equals the original."""
    src, x, int8 = int8_file
    same = _resign(src, tmp_path / "same.int8_x86.safetensors", lambda t: None)
    assert torch.equal(load_int8(same)(x), int8(x))


def test_fp32_negative_running_var_refused(tmp_path):
    model = frostnet.get_model(ARCH, num_classes=10)
    src = tmp_path / "m.fp32.safetensors"
    save_fp32(model, src, arch=ARCH, num_classes=10)
    key = next(k for k in model.state_dict() if k.endswith("running_var"))

    def edit(tensors):
        tensors[key][0] = -1.0

    bad = _resign(src, tmp_path / "bad.fp32.safetensors", edit)
    with pytest.raises(WeightsError, match="running_var") as info:
        load_fp32(bad)
    assert repr(key) in str(info.value) and str(bad) in str(info.value)


# ------------------------------------------------------------------------------ model input


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_float_model_wrong_dtype_clear_error(dtype):
    model = frostnet.get_model(ARCH, num_classes=10).eval()
    with pytest.raises(TypeError, match=rf"got dtype {dtype}; convert it with x\.float\(\)"):
        model(torch.zeros(1, 3, 32, 32, dtype=dtype))


def test_int8_model_wrong_dtype_and_nan_input(int8_file):
    _, x, int8 = int8_file
    with pytest.raises(TypeError, match="got dtype torch.float64"):
        int8(x.double())
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="1 NaN or infinite input values"):
        int8(bad)
    assert torch.isfinite(int8(x)).all()  # a finite batch still runs


# ------------------------------------------------------------------------------ checkpoints

KEYS = ("model", "epoch")


def _state(epoch: int) -> dict:
    return {"model": {"w": torch.full((64, 64), float(epoch))}, "epoch": epoch}


def _flip_byte(path: Path, offset: int = 200) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_checkpoint_roundtrip_and_previous_kept(tmp_path):
    path = tmp_path / "checkpoint.pt"
    ckpt.save_checkpoint(path, _state(1))
    ckpt.save_checkpoint(path, _state(2))
    loaded = ckpt.load_checkpoint(path, required_keys=KEYS)
    assert loaded.state["epoch"] == 2 and loaded.path == path and loaded.fallback_reason is None
    assert ckpt.load_checkpoint(ckpt.previous_path(path), required_keys=KEYS, fallback=False).state["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.prev.pt", "checkpoint.prev.pt.sha256",
                                                         "checkpoint.pt", "checkpoint.pt.sha256"]


def test_checkpoint_flipped_byte_falls_back_to_previous(tmp_path):
    """torch.load does not check the zip CRCs: one flipped byte used to resume silently."""
    path = tmp_path / "checkpoint.pt"
    ckpt.save_checkpoint(path, _state(1))
    ckpt.save_checkpoint(path, _state(2))
    _flip_byte(path, offset=path.stat().st_size // 2)
    with pytest.warns(UserWarning, match="previous good checkpoint"):
        loaded = ckpt.load_checkpoint(path, required_keys=KEYS)
    assert loaded.state["epoch"] == 1 and loaded.path == ckpt.previous_path(path)
    assert "does not match its sha256 digest" in loaded.fallback_reason


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.write_bytes(b""), "is empty"),
    (lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), "does not match its sha256 digest"),
    (lambda p: _flip_byte(p, offset=p.stat().st_size // 2), "does not match its sha256 digest"),
    (lambda p: ckpt.digest_path(p).unlink(), "has no digest file"),
])
def test_checkpoint_damaged_without_previous_names_file_and_fix(tmp_path, damage, message):
    path = tmp_path / "checkpoint.pt"
    ckpt.save_checkpoint(path, _state(1))
    damage(path)
    with pytest.raises(ckpt.CheckpointError, match=message) as info:
        ckpt.load_checkpoint(path, required_keys=KEYS)
    assert str(path) in str(info.value) and "--resume" in str(info.value)


def test_checkpoint_missing_key(tmp_path):
    path = tmp_path / "checkpoint.pt"
    ckpt.save_checkpoint(path, {"model": {}})
    with pytest.raises(ckpt.CheckpointError, match=r"lacks the keys \['epoch'\]"):
        ckpt.load_checkpoint(path, required_keys=KEYS)


def test_checkpoint_crash_between_writes_is_recovered(tmp_path):
    """The states a crash inside save_checkpoint can leave (see its docstring) all resume from a
    complete checkpoint."""
    path, prev = tmp_path / "checkpoint.pt", tmp_path / "checkpoint.prev.pt"
    ckpt.save_checkpoint(path, _state(1))
    ckpt.save_checkpoint(path, _state(2))
    # crash in step 2: current renamed to prev, its digest not yet
    os.replace(path, prev)
    with pytest.warns(UserWarning):
        assert ckpt.load_checkpoint(path, required_keys=KEYS).state["epoch"] == 2
    # crash between steps 3 and 4: the rotation done, the new digest written, the new file not
    # renamed into place
    os.replace(ckpt.digest_path(path), ckpt.digest_path(prev))
    ckpt.digest_path(path).write_text("f" * 64 + "\n")
    with pytest.warns(UserWarning):
        assert ckpt.load_checkpoint(path, required_keys=KEYS).state["epoch"] == 2


def test_checkpoint_damaged_current_does_not_push_out_good_previous(tmp_path):
    path = tmp_path / "checkpoint.pt"
    ckpt.save_checkpoint(path, _state(1))
    ckpt.save_checkpoint(path, _state(2))
    _flip_byte(path, offset=path.stat().st_size // 2)
    ckpt.save_checkpoint(path, _state(3))
    assert ckpt.load_checkpoint(ckpt.previous_path(path), required_keys=KEYS, fallback=False).state["epoch"] == 1


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"),
                                   RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 320 vs 256")])
def test_checkpoint_disk_full_cleans_up(tmp_path, monkeypatch, error):
    path = tmp_path / "checkpoint.pt"
    ckpt.save_checkpoint(path, _state(1))
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 partial")  # the disk fills up mid-write
        raise error

    monkeypatch.setattr(torch, "save", full_disk)
    for _ in range(2):  # retries leave nothing behind either
        with pytest.raises(ckpt.DiskFullError, match=r"is full \(.* MB free\).*previous checkpoint is intact"):
            ckpt.save_checkpoint(path, _state(2))
    monkeypatch.setattr(torch, "save", real_save)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "checkpoint.pt.sha256"]
    assert ckpt.load_checkpoint(path, required_keys=KEYS).state["epoch"] == 1


# ------------------------------------------------------------------------------ resume flags

DEFAULTS = vars(get_args_parser().parse_args([]))


def _args(**changes) -> argparse.Namespace:
    return argparse.Namespace(**{**DEFAULTS, **changes})


@pytest.mark.parametrize("flag, value", [("lr", 0.5), ("gb_decay", 0.5), ("batch_size", 64), ("seed", 3),
                                         ("train_subset", 500), ("backend", "qnnpack"), ("epochs", 20),
                                         ("qat_method", "ewgs"), ("input_size", 64), ("data", "imagefolder:x")])
def test_resume_changed_flag_refused_unless_overridden(flag, value):
    saved = dict(DEFAULTS)
    with pytest.raises(ResumeFlagError, match=rf"--{flag.replace('_', '-')} .*--override-resume {flag.replace('_', '-')}"):
        check_resume_flags(saved, _args(**{flag: value}), defaults=DEFAULTS, position=(1, 0))
    overrides = parse_override_flags(flag.replace("_", "-"), DEFAULTS)
    assert check_resume_flags(saved, _args(**{flag: value}), defaults=DEFAULTS, position=(1, 0),
                              overrides=overrides) == {flag: (DEFAULTS[flag], value)}


def test_resume_harmless_flags_pass_and_missing_keys_are_defaults():
    saved = {k: v for k, v in DEFAULTS.items() if k != "qat_method"}  # recorded_args drops defaults
    changed = _args(threads=2, workers=0, progress=False, output_dir="runs/./x", ckpt_interval_steps=5)
    assert check_resume_flags(saved, changed, defaults=DEFAULTS, position=(1, 0)) == {}


def test_resume_epochs_before_checkpoint_position_never_allowed():
    with pytest.raises(ResumeFlagError, match="--epochs 1 ends before the checkpoint's position"):
        check_resume_flags(dict(DEFAULTS), _args(epochs=1), defaults=DEFAULTS, position=(1, 7),
                           overrides={"epochs"})


def test_resume_override_flag_names_checked():
    with pytest.raises(ResumeFlagError, match="unknown flag 'lrr'; valid choices: .*lr"):
        parse_override_flags("lrr", DEFAULTS)
    with pytest.raises(ResumeFlagError, match="--model cannot be overridden"):
        parse_override_flags("model", DEFAULTS)
    assert parse_override_flags("--lr, gb-decay", DEFAULTS) == {"lr", "gb_decay"}


# ------------------------------------------------------------------------------ run directory


def test_rundir_second_run_fails_naming_holder(tmp_path):
    out = tmp_path / "run"
    with open_run_dir(out, resume=False, overwrite=False) as first:
        with pytest.raises(RunDirError, match=rf"in use by another run \(pid {os.getpid()} holds"):
            open_run_dir(out, resume=True, overwrite=False)
        assert len(first.run_id) == 32
    open_run_dir(out, resume=True, overwrite=False).close()  # released


def _hold_run_dir(out: str, locked, release) -> None:
    run_dir = open_run_dir(out, resume=False, overwrite=False)  # held while referenced
    locked.set()
    release.wait(60)
    run_dir.close()


def test_rundir_lock_held_by_other_process(tmp_path):
    out = tmp_path / "run"
    ctx = multiprocessing.get_context("fork")
    locked, release = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_hold_run_dir, args=(str(out), locked, release))
    proc.start()
    try:
        assert locked.wait(60)
        with pytest.raises(RunDirError, match=rf"pid {proc.pid} holds"):
            open_run_dir(out, resume=True, overwrite=False)
    finally:
        release.set()
        proc.join(60)
    open_run_dir(out, resume=True, overwrite=False).close()  # the kernel released the lock at exit


def test_rundir_refuses_non_empty_and_overwrite_clears_only_run_files(tmp_path):
    out = tmp_path / "run"
    (out / "export").mkdir(parents=True)
    (out / "export" / "x.int8_x86.safetensors").write_text("stale")
    (out / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(RunDirError, match="is not empty .*pass --resume .*--overwrite"):
        open_run_dir(out, resume=False, overwrite=False)
    open_run_dir(out, resume=True, overwrite=False).close()  # resuming expects old files
    with open_run_dir(out, resume=False, overwrite=True):
        assert [p.name for p in out.iterdir()] == [".lock"]
    (out / "notes.txt").write_text("mine")
    (out / "run.json").write_text("{}")
    with pytest.raises(RunDirError, match=r"\['notes.txt'\] were not written by the recipe"):
        open_run_dir(out, resume=False, overwrite=True)
    assert (out / "notes.txt").exists() and (out / "run.json").exists()
    with pytest.raises(ValueError, match="--resume and --overwrite"):
        open_run_dir(out, resume=True, overwrite=True)


def _add_weights_tool():
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import add_weights
    finally:
        sys.path.remove(str(ROOT / "tools"))
    return add_weights


def test_add_weights_publishes_only_the_runs_files(tmp_path):
    add_weights = _add_weights_tool()
    model = frostnet.get_model(ARCH, num_classes=10)
    own, stale = tmp_path / "a.fp32.safetensors", tmp_path / "b.int8_x86.safetensors"
    save_fp32(model, own, arch=ARCH, num_classes=10, metadata={"run_id": "new"})
    save_fp32(model, stale, arch=ARCH, num_classes=10, metadata={"run_id": "old"})
    add_weights.check_run_ids({"run_id": "new"}, [own])
    with pytest.raises(SystemExit, match=r"not written by run new .*b.int8_x86.safetensors \(run_id 'old'\)"):
        add_weights.check_run_ids({"run_id": "new"}, [own, stale])
    with pytest.raises(SystemExit, match="run.json has no run_id"):
        add_weights.check_run_ids({}, [own])
    add_weights.check_run_ids({}, [own], allow_missing=True)


def test_publish_refuses_int8_from_another_run_than_its_base(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import publish
    finally:
        sys.path.remove(str(ROOT / "tools"))
    model = frostnet.get_model(ARCH, num_classes=10)
    files = {}
    for name, run in (("fp", "new"), ("q", "old")):
        files[name] = tmp_path / f"{name}.safetensors"
        save_fp32(model, files[name], arch=ARCH, num_classes=10, metadata={"run_id": run})
    monkeypatch.setattr(publish.hub, "resolve_file", lambda e, **kw: files[e.name])
    entries = {"fp": SimpleNamespace(name="fp", base=None), "q": SimpleNamespace(name="q", base="fp")}
    with pytest.raises(ValueError, match="q was written by run old but its base fp by run new"):
        publish.check_same_run(list(entries.values()), entries, None)


# ------------------------------------------------------------------------------ manifest writers


def _manifest_writer(manifest: str, entries: list) -> None:
    for name, entry in entries:
        hub.add_manifest_entry(name, entry, manifest_path=manifest)


def test_concurrent_manifest_writers_lose_nothing(tmp_path):
    src = tmp_path / f"{ARCH}.t0.fp32.safetensors"
    save_fp32(frostnet.get_model(ARCH, num_classes=10), src, arch=ARCH, num_classes=10)
    name0, entry0 = hub.make_manifest_entry(src, dataset="fashion_mnist", tag="t0")
    text = json.dumps(entry0)
    manifest = tmp_path / "weights_manifest.json"
    hub.add_manifest_entry("frostnet_small_0_35.old.fp32", json.loads(text.replace(".t0.", ".old.")),
                           manifest_path=manifest)

    def entry(i):
        return f"{ARCH}.t{i}.fp32", json.loads(text.replace(".t0.", f".t{i}."))

    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_manifest_writer, args=(str(manifest), [entry(w * 60 + i) for i in range(60)]))
             for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert len(hub.read_manifest(manifest)) == 181
    assert not list(tmp_path.glob("*.tmp*"))


# ------------------------------------------------------------------------------ degenerate runs


@pytest.mark.parametrize("changes, train_size, eval_size, message", [
    ({"batch_size": 512, "train_subset": 100}, 100, 10, r"--batch-size 512 is larger than the training set \(--train-subset 100\)"),
    ({"epochs": 0}, 100, 10, "--epochs must be >= 1, got 0"),
    ({"batch_size": 0}, 100, 10, "--batch-size must be >= 1, got 0"),
    ({"lr": float("nan")}, 100, 10, "--lr must be a finite number > 0, got nan"),
    ({"lr": float("inf")}, 100, 10, "--lr must be a finite number > 0, got inf"),
    ({"lr": 0.0}, 100, 10, "--lr must be a finite number > 0, got 0.0"),
    ({"reset_head": True}, 100, 10, "--reset-head .* no --init was given"),
    ({"ckpt_interval_steps": -1}, 100, 10, "--ckpt-interval-steps must be >= 0"),
    ({"batch_size": 8}, 100, 0, "evaluation split .* holds no images"),
])
def test_degenerate_run_config_refused(changes, train_size, eval_size, message):
    with pytest.raises(ValueError, match=message):
        validate_run_config(_args(**changes), train_size, eval_size=eval_size)


def test_sound_run_config_passes():
    validate_run_config(_args(batch_size=8, train_subset=100), 100, eval_size=10)


# ------------------------------------------------------------------------------ ImageFolder data


def _image_tree(root: Path, per_class: int = 6, classes=("a", "b", "c"), splits=("train", "val")) -> Path:
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split in splits:
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = torch.randint(0, 256, (12, 12, 3), generator=g, dtype=torch.uint8).numpy()
                Image.fromarray(pixels).save(root / split / c / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def image_tree(tmp_path_factory):
    return _image_tree(tmp_path_factory.mktemp("images"))


@pytest.mark.parametrize("workers", [0, 2])
def test_imagefolder_resume_batches_are_the_tail_of_the_epoch(image_tree, workers):
    ds = build_imagefolder(image_tree, "train", imagenet_train_transform(8))
    batches = LoaderBatches(ds, batch_size=4, shuffle=True, seed=5, rank=0, world=1, workers=workers, drop_last=True)
    rng = torch.get_rng_state()
    full = list(batches.epoch(2))
    assert torch.equal(torch.get_rng_state(), rng)  # the training's random stream is untouched
    torch.manual_seed(123)  # a resumed process has another global RNG state
    tail = list(batches.epoch(2, start_batch=3))
    assert len(full) == 4 and len(tail) == 1
    for (x, y), (x2, y2) in zip(full[3:], tail):
        assert torch.equal(x, x2) and torch.equal(y, y2)
    other = LoaderBatches(ds, batch_size=4, shuffle=True, seed=5, rank=0, world=1, workers=2 - workers, drop_last=True)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(full, other.epoch(2)))  # workers do not change the data


def test_imagefolder_corrupt_image_skipped_with_warning_then_fatal(tmp_path):
    root = _image_tree(tmp_path, per_class=4, splits=("train",))
    bad = root / "train" / "b" / "1.png"
    bad.write_bytes(b"not an image")
    ds = build_imagefolder(root, "train", imagenet_train_transform(8))
    with pytest.warns(UserWarning, match=rf"skipping unreadable image {bad}"):
        items = [ds[i] for i in range(len(ds))]
    assert len(items) == 12 and ds.bad_files == {str(bad)}
    (root / "train" / "c" / "2.png").write_bytes(b"")
    with warnings.catch_warnings():  # the per-file warnings were checked above
        warnings.filterwarnings("ignore", message="skipping unreadable image", category=UserWarning)
        with pytest.raises(CorruptImagesError, match="2 of 12 images .* cannot be read"):
            [ds[i] for i in range(len(ds))]


def test_imagefolder_empty_val_split_refused(tmp_path):
    root = _image_tree(tmp_path, per_class=2, splits=("train",))
    (root / "val").mkdir()
    with pytest.raises(FileNotFoundError, match=r"val holds no images .*class folders found: none"):
        build_imagefolder(root, "val")


# ------------------------------------------------------------------------------ engine wiring
# These call the training loop; the mechanisms above must run before any work, so the model
# builder is replaced by a tripwire: reaching it means the loop did not refuse in time.


class _WorkStarted(Exception):
    pass


@pytest.fixture
def engine(monkeypatch):
    from frostnet.recipe import engine as module

    def tripwire(*args, **kwargs):
        raise _WorkStarted("the loop built the model before refusing")

    monkeypatch.setattr(module, "get_model", tripwire, raising=False)
    return module


def _train_args(out: Path, *flags: str) -> argparse.Namespace:
    return get_args_parser().parse_args(["--model", ARCH, "--mode", "fp", "--epochs", "1", "--train-subset", "64",
                                         "--batch-size", "32", "--eval-subset", "64", "--no-progress", "--no-export",
                                         "--output-dir", str(out), *flags])


@pytest.mark.parametrize("flags, message", [
    (("--batch-size", "128"), "--batch-size 128 is larger than the training set"),
    (("--epochs", "0"), "--epochs must be >= 1"),
    (("--lr", "nan"), "--lr must be a finite number"),
    (("--reset-head",), "--reset-head"),
    (("--ckpt-interval-steps", "-1"), "--ckpt-interval-steps must be >= 0"),
])
def test_engine_refuses_degenerate_run(engine, tmp_path, flags, message):
    with pytest.raises(ValueError, match=message):
        engine.main(_train_args(tmp_path / "run", *flags))


def test_engine_second_run_into_locked_dir_refused(engine, tmp_path):
    out = tmp_path / "run"
    with open_run_dir(out, resume=False, overwrite=False):
        with pytest.raises(RunDirError, match="in use by another run"):
            engine.main(_train_args(out))


@pytest.mark.parametrize("leftover, flags, error, message", [
    ("metrics.jsonl", (), RunDirError, "is not empty"),  # a finished run's directory, without --resume
    ("checkpoint.pt", ("--resume", "auto"), ckpt.CheckpointError, "checkpoint.pt"),  # no digest, no keys
])
def test_engine_refuses_leftovers(engine, tmp_path, leftover, flags, error, message):
    out = tmp_path / "run"
    out.mkdir()
    torch.save({"epoch": 1}, out / leftover)
    with pytest.raises(error, match=message):
        engine.main(_train_args(out, *flags))


def test_engine_resume_with_changed_lr_refused(engine, tmp_path):
    from frostnet.recipe.args import recorded_args

    out = tmp_path / "run"
    out.mkdir()
    state = {"model": {}, "optimizer": {}, "scheduler": {}, "statassist": {}, "epoch": 1, "batch": 0, "global_step": 2,
             "rng": torch.get_rng_state(), "history": [], "args": recorded_args(_train_args(out, "--epochs", "2"))}
    ckpt.save_checkpoint(out / "checkpoint.pt", state)
    with pytest.raises(ResumeFlagError, match="--lr 0.5 .*--override-resume lr"):
        engine.main(_train_args(out, "--epochs", "2", "--resume", "auto", "--lr", "0.5"))
