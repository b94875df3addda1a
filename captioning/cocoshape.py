"""A COCO-shaped synthetic set: MS-COCO 2014's counts, image sizes and caption statistics, at any scale.

    write_coco_shaped("runs/cocoshape", scale=0.01)     # 828 train + 405 val images, in seconds
    python -m captioning.cocoshape --out DIR --scale 0.01 [--seed 0] [--overwrite]

COCO cannot be downloaded here, yet every stage of the pipeline (vocabulary, resize, feature cache,
training, captioning, evaluation) should be timed and its memory measured at COCO's size before a
real run meets it. This writes a set with COCO 2014's shape and none of its meaning:

    DIR/train2014/COCO_train2014_000000000009.jpg ...     round(scale x 82,783) images
    DIR/val2014/COCO_val2014_000000000042.jpg ...         round(scale x 40,504) images
    DIR/annotations/captions_{train,val}2014.json         COCO's captions format
    DIR/dataset_coco.json                                 Karpathy's split of them

At least MIN_IMAGES images per split at any scale. Ids are drawn without repeats from COCO's id range,
train and val disjoint, as in COCO.

Images: 640x480 JPEGs, PORTRAIT_SHARE of them 480x640 and GREY_SHARE greyscale ("L" mode), as in
COCO; a few large shapes (tinyset.draw_shape) on a plain colour, under a fine grain that brings the
files near COCO's size on disk (~140 KB; COCO's average ~160 KB). Pictures and captions are
unrelated: what a model can learn here is the captions' word statistics, which is all a rehearsal of
time and memory needs.

Captions: 5 per image, EXTRA_CAPTION_SHARE of the images 6 or 7 (as in COCO), 8 to 20 words (mean
13). Each is built of three classes of words: an article opens most of them ("A ..."), content words
follow, and now and then a function word, often with an article, joins two ("... on a ...", "... with
..."); the last word is a content word. Each class has its own Zipf-Mandelbrot law (frequency ~
1 / (rank + offset) ** exponent): "a" is 8% of all words (COCO: 16%). The words: ARTICLES,
FUNCTION_WORDS and content words, COCO's commonest (COMMON_CONTENT) and then made-up pronounceable
ones ("bodaki", "temuso"), VOCABULARY (10,000) in all, letters only, so that the project's tokenizer
gives each back whole. The structure is there so that a decoder trained for a few dozen steps already
writes captions of some length (it learns what follows what long before the words' meaning), as a
COCO-trained one does: the decoding and scoring stages then do the work they would do at scale.

The vocabulary rule: every word used occurs at least MIN_COUNT (4, the coco preset's vocab_threshold)
times in the train captions, so that `build_vocabulary(..., threshold=4)` keeps all of them whatever
the scale: 4 occurrences of each word are placed first, at random train positions of its class, and
the other positions are drawn from the class's Zipf law. The placed occurrences may take at most
COVERAGE_SHARE (95%) of a class's train positions, so a class uses

    min(its words, floor(0.95 x its train positions / 4))

words (at least 1, which may then occur fewer than 4 times). All 10,000 from a scale of about 0.01
(828 train images, ~43k content positions) upward; below it the content words shrink with the scale
(about 0.0005: 41 images, ~500 words). `write_coco_shaped` returns the count ("vocabulary"); the
vocabulary built at threshold 4 is those words plus the 4 special tokens. At small scales most
content positions hold placed words, so their distribution is flatter than Zipf's there; at scale 1
the placed words are under 1% of the 5 million positions.

Karpathy's split (dataset_coco.json): round(scale x 5,000) val2014 images each for "val" and "test"
(at least 1, at most a third of val2014 each), the rest of val2014 "restval", all of train2014
"train". Beside COCO's own annotations it only chooses the images `evaluate` scores (karpathy.py).

The set is built in a hidden folder beside DIR and renamed to DIR when complete: an interrupted run
leaves no half-written DIR. An existing DIR that is not empty is refused, unless overwrite=True,
which moves it aside to DIR-previous-<timestamp> (and says so): nothing is deleted.

Generation is deterministic for a seed, whatever the number of worker processes; scale 1 is about
123k images, 20 GB and minutes per core.
"""
import argparse
import os
import random
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import numpy as np
from PIL import Image, ImageChops, ImageDraw

from .atomic import atomic_write_json, fsync_dir
from .progress import tqdm
from .tinyset import DRAWABLE_SHAPES, _vary_case, draw_shape
from .vocabulary import tokenize

