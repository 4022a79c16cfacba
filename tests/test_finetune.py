"""Fine-tuning from INT8-ready (QAT-trained) FP32 weights on a dataset with another class count."""

import pytest
import torch
from PIL import Image

import frostnet
from frostnet import hub, quant
from frostnet.recipe import get_args_parser, main
from frostnet.serialization import save_fp32


def _imagefolder(root, classes=("cat", "dog", "owl"), per_class=6):
    g = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for c, name in enumerate(classes):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(per_class):
                # each class has its own dominant colour, so a few steps can learn something
                img = (torch.rand(40, 44, 3, generator=g) * 80).to(torch.uint8)
                img[..., c] += 150
                Image.fromarray(img.numpy()).save(d / f"{i}.png")


@pytest.fixture
def int8_ready_weights(tmp_path):
    """A QAT-trained 10-class FrostNet saved as its latent FP32 weights."""
    model = frostnet.get_model("frostnet_small_0_35", num_classes=10)
    quant.prepare_qat(model, "x86")
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    path = tmp_path / "ready.fp32.safetensors"
    save_fp32(model, path, arch="frostnet_small_0_35", num_classes=10)
    return path


def test_finetune_int8_ready_weights_with_a_new_head(tmp_path, int8_ready_weights):
    _imagefolder(tmp_path / "data")
    out = tmp_path / "ft"
    args = get_args_parser().parse_args([
        "--model", "frostnet_small_0_35", "--data", f"imagefolder:{tmp_path / 'data'}", "--input-size", "32",
        "--mode", "qat-finetune", "--init", str(int8_ready_weights), "--reset-head", "--epochs", "1",
        "--batch-size", "6", "--lr", "0.01", "--workers", "0", "--calib-batches", "1", "--no-progress",
        "--export-backends", "x86", "--output-dir", str(out)])
    final = main(args)
    assert {"fp32_top1", "fake_quant_top1", "int8_x86_top1"} <= set(final) and final["split"] == "val"
    # the backbone came from the file, the head did not
    tensors = hub.load_weights(final["files"]["fp32"]).state_dict()
    assert tensors["classifier.2.weight"].shape == (3, 1280, 1, 1)
    int8 = hub.load_weights(final["files"]["int8_x86"])
    assert quant.is_quantized_model(int8)
    assert int8(torch.randn(2, 3, 32, 32)).shape == (2, 3)


def test_init_with_other_classes_needs_reset_head(tmp_path, int8_ready_weights):
    from frostnet.recipe.engine import load_init

    model = frostnet.get_model("frostnet_small_0_35", num_classes=3)
    with pytest.raises(ValueError, match="shapes differ for classifier.2.bias, classifier.2.weight; .*--reset-head"):
        load_init(model, str(int8_ready_weights))
    load_init(model, str(int8_ready_weights), reset_head=True, verbose=False)
    ref = frostnet.get_model("frostnet_small_0_35", num_classes=10)
    ref.load_state_dict(hub.load_weights(str(int8_ready_weights)).state_dict())
    assert torch.equal(model.layer1[0].conv2.conv[0].weight, ref.layer1[0].conv2.conv[0].weight)
