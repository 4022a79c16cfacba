"""Tests for frostnet.data: every loader reads tiny fixtures written here in the real formats."""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.tv_tensors import BoundingBoxes

from frostnet.data import (
    CITYSCAPES_CLASSES,
    CITYSCAPES_LABEL_TO_TRAIN_ID,
    DEFAULT_FASHION_MNIST_ROOT,
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    IGNORE_INDEX,
    VOC_CLASSES,
    BatchPipeline,
    Cityscapes,
    CocoDetection,
    FashionMNIST,
    FashionMNISTTransform,
    IDXFormatError,
    SegCompose,
    SegRandomCrop,
    SegRandomHorizontalFlip,
    SegRandomScale,
    TensorBatchLoader,
    VOCAnnotationError,
    VOCDetection,
    VOCSegmentation,
    build_dataset,
    clean_boxes,
    compute_mean_std,
    detection_collate,
    fashion_mnist_train_val,
    label_ids_to_train_ids,
    prepare_batch,
    random_crop_flip,
    read_idx,
    segmentation_train_transform,
    subset_indices,
    train_val_split,
    voc_palette,
    write_idx,
)

# --------------------------------------------------------------------------- #
# IDX fixtures, written by hand with struct so the reader is checked against
# the format itself rather than against our own writer.
# --------------------------------------------------------------------------- #


def _idx_bytes(array: np.ndarray, type_code: int, fmt: str) -> bytes:
    header = struct.pack(">BBBB", 0, 0, type_code, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    return header + struct.pack(f">{array.size}{fmt}", *array.ravel().tolist())


def _write(path: Path, payload: bytes, compress: bool) -> Path:
    path.write_bytes(gzip.compress(payload) if compress else payload)
    return path


def _fake_images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 28, 28), dtype=np.uint8)


def _make_fashion_dir(root: Path, n_train: int = 12, n_test: int = 5) -> dict[str, np.ndarray]:
    """Write the four Fashion-MNIST files (train gzipped, test raw, like a user might)."""
    root.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train_x": _fake_images(n_train, 0),
        "train_y": (np.arange(n_train) % 10).astype(np.uint8),
        "test_x": _fake_images(n_test, 1),
        "test_y": np.array([9, 0, 3, 3, 7][:n_test], dtype=np.uint8),
    }
    _write(root / "train-images-idx3-ubyte.gz", _idx_bytes(arrays["train_x"], 0x08, "B"), True)
    _write(root / "train-labels-idx1-ubyte.gz", _idx_bytes(arrays["train_y"], 0x08, "B"), True)
    # Decompressed names (no .gz) must be found as a fallback.
    _write(root / "t10k-images-idx3-ubyte", _idx_bytes(arrays["test_x"], 0x08, "B"), False)
    _write(root / "t10k-labels-idx1-ubyte", _idx_bytes(arrays["test_y"], 0x08, "B"), False)
    return arrays


@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_uint8_gz_and_raw(tmp_path: Path, compress: bool) -> None:
    images = _fake_images(3, 42)
    path = _write(tmp_path / "img.idx", _idx_bytes(images, 0x08, "B"), compress)
    out = read_idx(path, expected_ndim=3, expected_dtype=torch.uint8)
    assert out.dtype == torch.uint8 and out.shape == (3, 28, 28)
    assert torch.equal(out, torch.from_numpy(images))


def test_read_idx_big_endian_multibyte_types(tmp_path: Path) -> None:
    ints = np.array([[1, -2, 70000], [2**31 - 1, -(2**31), 0]], dtype=np.int32)
    p = _write(tmp_path / "i.idx", _idx_bytes(ints, 0x0C, "i"), False)
    assert torch.equal(read_idx(p), torch.from_numpy(ints))
    floats = np.array([1.5, -0.25, 3e10], dtype=np.float64)
    p = _write(tmp_path / "d.idx.gz", _idx_bytes(floats, 0x0E, "d"), True)
    out = read_idx(p)
    assert out.dtype == torch.float64 and out.tolist() == floats.tolist()


def test_write_idx_round_trip(tmp_path: Path) -> None:
    t = torch.arange(-6, 6, dtype=torch.int16).reshape(3, 4)
    write_idx(tmp_path / "a.gz", t)
    assert (tmp_path / "a.gz").read_bytes()[:2] == b"\x1f\x8b"
    assert torch.equal(read_idx(tmp_path / "a.gz"), t)
    with pytest.raises(ValueError, match="int64"):
        write_idx(tmp_path / "b", torch.zeros(2, dtype=torch.int64))


