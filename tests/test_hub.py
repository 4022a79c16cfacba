"""Manifest, weight resolution (local, Hugging Face Hub cache), builders with weights=,
torch.hub entrypoints, and the convert/publish tools."""

import copy
import dataclasses
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard

import frostnet
import frostnet.data
from frostnet import hub, quant
from frostnet.serialization import WeightsError, load_int8, save_fp32, sha256_file

ROOT = Path(__file__).resolve().parents[1]
ARCH = "frostnet_small_0_35"
FP32 = f"{ARCH}.fashion_mnist.fp32"
X86 = f"{ARCH}.fashion_mnist.int8_x86"
QNN = f"{ARCH}.fashion_mnist.int8_qnnpack"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _tool(name):
    spec = importlib.util.spec_from_file_location(f"frostnet_tools_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# one intra-op thread: tiny tensors on 2 shared cores (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def x():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def zoo(tmp_path_factory, x):
    """A manifest with an FP32 entry (save_fp32 + make/add_manifest_entry), its x86 INT8 entry
    (tools/convert.py, PTQ on Fashion-MNIST) and its qnnpack INT8 entry (convert_qat_model)."""
    root = tmp_path_factory.mktemp("zoo")
    weights, manifest = root / "weights", root / "weights_manifest.json"
    weights.mkdir()
    torch.manual_seed(0)
    model = frostnet.get_model(ARCH, num_classes=10).eval()
    save_fp32(model, weights / f"{FP32}.safetensors", arch=ARCH, num_classes=10, metadata={"dataset": "fashion_mnist"})
    name, entry = hub.make_manifest_entry(weights / f"{FP32}.safetensors", dataset="fashion_mnist", default=True,
                                          recipe="python tools/train.py --model frostnet_small_0_35",
                                          metrics={"acc@1": 12.5}, metrics_command="python tools/evaluate.py ...")
    assert name == FP32
    hub.add_manifest_entry(name, entry, manifest_path=manifest)

    convert = _tool("convert")
    fmnist = frostnet.data.DEFAULT_FASHION_MNIST_ROOT
    calib = "fashion_mnist" if (fmnist / "train-images-idx3-ubyte.gz").exists() else "random"
    assert convert.cli([FP32, "--backend", "x86", "--calib", calib, "--calib-batches", "1", "--batch-size", "8",
                        "--manifest", str(manifest), "--weights-dir", str(weights), "--default"]) == 0

    qat = hub.load_weights(FP32, manifest=manifest, weights_dir=weights)  # FP32 entry -> QAT fine-tuning
    quant.prepare_qat(qat, "qnnpack")
    with torch.no_grad():
        qat(x)
    int8_qnn, qname = convert.convert_qat_model(qat, "qnnpack", FP32, recipe="python tools/train.py --qat",
                                                default=True, weights_dir=weights, manifest=manifest)
    assert qname == QNN
    with torch.no_grad():
        ref = {"fp32": model(x), "qnnpack": int8_qnn(x)}
    return {"root": root, "weights": weights, "manifest": manifest, "model": model, "ref": ref}


@pytest.fixture
def env(zoo, monkeypatch, tmp_path):
    """Builders read the zoo's manifest and weights folder; the Hub is offline."""
    monkeypatch.setenv("FROSTNET_MANIFEST", str(zoo["manifest"]))
    monkeypatch.setenv("FROSTNET_WEIGHTS_DIR", str(zoo["weights"]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return zoo


def _hf_cache(cache: Path, entry: hub.WeightsEntry, src: Path, commit: str = COMMIT) -> Path:
    """The huggingface_hub cache layout: models--org--name/{blobs,refs,snapshots}."""
    repo = cache / ("models--" + entry.hf.repo_id.replace("/", "--"))
    blob = repo / "blobs" / sha256_file(src)
    blob.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, blob)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit / entry.hf.filename
    snap.parent.mkdir(parents=True, exist_ok=True)
    if not snap.exists():
        snap.symlink_to(os.path.relpath(blob, snap.parent))
    return snap


# ------------------------------------------------------------------------------- manifest


def test_checkout_manifest_is_valid():
    assert hub.MANIFEST_PATH == ROOT / "frostnet" / "weights_manifest.json"  # package data
    data = json.loads(hub.MANIFEST_PATH.read_text())
    assert hub.validate_manifest(data) == []
    entries = hub.read_manifest(hub.MANIFEST_PATH)
    for name, entry in data["weights"].items():  # the fields other tools read
        assert entry["file"] == entries[name].file and len(entry["sha256"]) == 64
    import jsonschema  # in the dev extra: a missing test dependency fails, it does not skip

    schema = json.loads((ROOT / "frostnet/weights_manifest.schema.json").read_text())
    jsonschema.validate(data, schema)


def test_zoo_manifest_entries(zoo):
    entries = hub.read_manifest(zoo["manifest"])
    assert sorted(entries) == sorted([FP32, X86, QNN])
    fp32, x86, qnn = entries[FP32], entries[X86], entries[QNN]
    assert fp32.format == "fp32" and fp32.backend is None and fp32.base is None and fp32.default
    assert fp32.categories == frostnet.data.FASHION_MNIST_CLASSES and fp32.input_size == (3, 32, 32)
    assert fp32.num_params == sum(p.numel() for p in zoo["model"].parameters())
    assert fp32.hf.repo_id == f"frostnet/{ARCH}.fashion_mnist" and fp32.hf.revision is None
    assert x86.base == FP32 and x86.backend == "x86" and x86.quantized and x86.default
    assert x86.recipe.startswith("python tools/convert.py frostnet_small_0_35.fashion_mnist.fp32 --backend x86")
    assert x86.hf.repo_id == f"frostnet/{ARCH}.fashion_mnist.int8"
    assert qnn.base == FP32 and qnn.recipe == "python tools/train.py --qat"
    for e in entries.values():
        path = zoo["weights"] / e.file
        assert e.sha256 == sha256_file(path) and e.size == path.stat().st_size
        assert e.meta["name"] == e.name and e.builder_kwargs == {"num_classes": 10}


def _mutations():
    """(description, mutate(entry)) pairs that both validators must reject."""
    return [
        ("missing field", lambda e: e.pop("sha256")),
        ("unknown field", lambda e: e.update(color="blue")),
        ("bad sha", lambda e: e.update(sha256="xyz")),
        ("bad format", lambda e: e.update(format="fp16")),
        ("fp32 with backend", lambda e: e.update(backend="x86")),
        ("negative size", lambda e: e.update(size=-1)),
        ("size not int", lambda e: e.update(size="12")),
        ("empty categories", lambda e: e.update(categories=[])),
        ("duplicate categories", lambda e: e.update(categories=["a", "a"])),
        ("2-d input size", lambda e: e.update(input_size=[32, 32])),
        ("zero std", lambda e: e.update(std=[0.0, 1.0, 1.0])),
        ("bad revision", lambda e: e["hf"].update(revision="main")),
        ("bad repo id", lambda e: e["hf"].update(repo_id="no-slash")),
        ("hf extra key", lambda e: e["hf"].update(token="x")),
        ("default not bool", lambda e: e.update(default="yes")),
        ("bad task", lambda e: e.update(task="generation")),
        ("metric not a number", lambda e: e["metrics"].update({"acc@1": "high"})),
    ]


@pytest.mark.parametrize("what, mutate", _mutations(), ids=[m[0] for m in _mutations()])
def test_validators_reject_bad_entries(zoo, what, mutate):
    data = json.loads(zoo["manifest"].read_text())
    assert hub.validate_manifest(data) == []
    entry = copy.deepcopy(data["weights"][FP32])
    mutate(entry)
    data["weights"][FP32] = entry
    assert hub.validate_entry(FP32, entry), what
    import jsonschema  # in the dev extra: a missing test dependency fails, it does not skip

    schema = json.loads((ROOT / "frostnet/weights_manifest.schema.json").read_text())
    assert list(jsonschema.Draft202012Validator(schema).iter_errors(data)), what


def test_manifest_rules_beyond_single_entries(zoo, tmp_path):
    data = json.loads(zoo["manifest"].read_text())
    bad = copy.deepcopy(data)
    bad["weights"][X86]["base"] = f"{ARCH}.imagenet.fp32"
    assert any("is not an entry" in p for p in hub.validate_manifest(bad))
    bad = copy.deepcopy(data)
    bad["weights"][X86]["file"] = "renamed.safetensors"
    assert any("file must be" in p for p in hub.validate_manifest(bad))
    bad = copy.deepcopy(data)
    bad["weights"][FP32]["arch"] = "frostnet_small_0_5"
    assert any("name starts with arch" in p for p in hub.validate_manifest(bad))
    bad = copy.deepcopy(data)
    bad["weights"][FP32]["metrics_command"] = None
    assert any("metrics_command" in p for p in hub.validate_manifest(bad))
    bad = copy.deepcopy(data)
    bad["weights"][FP32]["builder_kwargs"]["num_classes"] = 11
    assert any("does not match the 10 categories" in p for p in hub.validate_manifest(bad))
    bad = copy.deepcopy(data)
    bad["format_version"] = 2
    assert any("format_version" in p for p in hub.validate_manifest(bad))
    dup = tmp_path / "dup.json"
    dup.write_text('{"format_version": 1, "weights": {}, "weights": {}}')
    with pytest.raises(hub.ManifestError, match="duplicate keys"):
        hub.read_manifest(dup)
    with pytest.raises(hub.ManifestError, match="does not exist"):
        hub.read_manifest(tmp_path / "missing.json")


def test_add_manifest_entry_replace_and_default(zoo, tmp_path):
    manifest = tmp_path / "m.json"
    shutil.copyfile(zoo["manifest"], manifest)
    data = json.loads(manifest.read_text())
    with pytest.raises(ValueError, match="already has an entry"):
        hub.add_manifest_entry(X86, data["weights"][X86], manifest_path=manifest)
    # a second x86 INT8 entry made default takes the default over
    tag = "fashion_mnist_v2"
    src = zoo["weights"] / f"{X86}.safetensors"
    other = tmp_path / f"{ARCH}.{tag}.int8_x86.safetensors"
    shutil.copyfile(src, other)
    fp32v2 = tmp_path / f"{ARCH}.{tag}.fp32.safetensors"
    shutil.copyfile(zoo["weights"] / f"{FP32}.safetensors", fp32v2)
    hub.add_manifest_entry(*hub.make_manifest_entry(fp32v2, dataset="fashion_mnist", tag=tag), manifest_path=manifest)
    hub.add_manifest_entry(*hub.make_manifest_entry(other, dataset="fashion_mnist", tag=tag, default=True),
                           manifest_path=manifest)
    entries = hub.read_manifest(manifest)
    assert entries[f"{ARCH}.{tag}.int8_x86"].default and not entries[X86].default
    assert entries[f"{ARCH}.{tag}.int8_x86"].base == f"{ARCH}.{tag}.fp32"
    with pytest.raises(ValueError, match="must be named"):
        hub.make_manifest_entry(zoo["weights"] / f"{X86}.safetensors", dataset="fashion_mnist", tag="other")
    hub.set_hf_revision([FP32], COMMIT, manifest_path=manifest)
    assert hub.read_manifest(manifest)[FP32].hf.revision == COMMIT
    with pytest.raises(hub.ManifestError, match="40-hex"):
        hub.set_hf_revision([FP32], "main", manifest_path=manifest)


def test_list_and_get_weights(env):
    assert frostnet.list_weights() == sorted([FP32, X86, QNN])
    assert frostnet.list_weights("*.int8_*") == sorted([X86, QNN])
    assert hub.list_weights(format="int8", backend="qnnpack") == [QNN]
    assert hub.list_weights(arch="frostnet_base_1_0") == []
    assert hub.default_weights(ARCH, quantized=True, backend="qnnpack").name == QNN
    with pytest.raises(ValueError, match=r"unknown weights 'frostnet_small_0_35.fashion_mnist.fp16'; did you mean"):
        hub.get_weights(f"{ARCH}.fashion_mnist.fp16")
    with pytest.raises(ValueError, match="unknown format 'fp16'; valid choices: fp32, int8"):
        hub.list_weights(format="fp16")
    assert hub._BACKENDS == quant.BACKENDS


# -------------------------------------------------------------------------------- builders


def test_builder_default_weights_fp32_and_int8(env, x):
    model = frostnet.get_model(ARCH, weights="DEFAULT").eval()
    assert model.num_classes == 10 and model.weights_meta["name"] == FP32
    with torch.no_grad():
        assert torch.equal(model(x), env["ref"]["fp32"])
    int8 = frostnet.get_model(ARCH, weights="DEFAULT", quantized=True, backend="qnnpack")
    assert quant.is_quantized_model(int8) and int8.weights_meta["name"] == QNN
    with torch.no_grad():
        assert torch.equal(int8(x), env["ref"]["qnnpack"])  # bitwise: the converted QAT model
    x86 = frostnet.get_model(ARCH, weights=X86, quantized=True)  # backend from the weights
    assert torch.backends.quantized.engine == "x86" and x86.weights_meta["base"] == FP32
    with torch.no_grad():
        assert x86(x).shape == (2, 10)
    assert torch.equal(hub.load_weights(QNN)(x), env["ref"]["qnnpack"])


def test_builder_argument_conflicts(env):
    assert frostnet.get_model(ARCH, weights="DEFAULT", num_classes=10).num_classes == 10
    with pytest.raises(ValueError, match=rf"FP32 but quantized=True needs INT8 weights: use one of {QNN}, {X86}"):
        frostnet.get_model(ARCH, weights=FP32, quantized=True)
    with pytest.raises(ValueError, match=r"are INT8 \(x86\); pass quantized=True"):
        frostnet.get_model(ARCH, weights=X86)
    with pytest.raises(ValueError, match=rf"backend='qnnpack' conflicts with weights '{X86}', converted for 'x86'; "
                                         rf"the qnnpack weights are {QNN}"):
        frostnet.get_model(ARCH, weights=X86, quantized=True, backend="qnnpack")
    with pytest.raises(ValueError, match=r"are for 'frostnet_small_0_35', not 'frostnet_small_0_5'"):
        frostnet.get_model("frostnet_small_0_5", weights=FP32)
    with pytest.raises(ValueError, match=r"no default FP32 weights exist for 'frostnet_base_1_0'.*weights=None"):
        frostnet.get_model("frostnet_base_1_0", weights="DEFAULT")
    entries = {k: dataclasses.replace(v, builder_kwargs={**v.builder_kwargs, "in_channels": 3})
               for k, v in hub.read_manifest(env["manifest"]).items()}
    with pytest.raises(ValueError, match=rf"in_channels=1 conflicts with weights '{FP32}', built with in_channels=3"):
        hub.build_with_weights(ARCH, frostnet.models.get_model_builder(ARCH), weights=FP32,
                               manifest=entries, num_classes=None, in_channels=1)
    with pytest.raises(ValueError, match="unknown quantization backend 'arm'"):
        frostnet.get_model(ARCH, quantized=True, backend="arm")
    with pytest.raises(ValueError, match="cannot be loaded into a features_only model"):
        frostnet.get_model(ARCH, weights="DEFAULT", quantized=True, features_only=True)
    with pytest.raises(TypeError, match="quantized must be True or False"):
        frostnet.get_model(ARCH, quantized="yes")


def test_builder_other_num_classes_loads_all_but_the_head(env, x):
    """timm's behaviour: a num_classes other than the FP32 weights' gets a fresh head, and a warning."""
    with pytest.warns(UserWarning, match=rf"loaded weights '{FP32}' except the classifier head for num_classes=3 "
                                         r"\(randomly initialized: classifier.2.bias, classifier.2.weight\)"):
        model = frostnet.get_model(ARCH, weights="DEFAULT", num_classes=3).eval()
    assert model.num_classes == 3 and model.reset_keys == ["classifier.2.bias", "classifier.2.weight"]
    ref = env["model"].state_dict()
    for key, value in model.state_dict().items():
        if key not in model.reset_keys:
            assert torch.equal(value, ref[key]), key
    assert model.weights_meta["categories"] is None and model.weights_meta["num_classes"] == 3
    with torch.no_grad():
        assert model(x).shape == (2, 3)
    with pytest.raises(ValueError, match=r"num_classes=3 conflicts with the 10 classes of INT8 weights .*"
                                         r"load the FP32 weights \(quantized=False\) to fine-tune a 3-class head"):
        frostnet.get_model(ARCH, weights="DEFAULT", quantized=True, num_classes=3)


def test_foreign_and_stray_keywords_raise(env):
    with pytest.raises(TypeError, match=r"frostnet takes weights='DEFAULT' .*not pretrained=True \(the torchvision/timm"):
        frostnet.get_model(ARCH, pretrained=True)
    with pytest.raises(TypeError, match=r"frostnet takes quantized=True, not quantize=True"):
        frostnet.get_model(ARCH, quantize=True)
    with pytest.raises(TypeError, match=r"frostnet takes quantized=True, not quantize=True"):
        frostnet.models.get_model(ARCH, quantize=True)
    with pytest.raises(ValueError, match=r"backend='qnnpack' only applies with quantized=True"):
        frostnet.get_model(ARCH, backend="qnnpack")
    with pytest.raises(ValueError, match=r"backend='x86' only applies with quantized=True"):
        frostnet.get_model(ARCH, weights="DEFAULT", backend="x86")
    with pytest.raises(TypeError, match=r"got unexpected keyword arguments \['colour'\]; valid: weights, quantized, "
                                        r"backend, num_classes"):
        frostnet.get_model(ARCH, colour="red")
    with pytest.raises(TypeError, match=r"frostnet.models.get_model builds architectures only; for weights= use "
                                        r"frostnet.get_model\('espnet', ...\)"):
        frostnet.models.get_model("espnet", weights="DEFAULT")


def test_builder_features_only_and_random_int8(env, x):
    features = frostnet.get_model(ARCH, weights="DEFAULT", features_only=True).eval()
    assert torch.equal(features.conv1.conv[0].weight, env["model"].conv1.conv[0].weight)
    assert len(features(x)) == 4
    rand = frostnet.get_model(ARCH, quantized=True, backend="qnnpack", num_classes=5)
    assert quant.is_quantized_model(rand) and rand(x).shape == (2, 5)
    assert torch.backends.quantized.engine == "qnnpack"


# ------------------------------------------------------------------------------ resolution


def test_resolution_order_and_errors(env, tmp_path, x):
    entry = hub.get_weights(FP32)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copyfile(env["weights"] / entry.file, elsewhere / entry.file)
    empty = tmp_path / "empty"
    empty.mkdir()
    # 1. explicit path (file or directory) before the weights folder
    assert hub.resolve_file(entry, path=elsewhere, weights_dir=empty) == elsewhere / entry.file
    assert hub.resolve_file(entry, path=elsewhere / entry.file) == elsewhere / entry.file
    # 2. the weights folder; a corrupted copy there is an error, never a silent fallback
    bad = tmp_path / "bad"
    bad.mkdir()
    data = bytearray((env["weights"] / entry.file).read_bytes())
    data[-10] ^= 0xFF
    (bad / entry.file).write_bytes(bytes(data))
    with pytest.raises(WeightsError, match=rf"sha256 mismatch for '{bad / entry.file}'.*fetch it again"):
        hub.load_weights(FP32, weights_dir=bad)
    # 3. the Hub (offline, empty cache) -> an error listing every place and how to get the file
    with pytest.raises(hub.WeightsNotFoundError) as info:
        hub.load_weights(FP32, path=tmp_path / "nope.safetensors", weights_dir=empty, cache_dir=tmp_path / "cache")
    msg = str(info.value)
    assert "1. the explicit path" in msg and "2. the weights folder" in msg and "3. the Hugging Face Hub" in msg
    assert "cache only (offline)" in msg and f"hf download frostnet/{ARCH}.fashion_mnist {entry.file}" in msg
    assert "python tools/train.py" in msg


def test_hugging_face_cache_offline_pinned_revision(env, tmp_path, x):
    """A real huggingface_hub cache layout; hf_hub_download resolves the pinned commit offline."""
    manifest = tmp_path / "m.json"
    shutil.copyfile(env["manifest"], manifest)
    hub.set_hf_revision([FP32, QNN], COMMIT, manifest_path=manifest)
    entries = hub.read_manifest(manifest)
    cache, empty = tmp_path / "hf", tmp_path / "empty"
    empty.mkdir()
    for name in (FP32, QNN):
        _hf_cache(cache, entries[name], env["weights"] / entries[name].file)
    model = hub.load_weights(FP32, manifest=manifest, weights_dir=empty, cache_dir=cache).eval()
    with torch.no_grad():
        assert torch.equal(model(x), env["ref"]["fp32"])
    int8 = hub.load_weights(QNN, manifest=manifest, weights_dir=empty, cache_dir=cache)
    with torch.no_grad():
        assert torch.equal(int8(x), env["ref"]["qnnpack"])
    # another pinned revision is not in the cache: offline, that is a clear error
    hub.set_hf_revision([FP32], "f" * 40, manifest_path=manifest)
    with pytest.raises(hub.WeightsNotFoundError, match="at revision f{40}, cache only"):
        hub.load_weights(FP32, manifest=manifest, weights_dir=empty, cache_dir=cache)
    # a corrupted blob in the cache is caught by the sha256 before it is parsed
    blob = next((cache / f"models--frostnet--{ARCH}.fashion_mnist.int8" / "blobs").iterdir())
    blob.write_bytes(blob.read_bytes()[:-1])
    with pytest.raises(WeightsError, match=rf"sha256 mismatch for '.*snapshots/{COMMIT}/{QNN}.safetensors'"):
        hub.load_weights(QNN, manifest=manifest, weights_dir=empty, cache_dir=cache)


def test_hugging_face_env_vars_and_torch_hub_in_fresh_process(env, tmp_path):
    """HF_HUB_CACHE + HF_HUB_OFFLINE=1 read by huggingface_hub itself at import, revision via
    refs/main (entry not pinned), loaded through torch.hub.load(<checkout>, source="local")."""
    entries = hub.read_manifest(env["manifest"])
    cache, empty = tmp_path / "hf", tmp_path / "empty"
    empty.mkdir()
    _hf_cache(cache, entries[QNN], env["weights"] / entries[QNN].file)
    torch.save(env["ref"]["qnnpack"], tmp_path / "ref.pt")  # test-side only
    code = (
        "import torch, sys\n"
        f"m = torch.hub.load({str(ROOT)!r}, {ARCH!r}, source='local', weights='DEFAULT', quantized=True,"
        " backend='qnnpack')\n"
        "x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))\n"
        f"ref = torch.load({str(tmp_path / 'ref.pt')!r}, weights_only=True)\n"
        "assert torch.equal(m(x), ref), 'outputs differ'\n"
        "print(m.weights_meta['name'])\n"
    )
    run_env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "FROSTNET_WEIGHTS_DIR": str(empty),
               "FROSTNET_MANIFEST": str(env["manifest"]), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    out = subprocess.run([sys.executable, "-c", code], env=run_env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == QNN


# ------------------------------------------------------------------------------- torch.hub


def _entrypoints():
    spec = importlib.util.spec_from_file_location("frostnet_hubconf", ROOT / "hubconf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_hubconf_lists_every_entrypoint():
    hubconf = _entrypoints()
    # torch.hub.list's rule (it only takes GitHub repos): public callables of hubconf
    listed = [n for n, f in vars(hubconf).items() if callable(f) and not n.startswith("_")]
    assert sorted(listed) == sorted(hubconf.ENTRYPOINTS)
    assert set(hubconf.ENTRYPOINTS) <= set(frostnet.list_models())
    assert set(frostnet.list_models(task="classification")) <= set(hubconf.ENTRYPOINTS)
    assert {"torch", "safetensors", "huggingface_hub"} <= set(hubconf.dependencies)
    for name in hubconf.ENTRYPOINTS:
        doc = getattr(hubconf, name).__doc__  # what torch.hub.help shows
        assert doc and "Example" in doc, f"{name} needs a docstring with an example"


@pytest.mark.parametrize("name", _entrypoints().ENTRYPOINTS)
def test_torch_hub_load_every_entrypoint(name):
    if frostnet.models.get_model_task(name) != "classification":
        model = torch.hub.load(str(ROOT), name, source="local", trust_repo=True)
        assert type(model) is type(frostnet.get_model(name))
        return
    model = torch.hub.load(str(ROOT), name, source="local", trust_repo=True, num_classes=3)
    assert isinstance(model, torch.nn.Module) and model.num_classes == 3
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 3)


# ----------------------------------------------------------------------------------- tools


def test_convert_tool_rejects_bad_requests(env, tmp_path):
    convert = _tool("convert")
    with pytest.raises(SystemExit, match="an FP32 file given by path has no manifest entry"):
        convert.cli([str(env["weights"] / f"{FP32}.safetensors"), "--calib", "random"])
    with pytest.raises(SystemExit, match="is an int8 entry"):
        convert.cli([X86, "--calib", "random"])
    with pytest.raises(ValueError, match="unsupported calibration set 'voc:/data'"):
        list(convert.calibration_batches("voc:/data", (3, 32, 32), [0.0] * 3, [1.0] * 3, 1, 1))
    out = tmp_path / "loose.int8.safetensors"
    assert convert.cli([str(env["weights"] / f"{FP32}.safetensors"), "--backend", "qnnpack", "--calib", "random",
                        "--calib-batches", "1", "--batch-size", "2", "--no-manifest", "--output", str(out)]) == 0
    assert quant.is_quantized_model(load_int8(out, backend="qnnpack"))
    assert hub.read_manifest(env["manifest"]).keys() == {FP32, X86, QNN}  # untouched


def test_publish_dry_run_writes_the_repo_folders(env, tmp_path):
    publish = _tool("publish")
    out = tmp_path / "hub"
    assert publish.cli([f"{ARCH}.fashion_mnist.*", "--manifest", str(env["manifest"]), "--dry-run",
                        "--out", str(out)]) == 0
    entries = hub.read_manifest(env["manifest"])
    fp32_repo = out / "frostnet" / f"{ARCH}.fashion_mnist"
    int8_repo = out / "frostnet" / f"{ARCH}.fashion_mnist.int8"
    assert sorted(p.name for p in fp32_repo.iterdir()) == sorted(["README.md", "weights_manifest.json", f"{FP32}.safetensors"])
    assert sorted(p.name for p in int8_repo.iterdir()) == sorted(
        ["README.md", "weights_manifest.json", f"{X86}.safetensors", f"{QNN}.safetensors"])
    for name in (FP32, X86, QNN):
        repo = fp32_repo if name == FP32 else int8_repo
        assert sha256_file(repo / f"{name}.safetensors") == entries[name].sha256

    card = ModelCard.load(int8_repo / "README.md")
    data = card.data.to_dict()
    assert data["base_model"] == f"frostnet/{ARCH}.fashion_mnist" and data["base_model_relation"] == "quantized"
    assert data["license"] == "mit" and data["datasets"] == ["zalando-datasets/fashion_mnist"]
    assert data["pipeline_tag"] == "image-classification" and {"int8", "x86", "qnnpack"} <= set(data["tags"])
    assert f"weights={QNN!r}, quantized=True, backend='qnnpack'" in card.text
    assert f"quantized (x86) from `{FP32}`" in card.text and "python tools/convert.py" in card.text
    fp32_card = ModelCard.load(fp32_repo / "README.md")
    assert "base_model" not in fp32_card.data.to_dict()
    results = fp32_card.data.eval_results
    assert results and results[0].metric_value == 12.5 and results[0].metric_type == "accuracy"
    assert "python tools/evaluate.py" in fp32_card.text
    folder_manifest = json.loads((int8_repo / "weights_manifest.json").read_text())
    for name, entry in folder_manifest["weights"].items():
        assert hub.validate_entry(name, entry) == []

    with pytest.raises(SystemExit, match="not empty; pass --overwrite"):
        publish.cli([FP32, "--manifest", str(env["manifest"]), "--dry-run", "--out", str(out)])
    assert publish.cli([FP32, "--manifest", str(env["manifest"]), "--dry-run", "--out", str(out), "--overwrite"]) == 0
    with pytest.raises(ValueError, match="matches no manifest entry"):
        publish.cli(["frostnet_large_*", "--manifest", str(env["manifest"]), "--dry-run", "--out", str(out)])


# ------------------------------------------------------------------ local folders, packaging


def test_local_folders_env_then_checkout_then_error_naming_the_variable(env, tmp_path, monkeypatch):
    entry = hub.get_weights(FP32)
    first, second = tmp_path / "first", tmp_path / "second"
    for d in (first, second):
        d.mkdir()
    shutil.copyfile(env["weights"] / entry.file, second / entry.file)
    monkeypatch.setattr(hub, "WEIGHTS_DIR", second)  # stands in for the checkout's weights/
    monkeypatch.setenv("FROSTNET_WEIGHTS_DIR", str(first))
    assert hub.local_weights_dirs() == [first, second]
    assert hub.resolve_file(entry) == second / entry.file
    shutil.copyfile(env["weights"] / entry.file, first / entry.file)
    assert hub.resolve_file(entry) == first / entry.file  # $FROSTNET_WEIGHTS_DIR first
    # an installed package (no checkout) without the variable: the error says what to set
    monkeypatch.setattr(hub, "WEIGHTS_DIR", None)
    monkeypatch.delenv("FROSTNET_WEIGHTS_DIR")
    with pytest.raises(hub.WeightsNotFoundError) as info:
        hub.resolve_file(entry, cache_dir=tmp_path / "cache")
    msg = str(info.value)
    assert "FROSTNET_WEIGHTS_DIR is not set and frostnet is not a checkout" in msg
    assert f"Hugging Face Hub frostnet/{ARCH}.fashion_mnist/{entry.file}" in msg
    assert "set FROSTNET_WEIGHTS_DIR=<that folder>" in msg
    with pytest.raises(hub.WeightsNotFoundError, match="set FROSTNET_WEIGHTS_DIR=<folder>"):
        hub.local_weights_dir()


def test_recipes_hold_no_machine_paths(zoo):
    assert hub.portable_recipe("python tools/train.py --output-dir /root/frostnet-runs/small --resume auto") == \
        "python tools/train.py --output-dir runs/small --resume auto"
    assert hub.portable_recipe("train --output-dir=/tmp/x/run7") == "train --output-dir=runs/run7"
    assert hub.portable_recipe("train --output-dir runs/a") == "train --output-dir runs/a"
    # flags that only steered a resumption are not part of the recipe
    assert hub.portable_recipe("train --lr 1 --override-resume ema_decay,lr --allow-unverified-checkpoint --seed 0") == \
        "train --lr 1 --seed 0"
    assert hub.portable_recipe("train --override-resume=lr --seed 0") == "train --seed 0"
    for name, entry in hub.read_manifest(hub.MANIFEST_PATH).items():
        assert hub.machine_paths(entry.recipe or "") == [] and hub.machine_paths(entry.metrics_command or "") == [], name
        assert "--output-dir runs/" in entry.recipe
    assert hub.machine_paths("train --output-dir /home/me/run --data-root=/data/x") == ["/home/me/run", "/data/x"]
    assert hub.machine_paths("train --root /usr/share/datasets/fashion-mnist") == []  # the same on every machine
    # make_manifest_entry rewrites the output dir of the recipe it is given
    _, made = hub.make_manifest_entry(zoo["weights"] / f"{FP32}.safetensors", dataset="fashion_mnist",
                                      recipe="python tools/train.py --output-dir /root/runs/abc")
    assert made["recipe"] == "python tools/train.py --output-dir runs/abc"


def test_models_import_nothing_from_hub_or_serialization():
    """Layers point down: model modules do not know where weights come from (the import graph)."""
    import ast

    offenders = []
    for path in sorted((ROOT / "frostnet" / "models").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom):
                mod = node.module or ""
                names = [mod] + [f"{mod}.{a.name}" if mod else a.name for a in node.names]
                if node.level >= 2:  # from .. import hub / from ..hub import x
                    names = [f"frostnet.{n}".rstrip(".") for n in names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for n in names:
                if any(part in ("hub", "serialization") for part in n.split(".")):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {n}")
    assert offenders == []


def test_weights_transforms_match_the_training_preprocessing(tmp_path):
    from PIL import Image

    from frostnet.data import prepare_batch

    entry = hub.get_weights("frostnet_small_1_0.fashion_mnist.int8_x86", manifest=hub.MANIFEST_PATH)
    preprocess = entry.transforms()
    img = Image.open(ROOT / "examples" / "ankle_boot_test0.png")
    pixels = torch.from_numpy(__import__("numpy").asarray(img.convert("L")).copy())
    ref = prepare_batch(pixels[None], size=32, mean=entry.mean[0], std=entry.std[0])[0]
    assert torch.equal(preprocess(img), ref)
    # the same picture as 16-bit and float images: scaled, not binarised
    import numpy as np

    Image.fromarray(np.asarray(pixels.numpy(), dtype=np.uint16) * 257).save(tmp_path / "a16.png")
    Image.fromarray(pixels.numpy().astype(np.float32) / 255).save(tmp_path / "af.tiff")
    for name in ("a16.png", "af.tiff"):
        assert torch.allclose(preprocess(Image.open(tmp_path / name)), ref, atol=1e-5), name
    # RGB input of another size is converted to gray and resized to 28x28 first
    assert preprocess(img.convert("RGB").resize((56, 56))).shape == (3, 32, 32)
    with pytest.raises(ValueError, match=r"float \(mode F\) image must hold values in \[0, 1\], got 0..255"):
        Image.fromarray(pixels.numpy().astype(np.float32)).save(tmp_path / "bad.tiff")
        preprocess(Image.open(tmp_path / "bad.tiff"))


# ------------------------------------------------------------- dense models with weights=

DENSE_TAG = "tiny_scenes"
DENSE = {"segmentation": "espnet", "detection": "tiny_dsod"}


@pytest.fixture(scope="module")
def dense_zoo(tmp_path_factory):
    """A segmenter and a detector published (FP32 + INT8 x86) into a temporary weights folder
    and manifest through make_manifest_entry/add_manifest_entry, as tools/add_weights.py does."""
    root = tmp_path_factory.mktemp("dense")
    weights, manifest = root / "weights", root / "weights_manifest.json"
    weights.mkdir()
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    categories = ["background", "shirt", "boot", "bag", "sneaker"]
    out = {"weights": weights, "manifest": manifest, "x": x, "ref": {}}
    for task, arch in DENSE.items():
        torch.manual_seed(0)
        model = frostnet.get_model(arch, num_classes=5)
        # BN statistics of real inputs, as any trained model has: with the initial ones (mean 0,
        # var 1) a deep random network's activations grow to scales the INT8 loader refuses
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.momentum = None  # cumulative average
        with torch.no_grad():
            for i in range(4):  # a detector's tensor network (its training forward needs targets)
                getattr(model, "body", model)(torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(10 + i)))
        model.eval()
        fp32 = weights / f"{arch}.{DENSE_TAG}.fp32.safetensors"
        save_fp32(model, fp32, arch=arch, num_classes=5)
        int8 = quant.quantize_ptq(model, [torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))], "x86")
        hub.export_int8(int8, "x86", weights / f"{arch}.{DENSE_TAG}.int8_x86.safetensors", arch=arch,
                        builder_kwargs={"num_classes": 5})
        for path in (fp32, weights / f"{arch}.{DENSE_TAG}.int8_x86.safetensors"):
            name, entry = hub.make_manifest_entry(
                path, dataset=DENSE_TAG, categories=categories, input_size=(3, 64, 64), mean=[0.5] * 3,
                std=[0.25] * 3, default=True, recipe="python tools/train.py --task " + task + " --output-dir /x/y")
            hub.add_manifest_entry(name, entry, manifest_path=manifest)
        with torch.no_grad():
            out["ref"][arch] = {"fp32": model(x), "int8": int8(x)}
    return out


def _same(a, b):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(u, v) for u, v in zip(a, b))
    return torch.equal(a, b)


