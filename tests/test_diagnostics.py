"""Collapse diagnostics, bootstrap intervals, paired comparison and the signature (captioning.diagnostics)."""
import numpy as np
import pytest

from captioning import diagnostics as dg

REFS = {
    1: ["a red circle", "a red circle on a white background", "there is a red circle"],
    2: ["a blue square to the left of a green triangle", "a blue square and a green triangle"],
    3: ["a yellow star", "one yellow star"],
    4: ["a green circle above a red square", "a green circle and a red square"],
    5: ["a purple triangle", "a purple triangle in the picture"],
    6: ["a red square", "a red square on white"],
}


def test_bleu_from_statistics_matches_pycocoevalcap():
    from pycocoevalcap.bleu.bleu import Bleu

    preds = {1: ["a red circle"], 2: ["a blue square and a green circle"], 3: ["a yellow star on a star"],
             4: ["a green circle"], 5: ["a purple triangle in the picture"], 6: ["a red"]}
    score, _ = Bleu(4).compute_score(REFS, preds, verbose=0)
    stats = dg.bleu_statistics(REFS, preds, sorted(REFS))
    assert dg.corpus_bleu4(stats.sum(0)) == pytest.approx(score[3], rel=1e-9)
    # and on a subset (what a resample adds up), still the scorer's corpus BLEU
    sub = [2, 3, 5]
    score_sub, _ = Bleu(4).compute_score({i: REFS[i] for i in sub}, {i: preds[i] for i in sub}, verbose=0)
    assert dg.corpus_bleu4(stats[[1, 2, 4]].sum(0)) == pytest.approx(score_sub[3], rel=1e-9)


def test_bootstrap_intervals_bracket_the_score_and_are_seeded():
    rng = np.random.default_rng(1)
    stats = np.column_stack([rng.integers(5, 12, 200), rng.integers(5, 12, 200)] +
                            [rng.integers(4 - k, 12 - k, 200) for k in range(4)] +
                            [rng.integers(0, 4 - k, 200) for k in range(4)]).astype(float)
    cider = rng.random(200) * 2
    a = dg.bootstrap_intervals(stats, cider, resamples=500, seed=3)
    assert a == dg.bootstrap_intervals(stats, cider, resamples=500, seed=3)
    assert a != dg.bootstrap_intervals(stats, cider, resamples=500, seed=4)
    lo, hi = a["CIDEr"]
    assert lo < cider.mean() < hi and hi - lo < 0.5
    lo, hi = a["Bleu_4"]
    assert lo < dg.corpus_bleu4(stats.sum(0)) < hi
    # identical images: no uncertainty at all
    same = dg.bootstrap_intervals(np.tile(stats[0], (50, 1)), np.full(50, 0.7), resamples=200)
    assert same["CIDEr"] == pytest.approx((0.7, 0.7)) and same["Bleu_4"][0] == pytest.approx(same["Bleu_4"][1])


def result(preds, cider, tokenizer="ptb-java"):
    ids = sorted(preds)
    stats = dg.bleu_statistics(REFS, {i: [preds[i]] for i in ids}, ids)
    return {"signature": {"tokenizer": tokenizer},
            "per_image": {i: {"bleu": list(row), "CIDEr": c} for i, row, c in zip(ids, stats, cider)}}


