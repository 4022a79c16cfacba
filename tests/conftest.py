"""Shared fixtures, and the rule for tests that need data a fresh machine lacks.

A test that needs the Debian Fashion-MNIST package skips, with the install command as the
reason, when it is missing: by a ``skipif`` whose reason holds ``apt-get install``, or by
raising the loader's FileNotFoundError (which names the command) -- so the README's test
command passes on a fresh machine. In CI (``CI`` or ``FROSTNET_CI`` set to true/1, as
``.ci/run`` does) such skips are failures: CI installs the data, and a skip there means a test
silently stopped running.
"""

import os

import pytest
import torch

#: The install command every missing-data skip names.
DATA_HINT = "apt-get install -y dataset-fashion-mnist"


def in_ci() -> bool:
    """True under CI (``CI`` or ``FROSTNET_CI`` = 1/true/yes)."""
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes") for k in ("CI", "FROSTNET_CI"))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    """A test that fails because the dataset is not installed is skipped (outside CI)."""
    try:
        return (yield)
    except FileNotFoundError as e:
        if DATA_HINT in str(e) and not in_ci():
            pytest.skip(f"needs Fashion-MNIST: {DATA_HINT}")
        raise


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """In CI, a skip for missing data is a failure."""
    report = yield
    if report.skipped and in_ci() and "apt-get install" in str(report.longrepr):
        report.outcome = "failed"
        report.longrepr = f"skipped in CI for missing data, which CI must install: {report.longrepr}"
    return report


@pytest.fixture(autouse=True)
def _seed_and_engine():
    """Every test starts from the same RNG state and restores the global quantized engine."""
    torch.manual_seed(0)
    engine = torch.backends.quantized.engine
    yield
    torch.backends.quantized.engine = engine


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module's tests: their tensors are tiny, and OpenMP hand-offs
    between the two cores of a shared machine cost more than they save."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def torchrun():
    """``torchrun(script_args, timeout)``: run ``tools/train.py`` in 2 local processes (gloo, one
    thread each) on a free loopback port; returns the completed process."""
    import socket
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]

    def run(args: list, timeout: int = 900) -> subprocess.CompletedProcess:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(port), str(root / "tools/train.py"), *map(str, args)]
        return subprocess.run(cmd, capture_output=True, text=True, cwd=root, env={**os.environ, "OMP_NUM_THREADS": "1"},
                              timeout=timeout)

    return run


#: The tiny scene runs of :func:`published_scenes`, one model per dense task.
TINY_SCENE_MODELS = {"detection": "ssdlite_mobilenet_v2", "segmentation": "espnet"}


@pytest.fixture(scope="session")
def published_scenes(tmp_path_factory):
    """A detector and a segmenter trained by the recipe (a few seconds each on 16 64x64 scene
    canvases, one QAT epoch: plumbing, not accuracy) and published by ``tools/add_weights.py
    --default`` into a temporary weights folder and manifest, exactly as real runs are.

    Returns ``{"manifest", "weights", "models": {task: arch}, "entries": {task: {"fp32", "int8_x86"}}}``;
    tests point ``FROSTNET_MANIFEST`` / ``FROSTNET_WEIGHTS_DIR`` at it (:func:`use_published_scenes`).
    """
    import importlib.util
    import sys
    from pathlib import Path

    from frostnet.recipe import get_args_parser, main

    root = Path(__file__).resolve().parents[1]
    tmp = tmp_path_factory.mktemp("published_scenes")
    manifest, weights = tmp / "weights_manifest.json", tmp / "weights"
    sys.path.insert(0, str(root / "tools"))  # add_weights imports tools/evaluate.py
    try:
        spec = importlib.util.spec_from_file_location("frostnet_tools_add_weights", root / "tools" / "add_weights.py")
        add_weights = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(add_weights)
    finally:
        sys.path.remove(str(root / "tools"))
    entries = {}
    threads = torch.get_num_threads()  # restored at the end: the recipe's --threads 1 sets the process-wide count
    torch.set_num_threads(1)  # loading INT8 files (weight prepacking) and 16-canvas evaluations: threads only contend
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FROSTNET_MANIFEST", str(manifest))
        for task, arch in TINY_SCENE_MODELS.items():
            out = tmp / arch
            main(get_args_parser().parse_args([
                "--model", arch, "--data", "fashion_scenes:size=64,train_images=16,val_images=16,test_images=16",
                "--input-size", "64", "--batch-size", "16", "--epochs", "1", "--fp-epochs", "0",
                "--mode", "statassist+gradboost", "--opt", "sgd", "--lr", "0.01", "--calib-batches", "1",
                "--no-progress", "--threads", "1", "--export-backends", "x86", "--output-dir", str(out)]))
            add_weights.main(add_weights.get_args_parser().parse_args(
                [str(out / "export"), "--default", "--weights-dir", str(weights)]))
            entries[task] = {"fp32": f"{arch}.fashion_scenes.fp32", "int8_x86": f"{arch}.fashion_scenes.int8_x86"}
    torch.set_num_threads(threads)
    return {"manifest": manifest, "weights": weights, "models": dict(TINY_SCENE_MODELS), "entries": entries}


@pytest.fixture
def use_published_scenes(published_scenes, monkeypatch):
    """:func:`published_scenes` as the manifest and weights folder of this test (offline)."""
    monkeypatch.setenv("FROSTNET_MANIFEST", str(published_scenes["manifest"]))
    monkeypatch.setenv("FROSTNET_WEIGHTS_DIR", str(published_scenes["weights"]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return published_scenes
