"""CIDEr-D for self-critical training: pycocoevalcap's `Cider`, exactly, with document frequencies fixed once.

Self-critical sequence training scores every sampled caption with its CIDEr-D against its image's
reference captions, many times per step, with document frequencies (df) taken once from the training
references. pycocoevalcap's `Cider` recomputes the df from whatever it is given and rebuilds every
reference's tf-idf vector for every candidate; `CiderD` builds the df once, keeps each image's
reference vectors (the candidates of one image share them), and scores all the candidates of a call
together in numpy, touching only the n-grams a candidate shares with its references.

The numbers are pycocoevalcap's (cider_scorer.py), quirks included:
  - an n-gram is a tuple of whitespace-separated tokens (`str.split()`); captions must already be tokenized;
  - tf-idf = count * (ref_len - log(max(1, df))), ref_len = log(number of images that built the df): an
    n-gram never seen in the references weighs as much as one seen in a single image;
  - the length in the Gaussian penalty exp(-delta^2 / (2 sigma^2)) is the number of BIGRAMS (words - 1,
    0 for an empty or one-word caption), not of words;
  - per order, sum over references of min(candidate, reference) * reference / (|candidate| |reference|),
    left undivided when either norm is 0 (the sum is then 0); the score is the mean over the orders,
    divided by the number of references, times 10.
pycocoevalcap counts 1- to 4-grams whatever its `n` (it fails or pads with zeros otherwise); here `n`
sets the orders counted, so the two agree for the default n=4.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Iterable, Mapping, Sequence
from itertools import chain, count, repeat
from typing import TypeVar

import numpy as np

Ngram = tuple[str, ...]
K = TypeVar("K", bound=Hashable)


def _ngram_counts(sentence: str, n: int) -> Counter[Ngram]:
    """Counts of the sentence's 1- to n-grams (pycocoevalcap's `precook`)."""
    words = sentence.split()
    return Counter(chain.from_iterable(zip(*(words[j:] for j in range(k))) for k in range(1, n + 1)))


def _check_references(refs: Sequence[str], position: int) -> tuple[str, ...]:
    if isinstance(refs, str):
        raise TypeError(f"references[{position}] is a string; it must be a list of that image's reference captions")
    refs = tuple(refs)
    if not refs:
        raise ValueError(f"references[{position}] has no reference captions; every image needs at least one")
    for ref in refs:
        if not isinstance(ref, str):
            raise TypeError(f"references[{position}] holds a {type(ref).__name__}, not a caption string of tokens")
    return refs


class _Image:
    """One image's reference tf-idf vectors, by n-gram: for each n-gram of its references, which of them
    hold it and with what weight (compressed by column), plus each reference's norm per order and length."""
    __slots__ = ("refs", "index", "starts", "rows", "weights", "norms", "lengths")

    def __init__(self, refs: tuple[str, ...], scorer: CiderD) -> None:
        n = scorer.n
        self.refs = refs
        ngrams: list[Ngram] = []
        counts: list[int] = []
        owners: list[int] = []
        for r, ref in enumerate(refs):
            cooked = _ngram_counts(ref, n)
            ngrams += cooked
            counts += cooked.values()
            owners += repeat(r, len(cooked))
        total = len(ngrams)
        self.index = dict(zip(dict.fromkeys(ngrams), count()))          # column of each n-gram, in order of appearance
        cols = np.fromiter(map(self.index.__getitem__, ngrams), dtype=np.intp, count=total)
        tf = np.fromiter(counts, dtype=np.float64, count=total)
        weights = tf * np.fromiter(map(scorer._idf.get, ngrams, repeat(scorer._ref_len)), dtype=np.float64, count=total)
        order = np.fromiter(map(len, ngrams), dtype=np.intp, count=total) - 1
        owner = np.fromiter(owners, dtype=np.intp, count=total)
        by_column = np.argsort(cols, kind="stable")
        self.starts = np.zeros(len(self.index) + 1, dtype=np.intp)     # column g's references: starts[g]:starts[g + 1]
        np.cumsum(np.bincount(cols, minlength=len(self.index)), out=self.starts[1:])
        self.rows = owner[by_column]
        self.weights = weights[by_column]
        self.norms = np.sqrt(np.bincount(owner * n + order, weights=weights * weights,
                                         minlength=len(refs) * n)).reshape(len(refs), n)       # (R, n)
        self.lengths = np.bincount(owner, weights=tf * (order == 1), minlength=len(refs))    # bigrams, as pycocoevalcap


