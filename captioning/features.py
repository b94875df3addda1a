"""Encoder feature cache: run the frozen backbone once per image instead of once per caption per step.

With a frozen backbone the chapter recomputes ResNet-152 for every caption at every step,
so each image goes through it 5 times per epoch. Here the backbone's output is stored once
and training reads it instead. Only the Linear+BatchNorm head and the LSTM are trained on
top, exactly as in the chapter. Two kinds of cache:

- "views": each training image is encoded K times, once per augmented view (a random crop, and
  a flip where allowed), as pooled vectors; training draws one view per caption per step, or,
  with `cache_jitter`, the views' mean plus a crop deviation borrowed from another image.
- "maps": each training image is encoded whole (and mirrored, where flips are allowed), and the
  last convolutional map is kept. Each caption at each step gets a fresh random crop taken in
  feature space: the crop's window is average-pooled from the map (pool_window). One or two
  encoder passes per image give a continuous family of crops, at K=1 or 2's extraction cost, but
  a map takes h x w times a pooled vector's space (8 x 8 for ResNet at 256 px).
- "grids": for the attention decoder (captioning.attention), the K augmented views as a views cache
  makes them, each kept as the chosen stage's grid (D, h, w) instead of its average: h x w times a
  views cache's space (7 x 7 x 128 per view for the tiny preset's ResNet-18 layer2, 7 x 7 x 2048 for
  COCO's ResNet-152 layer4).

Layout: features_dir/<split>-<backbone>-<kind>-<key>/features.npy  (fp16: (images, K, D) or
                                                        (images, flips or K, D, h, w))
                                                    /meta.json  (what the key was made of, rows done,
                                                                 "complete" once every row is written)
                                                    /lock       (flock: extraction, readers, prune)
The key hashes the kind, the backbone and its weights' fingerprint (the weights themselves, not the
file's path: the same weights reached through two models folders are one cache), the transform, the
view count and the image list, so a change never reuses stale features. Extraction writes rows in
order with plain file writes into space reserved up front (a full disk is one clear error, never a
SIGBUS) and records how many are done after each batch: an interrupted run resumes where it stopped.
Opening a cache touches its meta.json, so its modification time says when it was last used;
`prune_feature_caches` (`python -m captioning features --prune`) removes the caches that
a change of backbone, size, K or seed left behind, but never one that is being extracted or read:
extraction holds the folder's lock exclusively, and an open cache holds it shared.
"""
import errno
import fcntl
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist
import torch.utils.data as data

from .atomic import atomic_write_json
from .checkpoint import os_error, write_failed
from .config import Config
from .data import (
    CocoCaptionDataset,
    TrainTransform,
    Unreadable,
    eval_transform,
    seeded_generator,
    skipped_line,
    too_many_unreadable,
)
from .images import ImageReadError, load_image
from .progress import tqdm

if TYPE_CHECKING:                      # for the type hints only: the encoder is built elsewhere
    from .model import CNNModel


def backbone_fingerprint(encoder: "CNNModel") -> str:
    """A cheap hash of the backbone's weights (first values of every tensor + shapes)."""
    h = hashlib.sha1()
    for name, tensor in encoder.resnet_module.state_dict().items():
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode())
        h.update(tensor.detach().flatten()[:64].float().cpu().numpy().tobytes())
    return h.hexdigest()


KINDS = ("maps", "views", "grids")


class _ImageViews(data.Dataset):
    """Item i: the K transformed views of image i, stacked (K, 3, H, W).

    For a map cache the views are the whole image and, when K is 2, its mirror image.
    """

    def __init__(self, caption_dataset, transform, views, seed, kind="views"):
        self.ds, self.transform, self.views, self.seed, self.kind = caption_dataset, transform, views, seed, kind

    def __len__(self):
        return len(self.ds.image_ids)

    def __getitem__(self, i):
        try:
            image = load_image(self.ds.image_path(i))
        except ImageReadError as e:                      # no row for it: _collate_views leaves it out
            return Unreadable(os.path.basename(self.ds.image_path(i)), e.reason)
        if self.kind == "maps":
            whole = self.transform(image)
            return torch.stack([whole, whole.flip(-1)][:self.views])
        if isinstance(self.transform, TrainTransform):
            return torch.stack([self.transform(image, generator=seeded_generator(self.seed, i, k))
                                for k in range(self.views)])
        return self.transform(image).unsqueeze(0).expand(self.views, -1, -1, -1)


def _collate_views(batch):
    """(the readable items stacked (B', K, 3, H, W) or None, their positions in the batch, the batch's size,
    {position: (file name, reason)} of the unreadable ones)."""
    good = [k for k, item in enumerate(batch) if not isinstance(item, Unreadable)]
    bad = {k: (item.name, item.reason) for k, item in enumerate(batch) if isinstance(item, Unreadable)}
    return (torch.stack([batch[k] for k in good]) if good else None), good, len(batch), bad


