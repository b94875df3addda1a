"""The book's own files both ways: import-chapter / export-chapter against a copy of the book's classes."""
import json
import os
import pickle
import sys

import book_chapter2 as book
import pytest
import torch
import torchvision
from conftest import cli_error, run_cli
from conftest import cli_main as cli

from captioning.chapter_io import chapter_vocab_pickle, export_chapter, import_chapter
from captioning.checkpoint import atomic_save, build_models, checkpoint_state, load_captioner
from captioning.config import get_config
from captioning.data import eval_transform
from captioning.images import load_image
from captioning.model import decode
from captioning.vocabulary import load_vocabulary

E, H = 16, 32   # small sizes: a ResNet-18 encoder, so that the tests run in seconds


@pytest.fixture
def notebook_main(monkeypatch):
    """What the chapter's notebook does: its Vocab class lives in __main__."""
    monkeypatch.setattr(book.Vocab, "__module__", "__main__")
    monkeypatch.setattr(sys.modules["__main__"], "Vocab", book.Vocab, raising=False)
    return book


def book_vocab(words):
    vocab = book.Vocab()
    for w in words:
        vocab.add_token(w)
    return vocab


@pytest.fixture
def book_files(tmp_path, tiny_vocab, notebook_main):
    """The three files a reader of the book has after training: two state dicts and a __main__.Vocab pickle."""
    torch.manual_seed(0)
    vocab = book_vocab(tiny_vocab.words())
    encoder = book.CNNModel(E, torchvision.models.resnet18)
    decoder = book.LSTMModel(E, H, len(vocab), 1)
    with torch.no_grad():   # as after training: BatchNorm statistics that are not the initial 0 and 1
        encoder.batch_norm.running_mean.normal_()
        encoder.batch_norm.running_var.uniform_(0.5, 2)
    folder = tmp_path / "book"
    folder.mkdir()
    torch.save(encoder.state_dict(), folder / "encoder-5-3000.ckpt")
    torch.save(decoder.state_dict(), folder / "decoder-5-3000.ckpt")
    with open(folder / "vocabulary.pkl", "wb") as f:
        pickle.dump(vocab, f)
    assert b"__main__" in (folder / "vocabulary.pkl").read_bytes()
    return folder, encoder.eval(), decoder.eval(), vocab


def test_import_gives_the_books_greedy_ids_then_the_cli_captions_a_folder(book_files, tiny_data, tmp_path, capsys):
    folder, book_encoder, book_decoder, vocab = book_files
    out = tmp_path / "chapter.ckpt"
    cli("import-chapter", "--encoder", folder / "encoder-5-3000.ckpt", "--decoder", folder / "decoder-5-3000.ckpt",
        "--vocabulary", folder / "vocabulary.pkl", "--out", out)
    printed = capsys.readouterr().out
    # sizes the book's defaults do not match are read off the weights, and the user is told
    assert "inferred from the weights" in printed and "backbone resnet18" in printed
    assert f"embedding size {E}" in printed and f"hidden size {H}" in printed
    encoder, decoder, ours, config = load_captioner(str(out))
    assert (config.backbone, config.embedding_size, config.hidden_layer_size, config.max_seq_len) == \
        ("resnet18", E, H, 20)
    assert ours.w2i == vocab.w2i and ours.i2w == vocab.i2w

    torch.manual_seed(1)
    images = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        features = book_encoder(images)
        assert torch.allclose(encoder(images), features, atol=1e-5)
        book_ids, our_ids = book_decoder.sample(features), decoder.sample(features)
    assert book_ids.shape == (4, 20) and torch.equal(book_ids, our_ids)

    # the CLI captions a folder with it: the captions are the book's model's own, word for word
    images_dir = tiny_data / "val2014"
    names = sorted(os.listdir(images_dir))[:3]
    proc = run_cli("caption", *[images_dir / n for n in names], "--checkpoint", out, "--beam", 1, "--json")
    captions = {os.path.basename(r["image"]): r["caption"] for r in json.loads(proc.stdout)}
    transform = eval_transform(config.resize_size, config.crop_size)
    with torch.no_grad():
        batch = torch.stack([transform(load_image(str(images_dir / n))) for n in names])
        expected = [decode(ids, ours) for ids in book_decoder.sample(book_encoder(batch))]
    assert [captions[n] for n in names] == expected and any(expected)

    # an existing --out, a trained checkpoint included, is refused; --overwrite moves it aside
    before = out.read_bytes()
    args = ("import-chapter", "--encoder", folder / "encoder-5-3000.ckpt", "--decoder",
            folder / "decoder-5-3000.ckpt", "--vocabulary", folder / "vocabulary.pkl", "--out", out)
    message = cli_error(*args)
    assert f"--out {out} already exists" in message and "--overwrite" in message
    assert out.read_bytes() == before and not any(p.name.startswith("previous-") for p in tmp_path.iterdir())
    cli(*args, "--overwrite")
    [aside] = [p for p in tmp_path.iterdir() if p.name.startswith("previous-")]
    assert (aside / "chapter.ckpt").read_bytes() == before and out.exists()
    assert str(aside) in capsys.readouterr().out


