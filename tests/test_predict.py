"""tools/predict.py: the main job, and every bad input it meets."""

import importlib.util
import shutil
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from frostnet import quant

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("frostnet_tools_predict", ROOT / "tools" / "predict.py")
predict = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = predict  # its dataclass looks its module up by name
spec.loader.exec_module(predict)

pytestmark = pytest.mark.usefixtures("one_thread")


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims width x height (the pixel data is never reached)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
                     + chunk(b"IEND", b""))


def _parse(*argv):
    return predict.get_args_parser().parse_args(list(argv))


def test_options_are_checked_by_the_parser(capsys):
    assert predict.BACKENDS == quant.BACKENDS
    for bad, message in ((["--topk", "0"], "must be a positive integer (labels to print per image), got 0"),
                         (["--topk", "-1"], "got -1"), (["--topk", "two"], "must be a positive integer, got 'two'"),
                         (["--backend", "foo"], "invalid choice: 'foo' (choose from 'x86', 'fbgemm', 'qnnpack')"),
                         (["--score-threshold", "1.5"], "must be in [0, 1] (a detection score), got 1.5"),
                         (["--score-threshold", "high"], "must be a number in [0, 1], got 'high'")):
        with pytest.raises(SystemExit):
            _parse(*bad)
        assert message in capsys.readouterr().err
    helptext = predict.get_args_parser().format_help()
    assert "(default: x86)" in helptext and "(default: 3)" in helptext and "(default: None)" not in helptext
    flat = " ".join(helptext.split())  # argparse wraps lines at the terminal width
    assert "draw boxes scoring at least this (default: 0.5)" in flat and "(default: next to each image)" in flat