def window_weights(start: torch.Tensor, size: torch.Tensor, cells: int) -> torch.Tensor:
    """(B,) window starts and sizes in cell units -> (B, cells): the share of each cell in the window.

    Cell j covers [j, j + 1); a window [start, start + size) that cuts a cell takes that part of it.
    """
    j = torch.arange(cells, dtype=start.dtype, device=start.device)
    overlap = (torch.minimum(start[:, None] + size[:, None], j + 1) - torch.maximum(start[:, None], j)).clamp(min=0)
    return overlap / overlap.sum(1, keepdim=True)


def pool_window(maps: torch.Tensor, top: torch.Tensor, left: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """Average-pool one square window per feature map: a crop taken in feature space.

    maps (B, C, h, w); top, left, size (B,) in cell units. Returns (B, C), what `extract` gives for
    the same crop of the image, approximately: each cell stands for its patch of the image, and a
    window that cuts a cell takes the cut share of it.
    """
    maps = maps.float()
    wy = window_weights(top, size, maps.size(2))
    wx = window_weights(left, size, maps.size(3))
    return torch.einsum("bchw,bh,bw->bc", maps, wy, wx)


def meta_checksum(meta: dict) -> str:
    """The sha1 of a cache's meta.json without its own "checksum" field."""
    body = {k: v for k, v in meta.items() if k != "checksum"}
    return hashlib.sha1(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _write_meta(path, meta):
    _write_json(path, {**meta, "checksum": meta_checksum(meta)})


def _write_json(path, obj):
    try:
        atomic_write_json(path, obj, indent=1)
    except OSError as e:
        raise write_failed(e, path) from e


def _map_size(encoder, sample, device):
    """The (h, w) of the backbone's last feature map for images shaped like `sample` (3, H, W)."""
    with torch.no_grad():
        return tuple(encoder.extract_map(sample[None].to(device)).shape[2:])


def build_feature_cache(encoder: "CNNModel", caption_dataset: CocoCaptionDataset, transform: Callable, views: int,
                        features_dir: str | os.PathLike[str], split: str, device: torch.device,
                        batch_size: int = 64, num_workers: int = 0, seed: int = 0,
                        amp_dtype: torch.dtype | None = None, channels_last: bool = False, progress: bool = True,
                        kind: str = "views", log: Callable[[str], object] = print) -> np.memmap:
    """Extract (or resume extracting) the cache; returns a read-only fp16 memmap.

    kind "views": (images, K, D), one pooled vector per transformed view.
    kind "maps": (images, K, D, h, w), the feature maps of the whole image (and its mirror when K=2);
    `transform` then gives the whole image (eval_transform(resize_size, resize_size)).

    The returned memmap holds a shared lock on its folder for as long as it lives, so that
    `prune_feature_caches` leaves the cache of a running trainer alone; extraction holds it exclusively.

    An image that cannot be read gets no features (its row stays zeros): meta.json lists it under
    "unreadable", and the memmap's `unreadable` ({row: (file name, reason)}) lets CachedCaptionDataset
    leave out its captions. More than 1% of the images unreadable stops with an error naming them.

    The cache verifies itself before it is read: meta.json holds its own checksum and the array's
    shape, dtype, size in bytes and header checksum; a cache that fails (a truncated or resized
    features.npy, a corrupted header, a meta.json that does not match) is reported by path and
    extracted again, never read.
    """
    _check_kind(kind, views)
    views_of = _ImageViews(caption_dataset, transform, views, seed, kind)
    meta = _identity(encoder, caption_dataset, transform, views, seed, split, kind)
    folder = os.path.join(features_dir, f"{split}-{encoder.backbone_name}-{kind}-{cache_key(meta)}")
    meta_path, array_path = os.path.join(folder, "meta.json"), os.path.join(folder, "features.npy")
    shape: tuple[int, ...] = (meta["images"], views, encoder.feature_size)
    if kind in ("maps", "grids"):
        meta["map"] = list(_map_size(encoder, views_of[0][0], device))   # a list, as meta.json gives it back
        shape += tuple(meta["map"])

    lock, state = _lock_for_extraction(folder, meta_path, array_path, shape, meta, log)
    try:
        if state.damaged:
            log(f"feature cache {folder} is damaged ({state.damaged}): extracting it again")
            try:
                os.remove(array_path)
            except FileNotFoundError:
                pass
        if not state.complete:
            state = _extract(encoder, views_of, meta, folder, shape, state, lock, batch_size, num_workers,
                             amp_dtype, channels_last, progress, kind, device, log)
        unreadable = {int(i): (name, reason) for i, name, reason in state.meta.get("unreadable", [])}
        error = too_many_unreadable(dict(unreadable.values()), shape[0], caption_dataset.data_path)
        if error:
            raise error
        cache = np.load(array_path, mmap_mode="r")
        os.utime(meta_path)                                          # last used: now
        fcntl.flock(lock, fcntl.LOCK_SH)        # extracted: others may read it too, and prune must not delete it
    except BaseException:
        lock.close()
        raise
    cache.lock = lock                           # released when the memmap is garbage collected
    cache.unreadable = unreadable               # {row: (file name, reason)}: images without features
    cache.kind = kind
    return cache


def _check_kind(kind, views):
    """A ValueError for a kind that is not one of KINDS, or a view count that the kind cannot hold."""
    if kind not in KINDS:
        raise ValueError(f"cache kind must be one of {KINDS}, got {kind!r}")
    if views < 1 or (kind == "maps" and views > 2):
        raise ValueError(f"a {kind} cache holds 1{'-2' if kind == 'maps' else ' or more'} views, got {views}")


def _identity(encoder, caption_dataset, transform, views, seed, split, kind):
    """What a cache is made of (meta.json's first fields): the backbone, its weights, the transform, the
    view count, the image list and the images' file sizes. `cache_key` hashes all but the sizes."""
    names = [caption_dataset.coco.imgs[i]["file_name"] for i in caption_dataset.image_ids]
    return {
        "kind": kind, "backbone": encoder.backbone_name, "weights": encoder.weights_id,
        "fingerprint": backbone_fingerprint(encoder), "transform": repr(transform),
        "views": views, "seed": seed, "split": split, "dim": encoder.feature_size,
        "images": len(names), "image_list": hashlib.sha1("\n".join(names).encode()).hexdigest(),
        "image_sizes": image_sizes_sha1(caption_dataset),
    }


def image_sizes_sha1(caption_dataset: CocoCaptionDataset) -> str:
    """A hash of every image file's size, in the dataset's order (-1 for a file that is gone).

    Images made again under the same names (a data folder generated anew, photos replaced) keep the
    image list and change the sizes: a cache extracted from the old ones is then extracted again
    rather than read. One stat per image, no reading: cheap at COCO's scale."""
    def size(k: int) -> int:
        try:
            return os.path.getsize(caption_dataset.image_path(k))
        except OSError:
            return -1
    return hashlib.sha1(",".join(str(size(k)) for k in range(len(caption_dataset.image_ids))).encode()).hexdigest()


def cache_key(meta: dict) -> str:
    """The cache folder's key: a hash of everything that shapes the features.

    The weights are known by their fingerprint, not by their name: the same weights file reached
    through two paths (two models folders, a moved data_dir) is one cache, and a file retrained in
    place is another. The images' sizes are not in the key but checked when the cache is opened
    (_verify), so that a cache made before they were recorded keeps its folder."""
    identity = {k: v for k, v in meta.items() if k not in ("weights", "done", "complete", "map", "image_sizes")}
    return hashlib.sha1(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]


LOCK_NAME = "lock"


def _lock(folder, how, make_folder=True):
    """folder/lock, flock()ed `how` (LOCK_SH or LOCK_EX, | LOCK_NB): an open file, or None when
    LOCK_NB finds it taken or (make_folder=False) the folder is gone. A lock file deleted by a prune
    while we waited for it is not the lock any more: the new one is taken instead."""
    path = os.path.join(folder, LOCK_NAME)
    while True:
        if make_folder:
            os.makedirs(folder, exist_ok=True)
        try:
            f = open(path, "a")
        except FileNotFoundError:
            if make_folder:
                continue
            return None
        try:
            fcntl.flock(f, how)
        except BlockingIOError:
            f.close()
            return None
        try:
            if os.path.samestat(os.fstat(f.fileno()), os.stat(path)):
                return f
        except FileNotFoundError:
            pass
        f.close()
        if not make_folder:
            return None


def _lock_for_extraction(folder, meta_path, array_path, shape, expected, log):
    """(lock, _State): a shared lock when the cache is complete, else an exclusive one (to extract).

    Waits while another process extracts this same cache, then uses what it wrote."""
    said = False
    while True:
        lock = _lock(folder, fcntl.LOCK_SH | fcntl.LOCK_NB)
        if lock is None:
            if not said:
                log(f"waiting: {folder} is being extracted (or pruned) by another process")
                said = True
            lock = _lock(folder, fcntl.LOCK_SH)
        state = _progress(meta_path, array_path, shape, expected)
        if state.complete:
            return lock, state
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:       # another process is about to extract it: let it, then look again
            lock.close()
            time.sleep(0.5)
            continue
        return lock, _progress(meta_path, array_path, shape, expected)    # re-read: the lock was let go meanwhile


class _State:
    """Where a cache stands: rows done, complete, why it is damaged (None: it is not), its meta.json."""

    def __init__(self, done=0, complete=False, damaged=None, meta=None):
        self.done, self.complete, self.damaged, self.meta = done, complete, damaged, meta or {}


def _header_sha1(path, offset):
    with open(path, "rb") as f:
        return hashlib.sha1(f.read(offset)).hexdigest()


def _progress(meta_path, array_path, shape, expected):
    """The _State of the cache at these paths, verified: a fresh one when there is none (or nothing was
    written yet), a damaged one, saying why, when meta.json or features.npy fails a check."""
    if not os.path.exists(meta_path) and not os.path.exists(array_path):
        return _State()
    state = _verify(meta_path, array_path, shape, expected)
    if isinstance(state, str):                  # damaged; but a cache that claims no row loses nothing
        return _State(damaged=state)
    return state


def _verify(meta_path, array_path, shape, expected):
    """A _State, or the reason the cache is damaged (a str)."""
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except FileNotFoundError:
        return "meta.json is missing"
    except (OSError, ValueError) as e:
        return f"meta.json cannot be read: {e}"
    if not isinstance(meta, dict):
        return "meta.json is not a JSON object"
    if "checksum" in meta and meta["checksum"] != meta_checksum(meta):
        return "meta.json does not match its checksum"
    # "map" and "image_sizes" came later: a cache without them was made before they were recorded
    other = [k for k, v in expected.items()
             if k != "weights" and meta.get(k, v if k in ("map", "image_sizes") else None) != v]
    if other == ["image_sizes"]:
        return "its images have changed since it was extracted: their file sizes differ"
    if other:
        return f"meta.json describes another cache: {', '.join(other)} differ"
    done = meta.get("done", 0)
    if not isinstance(done, int) or not 0 <= done <= shape[0]:
        return f"meta.json says {done!r} rows are done, of {shape[0]}"
    if not os.path.exists(array_path):
        return _State(meta=meta) if done == 0 else "features.npy is missing"
    info, size = meta.get("array"), os.path.getsize(array_path)
    if info:
        if size != info.get("bytes"):
            return f"features.npy is {size:,} bytes, expected {info.get('bytes'):,}"
        if _header_sha1(array_path, info.get("offset", 0)) != info.get("header_sha1"):
            return "the header of features.npy does not match its checksum"
        if list(info.get("shape", ())) != list(shape) or info.get("dtype") != "float16":
            return f"meta.json records an array of shape {info.get('shape')} {info.get('dtype')}, " \
                   f"expected {list(shape)} float16"
    try:
        array = np.load(array_path, mmap_mode="r")
    except (OSError, ValueError) as e:
        return f"features.npy cannot be read: {e}"
    if array.shape != shape or array.dtype != np.float16:
        return f"features.npy holds {array.dtype} {array.shape}, expected float16 {shape}"
    if not info and size != array.offset + array.nbytes:          # written before the checks existed
        return f"features.npy is {size:,} bytes, expected {array.offset + array.nbytes:,}"
    # written before "complete" existed: rows were flushed before "done" was, so done == images was the mark
    complete = bool(meta.get("complete", done >= shape[0])) and done >= shape[0]
    return _State(done, complete, None, meta)


def _extract(encoder, views_of, meta, folder, shape, state, lock, batch_size, num_workers, amp_dtype,
             channels_last, progress, kind, device, log):
    """Write rows `state.done`.. of the cache, holding its exclusive lock; meta.json says "complete" last.
    Returns the complete cache's _State.

    Rows are written with plain pwrite() calls into space reserved beforehand (posix_fallocate), never
    through a memmap: a store into a memmapped page that the disk has no room for kills the process
    with SIGBUS (exit 135, no message), where a write() raises ENOSPC, which becomes the one line
    "no space left on device writing PATH". The reservation also finds a full disk before the first
    image rather than hours into the run. Each batch is one pwrite of contiguous rows plus an
    fdatasync (the memmap's flush() was an msync: same durability), then meta.json's "done".
    It costs nothing: writing 64-image batches on ext4 took 1.8 ms (views K=2, D=2048) and 69 ms
    (maps 2x2048x8x8) per batch, reservation included, against 3.4 and 93 ms for the memmap's
    store and flush; a ResNet-152 batch takes far longer to compute than either.
    """
    meta_path, array_path = os.path.join(folder, "meta.json"), os.path.join(folder, "features.npy")
    n, row_bytes = shape[0], 2 * int(np.prod(shape[1:]))
    meta, done, unreadable, offset = _prepare_array(folder, meta_path, array_path, meta, shape, state, kind, log)
    fd = os.open(array_path, os.O_RDWR)
    try:
        mine = os.fstat(fd)
        _reserve(fd, offset + done * row_bytes, (n - done) * row_bytes, array_path, new_file=done == 0)
        loader = data.DataLoader(data.Subset(views_of, range(done, n)), batch_size=batch_size,
                                 num_workers=num_workers, collate_fn=_collate_views)
        autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext()
        extractor = _frozen_extractor(encoder, kind, channels_last)
        what = _extraction_label(kind, shape)
        with tqdm(total=n, initial=done, desc=f"extracting {meta['split']} features ({what})",
                  unit="img", disable=not progress) as bar:
            for batch, good, b, bad in loader:                            # (B', K, 3, H, W) readable ones
                rows = _encode_batch(extractor, batch, good, b, shape, device, channels_last, autocast)
                unreadable += [[done + k, name, reason] for k, (name, reason) in sorted(bad.items())]
                if not np.isfinite(rows).all():
                    raise FloatingPointError(f"backbone features overflow float16 (images {done}..{done + b}); "
                                             f"is the backbone's weights file right?")
                _pwrite(fd, rows.tobytes(), offset + done * row_bytes, array_path)
                _check_still_there(array_path, mine, folder)
                done += b
                # the last one says "complete"
                _write_meta(meta_path, {**meta, "done": done, "complete": done >= n, "unreadable": unreadable})
                bar.update(b)
                if bad:
                    error = too_many_unreadable({u[1]: u[2] for u in unreadable}, n, views_of.ds.data_path)
                    if error:
                        raise error
    finally:
        os.close(fd)
    return _State(done, True, None, {**meta, "done": done, "complete": True, "unreadable": unreadable})


def _prepare_array(folder, meta_path, array_path, meta, shape, state, kind, log):
    """Ready features.npy for the rows still to write: a new (or damaged) cache's is created, once the disk is
    known to hold it; an interrupted one's is kept, and the disk checked for what it has yet to allocate.
    meta.json records what the array is checked against and the rows done, not yet "complete".
    Returns (meta with its "array" record, the rows done, the unreadable ones among them, the data's offset)."""
    done = 0 if state.damaged else state.done
    unreadable = [] if done == 0 else [u for u in state.meta.get("unreadable", []) if u[0] < done]
    array = state.meta.get("array") if done else None
    if done == 0:
        _check_space(folder, 2 * int(np.prod(shape)), kind, log)
        offset = _create_array(array_path, shape)
    else:
        offset = np.load(array_path, mmap_mode="r").offset
    if not array:           # what the cache is checked against whenever it is opened
        array = {"shape": list(shape), "dtype": "float16", "offset": offset,
                 "bytes": offset + 2 * int(np.prod(shape)), "header_sha1": _header_sha1(array_path, offset)}
    meta = {**meta, "array": array}
    _write_meta(meta_path, {**meta, "done": done, "complete": False, "unreadable": unreadable})
    if done:
        st = os.stat(array_path)
        # a cache started by earlier versions is a sparse file: only what it has allocated is on disk
        _check_space(folder, max(0, st.st_size - st.st_blocks * 512), kind, log, resumed=True)
    return meta, done, unreadable, offset


def _frozen_extractor(encoder, kind, channels_last):
    """The backbone to extract with: extract() / extract_map(), BatchNorm folded."""
    encoder.eval()
    extractor = encoder.frozen_extractor(maps=kind == "maps")
    if channels_last:
        extractor.to(memory_format=torch.channels_last)
    return extractor


def _extraction_label(kind, shape):
    """What the progress bar says is extracted: "K=2", or "maps 8x8, flipped too"."""
    if kind == "grids":
        return f"grids {'x'.join(map(str, shape[3:]))}, K={shape[1]}"
    return f"maps {'x'.join(map(str, shape[3:]))}{', flipped too' if shape[1] == 2 else ''}" \
        if kind == "maps" else f"K={shape[1]}"


def _encode_batch(extractor, batch, good, b, shape, device, channels_last, autocast):
    """A batch's b rows of the cache, fp16: the features of the readable images (at positions `good`),
    zeros for the others."""
    rows = np.zeros((b, *shape[1:]), np.float16)                # an unreadable image's row: zeros
    if batch is not None:
        images = batch.flatten(0, 1).to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.no_grad(), autocast:
            feats = extractor(images)
        rows[good] = feats.reshape(len(good), *shape[1:]).float().cpu().numpy().astype(np.float16)
    return rows


def _create_array(path, shape):
    """A new .npy file of fp16 zeros of `shape` (the header, then a hole); returns the data's offset."""
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float16)), "fortran_order": False,
              "shape": tuple(shape)}
    try:
        with open(path, "wb") as f:
            np.lib.format.write_array_header_1_0(f, header)
            offset = f.tell()
            f.truncate(offset + 2 * int(np.prod(shape)))
    except OSError as e:
        raise write_failed(e, path) from e
    return offset