@pytest.mark.parametrize("task", sorted(DENSE))
def test_dense_models_take_weights_quantized_backend(dense_zoo, monkeypatch, task):
    arch = DENSE[task]
    monkeypatch.setenv("FROSTNET_MANIFEST", str(dense_zoo["manifest"]))
    monkeypatch.setenv("FROSTNET_WEIGHTS_DIR", str(dense_zoo["weights"]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    x, ref = dense_zoo["x"], dense_zoo["ref"][arch]
    fp32 = frostnet.get_model(arch, weights="DEFAULT").eval()
    assert fp32.weights_meta["name"] == f"{arch}.{DENSE_TAG}.fp32" and fp32.weights_meta["task"] == task
    assert fp32.weights_meta["recipe"].endswith("--output-dir runs/y")
    int8 = frostnet.get_model(arch, weights="DEFAULT", quantized=True, backend="x86")
    hubbed = torch.hub.load(str(ROOT), arch, source="local", trust_repo=True, weights="DEFAULT", quantized=True)
    with torch.no_grad():
        assert _same(fp32(x), ref["fp32"])
        assert _same(int8(x), ref["int8"]) and _same(hubbed(x), ref["int8"])  # INT8 rebuilt bit for bit
    with pytest.warns(UserWarning, match="except the classifier head for num_classes=6"):
        five = frostnet.get_model(arch, weights="DEFAULT", num_classes=6)
    assert five.reset_keys and all(k not in five.reset_keys for k in fp32.state_dict() if "weight" in k and
                                   fp32.state_dict()[k].shape == five.state_dict()[k].shape)
    with pytest.raises(ValueError, match=r"backend='qnnpack' conflicts with weights .*converted for 'x86'"):
        frostnet.get_model(arch, weights=f"{arch}.{DENSE_TAG}.int8_x86", quantized=True, backend="qnnpack")
    with pytest.raises(ValueError, match=r"no default INT8 \(qnnpack\) weights exist"):
        frostnet.get_model(arch, weights="DEFAULT", quantized=True, backend="qnnpack")