def test_open_image_checks_size_before_decoding(tmp_path):
    _png_header_only(tmp_path / "huge.png", 20000, 20000)
    with pytest.raises(ValueError, match=r"image is 20000x20000 = 400,000,000 pixels, more than the 89,478,485 "
                                         r"accepted \(PIL's decompression-bomb limit\); downscale it first"):
        predict.open_image(tmp_path / "huge.png")
    assert Image.MAX_IMAGE_PIXELS == predict.MAX_PIXELS  # PIL's limit restored
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(ValueError, match="not a readable image"):
        predict.open_image(tmp_path / "text.png")
    with pytest.raises(ValueError, match="no such file"):
        predict.open_image(tmp_path / "missing.png")
    good = (ROOT / "examples" / "ankle_boot_test0.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="cannot decode the image"):
        predict.open_image(tmp_path / "cut.png")


def test_unknown_models_and_unpublished_weights_say_so(use_published_scenes, tmp_path):
    with pytest.raises(SystemExit, match="unknown model 'frostnet_smal_1_0'; did you mean frostnet_small_1_0"):
        predict.load_model("frostnet_smal_1_0", "DEFAULT", "x86")
    # the temporary manifest has no ssdlite_frostnet_small_1_0 weights
    with pytest.raises(SystemExit, match=r"no default INT8 \(x86\) weights exist for 'ssdlite_frostnet_small_1_0'"):
        predict.load_model("ssdlite_frostnet_small_1_0", "DEFAULT", "x86")
    arch = use_published_scenes["models"]["detection"]
    fp32 = use_published_scenes["weights"] / f"{use_published_scenes['entries']['detection']['fp32']}.safetensors"
    with pytest.raises(SystemExit, match=rf"--model {arch} --weights .*fp32.safetensors: weights .* are FP32 but "
                                         r"quantized=True needs INT8 weights"):
        predict.load_model(arch, str(fp32), "x86")
    with pytest.raises(SystemExit, match=r"--weights .*missing.safetensors: no such file"):
        predict.load_model(arch, str(tmp_path / "missing.safetensors"), "x86")
    with pytest.raises(SystemExit, match="weights 'espnet.fashion_scenes.int8_x86' are for 'espnet', not "
                                         "'ssdlite_mobilenet_v2'"):
        predict.load_model(arch, "espnet.fashion_scenes.int8_x86", "x86")


def test_default_images_keep_scenes_and_classification_apart(tmp_path, monkeypatch):
    real = predict.default_images("classification")
    assert [p.name for p in real] == ["ankle_boot_test0.png", "pullover_test1.png", "sandal_test8.png",
                                      "sneaker_test9.png", "t-shirt_top_test19.png", "trouser_test2.png"]
    assert [p.name for p in predict.default_images("detection")] == ["scene_test1.png", "scene_test3.png",
                                                                     "scene_test4.png"]
    (tmp_path / "examples").mkdir()
    for name in ("boot.png", "scene_test1.png", "scene_test1.espnet.png", "boot.frostnet_small_1_0.png", "notes.txt"):
        (tmp_path / "examples" / name).write_bytes(b"")
    monkeypatch.setattr(predict, "ROOT", tmp_path)
    assert [p.name for p in predict.default_images("classification")] == ["boot.png"]  # pictures are outputs
    assert [p.name for p in predict.default_images("segmentation")] == ["scene_test1.png"]


def test_options_that_do_not_apply_say_so(tmp_path):
    for argv, message in (
        (["--model", "frostnet_small_1_0", "--score-threshold", "0.3"],
         ("--score-threshold applies to detection and segmentation models (which write pictures); frostnet_small_1_0 "
          "is a classification model: drop --score-threshold, or pass --model one of ssdlite_frostnet_base_1_0")),
        (["--model", "frostnet_small_1_0", "--out-dir", str(tmp_path), "--score-threshold", "0.3"],
         "--score-threshold and --out-dir apply to"),
        (["--model", "espnet", "--topk", "2"],
         "--topk applies to classification models; espnet is a segmentation model: drop --topk"),
        (["--model", "espnet", "--score-threshold", "0.3"],
         "--score-threshold applies to detection models; espnet is a segmentation model"),
        (["--model", "tiny_dsod", "--out-dir", str(ROOT / "README.md")], "is a file, not a folder"),
    ):
        with pytest.raises(SystemExit) as exc:
            predict.main(_parse(*argv))
        assert message in str(exc.value), (argv, str(exc.value))


def _scene_inputs(tmp_path: Path) -> list[Path]:
    """A bundled scene, the same canvas as 16-bit PNG (same prediction), an unreadable file and a
    float image outside [0, 1] (refused by the weights' transforms)."""
    scene = tmp_path / "scene_test1.png"
    shutil.copyfile(ROOT / "examples" / "scene_test1.png", scene)
    pixels = np.asarray(Image.open(scene))
    Image.fromarray(pixels.astype(np.uint16) * 257).save(tmp_path / "scene16.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG garbage")
    Image.fromarray(pixels.astype(np.float32)).save(tmp_path / "scene255.tiff")
    return [scene, tmp_path / "scene16.png", tmp_path / "broken.png", tmp_path / "scene255.tiff"]


def _reference(name: str, image: Path):
    """The published model's own output for ``image``, outside predict."""
    from frostnet import hub

    entry = hub.get_weights(name)
    with torch.no_grad():
        return entry, hub.load_weights(name)(entry.transforms()(Image.open(image))[None])


def test_detection_writes_labelled_boxes(use_published_scenes, tmp_path, capsys):
    arch = use_published_scenes["models"]["detection"]
    name = use_published_scenes["entries"]["detection"]["int8_x86"]
    paths = _scene_inputs(tmp_path)
    out_dir = tmp_path / "pictures"
    code = predict.main(_parse(*map(str, paths), "--model", arch, "--score-threshold", "0.05", "--out-dir", str(out_dir)))
    out, err = capsys.readouterr()
    assert code == 1 and "2 of 4 images could not be read" in err
    assert f"{tmp_path / 'scene255.tiff'}: skipped: float (mode F) image must hold values in [0, 1], got 0.." in err
    assert out.startswith(f"{name} (int8, x86; test mAP@[.5:.95] ")
    lines = dict(line.split(": ", 1) for line in out.splitlines()[1:])
    entry, ref = _reference(name, paths[0])
    kept = ref[0]["scores"] >= 0.05
    expected = [f"{entry.categories[k]} {s:.2f}" for k, s in zip(ref[0]["labels"][kept].tolist(),
                                                                ref[0]["scores"][kept].tolist())]
    picture = out_dir / f"scene_test1.{arch}.png"
    assert lines["scene_test1.png"] == (f"{len(expected)} boxes (score >= 0.05)" + (": " + ", ".join(expected) if expected
                                                                                   else "") + f" -> {picture}")
    assert lines["scene16.png"].split(" -> ")[0] == lines["scene_test1.png"].split(" -> ")[0]
    assert sorted(p.name for p in out_dir.iterdir()) == [f"scene16.{arch}.png", f"scene_test1.{arch}.png"]  # no temp files
    drawn = Image.open(picture)
    assert drawn.mode == "RGB" and drawn.size == (256, 256)  # the 128x128 canvas enlarged 2x
    plain = np.asarray(Image.open(paths[0]).resize((256, 256), Image.NEAREST).convert("RGB"))
    assert (np.asarray(drawn) != plain).any() == bool(expected)  # boxes drawn, and only then


def test_segmentation_writes_overlay_with_legend(use_published_scenes, tmp_path, capsys):
    arch = use_published_scenes["models"]["segmentation"]
    name = use_published_scenes["entries"]["segmentation"]["int8_x86"]
    scene = _scene_inputs(tmp_path)[0]
    assert predict.main(_parse(str(scene), "--model", arch)) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{name} (int8, x86; test mIoU ")
    picture = tmp_path / f"scene_test1.{arch}.png"  # next to the input
    entry, ref = _reference(name, scene)
    pred = predict.logits_of(ref)[0].argmax(0)
    counts = torch.bincount(pred.flatten(), minlength=len(entry.categories))
    present = [k for k in counts.argsort(descending=True).tolist() if k > 0 and counts[k] > 0]
    texts = [f"{entry.categories[k]} {predict.share(counts[k].item() / pred.numel())}" for k in present]
    assert out.splitlines()[1] == (f"scene_test1.png: classes present: {', '.join(texts) or 'none (background only)'}"
                                   f" -> {picture}")
    sheet = Image.open(picture).convert("RGB")
    assert sheet.width == 256 and sheet.height > 256  # the legend strip under the overlay
    # the same INT8 file given by path: its recorded preprocessing, the same picture
    local = use_published_scenes["weights"] / f"{name}.safetensors"
    assert predict.main(_parse(str(scene), "--model", arch, "--weights", str(local), "--out-dir", str(tmp_path / "f"))) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"{local} (int8, x86; no recorded test metrics)"
    assert out[1].split(" -> ")[0] == f"scene_test1.png: classes present: {', '.join(texts) or 'none (background only)'}"
    assert np.array_equal(np.asarray(Image.open(tmp_path / "f" / picture.name).convert("RGB")), np.asarray(sheet))
    if present:  # the first swatch has the first class's colour
        r, g, b = sheet.getpixel((12, 256 + 10))
        assert f"#{r:02x}{g:02x}{b:02x}" == predict.colour(present[0])


def test_bad_images_are_reported_and_the_rest_predicted(tmp_path, capsys):
    """One run: an 8-bit example, the same image as 16-bit PNG (scaled, not binarised: same
    prediction), a float TIFF, an unreadable file and a missing one -> exit 1 at the end."""
    boot = ROOT / "examples" / "ankle_boot_test0.png"
    pixels = np.asarray(Image.open(boot).convert("L"))
    Image.fromarray(pixels.astype(np.uint16) * 257).save(tmp_path / "boot16.png")
    Image.fromarray(pixels.astype(np.float32) / 255).save(tmp_path / "bootf.tiff")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG garbage")
    paths = [boot, tmp_path / "boot16.png", tmp_path / "broken.png", tmp_path / "bootf.tiff", tmp_path / "nope.png"]
    code = predict.main(_parse(*map(str, paths), "--model", "frostnet_small_1_0", "--topk", "1"))
    out, err = capsys.readouterr()
    assert code == 1
    assert f"{tmp_path / 'broken.png'}: skipped: not a readable image" in err
    assert f"{tmp_path / 'nope.png'}: skipped: no such file" in err and "2 of 5 images could not be read" in err
    lines = dict(line.split(": ", 1) for line in out.splitlines()[1:])
    assert out.startswith("frostnet_small_1_0.fashion_mnist.int8_x86 (int8, x86; test top-1")
    assert lines["ankle_boot_test0.png"].startswith("Ankle boot")
    assert lines["boot16.png"] == lines["ankle_boot_test0.png"] == lines["bootf.tiff"]