def test_paired_comparison():
    good = {i: refs[0] for i, refs in REFS.items()}
    bad = {i: "a red circle" for i in REFS}
    a, b = result(bad, [0.1] * 6), result(good, [1.0, 1.2, 0.9, 1.1, 1.0, 0.8])
    out = dg.compare_results(a, b, resamples=300)
    assert out["CIDEr"]["difference"] == pytest.approx(np.mean([1.0, 1.2, 0.9, 1.1, 1.0, 0.8]) - 0.1)
    lo, hi = out["CIDEr"]["interval"]
    assert 0 < lo <= out["CIDEr"]["difference"] <= hi and out["CIDEr"]["b_better"] == 1.0
    assert out["Bleu_4"]["difference"] > 0
    same = dg.compare_results(a, a, resamples=100)
    assert same["CIDEr"]["difference"] == 0 and same["CIDEr"]["interval"] == (0, 0)
    fewer = result({i: good[i] for i in (1, 2, 3)}, [1.0] * 3)
    with pytest.raises(ValueError, match="different images"):
        dg.compare_results(a, fewer)
    with pytest.raises(ValueError, match="tokenized differently"):
        dg.compare_results(a, result(good, [1.0] * 6, tokenizer="python"))
    with pytest.raises(ValueError, match="per-image"):
        dg.compare_results({"metrics": {}}, b)


def test_training_captions_already_tokenized_are_taken_as_they_are():
    predictions = {i: "a red circle" for i in REFS}
    raw = dg.caption_diagnostics(predictions, REFS, ["A Red circle.", "a blue square"])
    joined = dg.caption_diagnostics(predictions, REFS, ["a red circle", "a blue square"], tokenized=True)
    assert raw["copied"] == joined["copied"] == 1.0
    # taken as they are, not tokenized again: a raw string passed as tokens matches nothing
    assert dg.caption_diagnostics(predictions, REFS, ["A Red circle."], tokenized=True)["copied"] == 0.0


def test_collapse_warning_fires_on_one_caption_and_not_on_the_references():
    training = ["a red circle", "a blue square"]
    collapsed = dg.caption_diagnostics({i: "a red circle ." for i in REFS}, REFS, training)
    assert collapsed["distinct"] == pytest.approx(1 / 6) and collapsed["top_share"] == 1.0
    assert collapsed["copied"] == 1.0 and collapsed["words_used"] == 3
    assert "caption collapse" in dg.collapse_warning(collapsed) and "a red circle" in dg.collapse_warning(collapsed)
    refs = dg.caption_diagnostics({i: r[0] for i, r in REFS.items()}, REFS, training)
    assert dg.collapse_warning(refs) is None and refs["distinct"] == 1.0
    assert refs["copied"] == pytest.approx(1 / 6)                      # "a red circle" is a training caption
    assert refs["reference_mean_length"] == pytest.approx(np.mean([len(c.split()) for r in REFS.values() for c in r]))
    # two captions for six images, one of them for four: most images get the same caption
    half = dg.caption_diagnostics({i: "a red circle" if i < 5 else "a blue square" for i in REFS}, REFS)
    assert dg.collapse_warning(half) is not None and half["copied"] is None
    with pytest.raises(ValueError):
        dg.caption_diagnostics({}, REFS)


def test_signature_line():
    sig = dg.signature("ptb-java", REFS, "val", 6, 3, 0.7)
    line = dg.format_signature(sig)
    assert "pycocoevalcap 1.2" in line and "tok:ptb-java" in line and "refs:2-3" in line
    assert "split:val (6 images)" in line and "beam:3" in line and "lp:0.7" in line and "scale:0-1" in line
    assert "lp:none" in dg.format_signature(dg.signature("python", {1: ["a", "b"]}, "val", 1, 1, 0.7))


def test_too_few_images_give_no_interval_and_no_paired_comparison():
    """One image gave CIDEr [x, x] and "B better in 100% of resamples": a certainty it does not have."""
    ids = (1, 2, 3, 4)
    good, bad = {i: REFS[i][0] for i in ids}, {i: "a red circle" for i in ids}
    a, b = result(bad, [0.1] * 4), result(good, [1.0] * 4)
    with pytest.raises(ValueError, match="score 4 images: a paired bootstrap needs at least 5"):
        dg.compare_results(a, b)
    one = result({1: "a red circle"}, [0.5])
    with pytest.raises(ValueError, match="score 1 image: a paired bootstrap"):
        dg.compare_results(one, one)
    stats = [one["per_image"][1]["bleu"]]
    assert dg.bootstrap_intervals(stats, [0.5]) == {"Bleu_4": None, "CIDEr": None}
    line = dg.format_intervals({"Bleu_4": 1.0, "CIDEr": None}, {"Bleu_4": None, "CIDEr": None})
    assert line.startswith("Bleu_4 1.000 [n/a]   CIDEr n/a [n/a]") and "at least 5 images" in line
    with pytest.raises(ValueError, match="non-zero"):
        dg.bootstrap_intervals([], [])


