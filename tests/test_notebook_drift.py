"""The chapter's classes and functions are editable cells in notebooks 02, 04 and 05, and the library
holds the same code. These tests keep the two from drifting apart: each notebook cell is run on its
own, and what it defines must behave exactly as the library's does.

Why behaviour and not text: the notebook cells are written as the book writes them (its names, its
loop), while the library's copies carry more (beam search, grouped batches, a faster CPU backward).
So the test loads the library's weights strictly into the notebook's classes (same parameter names
and shapes) and compares outputs, initial weights included, on the same inputs."""
import os

import nbformat
import pytest
import torch
from conftest import ROOT, SMALL

from captioning import model as library_model
from captioning.config import get_config
from captioning.data import TrainTransform, collate_function, get_loader
from captioning.vocabulary import build_vocabulary as library_build_vocabulary


def notebook_cell(notebook, marker):
    """The source of the one code cell of notebooks/<notebook>.ipynb that contains `marker`."""
    cells = nbformat.read(os.path.join(ROOT, "notebooks", notebook + ".ipynb"), as_version=4).cells
    [source] = [c.source for c in cells if c.cell_type == "code" and marker in c.source]
    return source


def run_cell(source, **namespace):
    namespace = {"torch": torch, **namespace}
    exec(compile(source, "<notebook cell>", "exec"), namespace)
    return namespace


def test_the_vocabulary_cell_builds_the_librarys_vocabulary(tiny_data):
    config = get_config("tiny", data_dir=str(tiny_data))
    for threshold in (1, 4, 40):
        cell = run_cell(notebook_cell("02_build_vocabulary", "class Vocab"), config=config, threshold=threshold)
        ours, theirs = cell["vocab"], library_build_vocabulary(config.captions_json("train"), threshold, False)
        assert ours.w2i == theirs.w2i and ours.i2w == theirs.i2w and ours.index == len(theirs)
        assert ours("no-such-word") == theirs("no-such-word") == 3 and len(ours) == len(theirs)


def test_the_collate_and_loader_cell_batches_as_the_library_does(tiny_data, tiny_vocab):
    cell = run_cell(notebook_cell("04_dataset_and_loader", "def collate_function"))
    args = (str(tiny_data / "train2014"), str(tiny_data / "annotations" / "captions_train2014.json"), tiny_vocab,
            TrainTransform(32, hflip=False))
    ours = cell["get_loader"](*args, batch_size=7, shuffle=False, num_workers=0)
    theirs = get_loader(*args, batch_size=7, shuffle=False, num_workers=0)
    for k, (a, b) in enumerate(zip(ours, theirs)):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2] == b[2]
        if k == 3:
            break
    items = [theirs.dataset[i] for i in (5, 0, 17, 3)]        # ties in length keep their order in both
    for a, b in zip(cell["collate_function"](list(items)), collate_function(list(items))):
        assert torch.equal(torch.as_tensor(a), torch.as_tensor(b))


@pytest.fixture(scope="module")
def chapter_classes():
    namespace = run_cell(notebook_cell("05_model", "class CNNModel"))
    namespace.pop("__builtins__", None)
    return run_cell(notebook_cell("05_model", "class LSTMModel"), **namespace)


def test_the_notebooks_lstm_model_is_the_librarys(chapter_classes):
    sizes = (SMALL["embedding_size"], SMALL["hidden_layer_size"], 30, 2, 9)
    torch.manual_seed(0)
    ours = chapter_classes["LSTMModel"](*sizes)
    torch.manual_seed(0)
    theirs = library_model.LSTMModel(*sizes)
    assert {k: v for k, v in ours.state_dict().items()}.keys() == theirs.state_dict().keys()
    assert all(torch.equal(v, theirs.state_dict()[k]) for k, v in ours.state_dict().items())   # same init
    with torch.no_grad():                                     # trained-looking weights, not the init
        for p in theirs.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    features = torch.randn(4, sizes[0])
    captions, lengths = torch.randint(0, 30, (4, 6)), [6, 5, 3, 2]
    assert torch.allclose(ours(features, captions, lengths), theirs(features, captions, lengths), atol=1e-6)
    assert torch.equal(ours.sample(features), theirs.sample(features))


def test_the_notebooks_cnn_model_is_the_librarys(chapter_classes):
    torch.manual_seed(0)
    ours = chapter_classes["CNNModel"](12, "resnet18", None)
    torch.manual_seed(0)
    theirs = library_model.CNNModel(12, "resnet18", None)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    assert all(torch.equal(v, theirs.state_dict()[k]) for k, v in ours.state_dict().items())
    ours.load_state_dict(theirs.state_dict(), strict=True)
    assert [n for n, p in ours.named_parameters() if p.requires_grad] == \
        [n for n, p in theirs.named_parameters() if p.requires_grad]             # the same layers learn
    images = torch.randn(5, 3, 48, 48)
    for mode in (True, False):                                # train mode too: the frozen ResNet stays in eval
        ours.train(mode), theirs.train(mode)
        assert torch.allclose(ours(images), theirs(images), atol=1e-5), mode
    assert all(not m.training for m in ours.resnet_module.modules())