class CiderD:
    """CIDEr-D with document frequencies fixed at construction.

    references: one entry per image, each a list of that image's reference captions as space-separated
    token strings; they give the df (in how many images an n-gram occurs) and ref_len = log(number of
    images). For SCST, pass the training set's references once and call `score` every step.

    `score` keeps each image's reference vectors under its key (the image id you pass, or the tuple of its
    references), for as long as this object lives: one entry per distinct image scored, which is what a
    training set needs, but the cache grows without bound over an unbounded stream of different images
    (per image, a dict of its G distinct reference n-grams and arrays of about 3 G numbers; `clear_cache()`
    drops them all).
    """

    def __init__(self, references: Iterable[Sequence[str]], n: int = 4, sigma: float = 6.0) -> None:
        if n < 1:
            raise ValueError(f"n must be at least 1, got {n}")
        self.n = n
        self.sigma = float(sigma)
        df: Counter[Ngram] = Counter()
        images = 0
        for position, refs in enumerate(references):
            counts: set[Ngram] = set()
            for ref in _check_references(refs, position):
                counts.update(_ngram_counts(ref, n))
            df.update(counts)
            images += 1
        if not images:
            raise ValueError("no images to take document frequencies from")
        self._images = images
        self._ref_len = float(np.log(float(images)))
        idf = self._ref_len - np.log(np.fromiter(df.values(), dtype=np.float64, count=len(df)))
        self._idf: dict[Ngram, float] = dict(zip(df, idf.tolist()))
        self._cache: dict[Hashable, _Image] = {}

    @property
    def images(self) -> int:
        """How many images built the document frequencies."""
        return self._images

    def clear_cache(self) -> None:
        """Forget every image's cached reference vectors."""
        self._cache.clear()

    def _image(self, key: Hashable, refs: tuple[str, ...]) -> _Image:
        entry = self._cache.get(key)
        if entry is None:
            entry = self._cache[key] = _Image(refs, self)
        elif entry.refs != refs:
            raise ValueError(f"key {key!r} was cached with other references; a key must always name the same image")
        return entry

    def score(self, candidates: Sequence[str], references: Sequence[Sequence[str]],
              keys: Sequence[Hashable] | None = None) -> np.ndarray:
        """CIDEr-D of candidates[i] (a token string) against references[i] (its image's token strings), shape (len,).

        keys[i] names references[i] in the cache (e.g. the image id), so that its reference vectors are built
        once; without keys the tuple of reference strings is the key. A key must always come with the same
        references. The candidates of one image, in one call, are scored together.
        """
        if isinstance(candidates, str):
            raise TypeError("candidates is a string; it must be a list of caption strings")
        if len(candidates) != len(references):
            raise ValueError(f"{len(candidates)} candidates but {len(references)} reference lists; "
                             "they must match one to one")
        if keys is not None and len(keys) != len(candidates):
            raise ValueError(f"{len(keys)} keys but {len(candidates)} candidates; they must match one to one")
        entries: dict[Hashable, _Image] = {}
        images: list[_Image] = []
        for i, refs in enumerate(references):
            if not isinstance(candidates[i], str):
                raise TypeError(f"candidates[{i}] is a {type(candidates[i]).__name__}, not a caption string")
            refs = _check_references(refs, i)
            key = refs if keys is None else keys[i]
            entry = entries.get(key)
            if entry is None:
                entry = entries[key] = self._image(key, refs)
            elif keys is not None and entry.refs != refs:
                raise ValueError(f"keys[{i}] = {key!r} comes with other references than before in this call")
            images.append(entry)
        return self._score(candidates, images, list(entries.values()))

    def _score(self, candidates: Sequence[str], images: list[_Image], distinct: list[_Image]) -> np.ndarray:
        """Every candidate against its image's references at once.

        tf-idf weights are never negative (an n-gram's df is at most the number of images), so
        min(candidate, reference) * reference is nonzero only for an n-gram both hold: the numerators are
        sums over each candidate's n-grams that its image's references hold, each taken with every
        reference that holds it. The images of this call are laid end to end, their columns and nonzeros offset.
        """
        n, size = self.n, len(candidates)
        if not size:
            return np.zeros(0)
        column_offset: dict[int, int] = {}
        columns = nonzeros = 0
        starts: list[np.ndarray] = []
        rows: list[np.ndarray] = []
        weights: list[np.ndarray] = []
        for image in distinct:
            column_offset[id(image)] = columns
            starts.append(image.starts[:-1] + nonzeros)
            rows.append(image.rows)
            weights.append(image.weights)
            columns += len(image.index)
            nonzeros += len(image.rows)
        starts.append(np.array([nonzeros], dtype=np.intp))
        all_starts, all_rows, all_weights = np.concatenate(starts), np.concatenate(rows), np.concatenate(weights)

        ngrams: list[Ngram] = []
        counts: list[int] = []
        local: list[int] = []
        sizes = np.zeros(size, dtype=np.intp)
        offsets = np.zeros(size, dtype=np.intp)
        for c, (candidate, image) in enumerate(zip(candidates, images)):
            cooked = _ngram_counts(candidate, n)
            ngrams += cooked
            counts += cooked.values()
            local += map(image.index.get, cooked, repeat(-1))
            sizes[c] = len(cooked)
            offsets[c] = column_offset[id(image)]
        total = len(ngrams)
        tf = np.fromiter(counts, dtype=np.float64, count=total)
        values = tf * np.fromiter(map(self._idf.get, ngrams, repeat(self._ref_len)), dtype=np.float64, count=total)
        order = np.fromiter(map(len, ngrams), dtype=np.intp, count=total) - 1
        owner = np.repeat(np.arange(size), sizes)
        # the norm counts every n-gram of a candidate; only those its references hold can match
        norms = np.sqrt(np.bincount(owner * n + order, weights=values * values, minlength=size * n)).reshape(size, n)
        lengths = np.bincount(owner, weights=tf * (order == 1), minlength=size)     # bigrams, as pycocoevalcap

        # (candidate, reference) pairs, the references of each candidate's image in turn
        ref_counts = np.array([len(image.refs) for image in images], dtype=np.intp)
        pair_start = np.cumsum(ref_counts) - ref_counts
        pairs = int(ref_counts.sum())
        found = np.fromiter(local, dtype=np.intp, count=total)
        held = found >= 0
        column = found[held] + offsets[owner[held]]
        first, spread = all_starts[column], all_starts[column + 1] - all_starts[column]
        which = np.repeat(np.arange(len(column)), spread)           # each found n-gram, once per reference holding it
        at = np.arange(len(which)) + np.repeat(first - (np.cumsum(spread) - spread), spread)
        ref_weight = all_weights[at]
        mine = values[held][which]
        pair = pair_start[owner[held][which]] + all_rows[at]
        numerator = np.bincount(pair * n + order[held][which], weights=np.minimum(mine, ref_weight) * ref_weight,
                                minlength=pairs * n).reshape(pairs, n)
        pair_candidate = np.repeat(np.arange(size), ref_counts)
        ref_norms = np.concatenate([image.norms for image in images])
        cand_norms = norms[pair_candidate]
        divide = (cand_norms != 0) & (ref_norms != 0)
        similarity = np.where(divide, numerator / np.where(divide, cand_norms * ref_norms, 1.0), numerator)
        delta = lengths[pair_candidate] - np.concatenate([image.lengths for image in images])
        similarity *= np.exp(-(delta ** 2) / (2 * self.sigma ** 2))[:, None]
        per_candidate = np.add.reduceat(similarity, pair_start, axis=0)   # every candidate has a reference
        return per_candidate.mean(axis=1) / ref_counts * 10.0

    def compute_score(self, gts: Mapping[K, Sequence[str]], res: Mapping[K, Sequence[str]]) -> tuple[float, np.ndarray]:
        """pycocoevalcap's `Cider().compute_score(gts, res)`, with this object's document frequencies.

        gts maps each image to its reference captions, res to a one-element list holding its candidate.
        Returns (mean, per-image scores in the order of gts's keys), as pycocoevalcap does.
        """
        if gts.keys() != res.keys():
            raise ValueError(f"gts and res must have the same images: {len(set(gts) - set(res))} only in gts, "
                             f"{len(set(res) - set(gts))} only in res")
        if not gts:
            raise ValueError("no images to score")
        candidates = []
        for key in gts:
            if not gts[key]:
                raise ValueError(f"gts[{key!r}] has no reference captions; every image needs at least one")
            hypothesis = res[key]
            if isinstance(hypothesis, str) or len(hypothesis) != 1:
                raise ValueError(f"res[{key!r}] must be a list holding one caption")
            candidates.append(hypothesis[0])
        scores = self.score(candidates, [gts[key] for key in gts])
        return float(np.mean(scores)), scores


def corpus_cider(gts: Mapping[K, Sequence[str]], res: Mapping[K, Sequence[str]], n: int = 4,
                 sigma: float = 6.0) -> tuple[float, np.ndarray]:
    """pycocoevalcap's `Cider().compute_score(gts, res)`: document frequencies from gts themselves."""
    return CiderD(gts.values(), n=n, sigma=sigma).compute_score(gts, res)