def _reserve(fd, offset, length, path, new_file=False):
    """Allocate the bytes still to be written, so that the writes cannot run out of room halfway.
    A `new_file` that does not fit is removed, giving back what was reserved of it.

    Where the filesystem cannot (EOPNOTSUPP, EINVAL), the writes themselves still fail cleanly."""
    if length <= 0 or not hasattr(os, "posix_fallocate"):
        return
    try:
        os.posix_fallocate(fd, offset, length)
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            return
        error = write_failed(e, path)
        if new_file:
            os.remove(path)
        raise error from e


def _pwrite(fd, buffer, offset, path):
    view = memoryview(buffer)
    try:
        while view:
            written = os.pwrite(fd, view, offset)
            view, offset = view[written:], offset + written
        os.fdatasync(fd)
    except OSError as e:
        raise write_failed(e, path) from e


def _check_still_there(array_path, mine, folder):
    """Refuse to go on writing into a cache whose folder was deleted meanwhile (by hand, or by a
    prune that ignores the lock): meta.json would otherwise be written anew and claim rows that
    are nowhere."""
    try:
        same = os.path.samestat(mine, os.stat(array_path))
    except FileNotFoundError:
        same = False
    if not same:
        raise RuntimeError(f"{array_path} was deleted while its features were being extracted; "
                           f"nothing was written after that: run again to extract {folder} anew")