def test_a_readers_change_in_the_cell_takes_effect_and_is_caught(chapter_classes):
    """The cells are real code: a change shows in what they build, and this file would notice it."""
    changed = notebook_cell("05_model", "class LSTMModel").replace("batch_first=True)", "batch_first=True, "
                                                                     "dropout=0.0, bidirectional=True)", 1)
    namespace = run_cell(changed, nn=chapter_classes["nn"], pack_padded_sequence=None)
    decoder = namespace["LSTMModel"](8, 16, 30, 1)
    assert decoder.lstm_layer.bidirectional
    with pytest.raises(RuntimeError):
        decoder.load_state_dict(library_model.LSTMModel(8, 16, 30, 1).state_dict(), strict=True)


def test_the_readmes_preset_table_is_the_librarys():
    from captioning.config import format_preset_table

    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        assert format_preset_table(markdown=True) in f.read()


@pytest.fixture(scope="module")
def attention_classes():
    namespace = run_cell(notebook_cell("09_attention", "class Attention("))
    namespace.pop("__builtins__", None)
    return run_cell(notebook_cell("09_attention", "class AttentionDecoder"), **namespace)


def test_the_notebooks_attention_decoder_is_the_librarys(attention_classes):
    from captioning import attention as library_attention
    from captioning.decoding import beam_search

    sizes = (16, 32, 30, 24, 9, 0.5, 1.0)
    torch.manual_seed(0)
    ours = attention_classes["AttentionDecoder"](*sizes)
    torch.manual_seed(0)
    theirs = library_attention.AttentionDecoder(*sizes)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    assert all(torch.equal(v, theirs.state_dict()[k]) for k, v in ours.state_dict().items())   # same init
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    ours.eval(), theirs.eval()
    features = torch.randn(4, 9, 16)
    captions, lengths = torch.randint(0, 30, (4, 6)), [6, 5, 3, 2]
    assert torch.allclose(ours(features, captions, lengths), theirs(features, captions, lengths), atol=1e-6)
    assert torch.allclose(ours.penalty, theirs.penalty)
    assert torch.equal(ours.sample(features), theirs.sample(features))
    ids, weights = beam_search(ours, features, 3, return_weights=True)          # the library's search drives it
    their_ids, their_weights = beam_search(theirs, features, 3, return_weights=True)
    assert ids == their_ids and all(torch.allclose(a, b) for a, b in zip(weights, their_weights))


def test_the_notebooks_attention_edits_take_effect(attention_classes):
    """'No gate' from the notebook's Try this: the cell's change shows in what the decoder computes."""
    changed = notebook_cell("09_attention", "class AttentionDecoder").replace("gate * context", "context", 1)
    assert changed != notebook_cell("09_attention", "class AttentionDecoder")
    namespace = {k: v for k, v in attention_classes.items() if k != "AttentionDecoder"}
    torch.manual_seed(0)
    ungated = run_cell(changed, **namespace)["AttentionDecoder"](16, 32, 30, 24, 9, 0.0).eval()
    gated = attention_classes["AttentionDecoder"](16, 32, 30, 24, 9, 0.0).eval()
    gated.load_state_dict(ungated.state_dict())
    features, captions = torch.randn(2, 9, 16), torch.randint(0, 30, (2, 5))
    assert not torch.allclose(gated(features, captions, [5, 4]), ungated(features, captions, [5, 4]))


def test_the_notebooks_reinforce_loss_and_baseline_are_the_librarys():
    from captioning import scst

    source = notebook_cell("10_scst", "def reinforce_loss")
    functions, patch = source.split("import captioning.scst", 1)
    assert "scst.mean_of_others, scst.reinforce_loss = mean_of_others, reinforce_loss" in patch
    cell = run_cell(functions)
    torch.manual_seed(0)
    rewards, log_probs = torch.rand(12), torch.randn(12, 7, requires_grad=True)
    mask = torch.rand(12, 7) > 0.3
    assert torch.equal(cell["mean_of_others"](rewards, 4), scst.mean_of_others(rewards, 4))
    baseline = scst.mean_of_others(rewards, 4)
    ours = cell["reinforce_loss"](log_probs, mask, rewards, baseline)
    (ours_grad,) = torch.autograd.grad(ours, log_probs)
    theirs = scst.reinforce_loss(log_probs, mask, rewards, baseline)
    (their_grad,) = torch.autograd.grad(theirs, log_probs)
    assert torch.equal(ours, theirs) and torch.equal(ours_grad, their_grad)
    # the notebook hands its versions to the library by assigning the module's names: the objective must look
    # them up there at every step, not hold its own references
    assert {"mean_of_others", "reinforce_loss"} <= set(scst.SelfCritical.loss.__code__.co_names)