# --- captions that end mid-phrase or repeat themselves (self-critical training's failure modes) ----------------

def test_a_caption_that_ends_mid_phrase_is_dangling_and_a_complete_one_is_not():
    out = dg.caption_artifacts({1: "a red circle to the left of a", 2: "a blue square to the left of a green triangle"},
                               REFS)
    assert out["images"] == 2 and out["dangling"] == 0.5 and out["repeated"] == 0
    assert out["examples"] == {"dangling": ["a red circle to the left of a"], "repeated": []}
    # "left", "and", "the" never end a reference; an empty caption dangles too
    for caption in ("a blue square to the left", "a blue square and", "a red circle on the", ""):
        assert dg.caption_artifacts({1: caption}, REFS)["dangling"] == 1.0, caption


def test_a_word_that_ends_some_reference_is_not_dangling():
    # "white" and "picture" end a reference (of another image: the references are pooled); "background" too
    preds = {1: "a red square on white", 2: "a yellow star in the picture", 3: "a star on a white background ."}
    assert dg.caption_artifacts(preds, REFS)["dangling"] == 0
    # the same word dangles where no reference ends with it
    assert dg.caption_artifacts({1: "a red square on white"}, {1: ["a white square", "white on red"]})["dangling"] == 1
    # no references: nothing to tell, n/a rather than everything dangling
    assert dg.caption_artifacts({1: "a red circle"}, {})["dangling"] is None


def test_repeated_words_and_phrases_count_unless_the_references_repeat_them():
    for caption in ("a red red circle", "a red circle circle", "the circle the circle", "a red circle a red circle"):
        out = dg.caption_artifacts({1: caption}, REFS)
        assert out["repeated"] == 1.0 and out["examples"]["repeated"] == [caption], caption
    for caption in ("a red circle and a red square", "a red circle on a white background", "a"):
        assert dg.caption_artifacts({1: caption}, REFS)["repeated"] == 0, caption   # said twice, not in a row
    assert dg.caption_artifacts({1: "a a red circle"}, REFS)["repeated"] == 1.0
    assert dg.caption_artifacts({1: "a a red circle"}, {**REFS, 7: ["a a dot"]})["repeated"] == 0
    refs = {**REFS, 7: ["a very very small red dot", "there is a dot dot"]}
    assert dg.caption_artifacts({1: "a very very red circle"}, refs)["repeated"] == 0       # a reference says it
    assert dg.caption_artifacts({1: "a red dot dot"}, refs)["repeated"] == 0
    assert dg.caption_artifacts({1: "a red red dot"}, refs)["repeated"] == 1.0              # no reference says that


def test_artifact_shares_over_a_mixed_set():
    preds = {1: "a red circle", 2: "a blue square to the left of a", 3: "a yellow star star",
             4: "a green circle and a red red", 5: "a purple triangle", 6: "a red square on white",
             7: "a blue square to the left of a", 8: "a green the circle the circle", 9: "a red circle and",
             10: "a yellow star"}
    out = dg.caption_artifacts(preds, REFS)
    assert out["images"] == 10
    assert out["dangling"] == pytest.approx(4 / 10)      # 2, 4 ("red"), 7, 9
    assert out["repeated"] == pytest.approx(3 / 10)      # 3, 4, 8
    # distinct examples, at most three of each kind, in the order met
    assert out["examples"]["dangling"] == ["a blue square to the left of a", "a green circle and a red red",
                                           "a red circle and"]
    assert out["examples"]["repeated"] == ["a yellow star star", "a green circle and a red red",
                                           "a green the circle the circle"]
    diagnostics = dg.caption_diagnostics(preds, REFS)
    assert diagnostics["dangling"] == out["dangling"] and diagnostics["repeated"] == out["repeated"]
    assert diagnostics["artifact_examples"] == out["examples"]
    assert "40% end mid-phrase, 30% repeat a word" in dg.format_diagnostics(diagnostics)
    with pytest.raises(ValueError):
        dg.caption_artifacts({}, REFS)