TRAIN_IMAGES = 82_783                 # COCO 2014 train
VAL_IMAGES = 40_504                   # COCO 2014 val
KARPATHY_HELDOUT = 5_000              # Karpathy's "val" and "test", each, drawn from val2014
MIN_IMAGES = 8                        # per split, at any scale
ID_SPACE = 581_930                    # COCO 2014's image ids lie below this
IMAGE_SIZE = (640, 480)               # landscape (width, height); portrait is the other way round
PORTRAIT_SHARE = 0.10
GREY_SHARE = 0.015
JPEG_QUALITY = 90
GRAIN = 64                            # the grain's amplitude (0..255): ~140 KB files (COCO's: ~160 KB)
EXTRA_CAPTION_SHARE = 0.01            # images with 6 or 7 captions instead of 5
CAPTION_LENGTHS = tuple(range(8, 21))  # words
LENGTH_WEIGHTS = (4, 6, 8, 9, 9, 9, 8, 7, 6, 5, 4, 3, 2)      # mean 13.2 words
VOCABULARY = 10_000
MIN_COUNT = 4                         # the coco preset's vocab_threshold
COVERAGE_SHARE = 0.95                 # the placed occurrences take at most this share of a class's train slots
# captions are built of three classes of words, each with its own Zipf-Mandelbrot law (exponent, offset):
# an article opens most captions ("A man ..."), content words follow, and now and then a function
# word, often with an article, joins two of them ("... on a ...", "... with ...")
ARTICLES = ("a", "the", "two", "an", "some", "three")
FUNCTION_WORDS = ("on", "of", "in", "with", "and", "is", "to", "at", "are", "next", "near", "by", "for", "while",
                  "from", "under", "has", "behind", "over", "into")
COMMON_CONTENT = ("man", "sitting", "standing", "people", "white", "woman", "street", "table", "holding", "large",
                  "person", "top", "group", "field", "small", "tennis", "front", "plate", "room", "dog", "cat",
                  "train", "pizza", "bus", "water", "grass", "kitchen", "red", "young", "riding")
ZIPF = {"article": (2.0, 0.0), "function": (1.0, 1.0), "content": (1.0, 2.7)}
OPENING_ARTICLE = 0.8                 # captions that start with an article
FUNCTION_AFTER_CONTENT = 0.12         # a function word after a content word
ARTICLE_AFTER_FUNCTION = 0.8          # ... and an article after it
CLASSES = ("article", "function", "content")
DESCRIPTION = "COCO-shaped synthetic set (COCO 2014's counts, sizes and caption statistics) in COCO 2014 format"


