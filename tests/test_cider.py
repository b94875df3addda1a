import random

import numpy as np
import pytest
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.cider.cider_scorer import CiderScorer

from captioning.cider import CiderD, corpus_cider

WORDS = [f"w{i}" for i in range(25)]


def random_caption(rng, low, high):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


def candidate_for(rng, refs):
    """A caption sharing n-grams with its references: a slice of one reference with a word or two changed."""
    words = rng.choice(refs).split()
    start = rng.randrange(len(words))
    words = words[start:start + rng.randint(3, 12)] + random_caption(rng, 0, 4).split()
    if len(words) > 1:
        words[rng.randrange(len(words))] = rng.choice(WORDS)
    return " ".join(words)


def random_set(seed, images, refs_low=3, refs_high=7):
    """gts/res in pycocoevalcap's form, keyed by unsorted strings: some candidates copy a reference,
    one is empty, one is a single word."""
    rng = random.Random(seed)
    gts, res = {}, {}
    for i in rng.sample(range(10 * images), images):
        refs = [random_caption(rng, 5, 15) for _ in range(rng.randint(refs_low, refs_high))]
        gts[f"img{i}"] = refs
        res[f"img{i}"] = [refs[1] if rng.random() < 0.15 else candidate_for(rng, refs)]
    keys = list(gts)
    res[keys[0]] = [""]
    res[keys[1]] = [rng.choice(WORDS)]
    return gts, res


REAL_GTS = {
    391895: ["a man with a red helmet on a small moped on a dirt road",
             "man riding a motor bike on a dirt road on the countryside",
             "a man riding on the back of a motorcycle",
             "a dirt path with a young person on a motor bike rests to the foreground of a verdant area",
             "a man in a red shirt and a red hat is on a motorcycle on a hill side"],
    522418: ["a woman wearing a net on her head cutting a cake",
             "a woman cutting a large white sheet cake",
             "a woman wearing a hair net cutting a large sheet cake",
             "there is a woman that is cutting a white cake",
             "a woman marking a cake with the back of a chef 's knife"],
    184613: ["a child holding a flowered umbrella and petting a yak",
             "a young man holding an umbrella next to a herd of cattle",
             "a young boy barefoot holding an umbrella touching the horn of a cow",
             "a young boy with an umbrella who is touching the horn of a cow",
             "a boy holding an umbrella while standing next to livestock"],
    318219: ["a young boy standing in front of a computer keyboard",
             "a little boy wearing headphones and looking at a computer monitor",
             "he is listening intently to the computer at school",
             "a young boy stares up at the computer monitor",
             "a young kid with head phones on using a computer"],
    554625: ["a boy wearing headphones using one computer in a long row of computers",
             "a little boy with earphones on listening to something",
             "a group of people sitting at desk using computers",
             "children sitting at computer stations on a long table",
             "a small child wearing headphones plays on the computer"],
}
REAL_RES = {
    391895: ["a man riding a motorcycle on a dirt road"],
    522418: ["a woman cutting a cake with a knife"],
    184613: ["a boy holding an umbrella next to a cow"],
    318219: ["a young boy using a computer"],
    554625: ["a group of children sitting at computers with headphones"],
}


@pytest.mark.parametrize("seed,sigma", [(0, 6.0), (1, 6.0), (2, 3.0)])
def test_random_captions_equal_pycocoevalcap(seed, sigma):
    gts, res = random_set(seed, images=40)
    expected_mean, expected = Cider(sigma=sigma).compute_score(gts, res)
    mean, scores = corpus_cider(gts, res, sigma=sigma)
    assert scores.dtype == np.float64 and scores.shape == (40,)
    np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-6)     # in gts's (unsorted) key order
    assert mean == pytest.approx(expected_mean, abs=1e-6)
    assert list(gts) != sorted(gts)                             # pycocoevalcap's order is gts's, not sorted
    assert scores[0] == expected[0] == 0.0                      # the empty candidate
    assert len(res[list(gts)[1]][0].split()) == 1               # the single-word candidate, as pycocoevalcap scores it
    assert len({len(refs) for refs in gts.values()}) > 1        # varying reference counts
    copies = [i for i, k in enumerate(gts) if res[k][0] == gts[k][1]]
    assert copies and all(scores[i] > 1.0 for i in copies)     # a copied reference scores high, and they still agree


def test_real_sentences_equal_pycocoevalcap():
    expected_mean, expected = Cider().compute_score(REAL_GTS, REAL_RES)
    mean, scores = corpus_cider(REAL_GTS, REAL_RES)
    np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-6)
    assert mean == pytest.approx(expected_mean, abs=1e-6)
    assert (scores > 0).all()


def test_edge_cases_equal_pycocoevalcap():
    gts = {"b": ["", "a man rides a horse"],                   # an empty reference
           "a": ["a dog"],                                     # one reference; the candidate's words are in none
           "c": ["x y z w v u", "x y"],
           "d": ["the cat sat on the mat the cat sat"],
           "e": ["one"],
           "f": ["  a  b   c ", "a b c d"]}
    res = {"b": ["a a a a a"],                                  # one n-gram, counted five times
           "a": ["zebra zebra giraffe"],
           "c": [""],
           "d": ["the cat sat on the mat the cat sat"],         # a copy, with repeated n-grams
           "e": ["one"],                                        # one word each: no bigrams, no length penalty
           "f": ["a b\tc"]}                                    # str.split(): any whitespace
    expected_mean, expected = Cider().compute_score(gts, res)
    mean, scores = corpus_cider(gts, res)
    np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-6)
    assert mean == pytest.approx(expected_mean, abs=1e-6)
    assert scores[1] == scores[2] == 0.0 and scores[3] > 0


