"""Resize benchmark: the chapter's sequential reshape_images loop vs captioning.images.resize_images,
in-process and as a user runs it (`python -m captioning resize`, the whole process timed).

    python benchmarks/resize.py [--images 1000] [--repeats 5]

All resize the same photo-like 640x480 JPEGs (made from matplotlib's sample photo) to 256x256,
in the same run, alternating; the table gives median wall times and the ratios to the chapter's
loop. A breakdown of one image's cost (decode, filter, encode) shows where the time goes, and the
CLI on a folder already done shows its fixed cost (start, imports, up-to-date checks).
"""
import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import matplotlib
from PIL import Image, ImageOps

from captioning.images import draft_size, resize_images


def make_photos(folder, n):
    """n different 640x480 JPEGs cut from the Grace Hopper photo (crops, flips, colour shifts)."""
    src = Image.open(os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")).convert("RGB")
    os.makedirs(folder, exist_ok=True)
    w, h = src.size
    for i in range(n):
        box_w = 300 + (i * 37) % (w - 300)
        box_h = box_w * 3 // 4
        if box_h > h:
            box_h = h
            box_w = box_h * 4 // 3
        x, y = (i * 53) % (w - box_w + 1), (i * 29) % (h - box_h + 1)
        im = src.crop((x, y, x + box_w, y + box_h)).resize((640, 480), Image.BICUBIC)
        if i % 2:
            im = ImageOps.mirror(im)
        im = Image.eval(im, lambda v, s=i % 7: min(255, v + 4 * s))
        im.save(os.path.join(folder, f"COCO_train2014_{i:012d}.jpg"), quality=90)


# --- the chapter's code (Image.ANTIALIAS is gone from Pillow; LANCZOS is the same filter) ---
def reshape_image(image, shape):
    return image.resize(shape, Image.LANCZOS)


def reshape_images(image_path, output_path, shape):
    images = os.listdir(image_path)
    for im in images:
        with open(os.path.join(image_path, im), "r+b") as f:
            with Image.open(f) as image:
                image = reshape_image(image, shape)
                image.save(os.path.join(output_path, im), image.format)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(src, dst):
    """`python -m captioning resize` as a shell user runs it: a new process, output to a terminal-less pipe."""
    subprocess.run([sys.executable, "-m", "captioning", "resize", "--src", src, "--dst", dst, "--size", "256"],
                   cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def breakdown(path, size=256, n=50):
    """Median ms per image for each stage, on one file."""
    def decode_full():
        with Image.open(path) as im:
            im.load()
    def decode_draft():
        with Image.open(path) as im:
            im.draft("RGB", draft_size(size))
            im.load()
    full = Image.open(path)
    full.load()
    drafted = Image.open(path)
    drafted.draft("RGB", draft_size(size))
    drafted.load()
    small = full.resize((size, size))
    stages = {
        "decode full 640x480": decode_full,
        "decode with draft (DCT scaling)": decode_draft,
        "LANCZOS 640x480 -> 256": lambda: full.resize((size, size), Image.LANCZOS),
        "BILINEAR 640x480 -> 256": lambda: full.resize((size, size), Image.BILINEAR),
        f"BILINEAR {drafted.size[0]}x{drafted.size[1]} (drafted) -> 256":
            lambda: drafted.resize((size, size), Image.BILINEAR),
        "encode 256x256 JPEG": lambda: small.save(os.devnull, "JPEG", quality=90),
    }
    return {name: 1000 * statistics.median(timed(fn) for _ in range(n)) for name, fn in stages.items()}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="resize-bench-")
    try:
        src = os.path.join(work, "src")
        make_photos(src, args.images)
        print(f"{args.images} JPEGs of 640x480 -> 256x256, {os.cpu_count()} CPUs, median of {args.repeats} runs each\n")
        for name, ms in breakdown(os.path.join(src, sorted(os.listdir(src))[0])).items():
            print(f"  {name:<44} {ms:6.2f} ms")
        chapter, ours, cmd, again = [], [], [], []
        for r in range(args.repeats):  # alternate, so machine noise hits all alike
            out = os.path.join(work, f"chapter{r}")
            os.makedirs(out)
            chapter.append(timed(lambda: reshape_images(src, out, (256, 256))))
            ours.append(timed(lambda: resize_images(src, os.path.join(work, f"ours{r}"), 256, progress=False)))
            cmd.append(timed(lambda: cli(src, os.path.join(work, f"cli{r}"))))
            again.append(timed(lambda: cli(src, os.path.join(work, f"cli{r}"))))   # all up to date
        c, o, k, a = (statistics.median(t) for t in (chapter, ours, cmd, again))
        print(f"\n{'method':<60}{'median s':>10}{'images/s':>10}{'vs chapter':>12}")
        for name, t in (("chapter: sequential reshape_images, LANCZOS", c),
                        ("resize_images in-process: draft + BILINEAR, all cores", o),
                        ("python -m captioning resize (whole process)", k)):
            print(f"{name:<60}{t:>10.2f}{args.images / t:>10.0f}{c / t:>11.1f}x")
        print(f"{'python -m captioning resize, all up to date (fixed cost)':<60}{a:>10.2f}")
        print(f"\nspeed-up: in-process {c / o:.1f}x, CLI {c / k:.1f}x")
    finally:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
