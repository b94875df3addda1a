"""Text encoding: tokenize captions offline, build a Vocab, save and load it safely.

The tokenizer needs no nltk data files (no `nltk.download('punkt')`), and drops the
same punctuation that pycocoevalcap's PTB tokenizer drops, so what the model learns
is what the evaluation scores.
"""
import contextlib
import io
import json
import os
import pickle
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ProcessPoolExecutor

from nltk.tokenize import NLTKWordTokenizer
from pycocotools.coco import COCO

from .atomic import atomic_write
from .derived import write_derived
from .progress import tqdm

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIAL_TOKENS = (PAD, START, END, UNK)  # ids 0, 1, 2, 3, in the chapter's order
END_ID = SPECIAL_TOKENS.index(END)

# pycocoevalcap.tokenizer.ptbtokenizer.PUNCTUATIONS
PUNCTUATIONS = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
                ".", "?", "!", ",", ":", "-", "--", "...", ";"}
_word_tokenizer = NLTKWordTokenizer()


def tokenize(text: str) -> list[str]:
    """'A dog on a Bench.' -> ['a', 'dog', 'on', 'a', 'bench']"""
    tokens = _word_tokenizer.tokenize(str(text).lower().strip())
    # the Treebank rules only split a period at the very end of the text; catch "bench." mid-text too
    tokens = [t[:-1] if len(t) > 1 and t.endswith(".") and t.count(".") == 1 else t for t in tokens]
    return [t for t in tokens if t not in PUNCTUATIONS]


class Vocab:
    """Maps words to ids and back; unknown words map to <unk>."""

    def __init__(self) -> None:
        self.w2i: dict[str, int] = {}
        self.i2w: dict[int, str] = {}
        self.index = 0

    def add_token(self, token: str) -> None:
        if token not in self.w2i:
            self.w2i[token] = self.index
            self.i2w[self.index] = token
            self.index += 1

    def __call__(self, token: str) -> int:
        return self.w2i.get(token, self.w2i[UNK])

    def __len__(self) -> int:
        return len(self.w2i)

    def words(self) -> list[str]:
        """The word list in id order: all a checkpoint needs to rebuild the Vocab."""
        return [self.i2w[i] for i in range(len(self))]

    @classmethod
    def from_words(cls, words: Iterable[str]) -> "Vocab":
        vocab = cls()
        for w in words:
            vocab.add_token(w)
        if tuple(vocab.words()[:4]) != SPECIAL_TOKENS:
            raise ValueError(f"a vocabulary must start with {SPECIAL_TOKENS}, got {vocab.words()[:4]}")
        return vocab

    def __repr__(self) -> str:
        return f"Vocab({len(self)} words)"


TOKENS_FORMAT = 1     # bump whenever tokenize() changes, so that cached token files are rebuilt
PARALLEL_ABOVE = 20000  # captions; fewer are tokenized in this process


def _tokenize_all(captions):
    return [" ".join(tokenize(c)) for c in captions]


def _read_token_cache(path, source):
    try:
        with open(path) as f:
            cached = json.load(f)
        if cached.get("format") == TOKENS_FORMAT and cached.get("source") == source:
            return {int(k): v for k, v in cached["tokens"].items()}
    except (OSError, ValueError, KeyError, AttributeError):
        pass  # missing, stale or damaged: tokenize again
    return None


# (path, size, mtime) of the captions files whose skipped entries were reported
_warned: set[tuple[str, int, int]] = set()


def read_captions_json(json_path: str | os.PathLike[str], log: Callable[[str], object] = print) -> dict:
    """A COCO captions file, checked once, as it is read.

    It must be a JSON object whose `annotations` are objects with an int `id`, an int `image_id`
    and a string `caption`, and whose `images`, when present, have an int `id` and a string
    `file_name`; ids unique. Anything else is a ValueError naming the file and the first bad entry
    (a string `image_id` would otherwise match no image and its caption would vanish unseen).

    Empty or blank captions are dropped (each would teach `<start> <end>`: stop at once), and so
    are captions whose `image_id` is none of the listed images; both are counted in one warning,
    given once per version of the file.
    """
    data = _load_json(json_path)
    _check_captions(json_path, data)
    _drop_unusable_captions(json_path, data, log)
    return data


