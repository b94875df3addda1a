"""Encoder feature cache: run the frozen backbone once per image instead of once per caption per step.

With a frozen backbone the chapter recomputes ResNet-152 for every caption at every step,
so each image goes through it 5 times per epoch. Here each training image is encoded
K times, once per augmented view (a random crop, and a flip where allowed), and training
draws one view per caption per step. Only the Linear+BatchNorm head and the LSTM are
trained on top, exactly as in the chapter.

Layout: features_dir/<split>-<backbone>-<key>/features.npy  (fp16, shape (images, K, D))
                                            /meta.json      (what the key was made of, rows done)
The key hashes the backbone, its weights, the transform, the view count and the image list,
so a change never reuses stale features. Extraction writes rows in order and records how
many are done after each batch: an interrupted run resumes where it stopped.
Opening a cache touches its meta.json, so its modification time says when it was last used;
`prune_feature_caches` (`python -m captioning features --prune`) removes the caches that
a change of backbone, size, K or seed left behind.
"""
import hashlib
import json
import os
import shutil
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.utils.data as data

from .atomic import atomic_write
from .data import TrainTransform, seeded_generator


def backbone_fingerprint(encoder):
    """A cheap hash of the backbone's weights (first values of every tensor + shapes)."""
    h = hashlib.sha1()
    for name, tensor in encoder.resnet_module.state_dict().items():
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode())
        h.update(tensor.detach().flatten()[:64].float().cpu().numpy().tobytes())
    return h.hexdigest()


class _ImageViews(data.Dataset):
    """Item i: the K transformed views of image i, stacked (K, 3, H, W)."""

    def __init__(self, caption_dataset, transform, views, seed):
        self.ds, self.transform, self.views, self.seed = caption_dataset, transform, views, seed

    def __len__(self):
        return len(self.ds.image_ids)

    def __getitem__(self, i):
        from .images import load_image

        image = load_image(self.ds.image_path(i))
        if isinstance(self.transform, TrainTransform):
            return torch.stack([self.transform(image, generator=seeded_generator(self.seed, i, k))
                                for k in range(self.views)])
        return self.transform(image).unsqueeze(0).expand(self.views, -1, -1, -1)


def _write_json(path, obj):
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=1)


def build_feature_cache(encoder, caption_dataset, transform, views, features_dir, split, device,
                        batch_size=64, num_workers=0, seed=0, amp_dtype=None, channels_last=False,
                        progress=True):
    """Extract (or resume extracting) the cache; returns a read-only (images, K, D) fp16 memmap."""
    from .progress import tqdm

    if views < 1:
        raise ValueError(f"cache_views must be >= 1, got {views}")
    names = [caption_dataset.coco.imgs[i]["file_name"] for i in caption_dataset.image_ids]
    meta = {
        "backbone": encoder.backbone_name, "weights": encoder.weights_id,
        "fingerprint": backbone_fingerprint(encoder), "transform": repr(transform),
        "views": views, "seed": seed, "split": split, "dim": encoder.feature_size,
        "images": len(names), "image_list": hashlib.sha1("\n".join(names).encode()).hexdigest(),
    }
    key = hashlib.sha1(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:12]
    folder = os.path.join(features_dir, f"{split}-{encoder.backbone_name}-{key}")
    os.makedirs(folder, exist_ok=True)
    meta_path, array_path = os.path.join(folder, "meta.json"), os.path.join(folder, "features.npy")
    shape = (len(names), views, encoder.feature_size)

    done, cache = 0, None
    if os.path.exists(meta_path) and os.path.exists(array_path):
        with open(meta_path) as f:
            done = json.load(f).get("done", 0)
        cache = np.lib.format.open_memmap(array_path, mode="r+")
        if cache.shape != shape:
            done, cache = 0, None
        os.utime(meta_path)                                          # last used: now
    if cache is None or done == 0:
        cache = np.lib.format.open_memmap(array_path, mode="w+", dtype=np.float16, shape=shape)
        _write_json(meta_path, {**meta, "done": 0})
    if done < len(names):
        loader = data.DataLoader(data.Subset(_ImageViews(caption_dataset, transform, views, seed),
                                             range(done, len(names))),
                                 batch_size=batch_size, num_workers=num_workers)
        autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext()
        encoder.eval()
        with tqdm(total=len(names), initial=done, desc=f"extracting {split} features (K={views})",
                  unit="img", disable=not progress) as bar:
            for batch in loader:                                                   # (B, K, 3, H, W)
                b = batch.size(0)
                images = batch.flatten(0, 1).to(device, non_blocking=True)
                if channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                with torch.no_grad(), autocast:
                    feats = encoder.extract(images)                                 # (B*K, D)
                rows = feats.view(b, views, -1).float().cpu().numpy().astype(np.float16)
                if not np.isfinite(rows).all():
                    raise FloatingPointError(f"backbone features overflow float16 (images {done}..{done + b}); "
                                             f"is the backbone's weights file right?")
                cache[done: done + b] = rows
                cache.flush()
                done += b
                _write_json(meta_path, {**meta, "done": done})
                bar.update(b)
    del cache
    return np.load(array_path, mmap_mode="r")