def test_artifact_warning_above_the_threshold_only_and_on_enough_images():
    complete = {i: r[0] for i, r in REFS.items()}
    clean = dg.caption_diagnostics(complete, REFS)
    assert clean["dangling"] == 0 and clean["repeated"] == 0 and dg.artifact_warning(clean) is None
    # 20 images, one dangles (5%, not above): no warning; two dangle (10%): a warning naming shares and example
    many = {i: REFS[i % 6 + 1][0] for i in range(20)}
    refs = {i: REFS[i % 6 + 1] for i in range(20)}
    one = dg.caption_diagnostics({**many, 0: "a red circle to the left of a"}, refs)
    assert one["dangling"] == pytest.approx(0.05) and dg.artifact_warning(one) is None
    two = dg.caption_diagnostics({**many, 0: "a red circle to the left of a", 1: "a red red circle"}, refs)
    assert two["dangling"] == two["repeated"] == pytest.approx(0.05) and dg.artifact_warning(two) is None
    three = dg.caption_diagnostics({**many, 0: "a red circle to the left of a", 1: "a blue square and a",
                                    2: "a red red circle"}, refs)
    warning = dg.artifact_warning(three)
    assert warning is not None and "10% end mid-phrase" in warning and "5% repeat" in warning
    assert '"a red circle to the left of a"' in warning and '"a red red circle"' in warning
    assert "self-critical" in warning and "max_seq_len" in warning
    repeats = dg.caption_diagnostics({**many, 0: "a red red circle", 1: "a yellow star star"}, refs)
    assert "10% repeat" in dg.artifact_warning(repeats)
    # fewer than 5 images: too few to tell, even if every caption dangles
    few = dg.caption_diagnostics({i: "a red circle to the left of a" for i in (1, 2, 3, 4)}, REFS)
    assert few["dangling"] == 1.0 and dg.artifact_warning(few) is None
    assert dg.artifact_warning({**few, "images": 5}) is not None


def test_format_diagnostics_and_the_warning_read_a_dict_of_an_older_version():
    old = {"images": 16, "distinct": 0.5, "top_caption": "a red circle", "top_share": 0.25, "copied": None,
           "words_used": 12, "mean_length": 4.0, "reference_mean_length": 5.5}
    line = dg.format_diagnostics(old)
    assert line.endswith("mean length 4.0 words (references 5.5)") and "mid-phrase" not in line
    assert dg.artifact_warning(old) is None
    assert dg.format_diagnostics({**old, "dangling": None, "repeated": 0.0}).endswith(", 0% repeat a word")


def test_artifacts_are_fast_on_a_full_split(monkeypatch):
    """5,000 captions against 25,000 references: sets, not a scan of every reference for every caption (which
    would take minutes). The tokenizer, shared with the rest of the diagnostics, is left out of the timing."""
    import time
    monkeypatch.setattr(dg, "tokenize", str.split)
    rng = np.random.default_rng(0)
    words = "a the red blue green circle square triangle on of to left right and with white".split()
    refs = {i: [" ".join(rng.choice(words, 10)) for _ in range(5)] for i in range(5000)}
    preds = {i: " ".join(rng.choice(words, 9)) for i in range(5000)}
    start = time.perf_counter()
    out = dg.caption_artifacts(preds, refs)
    assert out["images"] == 5000 and time.perf_counter() - start < 5