class PinnedRefLen(CiderScorer):
    """pycocoevalcap's CiderScorer with ref_len held at the training set's value: its compute_cider sets
    ref_len = log(len(crefs)), the number of images being SCORED, whatever document_frequency came from."""

    def __init__(self, ref_len):
        self._pinned = ref_len
        super().__init__()

    ref_len = property(lambda self: self._pinned, lambda self, value: None)


def test_training_document_frequencies_equal_pycocoevalcaps_scorer():
    train_gts, _ = random_set(3, images=300, refs_low=5, refs_high=5)
    train = list(train_gts.values())
    test_gts, test_res = random_set(4, images=20)
    items = list(zip(train[:10], [candidate_for(random.Random(i), refs) for i, refs in enumerate(train[:10])]))
    items += [(test_gts[k], test_res[k][0]) for k in test_gts]    # images outside the training set too
    candidates = [c for _, c in items]
    references = [refs for refs, _ in items]

    counting = CiderScorer()                    # pycocoevalcap's own df counting over the training references
    for refs in train:
        counting.cook_append(None, refs)
    counting.compute_doc_freq()
    reference = PinnedRefLen(np.log(float(len(train))))
    for refs, candidate in items:
        reference.cook_append(candidate, refs)
    reference.document_frequency = counting.document_frequency.copy()
    expected = np.array(reference.compute_cider())

    scorer = CiderD(train)
    assert scorer.images == 300
    scores = scorer.score(candidates, references)
    np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-6)
    mean, per_image = scorer.compute_score(dict(enumerate(references)), {i: [c] for i, c in enumerate(candidates)})
    np.testing.assert_allclose(per_image, expected, rtol=0, atol=1e-6)
    assert mean == pytest.approx(expected.mean(), abs=1e-6)

    unpinned = CiderScorer()                    # setting ref_len by hand is not enough: compute_cider overwrites it
    for refs, candidate in items:
        unpinned.cook_append(candidate, refs)
    unpinned.document_frequency = counting.document_frequency.copy()
    unpinned.ref_len = np.log(float(len(train)))
    assert np.abs(np.array(unpinned.compute_cider()) - expected).max() > 1e-3
    # and the corpus mode differs from the training-df mode: the df matter
    assert np.abs(corpus_cider(dict(enumerate(references)),
                               {i: [c] for i, c in enumerate(candidates)})[1] - expected).max() > 1e-3


def test_cache_is_one_entry_per_key_and_keys_do_not_change_scores():
    gts, _ = random_set(5, images=50)
    scorer = CiderD(gts.values())
    rng = random.Random(6)
    refs = gts["img" + str(next(int(k[3:]) for k in gts))]
    samples = [candidate_for(rng, refs) for _ in range(5)] + [""]
    with_key = scorer.score(samples, [refs] * 6, keys=[7] * 6)
    assert len(scorer._cache) == 1
    entry = scorer._cache[7]
    again = scorer.score(samples[::-1], [refs] * 6, keys=[7] * 6)
    assert len(scorer._cache) == 1 and scorer._cache[7] is entry
    np.testing.assert_array_equal(again, with_key[::-1])
    without = scorer.score(samples, [list(refs)] * 6)
    np.testing.assert_allclose(without, with_key, rtol=0, atol=1e-12)
    assert len(scorer._cache) == 2                               # keyed by the tuple of references this time
    one_by_one = np.array([scorer.score([s], [refs])[0] for s in samples])
    np.testing.assert_allclose(one_by_one, with_key, rtol=0, atol=1e-12)
    assert len(scorer._cache) == 2

    # several images interleaved in one call: grouped by key, returned in the callers order
    other = list(gts.values())[3]
    mixed = scorer.score([samples[0], "w1 w2 w3", samples[1]], [refs, other, refs], keys=[7, 8, 7])
    assert mixed[[0, 2]].tolist() == with_key[:2].tolist()
    assert mixed[1] == scorer.score(["w1 w2 w3"], [other])[0]
    assert set(scorer._cache) >= {7, 8}
    with pytest.raises(ValueError, match="key 7 was cached with other references"):
        scorer.score(["w1"], [other], keys=[7])
    scorer.clear_cache()
    assert not scorer._cache


def test_bad_input_is_a_clear_error():
    scorer = CiderD([["a b c", "a b d"], ["c d e"]])
    with pytest.raises(ValueError, match="2 candidates but 1 reference lists"):
        scorer.score(["a b", "c"], [["a b c"]])
    with pytest.raises(ValueError, match=r"references\[1\] has no reference captions"):
        scorer.score(["a b", "c"], [["a b c"], []])
    with pytest.raises(ValueError, match="1 keys but 2 candidates"):
        scorer.score(["a b", "c"], [["a b c"], ["c"]], keys=[1])
    with pytest.raises(TypeError, match=r"references\[0\] is a string"):
        scorer.score(["a b"], ["a b c"])
    with pytest.raises(ValueError, match=r"references\[1\] has no reference captions"):
        CiderD([["a b"], []])
    with pytest.raises(ValueError, match="no images"):
        CiderD([])
    with pytest.raises(ValueError, match="same images"):
        scorer.compute_score({1: ["a b"]}, {2: ["a b"]})
    with pytest.raises(ValueError, match=r"gts\[1\] has no reference captions"):
        scorer.compute_score({1: []}, {1: ["a b"]})
    with pytest.raises(ValueError, match="one caption"):
        scorer.compute_score({1: ["a b"]}, {1: ["a b", "a"]})
    assert scorer.score([], []).shape == (0,)