def list_feature_caches(features_dir):
    """The cache folders under features_dir, most recently used first.

    Each is a dict: folder, split, backbone, views, seed, images, done, bytes, used (a Unix time).
    Folders without a readable meta.json are not caches this code wrote, and are left out.
    """
    caches = []
    if not os.path.isdir(features_dir):
        return caches
    for name in os.listdir(features_dir):
        folder = os.path.join(features_dir, name)
        meta_path = os.path.join(folder, "meta.json")
        try:
            with open(meta_path) as f:
                meta = json.load(f)
            used = os.path.getmtime(meta_path)
        except (OSError, ValueError):
            continue
        size = sum(os.path.getsize(os.path.join(folder, n)) for n in os.listdir(folder)
                   if os.path.isfile(os.path.join(folder, n)))
        caches.append({"folder": folder, "split": meta.get("split", "?"), "backbone": meta.get("backbone", "?"),
                       "views": meta.get("views"), "seed": meta.get("seed"), "images": meta.get("images", 0),
                       "done": meta.get("done", 0), "bytes": size, "used": used})
    return sorted(caches, key=lambda c: c["used"], reverse=True)


def prune_feature_caches(features_dir, keep=1):
    """Delete all but the `keep` most recently used caches of each split; returns the deleted ones.

    A training run that has a cache open keeps reading it even if it is deleted (the memmap holds
    the file), but its next start would extract again.
    """
    if keep < 0:
        raise ValueError(f"keep must be >= 0, got {keep}")
    kept, removed = {}, []
    for cache in list_feature_caches(features_dir):
        kept[cache["split"]] = kept.get(cache["split"], 0) + 1
        if kept[cache["split"]] > keep:
            shutil.rmtree(cache["folder"])
            removed.append(cache)
    return removed


def format_caches(caches):
    """A table of list_feature_caches' entries, for the CLI."""
    now = time.time()
    lines = [f"{'split':<6}{'backbone':<11}{'K':>3}{'seed':>6}{'images':>15}{'MB':>9}{'last used':>12}  folder"]
    for c in caches:
        age = now - c["used"]
        when = f"{age / 86400:.1f} d ago" if age >= 86400 else f"{age / 3600:.1f} h ago"
        done = f"{c['done']}/{c['images']}"
        lines.append(f"{c['split']:<6}{c['backbone']:<11}{c['views']!s:>3}{c['seed']!s:>6}{done:>15}"
                     f"{c['bytes'] / 1e6:>9.1f}{when:>12}  {os.path.basename(c['folder'])}")
    return "\n".join(lines)


class CachedCaptionDataset(data.Dataset):
    """Items of a CocoCaptionDataset with the image replaced by one cached view of its features."""

    def __init__(self, caption_dataset, cache, seed=0):
        self.ds, self.cache, self.seed, self.epoch = caption_dataset, cache, seed, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.ds)

    def _view(self, idx):
        return hash((self.seed, self.epoch, idx)) % self.cache.shape[1]

    def __getitem__(self, idx):
        row = self.cache[self.ds.image_index(idx), self._view(idx)]
        return torch.from_numpy(np.asarray(row, dtype=np.float32)), self.ds.target(idx)

    def __getitems__(self, indices):
        """A whole batch in one gather from the memmap (the DataLoader calls this when it exists)."""
        rows = [self.ds.image_index(i) for i in indices]
        features = torch.from_numpy(np.asarray(self.cache[rows, [self._view(i) for i in indices]],
                                               dtype=np.float32))                   # (B, D)
        return [(f, self.ds.target(i)) for f, i in zip(features, indices)]
