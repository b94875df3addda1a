import io
import os
import subprocess
import sys
import time

import pytest
from conftest import ROOT, run_cli
from PIL import Image

from captioning.images import SIZE_STAMP, load_image, resize_images


@pytest.fixture
def odd_images(tmp_path):
    """Grayscale, CMYK, RGBA PNG, palette PNG with transparency, EXIF-rotated JPEG, a corrupt and a truncated file."""
    src = tmp_path / "src"
    src.mkdir()
    Image.new("L", (40, 30), 128).save(src / "gray.jpg")
    Image.new("CMYK", (40, 30), (0, 255, 255, 0)).save(src / "cmyk.jpg")
    rgba = Image.new("RGBA", (40, 30), (255, 0, 0, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))
    rgba.save(src / "rgba.png")
    pal = Image.new("P", (40, 30), 1)
    pal.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    pal.save(src / "palette.png", transparency=0)
    # a 40x20 landscape stored with EXIF orientation 6 (rotate 90 degrees clockwise to display)
    rotated = Image.new("RGB", (40, 20), (0, 200, 0))
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated.save(src / "exif.jpg", exif=exif)
    (src / "corrupt.jpg").write_bytes(b"this is not an image")
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buf, "JPEG")
    (src / "truncated.jpg").write_bytes(buf.getvalue()[:200])
    (src / "notes.txt").write_text("not an image extension: ignored")
    return src


def test_load_image_gives_upright_rgb(odd_images):
    for name in ("gray.jpg", "cmyk.jpg", "rgba.png", "palette.png", "exif.jpg"):
        assert load_image(odd_images / name).mode == "RGB"
    assert load_image(odd_images / "exif.jpg").size == (20, 40)  # EXIF rotation applied
    assert load_image(odd_images / "rgba.png").getpixel((0, 0)) == (255, 255, 255)  # transparent -> white
    r, g, b = load_image(odd_images / "cmyk.jpg").getpixel((5, 5))
    assert r > 200 and g < 60 and b < 60  # CMYK (0, 255, 255, 0) is red


def test_resize_handles_odd_and_corrupt_images(odd_images, tmp_path, capsys):
    dst = tmp_path / "dst"
    result = resize_images(str(odd_images), str(dst), size=32, workers=2, progress=False)
    good = {"gray.jpg", "cmyk.jpg", "rgba.png", "palette.png", "exif.jpg"}
    assert set(os.listdir(dst)) == good | {SIZE_STAMP}  # same names, nothing for the broken files
    for name in good:
        with Image.open(dst / name) as im:
            assert im.size == (32, 32) and im.mode == "RGB"
    assert sorted(f.split(":")[0] for f in result["failed"]) == ["corrupt.jpg", "truncated.jpg"]
    out = capsys.readouterr().out
    assert "skipped 2 unreadable image(s)" in out and "corrupt.jpg" in out and "truncated.jpg" in out


def test_resize_is_idempotent(odd_images, tmp_path):
    dst = tmp_path / "dst"
    first = resize_images(str(odd_images), str(dst), size=16, progress=False)
    assert first["resized"] == 5
    second = resize_images(str(odd_images), str(dst), size=16, progress=False)
    assert second["resized"] == 0 and second["skipped_up_to_date"] == 5
    os.utime(odd_images / "gray.jpg")  # a newer source is redone
    os.utime(dst / "gray.jpg", (0, 0))
    assert resize_images(str(odd_images), str(dst), size=16, progress=False)["resized"] == 1


def test_a_new_size_redoes_the_folder_and_a_missing_stamp_checks_each_file(odd_images, tmp_path, capsys):
    dst = tmp_path / "dst"
    resize_images(str(odd_images), str(dst), size=16, progress=False)
    again = resize_images(str(odd_images), str(dst), size=24, progress=False)
    assert again["resized"] == 5 and "resizing them again to 24x24" in capsys.readouterr().out
    assert all(Image.open(dst / n).size == (24, 24) for n in os.listdir(dst) if n != SIZE_STAMP)
    assert (dst / SIZE_STAMP).read_text() == "24"

    os.remove(dst / SIZE_STAMP)                       # as after an interrupted run, or one from before stamps
    Image.new("RGB", (16, 16)).save(dst / "gray.jpg")  # one file of the wrong size, newer than its source
    third = resize_images(str(odd_images), str(dst), size=24, progress=False)
    assert third["resized"] == 1 and Image.open(dst / "gray.jpg").size == (24, 24)


def test_parallel_path_over_many_files(tiny_data, tmp_path):
    dst = tmp_path / "r"
    r = resize_images(str(tiny_data / "train2014"), str(dst), size=24, workers=2, progress=False)
    assert r["resized"] == 60 and r["failed"] == []
    assert sorted(os.listdir(dst)) == sorted(os.listdir(tiny_data / "train2014") + [SIZE_STAMP])