def test_read_idx_corrupt_files_give_clear_errors(tmp_path: Path) -> None:
    good = _idx_bytes(_fake_images(2, 3), 0x08, "B")
    cases = {
        "badmagic.idx": (b"\x01\x02" + good[2:], "bad IDX magic"),
        "badtype.idx": (good[:2] + b"\x07" + good[3:], "unknown IDX type code 0x07"),
        "truncated.idx": (good[:-10], "truncated"),
        "trailing.idx": (good + b"\x00", "trailing bytes"),
        "short.idx": (b"\x00\x00", "too short"),
        "shorthdr.idx": (good[:9], "truncated header"),
    }
    for name, (payload, message) in cases.items():
        path = _write(tmp_path / name, payload, False)
        with pytest.raises(IDXFormatError, match=message) as info:
            read_idx(path)
        assert name in str(info.value)  # the error names the file
    # A gzip stream cut in half is reported as such, not as a raw EOFError.
    gz = gzip.compress(good)
    path = _write(tmp_path / "cut.gz", gz[: len(gz) // 2], False)
    with pytest.raises(IDXFormatError, match="gzip") as info:
        read_idx(path)
    assert "cut.gz" in str(info.value)
    # Expected shape/type checks.
    path = _write(tmp_path / "ok.idx", good, False)
    with pytest.raises(IDXFormatError, match="expected 1"):
        read_idx(path, expected_ndim=1)
    with pytest.raises(IDXFormatError, match="expected torch.float32"):
        read_idx(path, expected_dtype=torch.float32)
    with pytest.raises(FileNotFoundError, match="nope.idx"):
        read_idx(tmp_path / "nope.idx")


# --------------------------------------------------------------------------- #
# Fashion-MNIST dataset
# --------------------------------------------------------------------------- #


def test_fashion_mnist_reads_fixture_exactly(tmp_path: Path) -> None:
    arrays = _make_fashion_dir(tmp_path)
    train = FashionMNIST(tmp_path, "train")
    test = FashionMNIST(tmp_path, "test")
    assert len(train) == 12 and len(test) == 5
    assert torch.equal(train.images, torch.from_numpy(arrays["train_x"]))
    assert train.targets.tolist() == arrays["train_y"].tolist()
    assert test.targets.tolist() == [9, 0, 3, 3, 7]
    image, label = test[0]
    assert image.shape == (1, 28, 28) and image.dtype == torch.uint8 and label == 9
    assert torch.equal(image[0], torch.from_numpy(arrays["test_x"][0]))
    assert len(FASHION_MNIST_CLASSES) == 10 and FASHION_MNIST_CLASSES[9] == "Ankle boot"
    # Per-sample transform gives the 3-channel model input.
    ds = FashionMNIST(tmp_path, "test", transform=FashionMNISTTransform())
    x, _ = ds[1]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32


def test_fashion_mnist_subset_indices_and_val_split(tmp_path: Path) -> None:
    _make_fashion_dir(tmp_path)
    a = FashionMNIST(tmp_path, subset=5, seed=3)
    b = FashionMNIST(tmp_path, subset=5, seed=3)
    assert torch.equal(a.indices, b.indices) and len(a) == 5
    assert torch.equal(a.targets, torch.arange(12)[a.indices] % 10)
    picked = FashionMNIST(tmp_path, indices=[11, 0, 4])
    assert picked.targets.tolist() == [1, 0, 4]
    with pytest.raises(ValueError, match="0..11"):
        FashionMNIST(tmp_path, indices=[12])
    with pytest.raises(ValueError, match="either subset or indices"):
        FashionMNIST(tmp_path, subset=2, indices=[0])
    with pytest.raises(ValueError, match="valid: train, val, test"):
        FashionMNIST(tmp_path, split="validation")

    tr, va = fashion_mnist_train_val(tmp_path, val_size=4)
    assert tr.indices.tolist() == list(range(8)) and va.indices.tolist() == [8, 9, 10, 11]
    tr, va = fashion_mnist_train_val(tmp_path, val_size=4, val_seed=0)
    assert len(va) == 4 and set(tr.indices.tolist()).isdisjoint(va.indices.tolist())
    assert sorted(tr.indices.tolist() + va.indices.tolist()) == list(range(12))
    with pytest.raises(ValueError, match="val_size"):
        FashionMNIST(tmp_path, split="val")

    t, v = train_val_split(100, 10, seed=1)
    t2, v2 = train_val_split(100, 10, seed=1)
    assert torch.equal(v, v2) and len(t) == 90 and len(set(t.tolist()) | set(v.tolist())) == 100
    s = subset_indices(1000, 20, seed=0)
    assert torch.equal(s, subset_indices(1000, 20, seed=0)) and not torch.equal(s, subset_indices(1000, 20, seed=1))


def test_fashion_mnist_missing_and_inconsistent_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist") as info:
        FashionMNIST(tmp_path / "empty")
    assert str(tmp_path / "empty") in str(info.value)
    root = tmp_path / "bad"
    _make_fashion_dir(root)
    _write(root / "t10k-labels-idx1-ubyte", _idx_bytes(np.array([0, 1], np.uint8), 0x08, "B"), False)
    with pytest.raises(IDXFormatError, match="5 images but"):
        FashionMNIST(root, "test")
    _write(root / "t10k-labels-idx1-ubyte", _idx_bytes(np.array([0, 1, 2, 3, 10], np.uint8), 0x08, "B"), False)
    with pytest.raises(IDXFormatError, match="label 10 out of range"):
        FashionMNIST(root, "test")


def test_prepare_batch_pads_normalizes_and_replicates() -> None:
    images = torch.full((2, 28, 28), 255, dtype=torch.uint8)
    x = prepare_batch(images)
    assert x.shape == (2, 3, 32, 32)
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])
    inside = (1.0 - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
    border = (0.0 - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
    assert torch.allclose(x[:, :, 2:30, 2:30], torch.tensor(inside))
    assert torch.allclose(x[:, :, :2], torch.tensor(border)) and torch.allclose(x[:, :, :, 30:], torch.tensor(border))
    assert prepare_batch(images, size=64, resize=True).shape == (2, 3, 64, 64)
    assert prepare_batch(images.unsqueeze(1), size=28, channels=1).shape == (2, 1, 28, 28)
    with pytest.raises(ValueError, match="resize=True"):
        prepare_batch(images, size=20)


def test_random_crop_flip_matches_per_sample_reference() -> None:
    x = torch.arange(4 * 1 * 6 * 6, dtype=torch.float32).reshape(4, 1, 6, 6)
    out = random_crop_flip(x, padding=2, flip_p=0.5, generator=torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(4):
        # Each output must be some 6x6 window of the padded input, maybe flipped.
        windows = [padded[i, :, r : r + 6, c : c + 6] for r in range(5) for c in range(5)]
        assert any(torch.equal(out[i], w) or torch.equal(out[i], w.flip(-1)) for w in windows)
    again = random_crop_flip(x, padding=2, flip_p=0.5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    assert torch.equal(random_crop_flip(x, padding=0, flip_p=1.0), x.flip(-1))
    assert torch.equal(random_crop_flip(x, padding=0, flip_p=0.0), x)


def test_tensor_batch_loader_covers_dataset(tmp_path: Path) -> None:
    _make_fashion_dir(tmp_path)
    ds = FashionMNIST(tmp_path)
    loader = TensorBatchLoader(ds, batch_size=5, pipeline=BatchPipeline(train=True), shuffle=True, seed=1)
    assert len(loader) == 3
    batches = list(loader)
    assert [len(y) for _, y in batches] == [5, 5, 2]
    assert sorted(torch.cat([y for _, y in batches]).tolist()) == sorted(ds.targets.tolist())
    assert batches[0][0].shape == (5, 3, 32, 32)
    eval_loader = TensorBatchLoader(ds, batch_size=12)
    (x, y), = list(eval_loader)
    assert torch.equal(y, ds.targets) and torch.allclose(x, prepare_batch(ds.images))
    assert len(TensorBatchLoader(ds, batch_size=5, drop_last=True)) == 2


def test_compute_mean_std_matches_torch() -> None:
    images = torch.randint(0, 256, (7, 28, 28), dtype=torch.uint8)
    mean, std = compute_mean_std(images, chunk=3)
    ref = images.double() / 255
    assert mean == pytest.approx(float(ref.mean()), abs=1e-9)
    assert std == pytest.approx(float(ref.std(unbiased=False)), abs=1e-9)


def test_build_dataset_specs(tmp_path: Path) -> None:
    _make_fashion_dir(tmp_path / "fm")
    ds = build_dataset(f"fashion_mnist:{tmp_path / 'fm'}", "test")
    assert isinstance(ds, FashionMNIST) and len(ds) == 5
    ds = build_dataset(f"fashion_mnist:{tmp_path / 'fm'}", "train", subset=4)
    assert len(ds) == 4
    with pytest.raises(ValueError, match="valid choices: fashion_mnist.*imagefolder"):
        build_dataset("mnist", "train")
    with pytest.raises(ValueError, match="needs a path"):
        build_dataset("imagefolder", "train")
    _make_imagefolder(tmp_path / "inet")
    ds = build_dataset(f"imagefolder:{tmp_path / 'inet'}", "val", image_size=32, resize_size=36)
    assert ds[0][0].shape == (3, 32, 32)


# --------------------------------------------------------------------------- #
# ImageFolder
# --------------------------------------------------------------------------- #


def _make_imagefolder(root: Path) -> None:
    colors = {"cat": (255, 0, 0), "dog": (0, 0, 255), "emu": (0, 255, 0)}
    for split, classes in (("train", ["cat", "dog", "emu"]), ("val", ["cat", "emu"])):
        for cls in classes:
            d = root / split / cls
            d.mkdir(parents=True)
            Image.new("RGB", (40, 30), colors[cls]).save(d / "a.JPEG", format="JPEG", quality=95)
            Image.new("L", (20, 25), 128).save(d / "b.png")


def test_imagefolder_labels_and_transforms(tmp_path: Path) -> None:
    from frostnet.data import build_imagefolder

    _make_imagefolder(tmp_path)
    train = build_imagefolder(tmp_path, "train")
    assert train.classes == ["cat", "dog", "emu"]
    assert sorted(train.targets) == [0, 0, 1, 1, 2, 2]
    x, y = train[0]
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32
    # val lacks "dog": labels must still follow train's mapping (emu stays 2).
    val = build_imagefolder(tmp_path, "val")
    assert val.class_to_idx == train.class_to_idx
    assert sorted(val.targets) == [0, 0, 2, 2]
    x, y = val[0]
    assert x.shape == (3, 224, 224)
    # Eval transform is deterministic and the JPEG colour survives normalization:
    # a pure red image has R well above the mean and B below.
    red_idx = next(i for i, (p, t) in enumerate(val.samples) if t == 0 and p.endswith(".JPEG"))
    x, _ = val[red_idx]
    assert torch.equal(x, val[red_idx][0])
    assert x[0].mean() > 2.0 and x[2].mean() < -1.5
    with pytest.raises(ValueError, match="valid: train, val, test"):
        build_imagefolder(tmp_path, "training")
    with pytest.raises(FileNotFoundError, match="test"):
        build_imagefolder(tmp_path, "test")


# --------------------------------------------------------------------------- #
# Pascal VOC
# --------------------------------------------------------------------------- #

_VOC_OBJECTS = {
    "000005": [("chair", 263, 211, 324, 339, 0), ("chair", 165, 264, 253, 372, 1), ("person", 5, 1, 60, 100, 0)],
    "000007": [("car", 141, 50, 500, 330, 0)],
    "000009": [("dog", 1, 1, 8, 8, 1)],  # only a difficult object
}
_VOC_SIZE = (500, 375)  # width, height


def _voc_xml(image_id: str, objects: list[tuple]) -> str:
    objs = "".join(
        f"<object><name>{n}</name><pose>Unspecified</pose><truncated>0</truncated>"
        f"<difficult>{d}</difficult><bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin>"
        f"<xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"
        for n, x1, y1, x2, y2, d in objects
    )
    w, h = _VOC_SIZE
    return (f"<annotation><folder>VOC2007</folder><filename>{image_id}.jpg</filename>"
            f"<size><width>{w}</width><height>{h}</height><depth>3</depth></size>"
            f"<segmented>0</segmented>{objs}</annotation>")


def _make_voc(root: Path, year: str = "2007") -> Path:
    voc = root / "VOCdevkit" / f"VOC{year}"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main", "ImageSets/Segmentation", "SegmentationClass"):
        (voc / sub).mkdir(parents=True)
    for image_id, objects in _VOC_OBJECTS.items():
        (voc / "Annotations" / f"{image_id}.xml").write_text(_voc_xml(image_id, objects))
        Image.new("RGB", _VOC_SIZE, (10, 20, 30)).save(voc / "JPEGImages" / f"{image_id}.jpg")
    (voc / "ImageSets/Main/trainval.txt").write_text("000005\n000007\n000009\n")
    (voc / "ImageSets/Main/test.txt").write_text("000007\n")
    return voc


def test_voc_detection_boxes_labels_difficult(tmp_path: Path) -> None:
    _make_voc(tmp_path)
    ds = VOCDetection(tmp_path, "2007", "trainval")
    assert len(ds) == 3 and ds.ids == ["000005", "000007", "000009"]
    image, target = ds[0]
    assert image.shape == (3, 375, 500) and image.dtype == torch.float32
    assert float(image.max()) <= 1.0
    # 1-based inclusive VOC pixels -> 0-based continuous xyxy: (x1-1, y1-1, x2, y2).
    expected = torch.tensor([[262, 210, 324, 339], [164, 263, 253, 372], [4, 0, 60, 100]], dtype=torch.float32)
    assert target["boxes"].dtype == torch.float32 and torch.equal(target["boxes"].as_subclass(torch.Tensor), expected)
    chair, person = VOC_CLASSES.index("chair") + 1, VOC_CLASSES.index("person") + 1
    assert (chair, person) == (9, 15)
    assert target["labels"].tolist() == [chair, chair, person] and target["labels"].dtype == torch.int64
    assert target["difficult"].tolist() == [False, True, False]
    assert target["image_id"] == 0

    no_diff = VOCDetection(tmp_path / "VOCdevkit", "2007", "trainval", keep_difficult=False)
    _, t = no_diff[0]
    assert t["labels"].tolist() == [chair, person] and t["boxes"].shape == (2, 4)
    _, t = no_diff[2]
    assert t["boxes"].shape == (0, 4) and t["labels"].shape == (0,)

    images, targets = detection_collate([ds[0], ds[1]])
    assert len(images) == 2 and targets[1]["labels"].tolist() == [VOC_CLASSES.index("car") + 1]
    assert len(VOCDetection(tmp_path / "VOCdevkit" / "VOC2007", split="test")) == 1


def test_voc_detection_joint_v2_transform_moves_boxes(tmp_path: Path) -> None:
    from torchvision.transforms import v2

    _make_voc(tmp_path)
    flip = v2.Compose([v2.RandomHorizontalFlip(p=1.0), v2.ToDtype(torch.float32, scale=True)])
    image, target = VOCDetection(tmp_path, split="trainval", transform=flip)[1]
    assert image.dtype == torch.float32
    # Car box (140, 49, 500, 330) on a 500-wide canvas mirrors to (0, 49, 360, 330).
    assert target["boxes"].tolist() == [[0.0, 49.0, 360.0, 330.0]]
    assert target["labels"].tolist() == [VOC_CLASSES.index("car") + 1]


def test_voc_errors(tmp_path: Path) -> None:
    voc = _make_voc(tmp_path)
    with pytest.raises(ValueError, match="valid: train, val, trainval, test"):
        VOCDetection(tmp_path, split="training")
    with pytest.raises(FileNotFoundError, match="val.txt"):
        VOCDetection(tmp_path, split="val")
    with pytest.raises(FileNotFoundError, match="VOC2012"):
        VOCDetection(tmp_path, year="2012")
    (voc / "Annotations" / "000007.xml").write_text(_voc_xml("000007", [("unicorn", 1, 1, 5, 5, 0)]))
    with pytest.raises(VOCAnnotationError, match="unknown class 'unicorn'.*aeroplane") as info:
        VOCDetection(tmp_path)[1]
    assert "000007.xml" in str(info.value)
    (voc / "Annotations" / "000007.xml").write_text("<annotation><object>")
    with pytest.raises(VOCAnnotationError, match="invalid XML"):
        VOCDetection(tmp_path)[1]


def test_voc_segmentation_palette_mask(tmp_path: Path) -> None:
    voc = _make_voc(tmp_path, "2012")
    (voc / "ImageSets/Segmentation/train.txt").write_text("000005\n")
    mask = np.zeros((375, 500), dtype=np.uint8)
    mask[10:100, 20:200] = 15  # person
    mask[200:300, 300:400] = 9  # chair
    mask[9, 20:200] = 255  # boundary band
    png = Image.fromarray(mask, mode="P")
    palette = voc_palette()
    assert len(palette) == 768 and palette[3:6] == [128, 0, 0] and palette[45:48] == [192, 128, 128]  # 1, 15
    png.putpalette(palette)
    png.save(voc / "SegmentationClass" / "000005.png")
    ds = VOCSegmentation(tmp_path, "2012", "train")
    image, m = ds[0]
    assert image.shape == (3, 375, 500) and image.dtype == torch.uint8
    assert m.dtype == torch.int64 and torch.equal(m, torch.from_numpy(mask).long())
    Image.fromarray(np.stack([mask] * 3, -1)).save(voc / "SegmentationClass" / "000005.png")
    with pytest.raises(ValueError, match="mode is 'RGB'"):
        ds[0]


def test_voc_detection_clips_drops_and_keeps_empty_images(tmp_path: Path) -> None:
    voc = _make_voc(tmp_path)
    objects = [("car", 400, 300, 600, 500, 0),  # partly outside the 500x375 image: clipped
               ("dog", 600, 10, 700, 50, 0),    # fully outside: dropped
               ("cat", 10, 1, 5, 5, 0),         # inverted: dropped
               ("bus", 20, 20, 20, 40, 0)]      # one column wide in VOC's inclusive pixels: kept
    (voc / "Annotations" / "000007.xml").write_text(_voc_xml("000007", objects))
    _, target = VOCDetection(tmp_path)[1]
    assert target["boxes"].tolist() == [[399, 299, 500, 375], [19, 19, 20, 40]]
    assert target["labels"].tolist() == [VOC_CLASSES.index("car") + 1, VOC_CLASSES.index("bus") + 1]
    assert target["difficult"].tolist() == [False, False]
    (voc / "Annotations" / "000007.xml").write_text(_voc_xml("000007", []))
    image, target = VOCDetection(tmp_path)[1]
    assert image.shape == (3, 375, 500) and target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)


def test_voc_png_images_and_classes_txt(tmp_path: Path) -> None:
    voc = tmp_path / "VOC"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / sub).mkdir(parents=True)
    Image.new("L", (6, 4), 50).save(voc / "JPEGImages" / "a.png")
    mask = np.zeros((4, 6), dtype=np.uint8)
    mask[1:3, 2:5] = 2
    Image.fromarray(mask, mode="L").save(voc / "SegmentationClass" / "a.png")
    (voc / "ImageSets/Segmentation/train.txt").write_text("a\n")
    (voc / "classes.txt").write_text("circle\nsquare\n")
    ds = VOCSegmentation(voc, split="train")
    assert ds.classes == ("__background__", "circle", "square")
    image, m = ds[0]
    assert image.shape == (3, 4, 6) and int(image[0, 0, 0]) == 50 and m.tolist() == mask.tolist()
    mask[0, 0] = 3  # not one of the two classes
    Image.fromarray(mask, mode="L").save(voc / "SegmentationClass" / "a.png")
    with pytest.raises(ValueError, match=r"a.png: mask value\(s\) \[3\] are not class ids \(valid: 0..2 or 255 = ignore\)"):
        ds[0]
    (voc / "classes.txt").write_text("background\ncircle\n")
    with pytest.raises(ValueError, match="without the background"):
        VOCSegmentation(voc, split="train")


def test_voc_segmentation_mask_size_mismatch_names_files(tmp_path: Path) -> None:
    voc = _make_voc(tmp_path, "2012")
    (voc / "ImageSets/Segmentation/train.txt").write_text("000005\n")
    Image.fromarray(np.zeros((300, 500), dtype=np.uint8), mode="L").save(voc / "SegmentationClass" / "000005.png")
    with pytest.raises(ValueError, match=r"mask .*000005.png is \(300, 500\).*image .*000005.jpg is \(375, 500\)"):
        VOCSegmentation(tmp_path, "2012", "train")[0]
    with pytest.raises(ValueError, match="one entry per box"):
        clean_boxes(BoundingBoxes(torch.zeros(2, 4), format="XYXY", canvas_size=(4, 4)), torch.zeros(1))


# --------------------------------------------------------------------------- #
# COCO
# --------------------------------------------------------------------------- #


def _make_coco(root: Path, annotations: list[dict]) -> tuple[Path, Path]:
    (root / "img").mkdir(parents=True)
    images = []
    for i, name in enumerate(("a.png", "b.png")):
        Image.new("RGB", (40, 30), (i * 100, 0, 0)).save(root / "img" / name)
        images.append({"id": 10 + i, "file_name": name, "width": 40, "height": 30})
    data = {"images": images, "annotations": annotations,
            "categories": [{"id": 3, "name": "hat"}, {"id": 7, "name": "shoe"}]}
    (root / "ann.json").write_text(json.dumps(data))
    return root / "img", root / "ann.json"


def test_coco_detection_labels_clipping_crowd_and_empty_images(tmp_path: Path) -> None:
    anns = [
        {"id": 1, "image_id": 10, "category_id": 7, "bbox": [2, 3, 10, 5], "area": 50, "iscrowd": 0},
        {"id": 2, "image_id": 10, "category_id": 3, "bbox": [30, 20, 20, 20], "area": 400, "iscrowd": 0},  # clipped
        {"id": 3, "image_id": 10, "category_id": 3, "bbox": [50, 5, 5, 5], "area": 25, "iscrowd": 0},  # outside
        {"id": 4, "image_id": 10, "category_id": 3, "bbox": [5, 5, 0, 8], "area": 0, "iscrowd": 0},  # zero width
        {"id": 5, "image_id": 10, "category_id": 7, "bbox": [0, 0, 8, 8], "area": 64, "iscrowd": 1},  # crowd
    ]
    ds = CocoDetection(*_make_coco(tmp_path, anns))
    assert len(ds) == 2 and ds.classes == ("background", "hat", "shoe") and ds.category_ids == [3, 7]
    image, target = ds[0]
    assert image.shape == (3, 30, 40) and image.dtype == torch.uint8 and target["image_id"] == 10
    assert target["boxes"].tolist() == [[2, 3, 12, 8], [30, 20, 40, 30]]
    assert target["labels"].tolist() == [2, 1]  # category 7 -> label 2, category 3 -> label 1
    image, target = ds[1]  # no annotations
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,) and target["image_id"] == 11
    crowd = CocoDetection(tmp_path / "img", tmp_path / "ann.json", keep_crowd=True)
    assert crowd[0][1]["labels"].tolist() == [2, 1, 2]


def test_coco_detection_errors(tmp_path: Path) -> None:
    anns = [{"id": 9, "image_id": 11, "category_id": 5, "bbox": [1, 1, 4, 4], "area": 16, "iscrowd": 0}]
    images, ann = _make_coco(tmp_path, anns)
    with pytest.raises(ValueError, match=r"ann.json: annotation 9 of image 11 has category_id 5; the file defines \[3, 7\]"):
        CocoDetection(images, ann)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        CocoDetection(images, tmp_path / "missing.json")
    with pytest.raises(FileNotFoundError, match="image folder"):
        CocoDetection(tmp_path / "nope", ann)


# --------------------------------------------------------------------------- #
# Cityscapes
# --------------------------------------------------------------------------- #


def _make_cityscapes(root: Path) -> dict[str, np.ndarray]:
    """Two cities in train, one in val; each labelIds PNG holds every id 0..33."""
    written = {}
    rng = np.random.default_rng(0)
    for split, cities in (("train", ["aachen", "bochum"]), ("val", ["frankfurt"])):
        for k, city in enumerate(cities):
            stem = f"{city}_000000_{k:06d}"
            (root / "leftImg8bit" / split / city).mkdir(parents=True, exist_ok=True)
            (root / "gtFine" / split / city).mkdir(parents=True, exist_ok=True)
            ids = np.repeat(np.repeat(rng.permutation(np.arange(36) % 34).reshape(6, 6), 8, 0), 8, 1).astype(np.uint8)
            ids[0, 0] = 255  # the generic ignore value
            # Image encodes each pixel's label id so alignment can be checked later.
            rgb = np.stack([255 - ids, ids, np.full_like(ids, 3)], -1)
            Image.fromarray(rgb).save(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png")
            Image.fromarray(ids, mode="L").save(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png")
            written[f"{split}/{stem}"] = ids
    return written


def test_cityscapes_train_id_mapping_table() -> None:
    assert len(CITYSCAPES_LABEL_TO_TRAIN_ID) == 35 and len(CITYSCAPES_CLASSES) == 19
    train_ids = sorted(v for v in CITYSCAPES_LABEL_TO_TRAIN_ID.values() if v != 255)
    assert train_ids == list(range(19))  # each train id used exactly once
    spot = {0: 255, 6: 255, 7: 0, 8: 1, 9: 255, 11: 2, 17: 5, 19: 6, 20: 7, 23: 10,
            24: 11, 26: 13, 29: 255, 30: 255, 31: 16, 33: 18, -1: 255}
    assert {k: CITYSCAPES_LABEL_TO_TRAIN_ID[k] for k in spot} == spot
    out = label_ids_to_train_ids(torch.tensor([[7, 26], [34, 255]], dtype=torch.uint8))
    assert out.tolist() == [[0, 13], [255, 255]] and out.dtype == torch.int64


def test_cityscapes_reads_pairs_and_maps_ids(tmp_path: Path) -> None:
    written = _make_cityscapes(tmp_path)
    ds = Cityscapes(tmp_path, "train")
    assert len(ds) == 2 and [p.parent.name for p in ds.images] == ["aachen", "bochum"]
    image, mask = ds[1]
    ids = written["train/bochum_000000_000001"]
    assert image.shape == (3, 48, 48) and image.dtype == torch.uint8
    assert torch.equal(image[1], torch.from_numpy(ids))
    expected = np.vectorize(lambda i: CITYSCAPES_LABEL_TO_TRAIN_ID.get(int(i), 255))(ids)
    assert mask.dtype == torch.int64 and mask.tolist() == expected.tolist()
    assert int(mask[0, 0]) == 255
    assert len(Cityscapes(tmp_path, "val")) == 1
    with pytest.raises(ValueError, match="valid: train, val, test"):
        Cityscapes(tmp_path, "training")
    with pytest.raises(FileNotFoundError, match="test"):
        Cityscapes(tmp_path, "test")
    next(tmp_path.glob("gtFine/val/*/*.png")).unlink()
    with pytest.raises(FileNotFoundError, match="gtFine_labelIds.png"):
        Cityscapes(tmp_path, "val")
    assert isinstance(build_dataset(f"cityscapes:{tmp_path}", "train"), Cityscapes)


def test_cityscapes_unknown_ids_and_size_mismatch_raise(tmp_path: Path) -> None:
    _make_cityscapes(tmp_path)
    mask_path = next(tmp_path.glob("gtFine/train/aachen/*.png"))
    ids = np.array(Image.open(mask_path))
    ids[3, 3] = 200  # not a Cityscapes label id
    Image.fromarray(ids, mode="L").save(mask_path)
    with pytest.raises(ValueError, match=r"aachen_000000_000000_gtFine_labelIds.png: label id\(s\) \[200\]"):
        Cityscapes(tmp_path, "train")[0]
    ids[3, 3] = 7
    Image.fromarray(ids[:40], mode="L").save(mask_path)
    with pytest.raises(ValueError, match=r"mask .*labelIds.png is \(40, 48\).*leftImg8bit.png is \(48, 48\)"):
        Cityscapes(tmp_path, "train")[0]


def _encoded_pair(size: tuple[int, int] = (40, 56), block: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask of constant blocks and an image whose channel 0 is 10 * (label + 1)."""
    h, w = size
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 19, (h // block + 1, w // block + 1), generator=g)
    mask = labels.repeat_interleave(block, 0).repeat_interleave(block, 1)[:h, :w]
    image = ((mask + 1) * 10).to(torch.uint8).expand(3, h, w).clone()
    image[1] = torch.arange(w, dtype=torch.uint8)  # asymmetric content so a flip is visible
    return image, mask


def test_joint_crop_flip_keeps_exact_alignment() -> None:
    image, mask = _encoded_pair()
    tf = SegCompose([SegRandomCrop((48, 48), fill=0, generator=torch.Generator().manual_seed(1)),
                     SegRandomHorizontalFlip(0.5, generator=torch.Generator().manual_seed(2))])
    saw_flip = saw_pad = False
    for _ in range(10):
        img, m = tf(image, mask)
        assert img.shape == (3, 48, 48) and m.shape == (48, 48)
        valid = m != IGNORE_INDEX
        assert torch.equal(img[0][valid].long(), (m[valid] + 1) * 10)  # pixel-exact pairing
        assert bool((img[:, ~valid] == 0).all())  # padding: image fill, mask ignore
        saw_pad |= bool((~valid).any())
        # Channel 1 holds the column index, so a flip shows as decreasing rows.
        both = valid[:, 1:] & valid[:, :-1]
        saw_flip |= bool((img[1].long().diff(dim=1)[both] < 0).any())
    assert saw_flip and saw_pad


def _interior(mask: torch.Tensor, radius: int = 2) -> torch.Tensor:
    """Pixels whose (2r+1)^2 neighbourhood has a single label, i.e. away from edges.

    Bilinear resampling (with antialias, down to scale 0.5) only mixes source
    pixels within this radius, so there the image must decode to the mask exactly.
    """
    m = mask.float()[None, None]
    k = 2 * radius + 1
    hi = torch.nn.functional.max_pool2d(m, k, stride=1, padding=radius)
    lo = -torch.nn.functional.max_pool2d(-m, k, stride=1, padding=radius)
    inner = (hi == lo)[0, 0]
    # Near the crop border the neighbours that were blended in are cut away.
    inner[:radius] = inner[-radius:] = False
    inner[:, :radius] = inner[:, -radius:] = False
    return inner


def test_joint_random_scale_aligned_and_nearest() -> None:
    image, mask = _encoded_pair(block=16, size=(64, 64))
    gen = torch.Generator().manual_seed(0)
    tf = segmentation_train_transform(crop_size=40, scale_range=(0.75, 1.5), generator=gen,
                                      mean=(0, 0, 0), std=(1 / 255, 1 / 255, 1 / 255))
    for _ in range(8):
        x, m = tf(image, mask)
        assert x.shape == (3, 40, 40) and m.shape == (40, 40) and m.dtype == torch.int64
        valid = m != IGNORE_INDEX
        # Nearest-neighbour: the mask only contains original labels, never blends.
        assert set(m[valid].unique().tolist()) <= set(mask.unique().tolist())
        # Bilinear image vs nearest mask: exact wherever no label edge is near.
        decoded = (x[0] / 10 - 1).round().long()
        inner = _interior(m) & valid
        assert int(inner.sum()) > 200
        assert torch.equal(decoded[inner], m[inner])
    # Sanity check of the check: a mask flipped on its own is detected as misaligned.
    x, m = SegRandomScale(1.3, 1.3)(image, mask)
    decoded = (x[0].float() / 10 - 1).round().long()
    assert (decoded == m).float().mean() > 0.85
    assert (decoded == m.flip(-1)).float().mean() < 0.5


def test_cityscapes_dataset_with_joint_transform_alignment(tmp_path: Path) -> None:
    _make_cityscapes(tmp_path)
    tf = SegCompose([SegRandomScale(0.5, 2.0, generator=torch.Generator().manual_seed(5)),
                     SegRandomCrop(32, generator=torch.Generator().manual_seed(6)),
                     SegRandomHorizontalFlip(0.5, generator=torch.Generator().manual_seed(7))])
    ds = Cityscapes(tmp_path, "train", transform=tf)
    for i in range(2):
        for _ in range(3):
            img, m = ds[i]
            valid = m != IGNORE_INDEX
            decoded = label_ids_to_train_ids(img[1].long())
            inner = _interior(m) & valid
            assert bool(inner.any())
            assert torch.equal(decoded[inner], m[inner])
            assert not torch.equal(decoded.flip(-1)[inner], m[inner])


def test_dense_data_over_voc_detection_and_cityscapes(tmp_path: Path) -> None:
    from frostnet.recipe.dense_data import build_dense_data

    voc = _make_voc(tmp_path / "voc")
    (voc / "ImageSets/Main/train.txt").write_text("000005\n000007\n000009\n")
    train, evals, info = build_dense_data(f"voc:{tmp_path / 'voc'}", task="detection", input_size=50,
                                          batch_size=2, seed=0, eval_split="test")
    assert info.categories == ["background", *VOC_CLASSES] and info.eval_split == "test"
    assert (info.train_size, info.eval_size, len(train)) == (3, 1, 1)
    x, targets = next(iter(evals.epoch(0)))
    assert x.shape == (1, 3, 50, 50)
    # car (140, 49, 500, 330) on 500x375 scaled to 50x50: x / 10, y * 50 / 375
    assert torch.allclose(targets[0]["boxes"], torch.tensor([[14.0, 49 * 50 / 375, 50.0, 330 * 50 / 375]]))
    assert targets[0]["labels"].tolist() == [VOC_CLASSES.index("car") + 1]

    _make_cityscapes(tmp_path / "cs")
    train, evals, info = build_dense_data(f"cityscapes:{tmp_path / 'cs'}", task="segmentation", input_size=32,
                                          batch_size=2, seed=0)
    assert info.categories == list(CITYSCAPES_CLASSES) and info.eval_split == "val" and info.eval_size == 1
    x, masks = next(iter(train.epoch(0)))
    assert x.shape == (2, 3, 32, 32) and masks.shape == (2, 32, 32) and masks.dtype == torch.int64
    assert set(masks.unique().tolist()) <= set(range(19)) | {IGNORE_INDEX}


# --------------------------------------------------------------------------- #
# Real Debian data
# --------------------------------------------------------------------------- #


def test_real_debian_fashion_mnist() -> None:
    files = [DEFAULT_FASHION_MNIST_ROOT / f for f in ("train-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte.gz")]
    if not all(f.is_file() for f in files):
        pytest.skip("dataset-fashion-mnist is not installed (apt-get install -y dataset-fashion-mnist)")
    train, test = FashionMNIST(split="train"), FashionMNIST(split="test")
    assert train.images.shape == (60000, 28, 28) and test.images.shape == (10000, 28, 28)
    assert train.images.dtype == torch.uint8
    for ds in (train, test):
        assert int(ds.targets.min()) == 0 and int(ds.targets.max()) == 9
        assert torch.equal(ds.targets.bincount(), torch.full((10,), len(ds) // 10))  # balanced
    mean, std = compute_mean_std(train.images[:6000])
    assert mean == pytest.approx(FASHION_MNIST_MEAN, abs=0.01) and std == pytest.approx(FASHION_MNIST_STD, abs=0.01)
    x, y = next(iter(TensorBatchLoader(test, batch_size=64)))
    assert x.shape == (64, 3, 32, 32) and y.shape == (64,)
