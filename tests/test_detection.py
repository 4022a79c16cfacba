"""Detectors: SSD machinery (box coding, priors, matching, hard negatives, NMS), every registered
detector in eval and train mode, fusion, QAT -> INT8 on x86 and qnnpack, parameter parity.

Most tests run at 64x64-128x128: priors follow the feature-map sizes of the actual input, so
small inputs exercise the same code as 300x300 (only the 300x300 checks use 300x300).
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode
from torchvision.ops import box_convert, box_iou

import frostnet
from frostnet import quant
from frostnet.models.detection import (
    BoxCoder,
    PriorSpec,
    hard_negative_mask,
    make_priors,
    match_priors,
    multibox_loss,
    postprocess_detections,
)
from frostnet.models import ConvBNAct
from frostnet.models.detection.loss import match_priors_batch, pad_targets
from frostnet.models.ssdlite import SSDLITE_PRIORS
from frostnet.models.tiny_dsod import TINY_DSOD_PRIORS

DETECTORS = frostnet.list_models(task="detection")
BACKENDS = ["x86", "qnnpack"]


# one intra-op thread: tiny tensors on 2 shared cores (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_thread")


def _targets(size, *, empty_second=True):
    """One image with two boxes (pixels of a ``size`` x ``size`` input), optionally one without any."""
    s = size / 128
    first = {"boxes": torch.tensor([[10.0, 20.0, 70.0, 100.0], [70.0, 10.0, 120.0, 60.0]]) * s,
             "labels": torch.tensor([3, 12])}
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    return [first, empty if empty_second else first]


def _num_params(module):
    return sum(p.numel() for p in module.parameters())


def _settle_for_comparison(model, x, targets):
    """Bring a QAT model trained for a few steps into a state where eval-mode fake quantization and
    INT8 can be compared, as long training would:

    1. BN statistics re-estimated exactly and frozen: running statistics lag far behind after a few
       steps, so eval activations would differ from everything the observers saw.
    2. Activation ranges re-observed on ``x`` and frozen: values beyond a range saturate at the
       backend's quant_max in fake quantization (127 on x86) but at 255 in INT8 kernels.
    """
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average: one pass gives the exact batch statistics
    # 4 noisy copies: two samples would give degenerate variances on 1x1 maps
    batch = torch.cat([x] + [x + 0.05 * torch.randn_like(x) for _ in range(3)])
    with torch.no_grad():
        model.train()(batch, list(targets) * 4)
    quant.freeze_bn_stats(model)  # training-mode passes now normalize exactly as eval mode does
    for name, m in model.named_modules():
        if name.endswith("activation_post_process") and quant.is_fake_quant_module(m):
            m.activation_post_process.reset_min_max_vals()
    with torch.no_grad():
        model.train()(x, targets)
    quant.disable_observer(model)  # eval calls must not move the ranges convert will use
    model.eval()


# ---- registry, forward, train ---------------------------------------------------------------------


def test_registry_lists_the_detectors():
    assert {"ssdlite_mobilenet_v2", "tiny_dsod", "ssdlite_frostnet_small_1_0", "ssdlite_frostnet_base_1_0",
            "ssdlite_frostnet_large_1_0"} <= set(DETECTORS)
    assert all(frostnet.models.get_model_task(n) == "detection" for n in DETECTORS)
    assert not set(DETECTORS) & set(frostnet.list_models("frostnet_*"))


@pytest.mark.parametrize("name", DETECTORS)
def test_eval_returns_detections_and_train_returns_losses(name):
    model = frostnet.get_model(name).eval()
    x = torch.rand(2, 3, 128, 128)
    with torch.no_grad():
        out = model(x)
    assert isinstance(out, list) and len(out) == 2
    for det in out:
        assert set(det) == {"boxes", "scores", "labels"}
        n = det["boxes"].shape[0]
        assert det["boxes"].shape == (n, 4) and det["scores"].shape == (n,) and det["labels"].shape == (n,)
        assert det["labels"].dtype == torch.int64 and 0 < n <= 200
        assert ((det["labels"] >= 1) & (det["labels"] < 21)).all()
        assert (det["boxes"] >= 0).all() and (det["boxes"] <= 128).all()
        assert (det["boxes"][:, 2:] >= det["boxes"][:, :2]).all()
        assert (det["scores"][:-1] >= det["scores"][1:]).all() and (det["scores"] > 0.01).all()

    model.train()
    losses = model(x, _targets(128))  # the second image has no boxes
    assert set(losses) == {"bbox_regression", "classification"}
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())
    sum(losses.values()).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert len(grads) == len(list(model.parameters()))
    assert all(torch.isfinite(g).all() for g in grads)


def test_batch_without_any_box_gives_finite_zero_losses_that_backpropagate():
    model = frostnet.get_model("tiny_dsod").train()
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    losses = model(torch.rand(2, 3, 64, 64), [empty, empty])
    assert all(torch.isfinite(v) and v == 0 for v in losses.values())
    sum(losses.values()).backward()  # a graph exists, gradients are zero
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_list_input_equals_batched_tensor():
    model = frostnet.get_model("ssdlite_mobilenet_v2").eval()
    x = torch.rand(2, 3, 96, 96)
    with torch.no_grad():
        a, b = model(x), model(list(x))
    for da, db in zip(a, b):
        torch.testing.assert_close(da["boxes"], db["boxes"])
        torch.testing.assert_close(da["scores"], db["scores"])


def test_feature_maps_and_priors_at_300():
    ssd = frostnet.get_model("ssdlite_mobilenet_v2").eval()
    dsod = frostnet.get_model("tiny_dsod").eval()
    x = torch.rand(1, 3, 300, 300)
    with torch.no_grad():
        ssd_maps = [tuple(loc.shape[-2:]) for loc, _ in ssd.body(x)]
        dsod_maps = [tuple(loc.shape[-2:]) for loc, _ in dsod.body(x)]
        loc, conf, priors = ssd.raw_outputs(x)
    assert ssd_maps == [(19, 19), (10, 10), (5, 5), (3, 3), (2, 2), (1, 1)]
    assert dsod_maps == [(38, 38), (19, 19), (10, 10), (5, 5), (3, 3), (2, 2)]
    assert SSDLITE_PRIORS.num_anchors == (3, 6, 6, 6, 6, 6)
    assert TINY_DSOD_PRIORS.num_anchors == (4, 6, 6, 6, 4, 4)
    assert loc.shape == (1, 1917, 4) and conf.shape == (1, 1917, 21) and priors.shape == (1917, 4)
    assert TINY_DSOD_PRIORS.num_priors(dsod_maps) == 8744


# ---- priors and box coding ------------------------------------------------------------------------


def test_priors_step_is_image_over_map_size_and_boxes_are_clipped():
    spec = PriorSpec.ssd([0.2, 0.9], [0.3, 1.2], [[2.0], [2.0]])
    priors = make_priors(spec, [(3, 5), (2, 2)])
    assert priors.shape == (3 * 5 * 4 + 2 * 2 * 4, 4)
    corners = box_convert(priors, "cxcywh", "xyxy")
    assert (corners >= 0).all() and (corners <= 1).all()
    # unclipped centres of the 2x2 level sit at 1/4 and 3/4, none on the border
    raw = make_priors(spec, [(3, 5), (2, 2)], clip=False)
    torch.testing.assert_close(raw[60::4, :2], torch.tensor([[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.75, 0.75]]))
    torch.testing.assert_close(raw[:20:4, 0], (torch.arange(5) + 0.5) / 5)  # first row, x centres
    assert torch.allclose(raw[60, 2:], torch.tensor([0.9, 0.9]))
    assert torch.allclose(raw[61, 2:], torch.tensor([math.sqrt(0.9 * 1.2)] * 2))
    with pytest.raises(ValueError, match=r"got 1 feature maps \[\(3, 5\)\] for 2 prior levels"):
        make_priors(spec, [(3, 5)])


def test_box_coder_round_trip_and_variances():
    coder = BoxCoder((0.1, 0.2))
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(50, 2, generator=g) * 0.6
    boxes = torch.cat([xy, xy + 0.05 + torch.rand(50, 2, generator=g) * 0.3], dim=1)
    priors = torch.cat([torch.rand(50, 2, generator=g), 0.05 + torch.rand(50, 2, generator=g) * 0.5], dim=1)
    torch.testing.assert_close(coder.decode(coder.encode(boxes, priors), priors), boxes, rtol=1e-5, atol=1e-6)
    # a box equal to its prior encodes to zeros; a shift of one prior width is 1 / 0.1 = 10
    prior = torch.tensor([[0.5, 0.5, 0.2, 0.4]])
    same = box_convert(prior, "cxcywh", "xyxy")
    torch.testing.assert_close(coder.encode(same, prior), torch.zeros(1, 4))
    shifted = box_convert(torch.tensor([[0.7, 0.5, 0.2, 0.4 * math.e]]), "cxcywh", "xyxy")
    torch.testing.assert_close(coder.encode(shifted, prior), torch.tensor([[10.0, 0.0, 0.0, 5.0]]))
    with pytest.raises(ValueError, match=r"variances must be two positive numbers.*\(0.1, 0\)"):
        BoxCoder((0.1, 0))


# ---- matching, hard negatives, loss ---------------------------------------------------------------


def test_matcher_thresholds_and_forces_each_gt_to_its_best_prior():
    priors = box_convert(torch.tensor([
        [0.0, 0.0, 0.4, 0.4],    # 0: IoU 0.62 with gt A
        [0.0, 0.0, 0.5, 0.5],    # 1: IoU 0.64 with A, its best
        [0.6, 0.6, 1.0, 1.0],    # 2: best prior of the small gt B (IoU 0.0625 < 0.5)
        [0.5, 0.0, 1.0, 0.3],    # 3: nothing
    ]), "xyxy", "cxcywh")
    gt = torch.tensor([[0.05, 0.05, 0.45, 0.45], [0.9, 0.9, 1.0, 1.0]])
    boxes, labels = match_priors(gt, torch.tensor([5, 9]), priors, 0.5)
    assert labels.tolist() == [5, 5, 9, 0]  # B is matched despite IoU 0.0625
    torch.testing.assert_close(boxes[2], gt[1])

    # a prior that a gt claims as its best goes to that gt even if another overlaps it more
    priors = box_convert(torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 1.0, 1.0]]), "xyxy", "cxcywh")
    gt = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 0.45, 0.45]])  # both prefer prior 0
    _, labels = match_priors(gt, torch.tensor([1, 2]), priors, 0.5)
    assert labels.tolist() == [2, 0]  # the later gt wins the shared best prior (SSD's rule); prior 1: IoU 0.25

    boxes, labels = match_priors(torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), priors)
    assert boxes.shape == (2, 4) and labels.tolist() == [0, 0]


def test_hard_negative_mining_keeps_three_negatives_per_positive():
    loss = torch.tensor([[0.1, 9.0, 5.0, 0.2, 4.0, 8.0, 0.3, 7.0, 6.0, 0.4, 3.0, 0.5],
                         [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0],
                         [5.0] * 12])
    positive = torch.zeros(3, 12, dtype=torch.bool)
    positive[0, [1, 5]] = True      # 2 positives, with the two highest losses
    positive[2, :10] = True         # 10 positives, only 2 negatives left
    neg = hard_negative_mask(loss, positive, 3)
    assert neg.sum(1).tolist() == [6, 0, 2]  # row 1 has no positive: no negative either
    assert sorted(neg[0].nonzero().flatten().tolist()) == [2, 4, 7, 8, 10, 11]  # the 6 hardest non-positives
    assert not (neg & positive).any()


def test_multibox_loss_on_a_hand_made_case():
    coder = BoxCoder()
    priors = torch.tensor([[0.25, 0.25, 0.5, 0.5], [0.75, 0.25, 0.5, 0.5], [0.25, 0.75, 0.5, 0.5],
                           [0.75, 0.75, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]])
    gt = {"boxes": torch.tensor([[0.0, 0.0, 0.5, 0.5]]), "labels": torch.tensor([2])}
    loc = torch.randn(1, 5, 4)
    conf = torch.randn(1, 5, 3)
    losses = multibox_loss(loc, conf, priors, [gt], coder)
    # prior 0 is the only positive; the 3 negatives with the highest CE are mined
    ce = F.cross_entropy(conf[0], torch.tensor([2, 0, 0, 0, 0]), reduction="none")
    expected_cls = ce[0] + ce[1:].topk(3).values.sum()
    torch.testing.assert_close(losses["classification"], expected_cls)
    target = coder.encode(gt["boxes"], priors[:1])
    torch.testing.assert_close(losses["bbox_regression"], F.smooth_l1_loss(loc[0, :1], target, reduction="sum"))


def _reference_match_priors(gt_boxes, gt_labels, priors, iou_threshold):
    """The per-image matcher the batched one replaced, kept here only as the reference."""
    if gt_boxes.numel() == 0:
        return priors.new_zeros(priors.shape[0], 4), torch.zeros(priors.shape[0], dtype=torch.int64)
    iou = box_iou(gt_boxes, box_convert(priors, "cxcywh", "xyxy"))
    best_iou, best_gt = iou.max(dim=0)
    for k, p in enumerate(iou.argmax(dim=1).tolist()):  # the later gt wins a shared best prior
        best_gt[p] = k
        best_iou[p] = 2.0
    labels = gt_labels[best_gt].clone()
    labels[best_iou < iou_threshold] = 0
    return gt_boxes[best_gt], labels


def _reference_multibox_loss(loc, conf, priors, targets, coder, iou_threshold=0.5, neg_pos_ratio=3):
    """The per-image-loop MultiBox loss (before vectorising), kept here only as the reference."""
    matched, labels = zip(*(_reference_match_priors(t["boxes"], t["labels"], priors, iou_threshold)
                            for t in targets))
    labels = torch.stack(labels)
    positive = labels > 0
    num_pos = positive.sum().clamp(min=1)
    loc_target = coder.encode(torch.stack(matched)[positive], priors.expand_as(loc)[positive])
    bbox = F.smooth_l1_loss(loc[positive], loc_target, reduction="sum")
    ce = F.cross_entropy(conf.flatten(0, 1), labels.flatten(), reduction="none").view_as(labels)
    selected = positive | hard_negative_mask(ce, positive, neg_pos_ratio)
    return {"bbox_regression": bbox / num_pos, "classification": ce[selected].sum() / num_pos}


def _random_targets(gen, batch, max_boxes, num_classes):
    """Normalized xyxy targets with 0..max_boxes boxes per image (empty images included)."""
    targets = []
    for i in range(batch):
        k = 0 if i % 4 == 1 else int(torch.randint(0, max_boxes + 1, (1,), generator=gen))
        xy = torch.rand(k, 2, generator=gen) * 0.8
        wh = 0.02 + torch.rand(k, 2, generator=gen) * (1 - xy - 0.02).clamp(min=0.01)
        boxes = torch.cat([xy, (xy + wh).clamp(max=1.0)], dim=1)
        targets.append({"boxes": boxes, "labels": torch.randint(1, num_classes, (k,), generator=gen)})
    return targets


@pytest.mark.parametrize("spec", [SSDLITE_PRIORS, TINY_DSOD_PRIORS], ids=["ssdlite", "tiny_dsod"])
def test_batched_loss_equals_the_per_image_loop_reference(spec):
    gen = torch.Generator().manual_seed(14)
    coder = BoxCoder()
    sizes = [(8, 8), (4, 4), (2, 2), (1, 1), (1, 1), (1, 1)][:spec.num_levels]
    priors = make_priors(spec, sizes)
    for batch, max_boxes in [(1, 3), (5, 6), (8, 12), (3, 0)]:
        targets = _random_targets(gen, batch, max_boxes, 11)
        loc = torch.randn(batch, priors.shape[0], 4, generator=gen, requires_grad=True)
        conf = torch.randn(batch, priors.shape[0], 11, generator=gen, requires_grad=True)
        got = multibox_loss(loc, conf, priors, targets, coder)
        want = _reference_multibox_loss(loc, conf, priors, targets, coder)
        for key in want:
            torch.testing.assert_close(got[key], want[key])
            grad_got = torch.autograd.grad(got[key], (loc, conf), allow_unused=True, retain_graph=True)
            grad_want = torch.autograd.grad(want[key], (loc, conf), allow_unused=True, retain_graph=True)
            for g, w in zip(grad_got, grad_want):
                assert (g is None) == (w is None)
                if g is not None:
                    torch.testing.assert_close(g, w)
        boxes, labels, valid = pad_targets(targets)
        matched, lab = match_priors_batch(boxes, labels, valid, priors, 0.5)
        for i, t in enumerate(targets):
            ref_boxes, ref_labels = _reference_match_priors(t["boxes"], t["labels"], priors, 0.5)
            assert torch.equal(lab[i], ref_labels), f"batch {batch}, image {i}"
            torch.testing.assert_close(matched[i][ref_labels > 0], ref_boxes[ref_labels > 0])


def test_batched_matcher_later_gt_wins_a_shared_best_prior_in_every_image():
    priors = box_convert(torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 1.0, 1.0]]), "xyxy", "cxcywh")
    a, b = [0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 0.45, 0.45]  # both prefer prior 0
    boxes = torch.tensor([[a, b, [0, 0, 0, 0]], [b, a, [0, 0, 0, 0]], [a, b, a]])
    labels = torch.tensor([[1, 2, 0], [1, 2, 0], [1, 2, 3]])
    valid = torch.tensor([[True, True, False], [True, True, False], [True, True, True]])
    _, got = match_priors_batch(boxes, labels, valid, priors, 0.5)
    # image 0 and 1: gt 1 claims prior 0 last; image 2: gt 2 (a duplicate of gt 0) is later still
    assert got[:, 0].tolist() == [2, 2, 3]
    # padding never claims a prior: a padded row equal to a real box changes nothing
    valid[2, 2] = False
    _, got = match_priors_batch(boxes, labels, valid, priors, 0.5)
    assert got[2, 0].item() == 2


def test_pad_targets_shapes_and_mask():
    targets = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
               {"boxes": torch.rand(3, 4), "labels": torch.tensor([1, 2, 3])}]
    boxes, labels, valid = pad_targets(targets)
    assert boxes.shape == (2, 3, 4) and labels.tolist() == [[0, 0, 0], [1, 2, 3]]
    assert valid.tolist() == [[False] * 3, [True] * 3]
    boxes, labels, valid = pad_targets(targets[:1])
    assert boxes.shape == (1, 0, 4) and valid.shape == (1, 0)


def test_loss_bad_target_count_and_empty_targets_raise():
    priors = make_priors(SSDLITE_PRIORS, [(2, 2)] + [(1, 1)] * 5)
    loc, conf = torch.zeros(2, priors.shape[0], 4), torch.zeros(2, priors.shape[0], 3)
    with pytest.raises(ValueError, match="got 1 targets for a batch of 2 images"):
        multibox_loss(loc, conf, priors, _random_targets(torch.Generator(), 1, 2, 3), BoxCoder())
    with pytest.raises(ValueError, match="at least one target"):
        pad_targets([])


# ---- post-processing ------------------------------------------------------------------------------


def test_postprocess_threshold_nms_and_empty_results():
    coder = BoxCoder()
    priors = torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.31, 0.3, 0.2, 0.2], [0.7, 0.7, 0.2, 0.2]])
    loc = torch.zeros(2, 3, 4)
    conf = torch.full((2, 3, 4), -10.0)
    conf[..., 0] = 10.0                               # everything background ...
    conf[0, 0, 2] = conf[0, 1, 2] = 10.0               # ... except two overlapping class-2 boxes
    conf[0, 1, 3] = 10.0                               # and the same box as class 3
    dets = postprocess_detections(loc, conf, priors, (100, 200), coder)
    first, second = dets
    assert sorted(first["labels"].tolist()) == [2, 3]  # NMS is per class
    torch.testing.assert_close(first["boxes"][first["labels"] == 2], torch.tensor([[40.0, 20.0, 80.0, 40.0]]))
    # no score above 0.01: empty tensors of the right shape and dtype
    assert second["boxes"].shape == (0, 4) and second["scores"].shape == (0,) and second["labels"].shape == (0,)
    assert second["boxes"].dtype == torch.float32 and second["labels"].dtype == torch.int64
    # limits
    few = postprocess_detections(loc, conf, priors, (100, 200), coder, score_thresh=0.0, detections_per_img=2)
    assert few[0]["boxes"].shape == (2, 4)


def test_model_with_no_detection_above_threshold_returns_empty_tensors():
    model = frostnet.get_model("ssdlite_mobilenet_v2", score_thresh=1.0).eval()
    with torch.no_grad():
        out = model(torch.rand(1, 3, 64, 64))
    assert out[0]["boxes"].shape == (0, 4) and out[0]["scores"].shape == (0,) and out[0]["labels"].shape == (0,)


# ---- fusion and quantization ----------------------------------------------------------------------


@pytest.mark.parametrize("name", DETECTORS)
def test_eval_fusion_preserves_outputs_and_leaves_no_batchnorm(name):
    model = frostnet.get_model(name).eval()
    for m in model.modules():  # non-trivial BN statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    x = torch.rand(1, 3, 96, 96)
    with torch.no_grad():
        ref = model.raw_outputs(x)[:2]
        model.fuse_model()
        fused = model.raw_outputs(x)[:2]
    for a, b in zip(ref, fused):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    model.fuse_model()  # idempotent


def _float_convs(model):
    return [n for n, m in model.named_modules() if type(m) is torch.nn.Conv2d]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", DETECTORS)
def test_qat_train_step_convert_int8(name, backend):
    model = frostnet.get_model(name)
    float_params = {id(p) for p in model.parameters()}
    quant.prepare_qat(model, backend)
    assert {id(p) for p in model.parameters()} == float_params  # an optimizer carries over
    # QAT fusion: every Conv-BN(-ReLU) became one module that keeps BN for training
    assert all(isinstance(m.conv[1], torch.nn.Identity) for m in model.modules() if isinstance(m, ConvBNAct))
    x = torch.rand(2, 3, 64, 64)
    # Adam bounds the step: fake-quantized BN nets from scratch see huge gradients at first
    # (the instability StatAssist addresses), and one SGD step can blow the activations up
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = model(x, _targets(64))
    opt.zero_grad()
    sum(losses.values()).backward()
    opt.step()
    _settle_for_comparison(model, x, _targets(64))
    with torch.no_grad():
        fake_loc, fake_conf, _ = model.raw_outputs(x)
    int8 = quant.convert(model, backend)
    assert quant.is_quantized_model(int8)
    # everything but the FP32 last layers is INT8
    float_convs = _float_convs(int8)
    assert float_convs and all(any(c.startswith(f) for f in int8.float_modules) for c in float_convs), float_convs
    assert len(float_convs) == len(int8.float_modules)
    assert not any(isinstance(m, quant.FloatFunctional) for m in int8.modules())
    with torch.no_grad():
        loc, conf, _ = int8.raw_outputs(x)
        dets = int8(x)
    assert len(dets) == 2 and all(d["boxes"].shape[1] == 4 for d in dets)
    assert F.cosine_similarity(loc.flatten(), fake_loc.flatten(), dim=0) > 0.99
    assert F.cosine_similarity(conf.flatten(), fake_conf.flatten(), dim=0) > 0.99


@pytest.mark.parametrize("backend", BACKENDS)
def test_trained_int8_detects_what_fake_quant_detects(backend):
    """After QAT has learned a fixed batch (decisive scores), INT8 finds the fake-quant model's
    confident detections and nothing else confident."""
    model = frostnet.get_model("ssdlite_mobilenet_v2")
    x = torch.rand(2, 3, 64, 64)
    targets = _targets(64, empty_second=False)
    quant.prepare_qat(model, backend)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(20):
        losses = model(x, targets)
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
    _settle_for_comparison(model, x, targets)
    with torch.no_grad():
        fake = model(x)
        int8 = quant.convert(model, backend)(x)
    for f, q in zip(fake, int8):
        assert f["scores"][0] > 0.9  # decisive
        # every confident detection of one model is found by the other: same label, IoU > 0.9
        for a, b in ((f, q), (q, f)):
            confident = a["scores"] > 0.5
            assert confident.any()
            for box, label in zip(a["boxes"][confident], a["labels"][confident]):
                same = b["labels"] == label
                assert same.any() and box_iou(box[None], b["boxes"][same]).max() > 0.9, (box, label)


# ---- parameter and MAC parity ---------------------------------------------------------------------


def test_ssdlite_mobilenet_v2_matches_the_mobilenet_v2_paper():
    model = frostnet.get_model("ssdlite_mobilenet_v2")
    assert _num_params(model.body.backbone) == 2_223_872  # MobileNetV2 1.0 without its classifier
    assert _num_params(model) == 3_355_833  # 21 classes; the StatAssist paper lists 2.95M
    # The MobileNetV2 paper (Tables 5-6) counts SSDLite for 80 classes (+ background): 2.1M for
    # the extra layers and heads, 4.3M with the backbone.
    coco = frostnet.get_model("ssdlite_mobilenet_v2", num_classes=81)
    assert math.isclose(_num_params(coco.body) - _num_params(coco.body.backbone), 2.1e6, rel_tol=0.01)
    assert math.isclose(_num_params(coco), 4.3e6, rel_tol=0.01)


def test_tiny_dsod_matches_the_reference_build():
    model = frostnet.get_model("tiny_dsod")
    heads = _num_params(model.body.head)
    # shared/specs/baselines.md: 1.69M = 0.82M backbone + 0.87M heads, 1.32 GMACs at 300x300
    assert math.isclose(heads, 0.87e6, rel_tol=0.01)
    assert math.isclose(_num_params(model) - heads, 0.82e6, rel_tol=0.02)
    assert math.isclose(_num_params(model), 1.69e6, rel_tol=0.02)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.eval()(torch.rand(1, 3, 300, 300))
    assert math.isclose(counter.get_total_flops() / 2, 1.32e9, rel_tol=0.02)


# ---- bad inputs -----------------------------------------------------------------------------------


def test_odd_input_sizes_work():
    model = frostnet.get_model("tiny_dsod").eval()
    x = torch.rand(1, 3, 97, 131)
    with torch.no_grad():
        loc, _, priors = model.raw_outputs(x)
        det = model(x)[0]
    assert loc.shape[1] == priors.shape[0]
    assert (det["boxes"][:, [0, 2]] <= 131).all() and (det["boxes"][:, [1, 3]] <= 97).all()


@pytest.mark.parametrize("name", ["ssdlite_mobilenet_v2", "tiny_dsod"])
def test_bad_inputs_raise_clear_errors(name):
    model = frostnet.get_model(name).eval()
    with pytest.raises(ValueError, match=r"built for 3 input channels, got 1"):
        model(torch.rand(1, 1, 64, 64))
    with pytest.raises(ValueError, match=r"4-D batch .* got a 3-D tensor of shape \(3, 64, 64\)"):
        model(torch.rand(3, 64, 64))
    with pytest.raises(TypeError, match="floating-point batch, got dtype torch.uint8"):
        model(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"equally sized images .* got shapes \[\(3, 64, 64\), \(3, 64, 80\)\]"):
        model([torch.rand(3, 64, 64), torch.rand(3, 64, 80)])
    model.train()
    x = torch.rand(2, 3, 64, 64)
    with pytest.raises(ValueError, match="training mode and needs targets"):
        model(x)
    with pytest.raises(ValueError, match="got 1 targets for 2 images"):
        model(x, _targets(64)[:1])
    bad = _targets(64)
    bad[0] = {"boxes": bad[0]["boxes"], "labels": torch.tensor([3, 21])}
    with pytest.raises(ValueError, match=r"label 21 out of range; valid labels are 1..20"):
        model(x, bad)
    bad[0] = {"boxes": torch.tensor([[10.0, 10.0, 5.0, 20.0]]), "labels": torch.tensor([1])}
    with pytest.raises(ValueError, match=r"box \[10.0, 10.0, 5.0, 20.0\] has no area"):
        model(x, bad)
    bad[0] = {"boxes": torch.tensor([10.0, 10.0, 15.0, 20.0]), "labels": torch.tensor([1])}
    with pytest.raises(ValueError, match=r"boxes must be \(K, 4\) xyxy, got shape \(4,\)"):
        model(x, bad)


def test_bad_builder_arguments_raise():
    with pytest.raises(ValueError, match=r"num_classes must be an integer >= 2 .*background.*got 1"):
        frostnet.get_model("tiny_dsod", num_classes=1)
    with pytest.raises(ValueError, match=r"nms_thresh must be in \[0, 1\], got 1.5"):
        frostnet.get_model("ssdlite_mobilenet_v2", nms_thresh=1.5)
    with pytest.raises(TypeError, match="num_clases"):
        frostnet.get_model("ssdlite_frostnet_small_1_0", num_clases=3)


def test_single_image_training_batch_reaching_1x1_maps_explains_itself():
    model = frostnet.get_model("ssdlite_mobilenet_v2").train()
    with pytest.raises(ValueError, match=r"batch of 1 image\(s\) of 64x64 reaches a 1x1 feature map.*at least 2"):
        model(torch.rand(1, 3, 64, 64), _targets(64)[:1])
