"""Packaging: a built wheel, installed outside the checkout, loads published weights by name;
the test suite's rule for missing data (skip on a fresh machine, fail in CI)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import frostnet
from frostnet import hub

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the dev extra installs tomli
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
NAME = "frostnet_small_1_0.fashion_mnist.int8_x86"

_LOAD = """
import os, sys, torch
import frostnet
from frostnet import hub
site = sys.argv[1]
assert frostnet.__file__.startswith(site), f"imported {frostnet.__file__}, not the wheel in {site}"
assert hub.REPO_ROOT is None and hub.MANIFEST_PATH.is_file(), hub.MANIFEST_PATH
assert (hub.MANIFEST_PATH.parent / "py.typed").is_file() and (hub.MANIFEST_PATH.parent / "weights_manifest.schema.json").is_file()
assert "{name}" in frostnet.list_weights()
int8 = frostnet.get_model("frostnet_small_1_0", weights="DEFAULT", quantized=True)
x = torch.stack([hub.get_weights("{name}").transforms()(torch.zeros(1, 28, 28, dtype=torch.uint8))])
torch.save(int8(x), sys.argv[2])
del os.environ["FROSTNET_WEIGHTS_DIR"]
try:
    frostnet.get_model("frostnet_small_1_0", weights="DEFAULT", quantized=True)
except hub.WeightsNotFoundError as e:
    print(str(e))
"""


def test_wheel_installed_outside_the_checkout_loads_int8_by_name(tmp_path):
    src, dist, site, elsewhere = (tmp_path / d for d in ("src", "dist", "site", "elsewhere"))
    # build from a copy: building in place would leave build/ and *.egg-info in the checkout
    src.mkdir()
    for f in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copyfile(ROOT / f, src / f)
    shutil.copytree(ROOT / "frostnet", src / "frostnet", ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    # no build isolation: setuptools comes from the dev extra, so this works offline
    subprocess.run(pip + ["wheel", "--no-deps", "--no-build-isolation", "-w", str(dist), str(src)], check=True,
                   capture_output=True, timeout=300)
    wheel = next(dist.glob("frostnet-*.whl"))
    subprocess.run(pip + ["install", "--no-deps", "--target", str(site), str(wheel)], check=True,
                   capture_output=True, timeout=300)
    weights = tmp_path / "my-weights"
    weights.mkdir()
    shutil.copyfile(ROOT / "weights" / f"{NAME}.safetensors", weights / f"{NAME}.safetensors")
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "FROSTNET_WEIGHTS_DIR": str(weights), "HF_HUB_OFFLINE": "1",
           "HF_HUB_CACHE": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("FROSTNET_MANIFEST", None)
    out = subprocess.run([sys.executable, "-c", _LOAD.replace("{name}", NAME), str(site), str(tmp_path / "y.pt")],
                         cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    # the same INT8 model as from the checkout, bit for bit
    import torch

    int8 = frostnet.get_model("frostnet_small_1_0", weights="DEFAULT", quantized=True)
    x = torch.stack([hub.get_weights(NAME).transforms()(torch.zeros(1, 28, 28, dtype=torch.uint8))])
    assert torch.equal(torch.load(tmp_path / "y.pt", weights_only=True), int8(x))
    # without FROSTNET_WEIGHTS_DIR (and no Hub cache) the error names the variable and the Hub repo
    assert "FROSTNET_WEIGHTS_DIR is not set and frostnet is not a checkout" in out.stdout
    assert "set FROSTNET_WEIGHTS_DIR=<that folder>" in out.stdout
    assert f"Hugging Face Hub frostnet/frostnet_small_1_0.fashion_mnist.int8/{NAME}.safetensors" in out.stdout


def test_pyproject_declares_license_extras_and_package_data():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project = meta["project"]
    assert project["license"] == "MIT" and "MIT License" in (ROOT / "LICENSE").read_text()
    assert {"pytest", "jsonschema", "setuptools", "tomli"} <= {d.split(">")[0] for d in project["optional-dependencies"]["dev"]}
    assert all("==" not in d for d in project["dependencies"])  # lower bounds only
    data = meta["tool"]["setuptools"]["package-data"]["frostnet"]
    assert {"weights_manifest.json", "weights_manifest.schema.json", "py.typed"} <= set(data)
    assert frostnet.__version__ == project["version"]
    citation = (ROOT / "CITATION.cff").read_text()
    for title in ("FrostNet: Towards Quantization-Aware Network Architecture Search",
                  "StatAssist & GradBoost: A Study on Optimal INT8 Quantization-aware Training from Scratch",
                  "Network Quantization with Element-wise Gradient Scaling",
                  "Scheduling Weight Transitions for Quantization-Aware Training",
                  "Optimal Clipping and Magnitude-aware Differentiation for Improved Quantization-aware Training"):
        assert title in citation


_DATA_TESTS = """
import pytest
def test_skipif():
    pytest.skip("needs Fashion-MNIST: apt-get install -y dataset-fashion-mnist")
def test_loader_raises():
    raise FileNotFoundError("Fashion-MNIST not found; apt-get install -y dataset-fashion-mnist")
def test_other_skip():
    pytest.skip("no GPU")
