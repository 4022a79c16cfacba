"""tools/predict.py: the main job, and every bad input it meets."""

import importlib.util
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from frostnet import quant

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("frostnet_tools_predict", ROOT / "tools" / "predict.py")
predict = importlib.util.module_from_spec(spec)
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
                         (["--backend", "foo"], "invalid choice: 'foo' (choose from 'x86', 'fbgemm', 'qnnpack')")):
        with pytest.raises(SystemExit):
            _parse(*bad)
        assert message in capsys.readouterr().err
    helptext = predict.get_args_parser().format_help()
    assert "(default: x86)" in helptext and "(default: 3)" in helptext and "(default: None)" not in helptext


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


def test_dense_and_unknown_models_say_so():
    with pytest.raises(SystemExit, match="--model ssdlite_frostnet_small_1_0: detection prediction is not supported "
                                         "by tools/predict.py yet; classification models: frostnet_base_0_35"):
        predict.load_model("ssdlite_frostnet_small_1_0", "DEFAULT", "x86")
    with pytest.raises(SystemExit, match="--model espnet: segmentation prediction is not supported"):
        predict.load_model("espnet", "DEFAULT", "x86")
    with pytest.raises(SystemExit, match="unknown model 'frostnet_smal_1_0'; did you mean frostnet_small_1_0"):
        predict.load_model("frostnet_smal_1_0", "DEFAULT", "x86")


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