def test_missing_source_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="source image folder not found"):
        resize_images(str(tmp_path / "nope"), str(tmp_path / "dst"))


def test_cli_reports_and_exits_1_when_files_failed(odd_images, tmp_path):
    proc = run_cli("resize", "--src", odd_images, "--dst", tmp_path / "d", "--size", 20, "--workers", 1, check=False)
    assert proc.returncode == 1 and "exit code is then 1" in run_cli("resize", "--help").stdout
    assert "5 resized" in proc.stdout and "2 unreadable" in proc.stdout and "corrupt.jpg" in proc.stdout
    os.remove(odd_images / "corrupt.jpg")
    os.remove(odd_images / "truncated.jpg")
    proc = run_cli("resize", "--src", odd_images, "--dst", tmp_path / "d", "--size", 20)     # exit 0: none failed
    assert "5 already up to date" in proc.stdout
    proc = run_cli("resize", "--src", tmp_path / "missing", "--dst", tmp_path / "d", check=False)
    assert proc.returncode != 0 and "missing" in proc.stderr


def test_a_read_only_destination_is_one_line(odd_images, readonly_dir):
    for dst in (readonly_dir, os.path.join(readonly_dir, "resized")):   # the folder, or one to be created in it
        proc = run_cli("resize", "--src", odd_images, "--dst", dst, check=False)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert proc.stderr.startswith(f"error: cannot write to the output folder {dst}"), proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1


