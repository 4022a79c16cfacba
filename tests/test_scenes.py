"""FashionScenes canvases, the dense batch pipeline (build_dense_data) and tools/make_scenes.py.

Fashion-MNIST is replaced by a tiny IDX fixture whose items are ellipses of one gray value per
item (unique across both files), so a pasted pixel tells which item it came from.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from frostnet.data import (
    EDGE_THRESHOLD,
    FOREGROUND_THRESHOLD,
    IGNORE_INDEX,
    SCENES_CATEGORIES,
    CocoDetection,
    FashionScenes,
    VOCSegmentation,
    write_idx,
)
from frostnet.recipe.dense_data import DenseBatches, build_dense_data

ROOT = Path(__file__).resolve().parents[1]
N_TRAIN, N_TEST, VAL = 100, 30, 20  # train file: items 0..79 train, 80..99 val
# labels and boxes of the first two canvases of FashionScenes(split="test") on the Debian data
PINNED_TEST_CANVASES = [([6, 1], [[28, 31, 82, 75], [47, 65, 87, 113]]),
                        ([5, 3, 7, 3], [[67, 31, 99, 77], [29, 36, 66, 81], [82, 42, 120, 94], [5, 73, 43, 118]])]


def _item_value(file: str, index: int) -> int:
    return 100 + index if file == "train" else 205 + index  # train 100..199, test 205..234


def _make_items(root: Path) -> Path:
    """Fashion-MNIST IDX fixture: item i is a filled ellipse of value _item_value, with a faint rim."""
    yy, xx = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    for file, n, names in (("train", N_TRAIN, ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz")),
                           ("test", N_TEST, ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"))):
        images = torch.zeros(n, 28, 28, dtype=torch.uint8)
        for i in range(n):
            ry, rx = 6 + i % 7, 5 + (i * 3) % 8
            d = ((yy - 14) / ry) ** 2 + ((xx - 14) / rx) ** 2
            images[i][d <= 1.0] = _item_value(file, i)
            images[i][(d > 1.0) & (d <= 1.3)] = 15  # faint rim: foreground, below EDGE_THRESHOLD
        write_idx(root / names[0], images)
        write_idx(root / names[1], (torch.arange(n) % 10).to(torch.uint8))
    return root


@pytest.fixture(scope="module")
def items(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _make_items(tmp_path_factory.mktemp("fashion"))


def _scenes(root: Path, split: str = "train", **kw) -> FashionScenes:
    kw.setdefault("num_images", 12)
    kw.setdefault("size", 64)
    return FashionScenes(root, split, val_size=VAL, **kw)


def _interior(values: torch.Tensor) -> torch.Tensor:
    """Pixels whose 3x3 neighbourhood has one value (inside an item, away from blended edges)."""
    v = values.float()[None, None]
    return (F.max_pool2d(v, 3, 1, 1) == -F.max_pool2d(-v, 3, 1, 1))[0, 0]


# --------------------------------------------------------------------------- #
# FashionScenes
# --------------------------------------------------------------------------- #


def test_scenes_sample_format_and_determinism(items: Path) -> None:
    ds = _scenes(items)
    assert len(ds) == 12 and ds.categories == SCENES_CATEGORIES and SCENES_CATEGORIES[0] == "background"
    image, target = ds[3]
    assert image.shape == (1, 64, 64) and image.dtype == torch.uint8
    assert set(target) == {"boxes", "labels", "masks", "image_id"} and target["image_id"] == 3
    assert target["boxes"].dtype == torch.float32 and target["boxes"].shape[1] == 4
    assert target["labels"].dtype == torch.int64 and target["masks"].dtype == torch.int64
    assert target["masks"].shape == (64, 64)
    assert set(target["masks"].unique().tolist()) <= set(range(11)) | {IGNORE_INDEX}
    # same arguments, fresh object: identical canvas; other index or seed: a different one
    again = _scenes(items)[3]
    assert torch.equal(image, again[0]) and torch.equal(target["boxes"], again[1]["boxes"])
    assert not torch.equal(image, ds[4][0])
    assert not torch.equal(image, _scenes(items, seed=1)[3][0])
    # the cache hands out copies
    image[:] = 0
    target["boxes"][:] = -1
    assert torch.equal(ds[3][0], again[0]) and torch.equal(ds[3][1]["boxes"], again[1]["boxes"])
    assert ds[-1][1]["image_id"] == 11
    with pytest.raises(IndexError, match="12 train canvases"):
        ds[12]


def test_scenes_boxes_masks_and_visibility(items: Path) -> None:
    ds = _scenes(items, num_images=30, items=(3, 6))
    saw_hidden = saw_ignore = False
    for i in range(len(ds)):
        image, target = ds[i]
        mask, scene = target["masks"], ds.scene_items(i)
        kept = [it for it in scene if it.has_box]
        assert target["labels"].tolist() == [it.label for it in kept]
        for it in scene:
            assert it.has_box == (it.visible >= 0.3 * it.foreground and it.visible > 0)
            saw_hidden |= not it.has_box
        for box, it in zip(target["boxes"].tolist(), kept):
            x1, y1, x2, y2 = map(int, box)
            # inside the item's own square, and its region holds its label
            assert it.left <= x1 < x2 <= it.left + it.side and it.top <= y1 < y2 <= it.top + it.side
            region = mask[y1:y2, x1:x2]
            assert bool((region == it.label).any())
            # tight: each edge row/column of the box holds a visible pixel of some item
            for edge in (region[0], region[-1], region[:, 0], region[:, -1]):
                assert bool((edge != 0).any())
        # mask follows the canvas: background is plain 0, items never below the threshold
        assert bool((image[0][mask == 0] == 0).all())
        ignored = mask == IGNORE_INDEX
        assert bool((image[0][ignored] < EDGE_THRESHOLD).all())
        assert bool((image[0][ignored] >= FOREGROUND_THRESHOLD).all())
        labelled = (mask > 0) & ~ignored
        assert bool((image[0][labelled] >= FOREGROUND_THRESHOLD).all())
        saw_ignore |= bool(ignored.any())
    assert saw_hidden and saw_ignore  # the fixture exercises both rules
    # min_visible=1 keeps only items nobody covers; 0 keeps every placed item
    strict, loose = _scenes(items, num_images=30, items=(3, 6), min_visible=1.0), _scenes(
        items, num_images=30, items=(3, 6), min_visible=0.0)
    assert all(it.has_box == (it.visible == it.foreground) for i in range(30) for it in strict.scene_items(i))
    assert sum(len(loose[i][1]["labels"]) for i in range(30)) > sum(len(strict[i][1]["labels"]) for i in range(30))


def test_scenes_no_item_leaks_between_splits(items: Path) -> None:
    pools = {"train": set(range(N_TRAIN - VAL)), "val": set(range(N_TRAIN - VAL, N_TRAIN)), "test": set(range(N_TEST))}
    for split, pool in pools.items():
        ds = _scenes(items, split, num_images=25)
        file = "test" if split == "test" else "train"
        allowed = {_item_value(file, k) for k in pool}
        used = set()
        for i in range(len(ds)):
            assert all(it.source_file == file for it in ds.scene_items(i))
            used |= {it.source_index for it in ds.scene_items(i)}
            # pixel evidence, independent of scene_items: every item interior value is from the pool
            img = ds[i][0][0]
            values = set(img[_interior(img) & (img >= 100)].tolist())
            assert values <= allowed, (split, sorted(values - allowed))
        assert used <= pool and len(used) > 5


def test_scenes_occlusion_off_and_texture(items: Path) -> None:
    apart = _scenes(items, num_images=20, items=(4, 6), occlusion=False)
    assert all(it.visible == it.foreground for i in range(20) for it in apart.scene_items(i))
    overlap = _scenes(items, num_images=20, items=(4, 6))
    assert any(it.visible < it.foreground for i in range(20) for it in overlap.scene_items(i))
    tex = _scenes(items, num_images=3, background="texture")
    image, target = tex[0]
    background = image[0][target["masks"] == 0]
    assert background.float().std() > 5 and bool((background > 0).any())
    # the background has its own random stream: same items and targets as the plain canvas
    plain = _scenes(items, num_images=3)
    assert tex.scene_items(0) == plain.scene_items(0)
    assert torch.equal(target["boxes"], plain[0][1]["boxes"])


@pytest.mark.parametrize("kw, match", [
    ({"split": "dev"}, "unknown FashionScenes split 'dev'; valid: train, val, test"),
    ({"background": "noise"}, "unknown background 'noise'; valid: plain, texture"),
    ({"num_images": -1}, "num_images must be an int >= 0"),
    ({"size": 40}, "size must be an int >= 56"),
    ({"items": (3, 1)}, "items must satisfy"),
    ({"items": (1.5, 2)}, "items must be a pair of ints"),
    ({"scale": (0.0, 1.0)}, "scale must satisfy"),
    ({"min_visible": 1.5}, r"min_visible must be in \[0, 1\]"),
])
def test_scenes_bad_arguments(items: Path, kw: dict, match: str) -> None:
    split = kw.pop("split", "train")
    with pytest.raises(ValueError, match=match):
        _scenes(items, split, **kw)


def test_scenes_val_needs_held_out_items(items: Path) -> None:
    with pytest.raises(ValueError, match="split='val' needs val_size > 0"):
        FashionScenes(items, "val", val_size=0)
    with pytest.raises(FileNotFoundError, match="apt-get install"):
        FashionScenes(items / "missing", "test")


# --------------------------------------------------------------------------- #
# tools/make_scenes.py: COCO and VOC round trips
# --------------------------------------------------------------------------- #


def _tool():
    spec = importlib.util.spec_from_file_location("frostnet_tools_make_scenes", ROOT / "tools" / "make_scenes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_make_scenes_round_trips_through_coco_and_voc(items: Path, tmp_path: Path) -> None:
    tool = _tool()
    ds = _scenes(items, "test", num_images=8, min_visible=0.0)
    paths = tool.write_split(ds, tmp_path)
    assert not list(tmp_path.rglob("*.tmp*"))  # atomic writes leave no temporaries
    coco = CocoDetection(paths["coco_images"], paths["coco_json"])
    voc = VOCSegmentation(tmp_path, split="test")
    assert len(coco) == len(voc) == 8 and coco.classes == SCENES_CATEGORIES
    assert voc.classes[1:] == SCENES_CATEGORIES[1:]
    for i in range(8):
        image, target = ds[i]
        c_image, c_target = coco[i]
        assert torch.equal(c_image[0], image[0]) and c_target["image_id"] == i
        assert torch.equal(c_target["boxes"].as_subclass(torch.Tensor), target["boxes"])
        assert torch.equal(c_target["labels"], target["labels"])
        v_image, v_mask = voc[i]
        assert torch.equal(v_image[0], image[0]) and torch.equal(v_mask.as_subclass(torch.Tensor), target["masks"])
    data = json.loads(paths["coco_json"].read_text())
    assert data["annotations"][0]["bbox"][2] > 0 and data["annotations"][0]["iscrowd"] == 0
    # a second split goes beside the first
    tool.write_split(_scenes(items, "val", num_images=2), tmp_path)
    assert len(VOCSegmentation(tmp_path, split="test")) == 8 and len(VOCSegmentation(tmp_path, split="val")) == 2


def test_make_scenes_cli_and_preview(items: Path, tmp_path: Path) -> None:
    tool = _tool()
    args = tool.get_args_parser().parse_args(["--root", str(items), "--split", "val", "--val-size", str(VAL),
                                              "--num-images", "3", "--output", str(tmp_path / "out"),
                                              "--preview", str(tmp_path / "p.png"), "--preview-count", "2",
                                              "--items", "2-3"])
    assert tool.main(args) == 0
    assert (tmp_path / "out" / "annotations" / "instances_val.json").is_file()
    from PIL import Image

    with Image.open(tmp_path / "p.png") as png:
        assert png.width > 2 * 2 * 128 and png.mode == "RGB"
    with pytest.raises(SystemExit, match="--output DIR.*--stats"):
        tool.main(tool.get_args_parser().parse_args([]))


def test_make_scenes_examples(items: Path, tmp_path: Path) -> None:
    tool = _tool()
    args = tool.get_args_parser().parse_args(["--root", str(items), "--num-images", "5", "--examples",
                                              str(tmp_path / "ex"), "--example-indices", "4,0"])
    assert tool.main(args) == 0
    ds = _scenes(items, "test", num_images=5, size=128)  # the tool's default canvas
    from PIL import Image

    assert sorted(p.name for p in (tmp_path / "ex").iterdir()) == ["scene_test0.png", "scene_test4.png"]  # no temps
    for i in (0, 4):
        with Image.open(tmp_path / "ex" / f"scene_test{i}.png") as png:
            assert png.mode == "L" and torch.equal(torch.from_numpy(np.array(png)), ds[i][0][0])
    with pytest.raises(SystemExit, match=r"--example-indices \[5\] outside the 5 test canvases \(0..4\)"):
        tool.main(tool.get_args_parser().parse_args(["--root", str(items), "--num-images", "5", "--examples",
                                                     str(tmp_path / "ex"), "--example-indices", "1,5"]))


def test_bundled_scene_examples_are_canvases_of_the_fixed_test_split() -> None:
    """examples/scene_test<i>.png (tools/predict.py's default dense inputs) are canvas i of the
    default test split, as `python tools/make_scenes.py --examples examples/` writes them."""
    from PIL import Image

    bundled = sorted((ROOT / "examples").glob("scene_test*.png"))
    assert [p.name for p in bundled] == ["scene_test1.png", "scene_test3.png", "scene_test4.png"]
    test = FashionScenes(split="test")  # without the Debian package: skipped by conftest (fails in CI)
    for path in bundled:
        with Image.open(path) as png:
            assert png.size == (128, 128) and png.mode == "L"
            assert torch.equal(torch.from_numpy(np.array(png)), test[int(path.stem.removeprefix("scene_test"))][0][0])


# --------------------------------------------------------------------------- #
# build_dense_data / DenseBatches
# --------------------------------------------------------------------------- #


def _spec(root: Path, **extra: object) -> str:
    opts = {"root": root, "size": 64, "train_images": 24, "val_images": 10, "val_items": VAL, **extra}
    return "fashion_scenes:" + ",".join(f"{k}={v}" for k, v in opts.items())


def _same(a: tuple, b: tuple) -> bool:
    (xa, ta), (xb, tb) = a, b
    if not torch.equal(xa, xb):
        return False
    if isinstance(ta, torch.Tensor):
        return torch.equal(ta, tb)
    return all(torch.equal(p["boxes"], q["boxes"]) and torch.equal(p["labels"], q["labels"]) for p, q in zip(ta, tb))


@pytest.mark.parametrize("task", ["segmentation", "detection"])
def test_dense_batches_deterministic_resumable_and_rank_split(items: Path, task: str) -> None:
    train, evals, info = build_dense_data(_spec(items, scale_jitter=0.2), task=task, input_size=48,
                                          batch_size=4, seed=7)
    assert len(train) == 6 and len(evals) == 1 and info.eval_split == "val" and info.eval_size == 10
    full = list(train.epoch(3))
    assert all(_same(a, b) for a, b in zip(full, train.epoch(3)))  # reproducible
    assert all(_same(a, b) for a, b in zip(full[2:], train.epoch(3, start_batch=2)))  # resumable
    assert len(list(train.epoch(3, start_batch=2))) == 4
    assert not _same(full[0], next(iter(train.epoch(4))))  # a new epoch reshuffles
    ranks = [build_dense_data(_spec(items, scale_jitter=0.2), task=task, input_size=48, batch_size=4, seed=7,
                              rank=r, world=2)[0] for r in (0, 1)]
    for b, (x, t) in enumerate(full):
        (x0, t0), (x1, t1) = (list(r.epoch(3))[b] for r in ranks)
        assert torch.equal(x[0::2], x0) and torch.equal(x[1::2], x1)
        if task == "segmentation":
            assert torch.equal(t[0::2], t0) and torch.equal(t[1::2], t1)
        else:
            assert [d["labels"].tolist() for d in t[0::2]] == [d["labels"].tolist() for d in t0]


def test_dense_batches_shapes_flip_and_mask_box_consistency(items: Path) -> None:
    seg, seg_eval, info = build_dense_data(_spec(items), task="segmentation", input_size=64, batch_size=4, seed=1)
    det, det_eval, _ = build_dense_data(_spec(items), task="detection", input_size=64, batch_size=4, seed=1)
    assert info.categories == list(SCENES_CATEGORIES) and len(info.mean) == len(info.std) == 3
    assert "preprocessing" in info.extra
    for (x, masks), (xd, targets) in zip(seg.epoch(0), det.epoch(0)):
        assert x.shape == (4, 3, 64, 64) and x.dtype == torch.float32 and torch.equal(x, xd)
        assert torch.equal(x[:, 0], x[:, 2])  # gray replicated
        assert masks.shape == (4, 64, 64) and masks.dtype == torch.int64
        assert isinstance(targets, list) and len(targets) == 4
        for k, t in enumerate(targets):
            assert t["boxes"].dtype == torch.float32 and t["labels"].dtype == torch.int64
            b = t["boxes"]
            assert bool(((b >= 0) & (b <= 64)).all()) and bool((b[:, 2:] > b[:, :2]).all())
            for (x1, y1, x2, y2), label in zip(b.long().tolist(), t["labels"].tolist()):
                assert bool((masks[k, y1:y2, x1:x2] == label).any())
    # every training sample is its canvas, flipped or not (no jitter at input_size == size), and
    # both happen; the order is the TensorBatches order
    order = torch.randperm(24, generator=torch.Generator().manual_seed(1 * 100003 + 0)).tolist()
    flips = []
    for b, (_, masks) in enumerate(seg.epoch(0)):
        for k, m in enumerate(masks):
            ref = seg.dataset[order[b * 4 + k]][1]["masks"]
            assert torch.equal(m, ref) or torch.equal(m, ref.flip(-1))
            flips.append(not torch.equal(m, ref))
    assert any(flips) and not all(flips)
    # evaluation: no augmentation, whole split, deterministic order
    xe, me = next(iter(seg_eval.epoch(0)))
    assert xe.shape[0] == 10 and torch.equal(me, next(iter(seg_eval.epoch(5)))[1])


def test_dense_transform_rejects_bad_samples() -> None:
    from frostnet.data import dense_transform

    image = torch.zeros(1, 4, 5, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"mask of sample 7 is \(4, 4\) \(H, W\) but its image of sample 7 is \(4, 5\)"):
        dense_transform(image, {"masks": torch.zeros(4, 4, dtype=torch.long), "image_id": 7}, size=8, train=False)
    with pytest.raises(ValueError, match="needs a generator"):
        dense_transform(image, {}, size=8, train=True)
    with pytest.raises(ValueError, match=r"scale_jitter must be in \[0, 1\), got 1.5"):
        dense_transform(image, {}, size=8, train=False, scale_jitter=1.5)
    # boxes outside the image are dropped before the resize, never moved into padding
    target = {"boxes": torch.tensor([[1.0, 1, 3, 3], [-4, -4, -1, -1]]), "labels": torch.tensor([2, 5])}
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        _, out = dense_transform(image, target, size=8, train=True, generator=gen, scale_jitter=0.5)
        assert out["labels"].tolist() == [2]


def test_dense_batches_argument_errors(items: Path) -> None:
    ds = _scenes(items, num_images=4)
    kw = dict(input_size=64, mean=[0.0] * 3, std=[1.0] * 3, shuffle=False, train=False, seed=0)
    with pytest.raises(ValueError, match="unknown task 'depth'"):
        DenseBatches(ds, task="depth", batch_size=2, **kw)
    with pytest.raises(ValueError, match="rank 2 must be in 0..1 for world 2"):
        DenseBatches(ds, task="detection", batch_size=2, rank=2, world=2, **kw)
    with pytest.raises(ValueError, match="batch_size 1 must be at least world 2"):
        DenseBatches(ds, task="detection", batch_size=1, rank=0, world=2, **kw)
    # without drop_last the short last batch is kept
    assert len(DenseBatches(ds, task="detection", batch_size=3, **kw)) == 2
    assert len(DenseBatches(ds, task="detection", batch_size=3, drop_last=True, **kw)) == 1


def test_dense_data_spec_errors(items: Path, tmp_path: Path) -> None:
    kw = dict(input_size=64, batch_size=4, seed=0)
    with pytest.raises(ValueError, match="unknown dense --data 'imagenet'.*fashion_scenes.*voc.*cityscapes.*coco"):
        build_dense_data("imagenet", task="detection", **kw)
    with pytest.raises(ValueError, match="unknown task 'depth'; valid: segmentation, detection"):
        build_dense_data(_spec(items), task="depth", **kw)
    with pytest.raises(ValueError, match="option 'colour=red'.*valid: root.*background"):
        build_dense_data(_spec(items) + ",colour=red", task="detection", **kw)
    with pytest.raises(ValueError, match="option items='x': expected min-max"):
        build_dense_data(_spec(items, items="x"), task="detection", **kw)
    with pytest.raises(ValueError, match="occlusion='maybe': expected true or false"):
        build_dense_data(_spec(items, occlusion="maybe"), task="detection", **kw)
    with pytest.raises(ValueError, match="needs a path"):
        build_dense_data("voc", task="segmentation", **kw)
    with pytest.raises(ValueError, match="cityscapes has segmentation labels only"):
        build_dense_data(f"cityscapes:{tmp_path}", task="detection", **kw)
    with pytest.raises(ValueError, match="coco loads detection boxes only"):
        build_dense_data(f"coco:{tmp_path},{tmp_path}/a.json", task="segmentation", **kw)
    with pytest.raises(ValueError, match="eval_split must be"):
        build_dense_data(_spec(items), task="detection", eval_split="train", **kw)


def test_dense_data_from_written_coco_and_voc(items: Path, tmp_path: Path) -> None:
    tool = _tool()
    for split, n in (("train", 10), ("val", 4)):
        tool.write_split(_scenes(items, split, num_images=n), tmp_path)
    kw = dict(input_size=64, batch_size=4, seed=3)
    seg, seg_eval, info = build_dense_data(f"voc:{tmp_path}", task="segmentation", **kw)
    assert info.categories == list(SCENES_CATEGORIES) and info.eval_split == "val" and info.eval_size == 4
    x, m = next(iter(seg_eval.epoch(0)))
    ref = _scenes(items, "val", num_images=4)
    assert torch.equal(m, torch.stack([ref[i][1]["masks"] for i in range(4)]))
    coco = f"coco:{tmp_path}/images/train,{tmp_path}/annotations/instances_train.json"
    det, det_eval, info = build_dense_data(coco, task="detection", val_size=3, **kw)
    assert info.eval_split == "val" and (info.train_size, info.eval_size) == (7, 3)
    assert info.categories == list(SCENES_CATEGORIES)
    _, targets = next(iter(det_eval.epoch(0)))
    train_ref = _scenes(items, "train", num_images=10)
    assert [t["labels"].tolist() for t in targets] == [train_ref[i][1]["labels"].tolist() for i in (7, 8, 9)]
    assert all(_same(a, b) for a, b in zip(det.epoch(1), det.epoch(1)))
    # DataLoader workers read the files; the augmentation stays in this process: same batches
    det_w, _, _ = build_dense_data(coco, task="detection", val_size=3, workers=1, **kw)
    assert all(_same(a, b) for a, b in zip(det.epoch(1), det_w.epoch(1)))


def test_default_test_split_is_fixed() -> None:
    """The reference test set must not drift: pin the first canvases of the default test split."""
    try:
        test = FashionScenes(split="test")
    except FileNotFoundError:
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    assert len(test) == 2000 and test.size == 128
    got = [(test[i][1]["labels"].tolist(), test[i][1]["boxes"].int().tolist()) for i in range(2)]
    assert got == PINNED_TEST_CANVASES
