"""Image loading and the one-off resize of a whole folder (no torch import here: the CLI starts fast).

Where the time goes when shrinking a 640x480 COCO JPEG to 256x256 (see benchmarks/resize.py):
full-size JPEG decoding dominates, then the resampling filter, then encoding. So:
- `Image.draft` lets libjpeg decode at 1/2, 1/4 or 1/8 scale straight from the DCT
  coefficients, never producing the full-size pixels. We allow the drafted image to be up to
  10% smaller than the target on an axis (640x480 decodes at 320x240 for a 256x256 target,
  then is stretched 7% vertically): without that slack a 4:3 photo never qualifies;
- the remaining downscale uses an antialiased bilinear filter (Pillow antialiases every filter
  when shrinking), about half the cost of LANCZOS and indistinguishable at this size for a CNN;
- files are spread over all cores with a process pool.
"""
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from PIL import Image, ImageOps

from .atomic import fsync_dir
from .derived import build_lock, write_derived
from .progress import tqdm

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


class ImageReadError(ValueError):
    """An image file that cannot be decoded; the message names the file, `reason` says why."""

    # one argument: a whole message (as DataLoader re-raises it)
    def __init__(self, path: str | os.PathLike[str], reason: str | None = None) -> None:
        super().__init__(path if reason is None else f"cannot read image {path}: {reason}")
        self.path, self.reason = path, reason

    def __reduce__(self) -> tuple[type, tuple[Any, ...]]:   # raised in a DataLoader worker, rebuilt in the main process
        return type(self), (self.path, self.reason)


# greyscale modes deeper than 8 bits: `convert("RGB")` clips them (a 16-bit picture turns white), so
# to_rgb scales them itself
_DEEP_GREY = ("I;16", "I;16L", "I;16B", "I;16N", "I;16S", "I", "F")


def deep_grey_to_l(image: Image.Image) -> Image.Image:
    """An 8-bit "L" image from 16/32-bit integer or floating greyscale (modes I;16*, I, F), scaled, not clipped.

    The rule, one for all these modes: the values are read in the smallest of the ranges 0..1 (mode F
    only: floats from 0 to 1), 0..255, 0..65535 that holds all of them, and that range becomes
    0..255. So I;16 (16-bit PNG, TIFF) is value / 257; 16-bit data stored as 32-bit (mode I, as older
    Pillow reads a 16-bit PNG, or an ImageJ TIFF) is value / 257 too; 8-bit values stored as I or F
    stay as they are. Values outside 0..65535 (negative, or deeper than 16 bits) are stretched from
    their minimum to their maximum. NaN and infinities become 0. (A picture so dark that all its 16-bit
    values are <= 255 is read as 8-bit: from the values alone the two cannot be told apart.)
    """
    import numpy as np  # lazy: only deep greyscale needs it; the CLI's resize and its workers start without it

    values = np.asarray(image, dtype=np.float64)
    finite = np.isfinite(values)
    values = np.where(finite, values, 0.0)
    low, high = (values[finite].min(), values[finite].max()) if finite.any() else (0.0, 0.0)
    if low >= 0 and high <= 1 and image.mode == "F":
        values = values * 255
    elif low >= 0 and high <= 255:
        pass
    elif low >= 0 and high <= 65535:
        values = values / 257
    else:
        values = (values - low) * (255 / (high - low) if high > low else 0.0)
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L")


_ORIENTATION = 0x0112     # the EXIF tag


def to_rgb(image: Image.Image) -> Image.Image:
    """Upright 8-bit RGB from any mode Pillow reads: EXIF rotation applied, alpha composited on white,
    CMYK/L/P/LAB... converted, 16-bit and 32-bit greyscale (I;16, I, F) scaled by deep_grey_to_l."""
    if image.getexif().get(_ORIENTATION, 1) != 1:   # exif_transpose copies even an upright image: 4% of a resize
        image = ImageOps.exif_transpose(image)
    if image.mode in _DEEP_GREY:
        image = deep_grey_to_l(image)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.getchannel("A"))
        return background
    return image.convert("RGB") if image.mode != "RGB" else image