def test_a_write_error_stops_the_resize_naming_the_file(odd_images, tmp_path, monkeypatch):
    import captioning.images as images

    def disk_full(path, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(images, "write_derived", disk_full)
    with pytest.raises(OSError, match=r"cannot write .*\.(jpg|png): OSError: .*No space left.*local disk problem"):
        resize_images(str(odd_images), str(tmp_path / "dst"), size=16, workers=1, progress=False)


def test_empty_or_truncated_outputs_are_redone_and_writes_leave_no_temp_files(odd_images, tmp_path):
    dst = tmp_path / "dst"
    resize_images(str(odd_images), str(dst), size=16, progress=False)
    (dst / "gray.jpg").write_bytes(b"")                               # a 0-byte file, newer than its source
    whole = (dst / "exif.jpg").read_bytes()
    (dst / "exif.jpg").write_bytes(whole[: len(whole) // 2])           # cut short
    png = (dst / "rgba.png").read_bytes()
    (dst / "rgba.png").write_bytes(png[:-5])
    (dst / "old.jpg.k3j5x0ab.tmp").write_bytes(b"left by a kill -9")
    os.utime(dst / "old.jpg.k3j5x0ab.tmp", (time.time() - 3600,) * 2)
    again = resize_images(str(odd_images), str(dst), size=16, progress=False)
    assert again["resized"] == 3 and again["skipped_up_to_date"] == 2
    assert (dst / "exif.jpg").read_bytes()[-2:] == b"\xff\xd9" and Image.open(dst / "gray.jpg").size == (16, 16)
    assert sorted(os.listdir(dst)) == sorted(["gray.jpg", "cmyk.jpg", "rgba.png", "palette.png", "exif.jpg",
                                              SIZE_STAMP])


def test_a_corrupt_resized_image_above_one_percent_stops_training_in_one_line(tiny_copy, tmp_path):
    """A resized file that passes the checks but does not decode is skipped, counted and named; here it is
    1 of 60 train images, more than 1%: the run stops with one line naming the count, the split and the
    file, from a DataLoader worker too, no traceback. (tests/test_bad_images.py: below 1% trains on.)"""
    from test_training import _train_cmd

    for split in ("train", "val"):
        resize_images(str(tiny_copy / f"{split}2014"), str(tiny_copy / "resized_images" / f"{split}2014"), 36,
                      progress=False)
    folder = tiny_copy / "resized_images" / "train2014"
    empty, bad = sorted(n for n in os.listdir(folder) if n.endswith(".jpg"))[:2]
    (folder / empty).write_bytes(b"")                        # redone by the resize check before training
    (folder / bad).write_bytes(b"\xff\xd8 garbage that ends as a JPEG does \xff\xd9")
    for cache in ([], ["--no-cache"]):                       # the feature extraction, the chapter's loop
        proc = run_cli(*_train_cmd(tiny_copy, tmp_path / f"m{len(cache)}", "--epochs", "1",
                                   "--num-workers", "1", *cache)[3:], check=False)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert proc.stderr.startswith(f"error: 1 of 60 images of train2014 ({folder}) are unreadable, more than 1%: "
                                      f"{bad} (UnidentifiedImageError: cannot identify image file"), proc.stderr
    assert (folder / empty).stat().st_size > 0


def test_resize_cli_does_not_import_torch(odd_images, tmp_path):
    code = ("import sys, runpy; sys.argv = ['captioning', 'resize', '--src', sys.argv[1], '--dst', sys.argv[2]];"
            "import captioning.__main__ as m\ntry:\n m.main()\n"
            "finally:\n print('TORCH' if 'torch' in sys.modules else 'NOTORCH')")
    out = subprocess.run([sys.executable, "-c", code, str(odd_images), str(tmp_path / "d")], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 1 and out.stdout.strip().endswith("NOTORCH")     # 1: two unreadable images


def test_resize_refuses_to_overwrite_its_sources(odd_images):
    before = {p.name: p.read_bytes() for p in odd_images.iterdir() if p.is_file()}
    proc = run_cli("resize", "--src", odd_images, "--dst", str(odd_images) + "/.", check=False)
    assert proc.returncode == 1 and "would overwrite every original" in proc.stderr
    assert {p.name: p.read_bytes() for p in odd_images.iterdir() if p.is_file()} == before



def _grey_picture():
    """An 8-bit greyscale picture with every value 0..255 (a gradient and a dark square on it)."""
    import numpy as np

    values = (np.arange(48 * 64).reshape(48, 64) % 256).astype(np.uint8)
    values[10:20, 10:30] = 3
    return values


def test_16_and_32_bit_greyscale_are_scaled_not_clipped(tmp_path):
    """16-bit PNG (I;16), a big-endian I;16B, 32-bit integer (I) and float (F) TIFFs of one picture load as the
    8-bit version does: `convert("RGB")` alone clips them (all but the darkest pixels become white)."""
    import numpy as np

    values = _grey_picture()
    Image.fromarray(values, "L").save(tmp_path / "grey8.png")
    wide = values.astype(np.uint16) * 257                                  # 0..255 -> 0..65535
    Image.fromarray(wide).save(tmp_path / "grey16.png")
    Image.fromarray(wide).save(tmp_path / "grey16.tif")
    Image.fromarray(wide.astype(np.int32), "I").save(tmp_path / "grey32i.tif")
    Image.fromarray(values.astype(np.float32) / 255, "F").save(tmp_path / "grey32f.tif")
    Image.fromarray(values.astype(np.int32), "I").save(tmp_path / "grey8_as_i.tif")     # 8-bit values in 32 bits
    expected = np.asarray(load_image(tmp_path / "grey8.png"))
    assert expected.shape == (48, 64, 3) and expected.min() == 0 and expected.max() == 255
    modes = {}
    for name in ("grey16.png", "grey16.tif", "grey32i.tif", "grey32f.tif", "grey8_as_i.tif"):
        with Image.open(tmp_path / name) as image:
            modes[name] = image.mode
        got = load_image(tmp_path / name)
        assert got.mode == "RGB", name
        pixels = np.asarray(got).astype(int)
        assert (pixels == 255).mean() < 0.05 and (pixels == 0).mean() < 0.05, f"{name} clipped to white or black"
        assert np.abs(pixels - expected).max() <= 1, name
    assert modes["grey16.png"].startswith("I;16") and modes["grey32i.tif"] == "I" and modes["grey32f.tif"] == "F"


def test_every_deep_greyscale_mode_and_odd_ranges():
    import numpy as np

    from captioning.images import to_rgb

    values = _grey_picture()
    wide = values.astype(np.uint16) * 257
    for mode, dtype in (("I;16", "<u2"), ("I;16B", ">u2"), ("I;16L", "<u2")):   # Pillow's convert() clips to them
        got = np.asarray(to_rgb(Image.frombytes(mode, (64, 48), wide.astype(dtype).tobytes())))
        assert np.abs(got[..., 0].astype(int) - values).max() <= 1 and (got[..., 0] == got[..., 2]).all(), mode
    # floats beyond 0..1 and 0..65535, negative ones: stretched from their minimum to their maximum
    stretched = np.asarray(to_rgb(Image.fromarray(values.astype(np.float32) * 1000 - 5e4, "F")))[..., 0]
    assert stretched.min() == 0 and stretched.max() == 255 and np.abs(stretched.astype(int) - values).max() <= 1
    # a float image with NaN: no error, NaN reads as 0
    nan = values.astype(np.float32) / 255
    nan[0, 0] = np.nan
    assert to_rgb(Image.fromarray(nan, "F")).getpixel((0, 0)) == (0, 0, 0)
    assert to_rgb(Image.fromarray(np.full((4, 4), -7, np.int32), "I")).getpixel((1, 1)) == (0, 0, 0)
