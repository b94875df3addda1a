"""Text encoding: tokenize captions offline, build a Vocab, save and load it safely.

The tokenizer needs no nltk data files (no `nltk.download('punkt')`), and drops the
same punctuation that pycocoevalcap's PTB tokenizer drops, so what the model learns
is what the evaluation scores.
"""
import io
import json
import os
import pickle
from collections import Counter

from nltk.tokenize import NLTKWordTokenizer

from .atomic import atomic_write

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIAL_TOKENS = (PAD, START, END, UNK)  # ids 0, 1, 2, 3, in the chapter's order
END_ID = SPECIAL_TOKENS.index(END)

# pycocoevalcap.tokenizer.ptbtokenizer.PUNCTUATIONS
PUNCTUATIONS = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
                ".", "?", "!", ",", ":", "-", "--", "...", ";"}
_word_tokenizer = NLTKWordTokenizer()


def tokenize(text):
    """'A dog on a Bench.' -> ['a', 'dog', 'on', 'a', 'bench']"""
    tokens = _word_tokenizer.tokenize(str(text).lower().strip())
    # the Treebank rules only split a period at the very end of the text; catch "bench." mid-text too
    tokens = [t[:-1] if len(t) > 1 and t.endswith(".") and t.count(".") == 1 else t for t in tokens]
    return [t for t in tokens if t not in PUNCTUATIONS]


class Vocab:
    """Maps words to ids and back; unknown words map to <unk>."""

    def __init__(self):
        self.w2i = {}
        self.i2w = {}
        self.index = 0

    def add_token(self, token):
        if token not in self.w2i:
            self.w2i[token] = self.index
            self.i2w[self.index] = token
            self.index += 1

    def __call__(self, token):
        return self.w2i.get(token, self.w2i[UNK])

    def __len__(self):
        return len(self.w2i)

    def words(self):
        """The word list in id order: all a checkpoint needs to rebuild the Vocab."""
        return [self.i2w[i] for i in range(len(self))]

    @classmethod
    def from_words(cls, words):
        vocab = cls()
        for w in words:
            vocab.add_token(w)
        if tuple(vocab.words()[:4]) != SPECIAL_TOKENS:
            raise ValueError(f"a vocabulary must start with {SPECIAL_TOKENS}, got {vocab.words()[:4]}")
        return vocab

    def __repr__(self):
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


def read_captions_json(json_path):
    """A COCO captions file, checked: a JSON object whose `annotations` are objects with an `id`,
    an `image_id` and a string `caption` (and whose `images`, when present, have an `id` and a
    `file_name`), ids unique. Anything else is a ValueError naming the file and what is wrong."""
    if not os.path.isfile(json_path):
        raise FileNotFoundError(f"captions file not found: {json_path} (get the data with notebook 01 first)")
    try:
        with open(json_path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{json_path} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{json_path} is not UTF-8 text (byte {e.start}): is it a captions file?") from None
    expected = "a COCO captions file (a JSON object with 'images' and 'annotations')"
    if not isinstance(data, dict):
        raise ValueError(f"{json_path} holds a JSON {type(data).__name__}, not {expected}")
    if "annotations" not in data:
        raise ValueError(f"{json_path} has no 'annotations' key: not {expected}")
    for key, fields in (("annotations", ("id", "image_id", "caption")), ("images", ("id", "file_name"))):
        items = data.get(key, [])
        if not isinstance(items, list):
            raise ValueError(f"{json_path}: '{key}' is a {type(items).__name__}, not a list")
        for k, item in enumerate(items):
            if not isinstance(item, dict):
                raise ValueError(f"{json_path}: {key}[{k}] is {item!r}, not an object")
            for field in fields:
                if field not in item:
                    raise ValueError(f"{json_path}: {key}[{k}] has no '{field}' key: {_short(item)}")
            if key == "annotations" and not isinstance(item["caption"], str):
                raise ValueError(f"{json_path}: annotations[{k}] has caption {_short(item['caption'])} "
                                 f"({type(item['caption']).__name__}), not a string")
        seen = set()
        for k, item in enumerate(items):        # pycocotools indexes both by id: a duplicate would vanish
            if item["id"] in seen:
                raise ValueError(f"{json_path}: {key}[{k}] repeats the id {item['id']!r}")
            seen.add(item["id"])
    return data


def _short(value, limit=80):
    text = json.dumps(value)
    return text if len(text) <= limit else text[:limit] + "..."


def load_coco(json_path):
    """pycocotools' index of a captions file (checked by read_captions_json), without the four
    lines it prints while loading.

    The library loads captions files several times per run; in a notebook those prints would
    bury the lines that matter. A reader's own COCO(...) calls still print.
    """
    import contextlib
    import io

    from pycocotools.coco import COCO

    data = read_captions_json(json_path)
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = data
        coco.createIndex()
    return coco


def caption_tokens(json_path, coco=None, progress=True):
    """{annotation id: "its tokens joined by spaces"} for every caption of a COCO captions file.

    Tokenizing is the slow part of reading captions (over a minute for COCO's 414k on one core),
    and it used to happen in every run and in every DataLoader worker of every epoch. So
    it happens once, in parallel for large files, and goes to `<json>.tokens`, keyed by the
    file's size and modification time. A cache that cannot be written is only a warning.
    One string per caption rather than a list of words: about a quarter of the memory.
    """
    from .progress import tqdm

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
            from concurrent.futures import ProcessPoolExecutor
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
        with atomic_write(cache_path, "w") as f:  # also safe with two processes writing at once
            json.dump({"format": TOKENS_FORMAT, "source": source, "tokens": dict(zip(map(str, ids), joined))}, f)
    except OSError as e:
        print(f"warning: could not cache the tokenized captions at {cache_path} ({e}); continuing without")
    return dict(zip(ids, joined))


def count_tokens(json_path, progress=True):
    """Tokenize every caption of a COCO captions file: (Counter of tokens, list of caption lengths)."""
    counter, lengths = Counter(), []
    for joined in caption_tokens(json_path, progress=progress).values():
        tokens = joined.split()
        counter.update(tokens)
        lengths.append(len(tokens))
    return counter, lengths


def vocab_from_counts(counter, threshold=4):
    """Special tokens first, then every token seen >= threshold times, most frequent first
    (ties alphabetical), so the same captions give the same ids everywhere."""
    vocab = Vocab()
    for token in SPECIAL_TOKENS:
        vocab.add_token(token)
    for token, count in sorted(counter.items(), key=lambda kv: (-kv[1], kv[0])):
        if count >= threshold:
            vocab.add_token(token)
    return vocab


def build_vocabulary(json, threshold=4, progress=True):
    """The chapter's function: a Vocab of the tokens seen >= threshold times in a COCO captions file."""
    return vocab_from_counts(count_tokens(json, progress)[0], threshold)


def save_vocabulary(vocab, path):
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


def load_vocabulary(path):
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
