"""Karpathy-format datasets (Flickr8k, Flickr30k, COCO's Karpathy split), put into the COCO layout once.

Karpathy's split files (`dataset_flickr8k.json`, `dataset_flickr30k.json`, `dataset_coco.json`)
list every image with its `filename` (COCO: and `filepath`, its folder), its `split` and its
`sentences`. A folder holding one of them and the images can be given as `data_dir`:
`ensure_coco_layout` writes, beside them,

    annotations/captions_train2014.json   the `train` and `restval` images and their captions
    annotations/captions_val2014.json     the `val` images, then the `test` ones (higher ids)
    train2014/, val2014/                  links to the images (symlinks; hard links or copies
                                          where symlinks are not allowed)
    annotations/karpathy_source.json      which file this came from (its size and time)

Only entries that name a file inside the folder are used: a `filename` with a path separator,
`.` or `..`, or a `filepath` that is absolute or climbs out with `..`, is skipped and counted. Links
are only made in train2014/ and val2014/, and only links this conversion made (listed in the marker)
are ever replaced or removed: a user's own files and links there are left alone.

Every other part of the pipeline (vocabulary, resize, feature cache, training, notebooks)
reads the COCO layout as it always does. `evaluate` scores the `test` images
(evaluation.heldout_split asks `karpathy_test_images`); the validation loss uses the leading val
images, which are the `val` ones. It runs again only when the split file changes.

A folder that already has COCO annotations of its own (download_coco.sh's, with
`dataset_coco.json` beside them) is left as it is: its Karpathy file only chooses the test images.
"""
import glob
import json
import os
import shutil
from collections import Counter
from collections.abc import Callable

from .atomic import atomic_write
from .progress import tqdm

FORMAT = 1
MARKER = os.path.join("annotations", "karpathy_source.json")
SPLITS = {"train": "train", "restval": "train", "val": "val", "test": "val"}   # Karpathy split -> COCO folder
_ORDER = {"train": 0, "restval": 1, "val": 2, "test": 3}    # of the ids, where not COCO's: _link_and_annotate
_OURS = {"annotations", "resized_images", "features", "train2014", "val2014"}  # never searched for images


def find_karpathy_file(data_dir: str | os.PathLike[str]) -> str | None:
    """The folder's `dataset_*.json`, or None. Several: dataset_coco.json if among them, else an error."""
    found = sorted(glob.glob(os.path.join(glob.escape(str(data_dir)), "dataset_*.json")))
    if len(found) > 1:
        coco = os.path.join(str(data_dir), "dataset_coco.json")
        if coco in found:
            return coco
        raise ValueError(f"{data_dir} holds several Karpathy split files ({', '.join(map(os.path.basename, found))}): "
                         f"keep the one of the images in this folder")
    return found[0] if found else None


