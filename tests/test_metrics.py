"""Metrics against hand-computed values: top-1, the segmentation confusion matrix (mIoU, pixel
accuracy, ignore index) and COCO mAP through pycocotools (IoU thresholds, false positives, empty
images)."""

import math

import pytest
import torch
import torch.nn.functional as F

from frostnet.metrics import (
    TASKS,
    ClassificationMetric,
    DetectionMetric,
    SegmentationMetric,
    metric_for_task,
)

# ---- classification -------------------------------------------------------------------------------


def test_classification_top1_and_loss_over_batches():
    metric = ClassificationMetric(num_classes=3)
    a = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 3.0]])
    b = torch.tensor([[0.0, 5.0, 0.0]])
    metric.update(a, torch.tensor([0, 1]))  # right, wrong
    metric.update(b, torch.tensor([1]))  # right
    out = metric.compute()
    assert out["n"] == 3 and out["top1"] == pytest.approx(200 / 3)
    expected = (F.cross_entropy(a, torch.tensor([0, 1]), reduction="sum") + F.cross_entropy(b, torch.tensor([1]))) / 3
    assert out["loss"] == pytest.approx(expected.item())
    assert ClassificationMetric.primary in out


def test_classification_bad_inputs_raise():
    metric = ClassificationMetric(num_classes=3)
    with pytest.raises(ValueError, match="target class 3 out of range; valid classes are 0..2"):
        metric.update(torch.zeros(1, 3), torch.tensor([3]))
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        metric.update(torch.zeros(2, 3), torch.tensor([0]))
    with pytest.raises(ValueError, match="logits have 4 classes, the metric was built for 3"):
        metric.update(torch.zeros(1, 4), torch.tensor([0]))
    assert math.isnan(metric.compute()["top1"])  # nothing was counted


# ---- segmentation ---------------------------------------------------------------------------------


def test_segmentation_perfect_prediction_gives_one():
    target = torch.randint(0, 4, (2, 8, 8))
    metric = SegmentationMetric(4)
    metric.update(F.one_hot(target, 4).permute(0, 3, 1, 2).float() * 10, target)
    out = metric.compute()
    assert out["miou"] == 1.0 and out["pixel_acc"] == 1.0


def test_segmentation_hand_built_confusion():
    # target [0, 0, 1, 1], prediction [0, 1, 1, 1]: confusion rows (target) [[1, 1], [0, 2]]
    metric = SegmentationMetric(2)
    metric.update(torch.tensor([[[0, 1], [1, 1]]]), torch.tensor([[[0, 0], [1, 1]]]))
    assert metric.confusion.tolist() == [[1, 1], [0, 2]]
    out = metric.compute()
    # IoU0 = 1 / (2 + 1 - 1) = 1/2, IoU1 = 2 / (2 + 3 - 2) = 2/3
    assert out["iou_per_class"] == pytest.approx([1 / 2, 2 / 3])
    assert out["miou"] == pytest.approx(7 / 12)
    assert out["pixel_acc"] == pytest.approx(3 / 4)
    assert "loss" not in out  # class ids, not logits


def test_segmentation_ignored_pixels_never_count():
    target = torch.tensor([[[0, 1, 255], [2, 255, 1]]])
    logits = torch.randn(1, 3, 2, 3)
    base = SegmentationMetric(3)
    base.update(logits, target)
    changed = logits.clone()
    changed[:, :, target[0] == 255] = torch.randn(3, 2) * 100  # other predictions on ignore pixels only
    other = SegmentationMetric(3)
    other.update(changed, target)
    assert torch.equal(base.confusion, other.confusion) and base.confusion.sum() == 4
    assert base.compute() == other.compute()
    assert base.compute()["loss"] == pytest.approx(F.cross_entropy(logits, target, ignore_index=255).item())