def _check_space(folder, need, kind, log, resumed=False):
    """Say how large a cache will be, and refuse one the disk cannot hold (`need`: the bytes still to write)."""
    free = shutil.disk_usage(folder).free
    if need > 1e9:
        log(f"feature cache: {need / 1e9:.1f} GB {'still to write ' if resumed else ''}in {folder}")
    if need > free:
        hint = " (cache_kind='views' stores pooled vectors: h x w times smaller)" if kind == "maps" else ""
        what = "the rest of the feature cache (resumed)" if resumed else "the feature cache"
        raise os_error(errno.ENOSPC, f"no space left on device: {what} needs {_mb(need)}{' more' if resumed else ''}"
                                     f" but {folder} has {_mb(free)} free{hint}")


def _mb(size):
    """Bytes in MB, with enough decimals that a small figure does not read 0.0."""
    return f"{size / 1e6:,.1f} MB" if size >= 1e6 else f"{size / 1e6:.3f} MB"


def list_feature_caches(features_dir: str | os.PathLike[str]) -> list[dict]:
    """The cache folders under features_dir, most recently used first.

    Each is a dict: folder, split, kind, backbone, views, seed, images, done, complete, in_use, bytes,
    used (a Unix time). `complete`: extraction finished and features.npy is there; `in_use`: being
    extracted, or open in a trainer. Folders without a readable meta.json are not caches this code
    wrote, and are left out.
    """
    caches: list[dict] = []
    if not os.path.isdir(features_dir):
        return caches
    for name in os.listdir(features_dir):
        folder = os.path.join(features_dir, name)
        meta_path = os.path.join(folder, "meta.json")
        try:
            with open(meta_path) as f:
                meta = json.load(f)
            used = os.path.getmtime(meta_path)
            size = sum(os.path.getsize(os.path.join(folder, n)) for n in os.listdir(folder)
                       if os.path.isfile(os.path.join(folder, n)))
        except (OSError, ValueError):
            continue
        kind = raw_kind = meta.get("kind", "views")
        if kind == "maps":
            kind = f"maps {'x'.join(map(str, meta.get('map', '?')))}{' +flip' if meta.get('views') == 2 else ''}"
        elif kind == "grids":
            kind = f"grids {'x'.join(map(str, meta.get('map', '?')))}"
        done, images = meta.get("done", 0), meta.get("images", 0)
        complete = bool(meta.get("complete", done >= images)) and done >= images and \
            os.path.isfile(os.path.join(folder, "features.npy"))
        caches.append({"folder": folder, "split": meta.get("split", "?"), "kind": kind, "cache_kind": raw_kind,
                       "backbone": meta.get("backbone", "?"),
                       "views": meta.get("views"), "seed": meta.get("seed"), "images": images,
                       "done": done, "complete": complete, "in_use": _in_use(folder), "bytes": size, "used": used})
    return sorted(caches, key=lambda c: c["used"], reverse=True)