def _source_stamp(path):
    stat = os.stat(path)
    return {"format": FORMAT, "source": os.path.basename(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _read_marker(data_dir):
    try:
        with open(os.path.join(data_dir, MARKER)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def karpathy_folder(data_dir: str | os.PathLike[str]) -> str | None:
    """The Karpathy file that this folder's COCO layout comes (or is to come) from; None for a COCO folder."""
    if not os.path.isdir(data_dir):
        return None
    path = find_karpathy_file(data_dir)
    if path is None:
        return None
    coco_annotations = os.path.exists(os.path.join(data_dir, "annotations", "captions_train2014.json"))
    if coco_annotations and _read_marker(data_dir) is None:   # a COCO folder with Karpathy's file beside it
        return None
    return path


def karpathy_test_images(data_dir: str | os.PathLike[str]) -> set[str] | None:
    """The file names of the `test` split of the folder's Karpathy file, or None without one."""
    path = find_karpathy_file(data_dir)
    if path is None:
        return None
    with open(path) as f:
        return {im["filename"] for im in json.load(f)["images"] if im.get("split") == "test"}


def unsafe_entry(filename: str, filepath: str = "") -> str | None:
    """Why an entry's file would lie outside the folder (a reason), or None for a safe one.

    `filename` must be a plain file name; `filepath`, when given, a relative folder that stays inside."""
    if not filename or filename in (".", "..") or "/" in filename or "\\" in filename or "\0" in filename:
        return f"filename {filename!r} is not a plain file name"
    if filepath:
        if not isinstance(filepath, str) or "\0" in filepath or os.path.isabs(filepath) or \
                filepath.startswith(("/", "\\")) or ":" in filepath.split("/")[0]:
            return f"filepath {filepath!r} is not a relative folder"
        if ".." in filepath.replace("\\", "/").split("/"):
            return f"filepath {filepath!r} leaves the folder"
    return None


def _read_karpathy(path):
    """The images of a Karpathy file, checked: ([{filename, filepath, split, captions, imgid, cocoid}],
    [(entry number, why) of the entries skipped because their file would lie outside the folder])."""
    try:
        with open(path) as f:
            data = json.load(f)
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"{path} is not a Karpathy split file: it has no 'images' list")
    images, unsafe = [], []
    for k, im in enumerate(data["images"]):
        if not isinstance(im, dict) or not isinstance(im.get("filename"), str) or "sentences" not in im:
            raise ValueError(f"{path}: image {k} has no 'filename' or 'sentences'")
        if im.get("split") not in SPLITS:
            raise ValueError(f"{path}: image {k} ({im['filename']}) has split {im.get('split')!r}; expected one of "
                             f"{sorted(SPLITS)}")
        why = unsafe_entry(im["filename"], im.get("filepath") or "")
        if why:
            unsafe.append((k, why))
            continue
        captions = [s.get("raw") or " ".join(s.get("tokens", [])) for s in im["sentences"]]
        images.append({"filename": im["filename"], "filepath": im.get("filepath") or "", "split": im["split"],
                       "captions": [c for c in captions if c.strip()], "imgid": im.get("imgid", k),
                       "cocoid": im.get("cocoid")})
    twice = [n for n, c in Counter(im["filename"] for im in images).items() if c > 1]
    if twice:
        raise ValueError(f"{path} lists the same file name more than once ({', '.join(sorted(twice)[:3])})")
    return images, unsafe


def _images_folder(data_dir, images):
    """The folder (data_dir or below, two levels at most) that holds the most of a sample of the images."""
    sample = {im["filename"] for im in images[:: max(1, len(images) // 50)]}
    best, hits = None, 0
    for root, dirs, files in os.walk(data_dir):
        depth = os.path.relpath(root, data_dir).count(os.sep) + (root != data_dir)
        dirs[:] = [d for d in dirs if depth < 2 and not (root == data_dir and d in _OURS)]
        n = len(sample.intersection(files))
        if n > hits:
            best, hits = root, n
    return best


def _points_inside(link, folder):
    """Whether the symlink `link` points (lexically, as this module writes them) into `folder`."""
    target = os.path.normpath(os.path.join(os.path.dirname(link), os.readlink(link)))
    return os.path.commonpath([os.path.abspath(target), os.path.abspath(folder)]) == os.path.abspath(folder)


def _link(src, dst, ours):
    """dst -> src: a relative symlink, else a hard link, else a copy. Returns True when dst is this
    conversion's (made now, or an earlier link to the same file), False for the image itself.

    An existing entry is replaced only if `ours(dst)` says an earlier conversion made it; anything
    else that is in the way is an error naming it, and is left as it is."""
    if os.path.islink(dst):
        if os.path.realpath(dst) == os.path.realpath(src):
            return True
        if not ours(dst):
            raise ValueError(f"{dst} is a link to {os.readlink(dst)} that this conversion did not make: move it "
                             f"away (train2014/ and val2014/ of a Karpathy-format folder hold links to its images)")
        os.remove(dst)
    elif os.path.exists(dst):
        if os.path.samefile(dst, src):
            return False                         # COCO: the image is already in its folder
        raise ValueError(f"{dst} exists and is not {src}: move it away (train2014/ and val2014/ of a "
                         f"Karpathy-format folder hold links to its images)")
    try:
        os.symlink(os.path.relpath(src, os.path.dirname(dst)), dst)
    except OSError:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)
    return True


def convert(data_dir: str, path: str, log: Callable[[str], object] = print, progress: bool = True) -> dict[str, int]:
    """Write the COCO layout of `data_dir` from its Karpathy file `path`; returns the counts."""
    images, unsafe = _read_karpathy(path)
    if unsafe:
        k, why = unsafe[0]
        log(f"warning: skipping {len(unsafe)} entr{'y' if len(unsafe) == 1 else 'ies'} of {path} whose file would "
            f"lie outside {data_dir} (e.g. image {k}: {why})")
    made, ours = _earlier_links(data_dir)
    with atomic_write(os.path.join(data_dir, MARKER), "w") as f:   # the layout is ours from here on, even if
        json.dump({"format": FORMAT, "converting": os.path.basename(path),        # this is interrupted
                   "links": {k: sorted(v) for k, v in made.items()}}, f)
    located, missing = _locate_images(data_dir, path, images, log, progress)
    coco, wanted, linked = _link_and_annotate(data_dir, path, located, ours, progress)
    _remove_stale_links(data_dir, wanted, ours)
    os.makedirs(os.path.join(data_dir, "annotations"), exist_ok=True)
    for split, content in coco.items():
        with atomic_write(os.path.join(data_dir, "annotations", f"captions_{split}2014.json"), "w") as f:
            json.dump(content, f)
    counts = {s: sum(1 for im, _ in located if im["split"] == s) for s in _ORDER}
    with atomic_write(os.path.join(data_dir, MARKER), "w") as f:           # last: the conversion is complete
        json.dump({**_source_stamp(path), "images": counts, "missing": len(missing), "unsafe": len(unsafe),
                   "links": {k: sorted(v) for k, v in linked.items()}}, f)
    log(f"{os.path.basename(path)} -> COCO layout in {data_dir}: {counts['train']} train + {counts['restval']} "
        f"restval images in train2014/, {counts['val']} val + {counts['test']} test in val2014/ "
        f"(evaluate scores the test ones)")
    return counts


def _earlier_links(data_dir):
    """The links an earlier conversion made, as its marker lists them ({split: names}), and `ours(link)`:
    whether a link is one of them (any link, for a conversion from before they were listed) and points inside."""
    previous = _read_marker(data_dir) or {}
    made = {split: set(previous.get("links", {}).get(split, [])) for split in ("train", "val")}
    legacy = "format" in previous and "links" not in previous   # converted before links were listed: judge
                                                                # by where they point

    def ours(dst):        # listed as made by a conversion (or one before the list), and pointing inside
        split = os.path.basename(os.path.dirname(dst))[:-4]
        return (legacy or os.path.basename(dst) in made[split]) and _points_inside(dst, data_dir)

    return made, ours


def _locate_images(data_dir, path, images, log, progress):
    """([(image, its file)] of the images that are there and have captions, [file names of the others]).

    An image is looked for where its entry says, else in the folder that holds most of them. Some
    missing is a warning; all of them, an error."""
    fallback = None                                     # the images' folder, found when first needed
    located, missing = [], []
    for im in tqdm(images, desc=f"finding the images of {os.path.basename(path)}", unit="img", disable=not progress):
        src = os.path.join(data_dir, im["filepath"], im["filename"])
        if not os.path.isfile(src):
            if fallback is None:
                fallback = _images_folder(data_dir, images) or ""
            src = os.path.join(fallback, im["filename"]) if fallback else ""
        if src and os.path.isfile(src) and im["captions"]:
            located.append((im, src))
        else:
            missing.append(im["filename"])
    if not located:
        raise FileNotFoundError(f"none of the {len(images)} images listed in {path} were found in {data_dir} or the "
                                f"folders below it (e.g. {images[0]['filename'] if images else 'no images listed'})")
    if missing:
        log(f"warning: {len(missing)} of {len(images)} images listed in {path} are missing or have no captions and "
            f"are skipped, e.g. {', '.join(missing[:5])}")
    return located, missing


def _link_and_annotate(data_dir, path, located, ours, progress):
    """Link each located image into train2014/ or val2014/, and list it and its captions in that split's
    COCO captions. Returns ({split: its captions file's content}, {split: the file names it holds},
    {split: those of them that are this conversion's links})."""
    # ids: COCO's own where the file has them; otherwise train, then val, then test, so that the
    # validation loss (the val images with the smallest ids) never reads a test image
    located = sorted(located, key=lambda pair: _ORDER[pair[0]["split"]])   # stable: the file's order within a split
    use_coco_ids = all(im["cocoid"] is not None for im, _ in located)
    coco = {split: {"info": {"description": f"converted from {os.path.basename(path)}"},
                    "images": [], "annotations": []} for split in ("train", "val")}
    wanted, linked = {"train": set(), "val": set()}, {"train": set(), "val": set()}
    ann_id = 0
    for k, (im, src) in enumerate(tqdm(located, desc="linking the images", unit="img", disable=not progress)):
        split = SPLITS[im["split"]]
        folder = os.path.join(data_dir, f"{split}2014")
        os.makedirs(folder, exist_ok=True)
        if _link(src, os.path.join(folder, im["filename"]), ours):
            linked[split].add(im["filename"])
        wanted[split].add(im["filename"])
        image_id = int(im["cocoid"]) if use_coco_ids else k + 1
        coco[split]["images"].append({"id": image_id, "file_name": im["filename"], "karpathy_split": im["split"],
                                      "karpathy_imgid": im["imgid"]})
        for caption in im["captions"]:
            ann_id += 1
            coco[split]["annotations"].append({"id": ann_id, "image_id": image_id, "caption": caption})
    return coco, wanted, linked


def _remove_stale_links(data_dir, wanted, ours):
    """Remove the links that an earlier conversion made to images the file no longer lists ({split: names})."""
    for split, names in wanted.items():
        folder = os.path.join(data_dir, f"{split}2014")
        for name in os.listdir(folder) if os.path.isdir(folder) else []:
            link = os.path.join(folder, name)
            if name not in names and os.path.islink(link) and ours(link):
                os.remove(link)


def ensure_coco_layout(data_dir: str, log: Callable[[str], object] = print, progress: bool = True) -> str | None:
    """Convert a Karpathy-format folder to the COCO layout if it is one and is not converted yet.

    Returns the Karpathy file's path for such a folder (converted now or before), None for any
    other folder (a COCO-layout one, a missing one), which is left untouched.
    """
    path = karpathy_folder(data_dir)
    if path is None:
        return None
    marker = _read_marker(data_dir)
    done = marker is not None and {k: marker.get(k) for k in ("format", "source", "size", "mtime_ns")} == \
        _source_stamp(path)
    if not done or not all(os.path.exists(os.path.join(data_dir, "annotations", f"captions_{s}2014.json"))
                           for s in ("train", "val")):
        convert(data_dir, path, log, progress)
    return path


def coco_captions_file(path: str, log: Callable[[str], object] = print) -> str:
    """`vocab --captions`: a Karpathy file stands for the train captions of its folder's COCO layout."""
    folder = os.path.dirname(path) or "."
    karpathy = karpathy_folder(folder)
    if karpathy is None or not os.path.isfile(path) or not os.path.samefile(karpathy, path):
        return path
    ensure_coco_layout(folder, log)
    return os.path.join(folder, "annotations", "captions_train2014.json")