def load_image(path: str | os.PathLike[str], draft_size: tuple[int, int] | None = None) -> Image.Image:
    """Open an image as upright RGB. `draft_size` lets JPEGs decode at a reduced scale >= that size.

    A file that cannot be decoded raises ImageReadError, naming it (a missing one FileNotFoundError)."""
    try:
        with Image.open(path) as image:
            if draft_size is not None and image.format == "JPEG":
                image.draft("RGB", draft_size)
            image.load()
            return to_rgb(image)
    except (FileNotFoundError, IsADirectoryError):
        raise
    except Exception as e:  # PIL's errors rarely name the file: a truncated JPEG is "image file is truncated"
        raise ImageReadError(path, f"{type(e).__name__}: {e}") from e


def list_images(folder: str | os.PathLike[str]) -> list[str]:
    """The image files of a folder, sorted: regular files with an image extension (a FIFO or a
    device named x.jpg would block whoever opens it)."""
    with os.scandir(folder) as entries:          # is_file() from the directory entry: no stat per file
        return sorted(e.name for e in entries if e.name.lower().endswith(IMAGE_EXTENSIONS) and e.is_file())


def draft_size(size: int) -> tuple[int, int]:
    """The smallest decode size resize_images accepts for a size x size output (90% per axis)."""
    return (size * 9 // 10, size * 9 // 10)


_FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG"}


def _resize_one(args: tuple[str, str, int]) -> tuple[str, str] | None:
    """None, or ("read", what) for a source that cannot be decoded, ("write", what) for a failed write."""
    src, dst, size = args
    try:
        image = load_image(src, draft_size=draft_size(size))
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    except Exception as e:  # a corrupt file must not stop a 100k-image run
        return "read", f"{os.path.basename(src)}: {e.reason if isinstance(e, ImageReadError) else e}"
    try:
        ext = os.path.splitext(dst)[1].lower()
        # registered_extensions() imports every Pillow plugin, in each worker: only for the rarer formats
        fmt = _FORMATS.get(ext) or Image.registered_extensions().get(ext, "JPEG")
        # temp file, rename (no per-file fsync: a resized image can be made again, and one that a power cut
        # leaves empty or cut short fails _up_to_date's end-marker check and is redone); one folder fsync at the end
        with write_derived(dst) as f:
            image.save(f, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
        return None
    except Exception as e:  # disk full, read-only: every other file would fail the same way
        return "write", f"cannot write {dst}: {type(e).__name__}: {e}"


SIZE_STAMP = ".resized-size"  # in the output folder: the size its images were made at
_TEMP_FILE = re.compile(r"\.[a-z0-9_]{8}\.tmp$|\.part$")    # atomic_write's temp files (".part": older versions)


def _check_writable(folder: str) -> None:
    """Create `folder` if needed, prove a file can be written there, and remove temporary files
    that a killed run left (older than 10 minutes: a running resize's are seconds old)."""
    try:
        os.makedirs(folder, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-test-")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise PermissionError(f"cannot write to the output folder {folder}: {e.strerror or e}") from None
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        try:
            if _TEMP_FILE.search(name) and time.time() - os.path.getmtime(path) > 600:
                os.remove(path)
        except OSError:
            pass


def _read_size_stamp(folder: str) -> int | None:
    try:
        with open(os.path.join(folder, SIZE_STAMP)) as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


# the last bytes of a complete file of the formats resize writes most
_END_MARKERS = {".jpg": b"\xff\xd9", ".jpeg": b"\xff\xd9", ".png": b"IEND\xaeB`\x82"}


def _complete(path: str, size: int) -> bool:
    """Not empty, and ends as a whole JPEG/PNG does (a file cut short by a crash or a full disk does not)."""
    if size == 0:
        return False
    marker = _END_MARKERS.get(os.path.splitext(path)[1].lower())
    if marker is None:
        return True
    try:
        with open(path, "rb") as f:
            f.seek(max(0, size - len(marker)))
            return f.read() == marker
    except OSError:
        return False


def _up_to_date(src: str, dst: str, check_size: int | None = None) -> bool:
    """dst exists, is complete, is newer than src and, when `check_size` is given, really is that size."""
    try:
        stat = os.stat(dst)
    except OSError:
        return False
    if stat.st_mtime < os.path.getmtime(src) or not _complete(dst, stat.st_size):
        return False
    if check_size is None:
        return True
    try:
        with Image.open(dst) as image:
            return image.size == (check_size, check_size)
    except Exception:
        return False


def resize_images(src: str, dst: str, size: int = 256, workers: int | None = None, progress: bool = True,
                  log: Callable[[str], object] = print) -> dict[str, Any]:
    """Resize every image in `src` to size x size into `dst`, keeping file names.

    Up-to-date outputs of the same size are skipped. Returns a dict with the counts and the list of
    files that could not be read (reported by name, never fatal). A second process resizing into the
    same `dst` waits for the first (a flock on `dst`), then finds its images up to date.
    """
    if not os.path.isdir(src):
        raise FileNotFoundError(f"source image folder not found: {src} (get the data with notebook 01 first)")
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    if os.path.realpath(src) == os.path.realpath(dst):
        raise ValueError(f"--dst {dst} is the source folder: resizing there would overwrite every original; "
                         f"give another folder (the pipeline uses <data>/resized_images/<split>)")
    _check_writable(dst)
    with build_lock(dst, "the resized images", log):       # a flock on the folder itself
        return _resize_all(src, dst, size, workers, progress, log)


def _resize_all(src: str, dst: str, size: int, workers: int | None, progress: bool,
                log: Callable[[str], object] = print) -> dict[str, Any]:
    names = list_images(src)
    # The stamp says which size the folder holds. A different size redoes everything; no stamp
    # (an interrupted or older run) means each existing file's header is checked.
    done_size = _read_size_stamp(dst)
    if done_size is not None and done_size != size:
        log(f"{dst} holds {done_size}x{done_size} images: resizing them again to {size}x{size}")
        os.remove(os.path.join(dst, SIZE_STAMP))
    check_size = None if done_size == size else size
    jobs = [(os.path.join(src, n), os.path.join(dst, n), size) for n in names
            if done_size not in (None, size) or not _up_to_date(os.path.join(src, n), os.path.join(dst, n), check_size)]
    failed: list[str] = []
    workers = workers or os.cpu_count() or 1
    bar = tqdm(total=len(jobs), desc=f"resizing {os.path.basename(src.rstrip('/'))}", unit="img",
               disable=not progress or not jobs)   # nothing to do: no "0img" bar
    if workers == 1 or len(jobs) < 64:
        results: Iterator[tuple[str, str] | None] = map(_resize_one, jobs)
        pool = None
    else:
        Image.preinit()       # the common format plugins, imported once here rather than in each worker
        pool = ProcessPoolExecutor(workers)
        # chunks small enough that the cores finish together (a 32-image chunk is ~0.15 s of one core)
        results = pool.map(_resize_one, jobs, chunksize=max(1, min(16, len(jobs) // (workers * 16))))
    try:
        for error in results:
            if error and error[0] == "write":
                raise OSError(f"{error[1]} (resize stopped: a local disk problem)")
            if error:
                failed.append(error[1])
            bar.update()
    finally:
        bar.close()
        if pool:
            pool.shutdown(cancel_futures=True)
        fsync_dir(dst)
    if done_size != size:
        with open(os.path.join(dst, SIZE_STAMP), "w") as f:
            f.write(str(size))
    if failed:
        log(f"skipped {len(failed)} unreadable image(s):")
        for line in failed:
            log("  " + line)
    return {"total": len(names), "resized": len(jobs) - len(failed),
            "skipped_up_to_date": len(names) - len(jobs), "failed": failed}