def _in_use(folder):
    """Whether a process holds the cache's lock (extracting it, or a trainer reading it)."""
    if not os.path.exists(os.path.join(folder, LOCK_NAME)):
        return False
    lock = _lock(folder, fcntl.LOCK_EX | fcntl.LOCK_NB, make_folder=False)
    if lock is None:
        return os.path.isdir(folder)
    lock.close()
    return False


def prune_feature_caches(features_dir: str | os.PathLike[str], keep: int = 1) -> tuple[list[dict], list[dict]]:
    """Delete all but the `keep` most recently used caches of each split and use (pooled views or maps for
    the chapter's decoder, grids for attention); returns (deleted, in use).

    A cache that a process is extracting, or that a trainer has open (build_feature_cache holds a
    lock on it for as long as its memmap lives), is never deleted: it is returned as in use instead.
    """
    if keep < 0:
        raise ValueError(f"keep must be >= 0, got {keep}")
    kept: dict[tuple[str, bool], int] = {}
    removed: list[dict] = []
    in_use: list[dict] = []
    for cache in list_feature_caches(features_dir):
        use = (cache["split"], cache["cache_kind"] == "grids")
        kept[use] = kept.get(use, 0) + 1
        if kept[use] <= keep:
            continue
        lock = _lock(cache["folder"], fcntl.LOCK_EX | fcntl.LOCK_NB, make_folder=False)
        if lock is None:
            if os.path.isdir(cache["folder"]):
                in_use.append(cache)
            continue
        with lock:
            shutil.rmtree(cache["folder"])
        removed.append(cache)
    return removed, in_use