def test_import_refuses_sizes_and_files_that_do_not_fit(book_files, tmp_path, tiny_vocab):
    folder, *_ = book_files
    enc, dec, voc = (str(folder / n) for n in ("encoder-5-3000.ckpt", "decoder-5-3000.ckpt", "vocabulary.pkl"))
    out = str(tmp_path / "x.ckpt")
    quiet = dict(log=lambda *a: None)
    # a size given by hand that disagrees with the weights: one line naming the flag and what the weights say
    assert cli_error("import-chapter", "--encoder", enc, "--decoder", dec, "--vocabulary", voc, "--out", out,
                     "--hidden-size", "512") == (f"error: --hidden-size 512 disagrees with the weights, which say "
                                                 f"{H} ({dec}); leave the flag out to use what the weights say")
    with pytest.raises(ValueError, match="--backbone resnet152 disagrees .* resnet18"):
        import_chapter(enc, dec, voc, out, backbone="resnet152", **quiet)
    with pytest.raises(ValueError, match="--embedding-size 256 disagrees"):
        import_chapter(enc, dec, voc, out, embedding_size=256, **quiet)
    assert not os.path.exists(out)
    import_chapter(enc, dec, voc, out, backbone="resnet18", embedding_size=E, hidden_size=H, num_layers=1,
                   max_seq_len=12, **quiet)    # the right sizes, given by hand, are accepted
    assert load_captioner(out)[3].max_seq_len == 12
    os.remove(out)                   # the checks below must refuse the files, not the existing --out
    with pytest.raises(ValueError, match="swapped"):
        import_chapter(dec, enc, voc, out, **quiet)
    # a vocabulary of other weights
    small = tmp_path / "small.pkl"
    small.write_bytes(pickle.dumps(book_vocab(tiny_vocab.words()[:-1])))
    with pytest.raises(ValueError, match=f"has {len(tiny_vocab) - 1} words but .* {len(tiny_vocab)}"):
        import_chapter(enc, dec, str(small), out, **quiet)
    # encoder and decoder of different models
    other = tmp_path / "other.ckpt"
    torch.save(book.LSTMModel(E + 1, H, len(tiny_vocab), 1).state_dict(), other)
    with pytest.raises(ValueError, match="not from the same model"):
        import_chapter(enc, str(other), voc, out, **quiet)
    # not a state dict; missing
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.ckpt is not a loadable state dict"):
        import_chapter(str(tmp_path / "junk.ckpt"), dec, voc, out, **quiet)
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        import_chapter(str(tmp_path / "nope.ckpt"), dec, voc, out, **quiet)


def test_import_refuses_a_vocabulary_pickle_that_would_run_code(book_files, tmp_path):
    folder, *_ = book_files

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps(Evil()))
    error = cli_error("import-chapter", "--encoder", folder / "encoder-5-3000.ckpt", "--decoder",
                      folder / "decoder-5-3000.ckpt", "--vocabulary", evil, "--out", tmp_path / "x.ckpt")
    assert error.startswith(f"error: {evil}: refusing to load ") and "system" in error
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "x.ckpt").exists()


