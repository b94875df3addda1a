import os
import pickle
import subprocess
import sys

import pytest
from conftest import ROOT, run_cli

from captioning.vocabulary import SPECIAL_TOKENS, Vocab, build_vocabulary, load_vocabulary, save_vocabulary, tokenize


def test_tokenize_is_offline_lowercase_and_drops_punctuation():
    assert tokenize("A dog on a Bench.") == ["a", "dog", "on", "a", "bench"]
    assert tokenize("Two cats, sitting in the background.") == ["two", "cats", "sitting", "in", "the", "background"]
    assert tokenize("a man's bike. it is red") == ["a", "man", "'s", "bike", "it", "is", "red"]


def test_build_vocabulary_order_threshold_and_unknown(tiny_data):
    json_path = str(tiny_data / "annotations" / "captions_train2014.json")
    vocab = build_vocabulary(json_path, threshold=1, progress=False)
    assert [vocab.i2w[i] for i in range(4)] == list(SPECIAL_TOKENS)
    assert vocab("<pad>") == 0 and vocab("<start>") == 1 and vocab("<end>") == 2 and vocab("<unk>") == 3
    assert vocab("zebra") == vocab("<unk>")
    assert vocab("circle") > 3 and vocab.i2w[vocab("circle")] == "circle"
    assert not any(w.endswith(".") for w in vocab.w2i)
    strict = build_vocabulary(json_path, threshold=10_000, progress=False)
    assert len(strict) == 4 < len(vocab)
    assert build_vocabulary(json_path, threshold=1, progress=False).words() == vocab.words()  # stable ids


def test_missing_captions_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        build_vocabulary(str(tmp_path / "nope.json"))


def test_pickle_loads_from_any_process(tiny_vocab, tmp_path):
    path = save_vocabulary(tiny_vocab, str(tmp_path / "vocabulary.pkl"))
    code = ("from captioning.vocabulary import load_vocabulary; import pickle, sys;"
            "v = load_vocabulary(sys.argv[1]); w = pickle.load(open(sys.argv[1], 'rb'));"
            "print(len(v), len(w), v('circle'))")
    out = subprocess.run([sys.executable, "-c", code, path], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split() == [str(len(tiny_vocab))] * 2 + [str(tiny_vocab("circle"))]


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "vocabulary.pkl"
    path.write_bytes(pickle.dumps(_Evil(marker)))
    with pytest.raises(pickle.UnpicklingError, match=r"refusing to load (posix|os)\.system"):
        load_vocabulary(str(path))
    assert not marker.exists()


def test_not_a_vocab_is_refused(tmp_path):
    path = tmp_path / "v.pkl"
    path.write_bytes(pickle.dumps({"w2i": {}}))
    with pytest.raises(pickle.UnpicklingError, match="does not hold a Vocab"):
        load_vocabulary(str(path))
    with pytest.raises(FileNotFoundError, match="notebook 02"):
        load_vocabulary(str(tmp_path / "missing.pkl"))


def test_chapter_style_main_pickle_still_loads(tmp_path):
    """The chapter pickled a Vocab defined in its notebook (__main__); such files load too."""
    code = ("import pickle\nclass Vocab:\n def __init__(self): self.w2i={}; self.i2w={}; self.index=0\n"
            "v=Vocab()\nfor w in ['<pad>','<start>','<end>','<unk>','dog']:\n"
            " v.w2i[w]=v.index; v.i2w[v.index]=w; v.index+=1\n"
            f"pickle.dump(v, open({str(tmp_path / 'old.pkl')!r}, 'wb'))\n")
    subprocess.run([sys.executable, "-c", code], check=True)
    vocab = load_vocabulary(str(tmp_path / "old.pkl"))
    assert isinstance(vocab, Vocab) and vocab("dog") == 4 and vocab("cat") == 3


def test_from_words_roundtrip_and_validation(tiny_vocab):
    assert Vocab.from_words(tiny_vocab.words()).w2i == tiny_vocab.w2i
    with pytest.raises(ValueError, match="must start with"):
        Vocab.from_words(["dog", "<pad>"])


def test_cli(tiny_data, tmp_path):
    out = tmp_path / "vocabulary.pkl"
    proc = run_cli("vocab", "--captions", tiny_data / "annotations" / "captions_train2014.json", "--out", out,
                   "--threshold", 2)
    assert "saved" in proc.stdout
    assert len(load_vocabulary(str(out))) > 10
    proc = run_cli("vocab", "--captions", tmp_path / "missing.json", "--out", out, check=False)
    assert proc.returncode != 0 and "missing.json" in proc.stderr


def _captions_file(tiny_data, tmp_path):
    path = tmp_path / "captions_train2014.json"
    path.write_text((tiny_data / "annotations" / "captions_train2014.json").read_text())
    return path


def test_caption_tokens_are_cached_beside_the_file_and_rebuilt_when_it_changes(tiny_data, tmp_path, monkeypatch):
    import json

    import captioning.vocabulary as v

    path = _captions_file(tiny_data, tmp_path)
    anns = json.loads(path.read_text())["annotations"]
    tokens = v.caption_tokens(str(path), progress=False)
    assert tokens == {a["id"]: " ".join(tokenize(a["caption"])) for a in anns}
    assert os.path.isfile(str(path) + ".tokens")

    calls = []
    real = v.tokenize
    monkeypatch.setattr(v, "tokenize", lambda text: calls.append(text) or real(text))
    assert v.caption_tokens(str(path), progress=False) == tokens and calls == []  # read from the cache

    anns[0]["caption"] = "A purple zebra."
    path.write_text(json.dumps({**json.loads(path.read_text()), "annotations": anns}))
    changed = v.caption_tokens(str(path), progress=False)
    assert changed[anns[0]["id"]] == "a purple zebra" and len(calls) == len(anns)

    (tmp_path / "captions_train2014.json.tokens").write_text("{not json")        # damaged: rebuilt, no crash
    assert v.caption_tokens(str(path), progress=False) == changed


def test_caption_tokens_in_parallel_match_and_an_unwritable_cache_only_warns(tiny_data, tmp_path, monkeypatch,
                                                                               capsys):
    import captioning.vocabulary as v

    path = _captions_file(tiny_data, tmp_path)
    serial = v.caption_tokens(str(path), progress=False)
    os.remove(str(path) + ".tokens")
    os.mkdir(str(path) + ".tokens")                   # a folder in the way: the cache cannot be written
    monkeypatch.setattr(v, "PARALLEL_ABOVE", 10)      # take the process-pool route on a small file
    assert v.caption_tokens(str(path), progress=False) == serial
    assert "could not cache the tokenized captions" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path)) == ["captions_train2014.json", "captions_train2014.json.tokens"]  # no temp left


