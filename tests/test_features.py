"""Feature extraction, dilation, and plugging FrostNet into torchvision detectors."""

import pytest
import torch
from torchvision.models.detection import FasterRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

import frostnet
from frostnet import quant
from frostnet.models import FeatureInfo, backbone_with_fpn


@pytest.mark.parametrize("name", frostnet.list_models("frostnet_*_1_0") + ["frostnet_small_0_35"])
def test_features_only_strides_and_channels(name):
    model = frostnet.get_model(name, features_only=True, out_indices=(0, 1, 2, 3, 4)).eval()
    feats = model(torch.randn(1, 3, 128, 96))
    assert [f["reduction"] for f in model.feature_info] == [2, 4, 8, 16, 32]
    for f, info in zip(feats, model.feature_info):
        assert f.shape[1] == info["num_chs"]
        assert f.shape[-2:] == (128 // info["reduction"], 96 // info["reduction"])
    if name == "frostnet_small_1_0":
        assert [f["num_chs"] for f in model.feature_info] == [32, 24, 40, 96, 320]
    assert not hasattr(model, "classifier")


def test_feature_info_describes_the_returned_taps():
    model = frostnet.get_model("frostnet_small_1_0", features_only=True, out_indices=(2, 4)).eval()
    feats = model(torch.randn(1, 3, 64, 64))
    assert isinstance(model.feature_info, FeatureInfo) and len(model.feature_info) == len(feats) == 2
    assert model.feature_info.channels() == [f.shape[1] for f in feats] == [40, 320]
    assert model.feature_info.reduction() == [8, 32] and [f.shape[-1] for f in feats] == [8, 2]
    assert model.feature_info.module_names() == ["layer2", "layer5"]
    assert [f["index"] for f in model.feature_info] == [2, 4]
    default = frostnet.get_model("frostnet_small_1_0", features_only=True)
    assert default.feature_info.reduction() == [4, 8, 16, 32]
    # a classifier describes every tap, for backbone_with_fpn to choose from
    assert frostnet.get_model("frostnet_small_1_0").feature_info.reduction() == [2, 4, 8, 16, 32]
    with pytest.raises(ValueError, match=r"out_indices \(0, 7\) must be taps 0..3"):
        FeatureInfo(default.feature_info, (0, 7))


def test_out_indices_without_features_only_raises():
    with pytest.raises(ValueError, match=r"out_indices=\(2, 4\) only applies with features_only=True"):
        frostnet.get_model("frostnet_small_1_0", out_indices=(2, 4))


def test_features_only_builds_only_the_stages_it_needs():
    model = frostnet.get_model("frostnet_small_1_0", features_only=True, out_indices=(1, 2))
    assert not hasattr(model, "layer3") and len(model(torch.randn(1, 3, 64, 64))) == 2


@pytest.mark.parametrize("output_stride", [16, 8])
def test_dilation_keeps_resolution_and_parameter_shapes(output_stride):
    base = frostnet.get_model("frostnet_base_1_0", features_only=True)
    dilated = frostnet.get_model("frostnet_base_1_0", features_only=True, output_stride=output_stride)
    dilated.load_state_dict(base.state_dict())  # the same weights: only strides/dilations differ
    feats = dilated.eval()(torch.randn(1, 3, 128, 128))
    assert dilated.feature_info.reduction() == [min(r, output_stride) for r in (4, 8, 16, 32)]
    assert feats[-1].shape[-2:] == (128 // output_stride, 128 // output_stride)
    dw = [m for m in dilated.modules() if isinstance(m, torch.nn.Conv2d) and m.groups > 1]
    assert max(m.dilation[0] for m in dw) == 32 // output_stride
    assert all(m.padding[0] == (m.kernel_size[0] - 1) // 2 * m.dilation[0] for m in dw)


def test_dilated_shorthand_is_output_stride_16():
    model = frostnet.get_model("frostnet_small_1_0", dilated=True).eval()
    assert model.feature_info[-1]["reduction"] == 16
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


def test_features_only_converts_to_int8():
    model = frostnet.get_model("frostnet_small_0_5", features_only=True)
    quant.prepare_qat(model, "x86")
    model(torch.randn(2, 3, 64, 64))
    int8 = quant.convert(model.eval(), "x86")
    feats = int8(torch.randn(1, 3, 64, 64))
    assert [f.shape[1] for f in feats] == model.feature_info.channels()
    assert all(f.dtype == torch.float32 for f in feats)


def test_faster_rcnn_with_frostnet_fpn():
    backbone = backbone_with_fpn(frostnet.get_model("frostnet_small_0_5"), out_channels=64)
    model = FasterRCNN(backbone, num_classes=5, min_size=128, max_size=160).eval()
    with torch.no_grad():
        out = model([torch.rand(3, 128, 150)])
    assert set(out[0]) == {"boxes", "scores", "labels"}
    model.train()
    losses = model([torch.rand(3, 128, 150)], [{"boxes": torch.tensor([[10.0, 20.0, 80.0, 90.0]]), "labels": torch.tensor([2])}])
    sum(losses.values()).backward()
    assert backbone.body.conv1.conv[0].weight.grad is not None


def test_retinanet_with_frostnet_fpn():
    body = frostnet.get_model("frostnet_large_0_5", features_only=True, out_indices=(2, 3, 4))
    backbone = backbone_with_fpn(body, out_indices=(2, 3, 4), out_channels=64, extra_blocks=LastLevelP6P7(64, 64))
    anchors = AnchorGenerator(tuple((s,) for s in (32, 64, 128, 256, 512)), ((0.5, 1.0, 2.0),) * 5)
    model = RetinaNet(backbone, num_classes=3, anchor_generator=anchors, min_size=128, max_size=128).eval()
    with torch.no_grad():
        out = model([torch.rand(3, 128, 128), torch.rand(3, 96, 128)])
    assert len(out) == 2 and out[0]["boxes"].shape[-1] == 4


def test_backbone_with_fpn_rejects_bad_taps():
    with pytest.raises(ValueError, match=r"out_indices \(1, 9\) must be taps the model has: 0=conv1, 1=layer1"):
        backbone_with_fpn(frostnet.get_model("frostnet_small_0_35"), out_indices=(1, 9))
    # a features_only model offers only the taps it returns
    with pytest.raises(ValueError, match=r"must be taps the model has: 2=layer2, 3=layer3, 4=layer5"):
        backbone_with_fpn(frostnet.get_model("frostnet_small_0_35", features_only=True, out_indices=(2, 3, 4)),
                          out_indices=(1, 2))
    with pytest.raises(TypeError, match="has no FeatureInfo feature_info; pass a FrostNet"):
        backbone_with_fpn(torch.nn.Conv2d(3, 3, 1))