def _load_json(json_path):
    """The file's JSON; a missing file, invalid JSON or text that is not UTF-8 is an error naming the file."""
    if not os.path.isfile(json_path):
        raise FileNotFoundError(f"captions file not found: {json_path} (get the data with notebook 01 first)")
    try:
        with open(json_path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{json_path} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{json_path} is not UTF-8 text (byte {e.start}): is it a captions file?") from None


def _check_captions(json_path, data):
    """The shape read_captions_json requires: a ValueError naming the file and the first entry that lacks it."""
    expected = "a COCO captions file (a JSON object with 'images' and 'annotations')"
    if not isinstance(data, dict):
        raise ValueError(f"{json_path} holds a JSON {type(data).__name__}, not {expected}")
    if "annotations" not in data:
        raise ValueError(f"{json_path} has no 'annotations' key: not {expected}")
    types = {"annotations": {"id": int, "image_id": int, "caption": str}, "images": {"id": int, "file_name": str}}
    for key, fields in types.items():
        items = data.get(key, [])
        if not isinstance(items, list):
            raise ValueError(f"{json_path}: '{key}' is a {type(items).__name__}, not a list")
        seen = set()
        for k, item in enumerate(items):
            _check_entry(json_path, key, k, item, fields)
            if item["id"] in seen:        # pycocotools indexes both by id: a duplicate would vanish
                raise ValueError(f"{json_path}: {key}[{k}] repeats the id {item['id']!r}")
            seen.add(item["id"])


def _check_entry(json_path, key, k, item, fields):
    """data[key][k] is an object with `fields` ({name: type}), and an image's file_name is not blank."""
    if not isinstance(item, dict):
        raise ValueError(f"{json_path}: {key}[{k}] is {item!r}, not an object")
    for field, kind in fields.items():
        if field not in item:
            raise ValueError(f"{json_path}: {key}[{k}] has no '{field}' key: {_short(item)}")
        value = item[field]
        if not isinstance(value, kind) or isinstance(value, bool):
            what = "a string" if kind is str else "an integer"
            raise ValueError(f"{json_path}: {key}[{k}] has {field} {_short(value)} "
                             f"({type(value).__name__}), not {what}: {_short(item)}")
    if key == "images" and not item["file_name"].strip():
        raise ValueError(f"{json_path}: images[{k}] has an empty file_name: {_short(item)}")


def _drop_unusable_captions(json_path, data, log):
    """Leave out of data["annotations"] the blank captions and those of images the file does not list,
    with one warning per version of the file (its size and modification time)."""
    annotations = data["annotations"]
    blank = [a for a in annotations if not a["caption"].strip()]
    known = {im["id"] for im in data["images"]} if "images" in data else None
    orphans = [a for a in annotations if known is not None and a["image_id"] not in known]
    if not (blank or orphans):
        return
    data["annotations"] = [a for a in annotations if a["caption"].strip()
                           and (known is None or a["image_id"] in known)]
    stat = os.stat(json_path)
    key = (os.path.abspath(json_path), stat.st_size, stat.st_mtime_ns)
    if key in _warned:
        return
    _warned.add(key)
    parts = []
    if blank:
        parts.append(f"{len(blank)} empty or blank caption(s) (e.g. annotation id {blank[0]['id']})")
    if orphans:
        parts.append(f"{len(orphans)} caption(s) of image ids that {os.path.basename(json_path)} does not "
                     f"list (e.g. image_id {orphans[0]['image_id']})")
    log(f"warning: {json_path}: skipping {' and '.join(parts)}, of {len(annotations)} captions")


def _short(value, limit=80):
    text = json.dumps(value)
    return text if len(text) <= limit else text[:limit] + "..."


def load_coco(json_path: str | os.PathLike[str]) -> COCO:
    """pycocotools' index of a captions file (checked by read_captions_json), without the four
    lines it prints while loading.

    The library loads captions files several times per run; in a notebook those prints would
    bury the lines that matter. A reader's own COCO(...) calls still print.
    """
    data = read_captions_json(json_path)
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = data
        coco.createIndex()
    return coco


def caption_tokens(json_path: str, coco: COCO | None = None, progress: bool = True) -> dict[int, str]:
    """{annotation id: "its tokens joined by spaces"} for every caption of a COCO captions file.

    Tokenizing is the slow part of reading captions (over a minute for COCO's 414k on one core),
    and it used to happen in every run and in every DataLoader worker of every epoch. So
    it happens once, in parallel for large files, and goes to `<json>.tokens`, keyed by the
    file's size and modification time. A cache that cannot be written is only a warning.
    One string per caption rather than a list of words: about a quarter of the memory.
    """
    if not os.path.isfile(json_path):
        raise FileNotFoundError(f"captions file not found: {json_path} (get the data with notebook 01 first)")
    stat = os.stat(json_path)
    source = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    cache_path = json_path + ".tokens"
    tokens = _read_token_cache(cache_path, source)
    if tokens is not None:
        return tokens
    if coco is None:
        coco = load_coco(json_path)
    ids = sorted(coco.anns)
    chunks = [[coco.anns[a]["caption"] for a in ids[i:i + 2000]] for i in range(0, len(ids), 2000)]
    workers = min(os.cpu_count() or 1, 8) if len(ids) > PARALLEL_ABOVE else 1
    joined = []
    with tqdm(total=len(ids), desc=f"tokenizing {os.path.basename(json_path)}", unit="cap",
              disable=not progress) as bar:
        if workers > 1:
            with ProcessPoolExecutor(workers) as pool:
                results = pool.map(_tokenize_all, chunks)
                for chunk in results:
                    joined += chunk
                    bar.update(len(chunk))
        else:
            for chunk in chunks:
                joined += _tokenize_all(chunk)
                bar.update(len(chunk))
    try:
        # temp file and rename (also safe with two processes writing at once), no fsync: a cache made again
        # from the captions when it is lost, and a torn one fails json.load in _read_token_cache and is redone
        with write_derived(cache_path, "w") as f:
            json.dump({"format": TOKENS_FORMAT, "source": source, "tokens": dict(zip(map(str, ids), joined))}, f)
    except OSError as e:
        print(f"warning: could not cache the tokenized captions at {cache_path} ({e}); continuing without")
    return dict(zip(ids, joined))


def count_tokens(json_path: str, progress: bool = True) -> tuple[Counter[str], list[int]]:
    """Tokenize every caption of a COCO captions file: (Counter of tokens, list of caption lengths)."""
    counter: Counter[str] = Counter()
    lengths: list[int] = []
    for joined in caption_tokens(json_path, progress=progress).values():
        tokens = joined.split()
        counter.update(tokens)
        lengths.append(len(tokens))
    return counter, lengths


def vocab_from_counts(counter: Mapping[str, int], threshold: int = 4) -> Vocab:
    """Special tokens first, then every token seen >= threshold times, most frequent first
    (ties alphabetical), so the same captions give the same ids everywhere."""
    vocab = Vocab()
    for token in SPECIAL_TOKENS:
        vocab.add_token(token)
    for token, count in sorted(counter.items(), key=lambda kv: (-kv[1], kv[0])):
        if count >= threshold:
            vocab.add_token(token)
    return vocab


def build_vocabulary(json: str, threshold: int = 4, progress: bool = True) -> Vocab:
    """The chapter's function: a Vocab of the tokens seen >= threshold times in a COCO captions file."""
    return vocab_from_counts(count_tokens(json, progress)[0], threshold)


def save_vocabulary(vocab: Vocab, path: str) -> str:
    with atomic_write(path) as f:
        pickle.dump(vocab, f, protocol=4)
    return path


class _VocabUnpickler(pickle.Unpickler):
    """Only the Vocab class and plain builtins may appear in a vocabulary pickle."""

    SAFE_BUILTINS = {"dict", "list", "tuple", "set", "frozenset", "int", "float", "str", "bool"}

    def find_class(self, module, name):
        if name == "Vocab" and module in (__name__, "__main__"):  # "__main__": pickles from the chapter's notebook
            return Vocab
        if module == "builtins" and name in self.SAFE_BUILTINS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"refusing to load {module}.{name} from a vocabulary pickle: only {__name__}.Vocab "
            f"and plain builtins are allowed (the file may be corrupt or malicious)")


def load_vocabulary(path: str | os.PathLike[str]) -> Vocab:
    """Load a vocabulary.pkl without running arbitrary code."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"vocabulary not found: {path} (build it with notebook 02 or "
                                f"`python -m captioning vocab`)")
    with open(path, "rb") as f:
        data = f.read()
    try:
        vocab = _VocabUnpickler(io.BytesIO(data)).load()
    except pickle.UnpicklingError as e:
        raise pickle.UnpicklingError(f"{path}: {e}") from None
    if not isinstance(vocab, Vocab) or not isinstance(getattr(vocab, "w2i", None), dict):
        raise pickle.UnpicklingError(f"{path} does not hold a Vocab (got {type(vocab).__name__})")
    return vocab