def test_segmentation_miou_over_occurring_classes_and_loss_over_batches():
    metric = SegmentationMetric(4)
    # class 3 never occurs (nan, left out); class 2 is predicted but never labelled (IoU 0, counts)
    metric.update({"out": F.one_hot(torch.tensor([[[0, 2]]]), 4).permute(0, 3, 1, 2).float()},
                  torch.tensor([[[0, 1]]]))
    metric.update(torch.tensor([[[1, 1]]]), torch.tensor([[[1, 1]]]))
    out = metric.compute()
    iou = out["iou_per_class"]
    assert iou[:3] == pytest.approx([1.0, 2 / 3, 0.0]) and math.isnan(iou[3])
    assert out["miou"] == pytest.approx((1 + 2 / 3 + 0) / 3)
    assert out["loss"] == pytest.approx(F.cross_entropy(  # only the batch that gave logits
        F.one_hot(torch.tensor([[[0, 2]]]), 4).permute(0, 3, 1, 2).float(), torch.tensor([[[0, 1]]])).item())
    empty = SegmentationMetric(4)
    empty.update(torch.tensor([[[0]]]), torch.tensor([[[255]]]))
    assert math.isnan(empty.compute()["miou"]) and math.isnan(empty.compute()["pixel_acc"])


def test_segmentation_bad_inputs_raise():
    metric = SegmentationMetric(3)
    with pytest.raises(ValueError, match=r"mask value 7 is neither a class id \(0..2\) nor the ignore index 255"):
        metric.update(torch.zeros(1, 2, 2, dtype=torch.int64), torch.tensor([[[0, 7], [0, 0]]]))
    with pytest.raises(ValueError, match=r"predictions of shape \(1, 4, 4\) do not match masks of shape \(1, 2, 2\)"):
        metric.update(torch.zeros(1, 3, 4, 4), torch.zeros(1, 2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"logits must be \(N, 3, H, W\)"):
        metric.update(torch.zeros(1, 5, 2, 2), torch.zeros(1, 2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="the key 'out'"):
        metric.update({"aux": torch.zeros(1, 3, 2, 2)}, torch.zeros(1, 2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="predicted class 3 out of range"):
        metric.update(torch.full((1, 2, 2), 3), torch.zeros(1, 2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="ignore_index 0 is a class id"):
        SegmentationMetric(3, ignore_index=0)
    assert metric.confusion.sum() == 0  # nothing half-counted


def test_merge_equals_one_metric_over_everything():
    preds, target = torch.randint(0, 3, (4, 5, 5)), torch.randint(0, 3, (4, 5, 5))
    whole, a, b = SegmentationMetric(3), SegmentationMetric(3), SegmentationMetric(3)
    whole.update(preds, target)
    a.update(preds[:2], target[:2])
    b.update(preds[2:], target[2:])
    a.merge(b)
    assert a.compute() == whole.compute()
    with pytest.raises(ValueError, match="over 4 classes"):
        a.merge(SegmentationMetric(4))
    with pytest.raises(TypeError, match="cannot merge a DetectionMetric into a SegmentationMetric"):
        a.merge(DetectionMetric())


# ---- detection ------------------------------------------------------------------------------------


def _gt(*boxes, labels=None):
    boxes_t = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    return {"boxes": boxes_t, "labels": torch.tensor(labels or [1] * len(boxes), dtype=torch.int64)}


def _det(*boxes, scores, labels=None):
    out = _gt(*boxes, labels=labels)
    out["scores"] = torch.tensor(scores, dtype=torch.float32)
    return out


def _map(detections, targets, num_classes=3):
    metric = DetectionMetric(num_classes)
    metric.update(detections, targets)
    return metric.compute()


def test_detection_perfect_predictions_give_map_one():
    targets = [_gt([10, 10, 50, 60], [60, 20, 90, 90], labels=[1, 2]), _gt([0, 0, 30, 30], labels=[2])]
    dets = [_det(*t["boxes"].tolist(), scores=[0.9] * len(t["labels"]), labels=t["labels"].tolist()) for t in targets]
    out = _map(dets, targets)
    assert (out["map"], out["map_50"], out["map_75"], out["n"]) == pytest.approx((1.0, 1.0, 1.0, 2))


def test_detection_shifted_box_passes_only_the_thresholds_below_its_iou(capsys):
    # IoU = 62.5 * 100 / (100 * 100) = 0.625: matches at .50, .55, .60 and none of the 7 higher thresholds
    out = _map([_det([0, 0, 100, 62.5], scores=[0.9])], [_gt([0, 0, 100, 100])])
    assert out["map_50"] == pytest.approx(1.0) and out["map_75"] == 0.0
    assert out["map"] == pytest.approx(3 / 10)
    assert capsys.readouterr().out == ""  # COCOeval's printing is silenced


def test_detection_higher_scored_false_positive_halves_ap():
    gt = _gt([0, 0, 40, 40])
    fp = [60, 60, 90, 90]
    # ranked FP then TP: precision 1/2 at recall 1 -> interpolated precision 1/2 everywhere
    assert _map([_det(fp, [0, 0, 40, 40], scores=[0.9, 0.8])], [gt])["map"] == pytest.approx(0.5)
    # ranked TP then FP: full recall already at precision 1
    assert _map([_det(fp, [0, 0, 40, 40], scores=[0.7, 0.8])], [gt])["map"] == pytest.approx(1.0)
    # the FP on another image without ground truth counts the same way
    out = _map([_det([0, 0, 40, 40], scores=[0.8]), _det(fp, scores=[0.9])], [gt, _gt()])
    assert out["map"] == pytest.approx(0.5) and out["n"] == 2


def test_detection_classes_are_averaged_and_wrong_class_does_not_match():
    targets = [_gt([0, 0, 40, 40], [50, 50, 90, 90], labels=[1, 2])]
    dets = [_det([0, 0, 40, 40], [50, 50, 90, 90], scores=[0.9, 0.9], labels=[1, 1])]
    assert _map(dets, targets)["map"] == pytest.approx(0.5)  # class 1: AP 1 (FP ranks level); class 2: AP 0


def test_detection_empty_inputs():
    gt = _gt([0, 0, 40, 40])
    none = _det(scores=[])
    assert _map([none, none], [gt, _gt()])["map"] == 0.0  # no detections anywhere
    out = _map([none, _det([0, 0, 10, 10], scores=[0.5])], [_gt(), _gt()])  # no ground truth anywhere
    assert math.isnan(out["map"]) and out["n"] == 2
    assert math.isnan(DetectionMetric().compute()["map"])
    plain_empty = {"boxes": torch.tensor([]), "labels": torch.tensor([])}  # float, shape (0,)
    assert _map([{**plain_empty, "scores": torch.tensor([])}], [plain_empty])["n"] == 1


def test_detection_merge_and_reset():
    targets = [_gt([0, 0, 40, 40]), _gt([10, 10, 30, 30])]
    dets = [_det([0, 0, 40, 40], scores=[0.9]), _det([50, 50, 60, 60], scores=[0.9])]
    a, b = DetectionMetric(3), DetectionMetric(3)
    a.update(dets[:1], targets[:1])
    b.update(dets[1:], targets[1:])
    a.merge(b)
    assert a.compute() == _map(dets, targets)
    a.reset()
    assert a.compute()["n"] == 0


def test_detection_bad_inputs_raise():
    metric = DetectionMetric(3)
    with pytest.raises(ValueError, match="detections for 1 images and targets for 2"):
        metric.update([_det(scores=[])], [_gt(), _gt()])
    with pytest.raises(ValueError, match=r"target 0: label 3 out of range; valid labels are 1..2"):
        metric.update([_det(scores=[])], [_gt([0, 0, 1, 1], labels=[3])])
    with pytest.raises(ValueError, match=r"detection 0 must be a dict with keys \['boxes', 'scores', 'labels'\]"):
        metric.update([_gt()], [_gt()])
    with pytest.raises(ValueError, match=r"detection 0: scores must have shape \(1,\)"):
        metric.update([_det([0, 0, 1, 1], scores=[0.5, 0.4])], [_gt()])
    with pytest.raises(ValueError, match="target 0: box .* has x2 < x1"):
        metric.update([_det(scores=[])], [_gt([5, 5, 1, 9])])
    with pytest.raises(ValueError, match="num_classes must be an integer >= 2"):
        DetectionMetric(1)
    assert metric.targets == []  # a rejected batch adds nothing


# ---- by task --------------------------------------------------------------------------------------


def test_metric_for_task_and_primary_keys():
    kinds = {task: metric_for_task(task, 11) for task in TASKS}
    assert {t: type(m) for t, m in kinds.items()} == {
        "classification": ClassificationMetric, "segmentation": SegmentationMetric, "detection": DetectionMetric}
    assert {t: m.primary for t, m in kinds.items()} == {
        "classification": "top1", "segmentation": "miou", "detection": "map"}
    with pytest.raises(ValueError, match="unknown task 'keypoints'; valid tasks are classification, segmentation, detection"):
        metric_for_task("keypoints", 11)