"""


@pytest.mark.parametrize("ci", [False, True], ids=["fresh-machine", "ci"])
def test_missing_data_skips_on_a_fresh_machine_and_fails_in_ci(tmp_path, ci):
    shutil.copyfile(ROOT / "tests" / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_data_rule.py").write_text(_DATA_TESTS)
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "FROSTNET_CI")}
    if ci:
        env["CI"] = "true"
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfs", str(tmp_path)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    summary = out.stdout.strip().splitlines()[-1]
    if ci:
        assert out.returncode == 1 and "2 failed, 1 skipped" in summary, out.stdout
        assert "skipped in CI for missing data, which CI must install" in out.stdout
    else:
        assert out.returncode == 0 and "3 skipped" in summary, out.stdout
        assert out.stdout.count("apt-get install -y dataset-fashion-mnist") >= 2


def test_ci_script_installs_the_data_and_runs_the_readme_test_command():
    script = (ROOT / ".ci" / "run").read_text()
    assert "export CI=true" in script and "dataset-fashion-mnist" in script
    assert "torch==2.14.1 torchvision==0.29.1" in script
    readme = (ROOT / "README.md").read_text()
    # the same install and the same pytest invocation as the README's test command
    assert '-e ".[dev]" && python -m pytest -q\n' in script
    assert 'pip install -e ".[dev]" && python -m pytest -q\n' in readme


def test_readme_is_a_front_door_with_generated_tables():
    readme = (ROOT / "README.md").read_text()
    assert len(readme) < 15_000
    sections = [line for line in readme.splitlines() if line.startswith("## ")]
    assert sections[0] == "## Quick start"
    quick = readme.split("## Quick start", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0].strip().splitlines()
    assert quick == ["pip install -e . && python tools/predict.py",
                     'pip install -e ".[dev]" && python -m pytest -q']
    assert "frostnet.models._" not in readme  # no private module in the examples
    for link in ("docs/models.md", "docs/weights-and-format.md", "docs/training-recipe.md", "docs/quantization.md",
                 "docs/experiments.md", "docs/benchmarks.md", "docs/deployment.md", "docs/scenes.md",
                 "docs/dense-training-speed.md", "docs/dense-models.md", "CHANGELOG.md", "CITATION.cff", "LICENSE"):
        assert f"]({link})" in readme, link
    import importlib.util

    spec = importlib.util.spec_from_file_location("frostnet_tools_docs_tables", ROOT / "tools" / "docs_tables.py")
    tables = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tables)
    assert tables.outdated() == {}, "run: python tools/docs_tables.py"
    assert "| `frostnet_small_1_0` | classification | fashion_mnist | top-1 " in readme
    with pytest.raises(ValueError, match=r"x.md has no '<!-- table:weights-summary:start -->'"):
        tables.render("no markers", "weights-summary", "|a|", "x.md")


def _docs_tables():
    import importlib.util

    spec = importlib.util.spec_from_file_location("frostnet_tools_docs_tables", ROOT / "tools" / "docs_tables.py")
    tables = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tables)
    return tables


def test_dense_table_is_stale_once_scene_weights_are_published(use_published_scenes, monkeypatch, capsys):
    """docs/dense-models.md against the packaged manifest plus the tiny published scene runs of
    conftest.py and a copy of the detector's entries posing as the FrostNet-backbone detector."""
    import dataclasses

    tables = _docs_tables()
    entries = {**tables._entries(), **hub.read_manifest(use_published_scenes["manifest"])}  # the packaged ones too
    for fmt in ("fp32", "int8_x86"):
        e = entries[f"ssdlite_mobilenet_v2.fashion_scenes.{fmt}"]
        name = f"ssdlite_frostnet_small_1_0.fashion_scenes.{fmt}"
        entries[name] = dataclasses.replace(e, name=name, arch="ssdlite_frostnet_small_1_0",
                                            metrics={**e.metrics, "map": e.metrics["map"] + 0.1})
    monkeypatch.setattr(tables, "_entries", lambda: entries)
    page = ROOT / "docs" / "dense-models.md"
    stale = tables.outdated()
    assert page in stale
    rows = {line.split(" | ")[1]: line for line in stale[page].splitlines() if line.startswith("| ")}
    fp32 = entries["ssdlite_mobilenet_v2.fashion_scenes.fp32"].metrics
    int8 = entries["ssdlite_mobilenet_v2.fashion_scenes.int8_x86"].metrics
    assert rows["`ssdlite_mobilenet_v2`"].endswith(
        f" | mAP {fp32['map']:.3f} / mAP@.5 {fp32['map_50']:.3f} | mAP {fp32['fake_quant_map']:.3f} / mAP@.5 "
        f"{fp32['fake_quant_map_50']:.3f} | mAP {int8['map']:.3f} / mAP@.5 {int8['map_50']:.3f} | - |")
    assert rows["`ssdlite_frostnet_small_1_0`"].endswith(", INT8 mAP +0.100 |")  # beside its MobileNet counterpart
    seg = entries["espnet.fashion_scenes.int8_x86"].metrics
    assert f"| mIoU {seg['miou']:.3f} / pixel acc. {seg['pixel_acc']:.3f} | - |" in rows["`espnet`"]
    assert rows["`lraspp_frostnet_small_1_0`"].count("not published") == 3
    assert tables.main(["--check"]) == 1
    assert "docs/dense-models.md is out of date: run python tools/docs_tables.py" in capsys.readouterr().out


def test_readme_snippets_run():
    import re


    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    code = "\n".join(blocks).replace("...                                       # your training loop",
                                     "model(torch.randn(2, 3, 32, 32))")
    cwd = os.getcwd()
    os.chdir(ROOT)  # the snippets open examples/ relative to the checkout
    try:
        with pytest.warns(UserWarning, match="except the classifier head for num_classes=5"):
            exec(compile(code, "README.md", "exec"), {})
    finally:
        os.chdir(cwd)