def test_export_loads_strictly_into_the_books_classes_with_the_whole_frozen_backbone(tmp_path, tiny_vocab,
                                                                                    notebook_main, capsys):
    # a checkpoint of a frozen pretrained backbone leaves the ResNet out: export must put it back
    torch.manual_seed(2)
    weights = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)
    config = get_config("coco", backbone="resnet18", weights=str(weights), embedding_size=E, hidden_layer_size=H,
                        max_seq_len=15)
    encoder, decoder = build_models(config, len(tiny_vocab))
    ckpt = tmp_path / "ours.ckpt"
    atomic_save(checkpoint_state(config, tiny_vocab, encoder, decoder), ckpt)
    assert not torch.load(ckpt, weights_only=True)["backbone"]["included"]

    out = tmp_path / "for_the_book"
    cli("export-chapter", "--checkpoint", ckpt, "--out", out)
    printed = capsys.readouterr().out
    assert f"LSTMModel({E}, {H}, len(vocabulary), 1, max_seq_len=15)" in printed and "models.resnet18" in printed
    assert sorted(os.listdir(out)) == ["decoder.ckpt", "encoder.ckpt", "vocabulary.pkl"]

    # the book's inference cells, in a notebook that defined the book's Vocab
    with open(out / "vocabulary.pkl", "rb") as f:
        vocabulary = pickle.load(f)
    assert type(vocabulary) is book.Vocab
    assert vocabulary.w2i == tiny_vocab.w2i and vocabulary.i2w == tiny_vocab.i2w
    assert vocabulary.index == len(tiny_vocab) and vocabulary("no-such-word") == 3
    encoder_model = book.CNNModel(E, torchvision.models.resnet18).eval()
    decoder_model = book.LSTMModel(E, H, len(vocabulary), 1, max_seq_len=15)
    encoder_model.load_state_dict(torch.load(out / "encoder.ckpt"), strict=True)
    decoder_model.load_state_dict(torch.load(out / "decoder.ckpt"), strict=True)
    assert torch.equal(encoder_model.resnet_module[0].weight, torch.load(weights)["conv1.weight"])

    ours_encoder, ours_decoder, *_ = load_captioner(str(ckpt))
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        features = encoder_model(images)
        assert torch.allclose(ours_encoder(images), features, atol=1e-5)
        assert torch.equal(decoder_model.sample(features), ours_decoder.sample(features))
    # and our own loader reads the exported pickle back, through the restricted unpickler
    assert load_vocabulary(str(out / "vocabulary.pkl")).words() == tiny_vocab.words()
    # a folder holding an export is refused; --overwrite moves the old files aside before writing
    (out / "notes.txt").write_text("mine")
    exported = {n: (out / n).read_bytes() for n in ("decoder.ckpt", "encoder.ckpt", "vocabulary.pkl")}
    message = cli_error("export-chapter", "--checkpoint", ckpt, "--out", out)
    assert "already holds an export (encoder.ckpt, decoder.ckpt, vocabulary.pkl)" in message, message
    cli("export-chapter", "--checkpoint", ckpt, "--out", out, "--overwrite")
    [aside] = [p for p in out.iterdir() if p.name.startswith("previous-")]
    assert {n: (aside / n).read_bytes() for n in exported} == exported
    assert (out / "notes.txt").read_text() == "mine" and sorted(os.listdir(aside)) == sorted(exported)
    assert load_vocabulary(str(out / "vocabulary.pkl")).words() == tiny_vocab.words()
    with pytest.raises(ValueError, match="is a file"):
        export_chapter(str(ckpt), str(out / "encoder.ckpt"), log=lambda *a: None)
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        export_chapter(str(tmp_path / "missing.ckpt"), str(tmp_path / "o"), log=lambda *a: None)


def test_the_exported_vocabulary_pickle_names_only_main_vocab_and_builtins(tiny_vocab):
    import pickletools

    data = chapter_vocab_pickle(tiny_vocab)
    globals_ = [arg for op, arg, _ in pickletools.genops(data) if op.name in ("GLOBAL", "STACK_GLOBAL")]
    assert globals_ == ["__main__ Vocab"]
    with pytest.raises(AttributeError, match="Vocab"):   # without the book's class in __main__ it cannot load
        pickle.loads(data)


def test_every_backbone_is_recognised_from_its_state_dict_keys():
    """The book's resnet152 included: built on the meta device, so no weights are made."""
    from captioning.backbone import BACKBONES
    from captioning.chapter_io import infer_backbone

    for name in BACKBONES:
        with torch.device("meta"):
            resnet = getattr(torchvision.models, name)()
        children = torch.nn.Sequential(*list(resnet.children())[:-1])
        assert infer_backbone({f"resnet_module.{k}": v for k, v in children.state_dict().items()}) == name
    with pytest.raises(ValueError, match="no ResNet weights"):
        infer_backbone({"linear_layer.weight": torch.zeros(1)})