@pytest.mark.parametrize("content, problem", [
    ('{"images": [], "info": {}}', "has no 'annotations' key"),
    ('[{"image_id": 1, "caption": "a dog"}]', "holds a JSON list, not a COCO captions file"),
    ('{"annotations": [{"id": 1, "image_id": 1, "caption": null}]}', "annotations[0] has caption null (NoneType)"),
    ('{"annotations": [{"id": 1, "image_id": 1, "caption": "a dog"}, {"id": 2, "image_id": 1, "caption": 42}]}',
     "annotations[1] has caption 42 (int), not a string"),
    ('{"annotations": [{"id": 1, "image_id": 1, "caption": ["a", "dog"]}]}', "has caption [\"a\", \"dog\"] (list)"),
    ('{"annotations": [{"id": 1, "image_id": 1, "text": "a dog"}]}', "annotations[0] has no 'caption' key"),
    ('{"annotations": {"id": 1}}', "'annotations' is a dict, not a list"),
    ('{"annotations": [{"id": 1, "image_id": 1, "caption": "a"}, {"id": 1, "image_id": 2, "caption": "b"}]}',
     "annotations[1] repeats the id 1"),
    ('{"annotations": [\n  {"id": 1, "image_id": 1, "caption": "a dog"},\n  {"id": 2 "image_id": 1}\n]}',
     "is not valid JSON: Expecting ',' delimiter at line 3, column 12"),
])
def test_broken_annotation_files_are_one_line_naming_the_file(tmp_path, content, problem):
    path = tmp_path / "captions.json"
    path.write_text(content)
    proc = run_cli("vocab", "--captions", path, "--out", tmp_path / "vocabulary.pkl", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert str(path) in proc.stderr and problem in proc.stderr, proc.stderr
    assert not (tmp_path / "vocabulary.pkl").exists()