def format_caches(caches: list[dict]) -> str:
    """A table of list_feature_caches' entries, for the CLI."""
    now = time.time()
    lines = [f"{'split':<6}{'kind':<14}{'backbone':<11}{'K':>3}{'seed':>6}{'images':>15}{'MB':>9}{'last used':>12}"
             f"  folder"]
    for c in caches:
        age = now - c["used"]
        when = f"{age / 86400:.1f} d ago" if age >= 86400 else f"{age / 3600:.1f} h ago"
        done = f"{c['done']}/{c['images']}"
        state = [s for s, on in (("in use", c.get("in_use")), ("incomplete", not c.get("complete", True))) if on]
        lines.append(f"{c['split']:<6}{c['kind']:<14}{c['backbone']:<11}{c['views']!s:>3}{c['seed']!s:>6}{done:>15}"
                     f"{c['bytes'] / 1e6:>9.1f}{when:>12}  {os.path.basename(c['folder'])}"
                     f"{' (' + ', '.join(state) + ')' if state else ''}")
    return "\n".join(lines)


class CachedCaptionDataset(data.Dataset):
    """Items of a CocoCaptionDataset with the image replaced by cached features: (D,) float32, or (D, h, w)
    from a grids cache (one of the image's K stored views, as a views cache without jitter gives).

    A views cache gives one of the image's K stored views; with `jitter` > 0 it gives instead the
    mean of the K views plus `jitter` times a crop deviation borrowed from a random other image
    (one of that image's views minus their mean), a fresh one per caption per step. A maps cache
    gives a fresh crop of `crop_fraction` of the image's side at a random, sub-cell offset, pooled
    from the map or, for half the draws when a mirrored map is stored, from the mirrored one. The
    draws depend on (seed, epoch, item) only, so a resumed run sees the same ones.

    Why borrow: K views show the decoder K fixed points per image for the whole run, where the
    chapter's loop shows a new crop per caption per step, and the decoder overfits to them. The
    deviation between two crops of one image looks like the deviation between two crops of any
    other; added to the mean of K views it has the crop-to-crop spread of real crops (at
    jitter 1), drawn from the N x K deviations the cache holds instead of K.
    """

    def __init__(self, caption_dataset: CocoCaptionDataset, cache: np.ndarray, seed: int = 0,
                 crop_fraction: float | None = None, jitter: float = 0.0) -> None:
        self.ds, self.cache, self.seed, self.epoch = caption_dataset, cache, seed, 0
        # images that could not be read have no features: their captions are left out
        bad = getattr(cache, "unreadable", None) or {}
        self.skipped = {name: reason for name, reason in bad.values()}
        self.items = [i for i in range(len(caption_dataset)) if caption_dataset.image_index(i) not in bad] \
            if bad else None                                      # None: every item, as they are
        self.rows = [r for r in range(len(cache)) if r not in bad] if bad else None   # rows to borrow from
        self.grids = getattr(cache, "kind", None) == "grids"
        self.maps = cache.ndim == 5 and not self.grids
        if not (isinstance(jitter, (int, float)) and jitter >= 0):
            raise ValueError(f"jitter must be a number >= 0, got {jitter!r}")
        self.jitter = float(jitter)
        if self.maps and not (crop_fraction and 0 < crop_fraction <= 1):
            raise ValueError(f"a maps cache needs a crop_fraction in (0, 1], got {crop_fraction!r}")
        self.crop_fraction = crop_fraction

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self):
        return len(self.ds) if self.items is None else len(self.items)

    def _view(self, idx):
        return hash((self.seed, self.epoch, idx)) % self.cache.shape[1]

    def _window(self, idx):
        """(flip, top, left) of item idx's crop; top and left in units of the room left by the crop."""
        flip, top, left = torch.rand(3, generator=seeded_generator(self.seed, self.epoch, idx)).tolist()
        return int(self.cache.shape[1] == 2 and flip < 0.5), top, left

    def __getitem__(self, idx):
        return self.__getitems__([idx])[0]

    def __getitems__(self, indices):
        """A whole batch in one gather from the memmap (the DataLoader calls this when it exists)."""
        if self.items is not None:
            indices = [self.items[i] for i in indices]
        rows = [self.ds.image_index(i) for i in indices]
        if self.maps:
            flips, tops, lefts = zip(*(self._window(i) for i in indices))
            maps = torch.from_numpy(np.asarray(self.cache[rows, list(flips)]))     # (B, D, h, w) fp16
            h, w = maps.shape[2:]
            size = torch.full((len(indices),), self.crop_fraction * h)              # square images: h == w
            room = h - size
            features = pool_window(maps, torch.tensor(tops) * room, torch.tensor(lefts) * room, size)
        elif self.jitter and self.cache.shape[1] > 1 and not self.grids:
            features = self._jittered(rows, indices)
        else:
            features = torch.from_numpy(np.asarray(self.cache[rows, [self._view(i) for i in indices]],
                                                   dtype=np.float32))               # (B, D[, h, w])
        return [(f, self.ds.target(i)) for f, i in zip(features, indices)]

    def _jittered(self, rows, indices):
        """Each item: the mean of its image's K views + jitter x (a random image's view - that image's mean)."""
        k = self.cache.shape[1]
        n = len(self.cache) if self.rows is None else len(self.rows)
        picks = [int(torch.randint(n * k, (1,), generator=seeded_generator(self.seed, self.epoch, i, 1)))
                 for i in indices]                      # (other image, its view), flattened
        others = [p // k if self.rows is None else self.rows[p // k] for p in picks]
        views = torch.from_numpy(np.asarray(self.cache[rows], dtype=np.float32))                          # (B, K, D)
        others = torch.from_numpy(np.asarray(self.cache[others], dtype=np.float32))                       # (B, K, D)
        deviation = others[torch.arange(len(picks)), torch.tensor([p % k for p in picks])] - others.mean(1)
        return views.mean(1) + self.jitter * deviation


# ---- the cache as training uses it ----------------------------------------------------------------

def cached_datasets(config: "Config", encoder: "CNNModel", train_ds: CocoCaptionDataset, val_ds: CocoCaptionDataset,
                    train_tf: Callable, val_tf: Callable, device: torch.device, master: bool,
                    amp_dtype: torch.dtype | None, channels_last: bool, log: Callable[[str], object]
                    ) -> tuple["CachedCaptionDataset", "CachedCaptionDataset"]:
    """Training's datasets over the frozen backbone's cached features: K augmented views per training
    image ("views"), or the whole image's map and its mirror to crop from ("maps"); one view per val image.
    The attention decoder reads grids: K augmented views' grids per training image, one per val image."""
    if config.decoder == "attention":
        train_cache = ("train", train_ds, train_tf, config.cache_views, "grids")
    elif config.cache_kind == "maps":
        train_cache = ("train", train_ds, eval_transform(config.resize_size, config.resize_size),
                       2 if config.hflip else 1, "maps")
    else:
        train_cache = ("train", train_ds, train_tf, config.cache_views, "views")
    val_kind = "grids" if config.decoder == "attention" else "views"
    caches = {split: _open_cache(config, encoder, ds, tf, views, kind, split, device, master, amp_dtype,
                                 channels_last, log)
              for split, ds, tf, views, kind in (train_cache, ("val", val_ds, val_tf, 1, val_kind))}
    return (CachedCaptionDataset(train_ds, caches["train"], config.seed,
                                 crop_fraction=config.crop_size / config.resize_size, jitter=config.cache_jitter),
            CachedCaptionDataset(val_ds, caches["val"], config.seed))


def _open_cache(config, encoder, ds, transform, views, kind, split, device, master, amp_dtype, channels_last, log):
    """Rank 0 extracts (or finds) the cache; under torchrun the other ranks wait, then open what it wrote."""
    cache = None
    if master:
        cache = build_feature_cache(encoder, ds, transform, views, config.features_dir, split, device,
                                    batch_size=config.batch_size, num_workers=config.num_workers, seed=config.seed,
                                    amp_dtype=amp_dtype, channels_last=channels_last, progress=config.progress,
                                    kind=kind, log=log)
        log(f"{split} features: {os.path.dirname(cache.filename)}")
        if cache.unreadable:        # extraction skipped them (more than 1% would have stopped it)
            log(f"{skipped_line(dict(cache.unreadable.values()))} ({ds.data_path}: no features, "
                f"their captions are left out)")
    if dist.is_initialized():
        dist.barrier()
    if not master:
        cache = build_feature_cache(encoder, ds, transform, views, config.features_dir, split, device,
                                    seed=config.seed, progress=False, kind=kind, log=log)
    return cache
