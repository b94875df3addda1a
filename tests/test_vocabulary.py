import json
import os
import pickle
import subprocess
import sys

import pytest
from conftest import ROOT, run_cli

from captioning.vocabulary import (
    SPECIAL_TOKENS,
    Vocab,
    build_vocabulary,
    count_tokens,
    load_vocabulary,
    save_vocabulary,
    tokenize,
)


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


@pytest.mark.parametrize("change, problem", [
    (lambda d: d["images"][0].update(file_name=17), "images[0] has file_name 17 (int), not a string"),
    (lambda d: d["annotations"][1].update(id=[2]), "annotations[1] has id [2] (list), not an integer"),
    (lambda d: d["annotations"][2].update(image_id=str(d["annotations"][2]["image_id"])),
     "(str), not an integer"),
    (lambda d: d["images"][1].update(id=True), "images[1] has id true (bool), not an integer"),
    (lambda d: d["images"][0].update(file_name="  "), "images[0] has an empty file_name"),
])
def test_captions_files_with_wrong_types_are_one_line_naming_the_entry(tiny_data, tmp_path, change, problem):
    data = json.loads((tiny_data / "annotations" / "captions_train2014.json").read_text())
    data["annotations"].sort(key=lambda a: a["id"])
    change(data)
    path = tmp_path / "captions.json"
    path.write_text(json.dumps(data))
    proc = run_cli("vocab", "--captions", path, "--out", tmp_path / "vocabulary.pkl", check=False)
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert str(path) in proc.stderr and problem in proc.stderr, proc.stderr


def test_blank_captions_and_captions_of_unknown_images_are_skipped_counted_and_never_trained_on(
        tiny_data, tiny_vocab, tmp_path, capsys):
    from captioning.data import CocoCaptionDataset
    from captioning.vocabulary import load_coco

    data = json.loads((tiny_data / "annotations" / "captions_train2014.json").read_text())
    anns = sorted(data["annotations"], key=lambda a: a["id"])
    for a in anns[:7]:
        a["caption"] = ""
    for a in anns[7:10]:
        a["caption"] = " \t "
    anns[10]["image_id"] = 999999                  # no such image
    path = tmp_path / "captions_train2014.json"
    path.write_text(json.dumps(data))
    coco = load_coco(str(path))
    said = capsys.readouterr().out
    assert said.count("warning") == 1 and str(path) in said, said
    assert f"10 empty or blank caption(s) (e.g. annotation id {anns[0]['id']})" in said, said
    assert "1 caption(s) of image ids that captions_train2014.json does not list (e.g. image_id 999999)" in said
    assert len(coco.anns) == len(anns) - 11 and all(a["caption"].strip() for a in coco.anns.values())
    load_coco(str(path))                            # the same file again: said once
    assert "warning" not in capsys.readouterr().out
    dataset = CocoCaptionDataset(str(tiny_data / "train2014"), str(path), tiny_vocab, progress=False)
    assert len(dataset) == len(anns) - 11
    assert all(len(dataset.target(i)) > 2 for i in range(len(dataset)))   # no <start> <end> caption
    counter, lengths = count_tokens(str(path), progress=False)
    assert len(lengths) == len(anns) - 11 and min(lengths) > 0