def scaled_counts(scale: float) -> dict[str, int]:
    """{"train", "val", "karpathy_val", "karpathy_test"}: the image counts at `scale` (COCO 2014 at 1)."""
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not 0 < scale <= 10:
        raise ValueError(f"scale must be a number in (0, 10], got {scale!r}")
    train = max(MIN_IMAGES, round(scale * TRAIN_IMAGES))
    val = max(MIN_IMAGES, round(scale * VAL_IMAGES))
    held = min(val // 3, max(1, round(scale * KARPATHY_HELDOUT)))
    return {"train": train, "val": val, "karpathy_val": held, "karpathy_test": held}


def words_used(slots: int, available: int) -> int:
    """How many words of a class (of `available`) its `slots` train positions can hold MIN_COUNT times each,
    taking at most COVERAGE_SHARE of them (at least 1)."""
    return max(1, min(available, int(COVERAGE_SHARE * slots) // MIN_COUNT))


_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


def content_words(n: int = VOCABULARY - len(ARTICLES) - len(FUNCTION_WORDS)) -> list[str]:
    """The first `n` content words of the fixed list: COMMON_CONTENT, then made-up words of 2 to 4 syllables.

    The same list at every scale and seed; each word is letters only, tokenizes to itself, and is none
    of the articles and function words."""
    words = list(COMMON_CONTENT[:n])
    seen = set(words) | set(ARTICLES) | set(FUNCTION_WORDS)
    rng = random.Random(2014)
    while len(words) < n:
        syllables = rng.choice((2, 2, 3, 3, 3, 4))
        word = "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(syllables))
        if rng.random() < 0.3:
            word += rng.choice("nrst")
        if word not in seen and tokenize(word) == [word]:
            seen.add(word)
            words.append(word)
    return words


def word_list(used: dict[str, int]) -> list[str]:
    """All the words of a plan ({class: words used}), in the order its token ids count them."""
    return (list(ARTICLES[:used["article"]]) + list(FUNCTION_WORDS[:used["function"]])
            + content_words(used["content"]))


def _zipf(n: int, exponent: float, offset: float) -> np.ndarray:
    p = 1.0 / (np.arange(1, n + 1) + offset) ** exponent
    return p / p.sum()


def _slot_classes(lengths: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each token position's class (an index into CLASSES), caption after caption: an opening article, then
    content words, a function word (and an article) now and then between two of them; the last word is
    always a content word."""
    article, function, content = range(3)
    draws = rng.random((len(lengths), 3 * max(CAPTION_LENGTHS))).tolist()
    out = []
    for length, draw in zip(lengths.tolist(), draws):
        caption = [article] if draw[0] < OPENING_ARTICLE else []
        k = 1
        while len(caption) < length:
            caption.append(content)
            if len(caption) < length - 2 and draw[k] < FUNCTION_AFTER_CONTENT:
                caption.append(function)
                if draw[k + 1] < ARTICLE_AFTER_FUNCTION:
                    caption.append(article)
            k += 2
        out += caption
    return np.asarray(out, dtype=np.int8)


def _plan(counts: dict[str, int], seed: int) -> dict[str, Any]:
    """Everything but the pixels: each image's id, size and mode, and its captions (word ids into
    word_list(plan["used"]))."""
    rng = np.random.default_rng(seed)
    n_train, n_val = counts["train"], counts["val"]
    ids = rng.choice(np.arange(1, max(ID_SPACE, 2 * (n_train + n_val))), n_train + n_val, replace=False)
    plan: dict[str, Any] = {}
    for split, split_ids in (("train", np.sort(ids[:n_train])), ("val", np.sort(ids[n_train:]))):
        n = len(split_ids)
        extra = rng.random(n) < EXTRA_CAPTION_SHARE
        per_image = np.where(extra, rng.choice((6, 7), n), 5)
        lengths = rng.choice(CAPTION_LENGTHS, int(per_image.sum()),
                             p=np.asarray(LENGTH_WEIGHTS) / sum(LENGTH_WEIGHTS))
        plan[split] = {"ids": split_ids.tolist(), "portrait": (rng.random(n) < PORTRAIT_SHARE).tolist(),
                       "grey": (rng.random(n) < GREY_SHARE).tolist(), "per_image": per_image.tolist(),
                       "lengths": lengths, "classes": _slot_classes(lengths, rng)}
    available = {"article": len(ARTICLES), "function": len(FUNCTION_WORDS),
                 "content": VOCABULARY - len(ARTICLES) - len(FUNCTION_WORDS)}
    train_classes = plan["train"]["classes"]
    used = {c: words_used(int(np.sum(train_classes == k)), available[c]) for k, c in enumerate(CLASSES)}
    for split in ("train", "val"):
        classes = plan[split]["classes"]
        tokens = np.zeros(len(classes), dtype=np.int32)
        first = 0                          # the class's first token id
        for k, c in enumerate(CLASSES):
            where = np.flatnonzero(classes == k)
            n = used[c]
            mine = rng.choice(n, len(where), p=_zipf(n, *ZIPF[c])).astype(np.int32)
            if split == "train" and MIN_COUNT * n <= len(where):   # MIN_COUNT of each word, at random positions
                placed = rng.choice(len(where), MIN_COUNT * n, replace=False)
                mine[placed] = rng.permutation(np.repeat(np.arange(n, dtype=np.int32), MIN_COUNT))
            tokens[where] = mine + first
            first += n
        plan[split]["tokens"] = tokens
    plan["used"] = used
    plan["vocabulary"] = sum(used.values())
    plan["heldout"] = rng.permutation(n_val)[:counts["karpathy_val"] + counts["karpathy_test"]].tolist()
    return plan


def _captions(split_plan: dict[str, Any], words: Sequence[str], rng: random.Random
              ) -> list[list[tuple[str, list[str]]]]:
    """Each image's captions: (the caption, cased and punctuated as people write them (tinyset._vary_case),
    its words), the words being what the project's tokenizer gives back (tests/test_cocoshape.py checks it)."""
    ends = np.cumsum(split_plan["lengths"]).tolist()
    tokens = split_plan["tokens"].tolist()
    out, caption, start = [], 0, 0
    for n in split_plan["per_image"]:
        mine = []
        for _ in range(n):
            said = [words[t] for t in tokens[start:ends[caption]]]
            mine.append((_vary_case(" ".join(said), rng), said))
            caption, start = caption + 1, ends[caption]
        out.append(mine)
    return out


# ---- pixels ----------------------------------------------------------------------------------------

_grain: Image.Image | None = None


def _grain_tile() -> Image.Image:
    """A fixed RGB noise field (one per process), larger than an image: each image adds a crop of it."""
    global _grain
    if _grain is None:
        noise = np.random.default_rng(0).integers(0, GRAIN, (800, 800), dtype=np.uint8)
        _grain = Image.fromarray(noise, "L").convert("RGB")
    return _grain


def draw_picture(width: int, height: int, grey: bool, seed: int) -> Image.Image:
    """One picture: 2 to 4 large shapes on a plain colour, under a fine grain; "L" mode when `grey`."""
    rng = random.Random(seed)
    image = Image.new("RGB", (width, height), tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    short = min(width, height)
    for _ in range(rng.randint(2, 4)):
        side = rng.randint(short // 4, 2 * short // 3)
        x0, y0 = rng.randint(-side // 4, width - 3 * side // 4), rng.randint(-side // 4, height - 3 * side // 4)
        draw_shape(draw, rng.choice(DRAWABLE_SHAPES), (x0, y0, x0 + side, y0 + side),
                   tuple(rng.randrange(256) for _ in range(3)), rotation=rng.uniform(0, 360))
    grain = _grain_tile()
    left, top = rng.randrange(grain.width - width + 1), rng.randrange(grain.height - height + 1)
    image = ImageChops.add(image, grain.crop((left, top, left + width, top + height)))
    return image.convert("L") if grey else image


def _render(jobs: Sequence[tuple[str, int, int, bool, int]]) -> int:
    """Draw and save each (path, width, height, grey, seed); returns how many."""
    for path, width, height, grey, seed in jobs:
        draw_picture(width, height, grey, seed).save(path, quality=JPEG_QUALITY)
    return len(jobs)


def _render_all(jobs: list[tuple[str, int, int, bool, int]], workers: int, progress: bool) -> None:
    chunks = [jobs[i:i + 64] for i in range(0, len(jobs), 64)]
    with tqdm(total=len(jobs), desc="drawing COCO-shaped images", unit="img", disable=not progress) as bar:
        if workers > 1 and len(chunks) > 1:
            with ProcessPoolExecutor(min(workers, len(chunks))) as pool:
                for done in pool.map(_render, chunks):
                    bar.update(done)
        else:
            for chunk in chunks:
                bar.update(_render(chunk))


# ---- the files -------------------------------------------------------------------------------------

def _check_out(out: str, overwrite: bool, log: Callable[[str], object]) -> None:
    """Refuse a folder with something in it (overwrite: move it aside first); remove an empty one."""
    if not os.path.lexists(out):
        return
    if not os.path.isdir(out) or os.path.islink(out):
        raise FileExistsError(f"{out} exists and is not a folder: give another --out")
    if not os.listdir(out):
        os.rmdir(out)
        return
    if not overwrite:
        raise FileExistsError(f"{out} exists and is not empty: give another folder, or overwrite=True "
                              f"(--overwrite) to move it aside first")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = f"{out.rstrip(os.sep)}-previous-{stamp}"
    k = 1
    while os.path.lexists(aside):
        k += 1
        aside = f"{out.rstrip(os.sep)}-previous-{stamp}-{k}"
    os.rename(out, aside)
    log(f"moved the previous {out} to {aside} (delete it when you no longer need it)")


def write_coco_shaped(out: str | os.PathLike[str], scale: float, seed: int = 0, progress: bool = True,
                      overwrite: bool = False, workers: int | None = None,
                      log: Callable[[str], object] = print) -> dict[str, Any]:
    """Write the COCO-shaped set at `scale` (1: COCO 2014's size) to `out`; returns what was written:
    {"out", "scale", "seed", "train", "val" (image counts), "captions" ({split: count}), "vocabulary" (the
    words used), "words" ({"article", "function", "content": how many of each}: word_list(words) lists them),
    "karpathy" ({split: count})}.

    `workers` processes draw the images (default: the CPU count, at most 8). `out` must not exist or be
    empty, unless `overwrite`, which moves it aside to `out`-previous-<timestamp>. See the module's
    docstring for what the set holds and the vocabulary rule."""
    out = os.fspath(out)
    counts = scaled_counts(scale)
    workers = workers or min(os.cpu_count() or 1, 8)
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    _check_out(out, overwrite, log)          # before any work: a refusal costs nothing
    building = os.path.join(parent, f".{os.path.basename(os.path.abspath(out))}.building-{os.getpid()}")
    shutil.rmtree(building, ignore_errors=True)
    try:
        summary = _build(building, counts, seed, workers, progress)
        _check_out(out, overwrite, log)      # again: something may have appeared there meanwhile
        os.rename(building, out)
        fsync_dir(parent)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    return {"out": out, "scale": scale, "seed": seed, **summary}


def _build(folder: str, counts: dict[str, int], seed: int, workers: int, progress: bool) -> dict[str, Any]:
    plan = _plan(counts, seed)
    words = word_list(plan["used"])
    text_rng = random.Random(seed)
    jobs = []
    images: dict[str, list[dict[str, Any]]] = {}
    captions: dict[str, list[list[tuple[str, list[str]]]]] = {}
    for split in ("train", "val"):
        p = plan[split]
        os.makedirs(os.path.join(folder, f"{split}2014"))
        captions[split] = _captions(p, words, text_rng)
        images[split] = []
        for image_id, portrait, grey in zip(p["ids"], p["portrait"], p["grey"]):
            width, height = IMAGE_SIZE[::-1] if portrait else IMAGE_SIZE
            name = f"COCO_{split}2014_{image_id:012d}.jpg"
            images[split].append({"id": image_id, "file_name": name, "width": width, "height": height,
                                  "license": 1})
            jobs.append((os.path.join(folder, f"{split}2014", name), width, height, grey,
                         seed * 1_000_003 + image_id))
    _render_all(jobs, workers, progress)
    os.makedirs(os.path.join(folder, "annotations"))
    ann_id = 0
    for split in ("train", "val"):
        annotations = []
        for image, mine in zip(images[split], captions[split]):
            for caption, _ in mine:
                ann_id += 1
                annotations.append({"id": ann_id, "image_id": image["id"], "caption": caption})
        atomic_write_json(os.path.join(folder, "annotations", f"captions_{split}2014.json"),
                          {"info": {"description": DESCRIPTION, "version": "1.0", "year": 2014},
                           "licenses": [{"id": 1, "name": "CC0", "url": ""}],
                           "images": images[split], "annotations": annotations}, sync_dir=False)
    karpathy = _write_karpathy(folder, images, captions, plan["heldout"], counts["karpathy_val"])
    fsync_dir(os.path.join(folder, "annotations"))
    fsync_dir(folder)
    return {"train": counts["train"], "val": counts["val"],
            "captions": {s: sum(map(len, captions[s])) for s in captions},
            "vocabulary": plan["vocabulary"], "words": plan["used"], "karpathy": karpathy}


def _write_karpathy(folder: str, images: dict[str, list[dict[str, Any]]],
                    captions: dict[str, list[list[tuple[str, list[str]]]]],
                    heldout: list[int], n_val: int) -> dict[str, int]:
    """dataset_coco.json in Karpathy's format: heldout[:n_val] of val2014 are "val", the rest of heldout "test"."""
    split_of = {k: "val" for k in heldout[:n_val]} | {k: "test" for k in heldout[n_val:]}
    entries: list[dict[str, Any]] = []
    sentid = 0
    counts = {"train": 0, "restval": 0, "val": 0, "test": 0}
    for coco_split in ("train", "val"):
        for k, (image, mine) in enumerate(zip(images[coco_split], captions[coco_split])):
            split = "train" if coco_split == "train" else split_of.get(k, "restval")
            counts[split] += 1
            imgid = len(entries)
            sentences = []
            for caption, said in mine:
                sentences.append({"tokens": said, "raw": caption, "imgid": imgid, "sentid": sentid})
                sentid += 1
            entries.append({"filepath": f"{coco_split}2014", "sentids": [s["sentid"] for s in sentences],
                            "filename": image["file_name"], "imgid": imgid, "split": split,
                            "sentences": sentences, "cocoid": image["id"]})
    atomic_write_json(os.path.join(folder, "dataset_coco.json"), {"images": entries, "dataset": "coco"}, sync_dir=False)
    return counts


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m captioning.cocoshape", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="the folder to write (must not exist, or be empty)")
    parser.add_argument("--scale", type=float, required=True, help="1: COCO 2014's size (82,783 + 40,504 images)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=None, help="processes drawing images (default: CPU count)")
    parser.add_argument("--overwrite", action="store_true", help="move an existing --out aside first")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        r = write_coco_shaped(args.out, args.scale, args.seed, progress=not args.no_progress,
                              overwrite=args.overwrite, workers=args.workers)
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e}")
    k = r["karpathy"]
    print(f"wrote {r['train']} train / {r['val']} val images, {r['captions']['train']} / {r['captions']['val']} "
          f"captions, {r['vocabulary']} words, Karpathy split {k['train']} train, {k['restval']} restval, "
          f"{k['val']} val, {k['test']} test, to {r['out']}")


if __name__ == "__main__":
    main()
