import math
import urllib.error
import zipfile

import pytest
import torch
import torchvision

from captioning.lstm import _PackedLSTMLayer, packed_lstm, use_packed_cpu_lstm
from captioning.model import CNNModel, LSTMModel, cut_after_end, decode
from captioning.training import caption_loss
from captioning.vocabulary import Vocab


def test_frozen_backbone_gets_no_gradients_and_keeps_bn_statistics():
    torch.manual_seed(0)
    enc = CNNModel(8, "resnet18", weights=None, train_backbone=False)
    enc.train()
    bns = [m for m in enc.resnet_module.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(not m.training for m in bns)          # stays in eval mode after .train()
    assert enc.batch_norm.training                              # the head's BatchNorm does train
    before = bns[0].running_mean.clone()
    enc(torch.randn(4, 3, 40, 40)).sum().backward()
    assert torch.equal(bns[0].running_mean, before)
    assert all(p.grad is None and not p.requires_grad for p in enc.resnet_module.parameters())
    assert enc.linear_layer.weight.grad is not None and enc.batch_norm.weight.grad is not None


@pytest.mark.parametrize("backbone", ["resnet18", "resnet50"])   # basic blocks; bottlenecks with downsample convs
def test_frozen_extractor_folds_batchnorm_and_gives_the_same_features(backbone):
    torch.manual_seed(0)
    enc = CNNModel(8, backbone, weights=None)
    with torch.no_grad():                      # statistics and affine parameters far from the defaults
        for m in enc.resnet_module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        pooled, maps = enc.extract(images), enc.extract_map(images)
        folded_pooled, folded_maps = enc.frozen_extractor()(images), enc.frozen_extractor(maps=True)(images)
        channels_last = enc.frozen_extractor().to(memory_format=torch.channels_last)(
            images.contiguous(memory_format=torch.channels_last))
    assert folded_pooled.shape == pooled.shape and folded_maps.shape == maps.shape
    assert torch.allclose(folded_pooled, pooled, rtol=1e-4, atol=1e-4)
    assert torch.allclose(folded_maps, maps, rtol=1e-4, atol=1e-4)
    assert torch.allclose(channels_last, pooled, rtol=1e-4, atol=1e-4)
    extractor = enc.frozen_extractor()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in extractor.modules())       # all folded
    assert not any(p.requires_grad for p in extractor.parameters())
    # the encoder itself is untouched: its BatchNorms are still there and still used
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in enc.resnet_module.modules()) == \
        sum(isinstance(m, torch.nn.Conv2d) for m in enc.resnet_module.modules())
    with torch.no_grad():
        assert torch.equal(enc.extract(images), pooled)


def test_fold_batchnorm_refuses_a_module_in_training_mode():
    from captioning.backbone import fold_batchnorm

    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorm(torchvision.models.resnet18(weights=None))


def test_trainable_backbone_fine_tunes():
    enc = CNNModel(8, "resnet18", weights=None, train_backbone=True).train()
    assert any(m.training for m in enc.resnet_module.modules() if isinstance(m, torch.nn.BatchNorm2d))
    enc(torch.randn(2, 3, 40, 40)).sum().backward()
    assert enc.resnet_module[0].weight.grad is not None


def test_local_weights_file(tmp_path):
    torch.manual_seed(3)
    reference = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    enc = CNNModel(8, "resnet18", weights=str(path))
    assert torch.equal(enc.resnet_module[0].weight, reference.conv1.weight)
    assert enc.weights_id == str(path) and enc.feature_size == 512
    assert {t.device.type for t in enc.state_dict().values()} == {"cpu"}   # nothing left on the meta device
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        CNNModel(8, "resnet18", weights=str(tmp_path / "missing.pth"))


def test_bad_backbone_and_weights_names():
    with pytest.raises(ValueError, match="unknown backbone"):
        CNNModel(8, "vgg16", weights=None)
    with pytest.raises(ValueError, match="unknown weights 'IMAGENET9K'"):
        CNNModel(8, "resnet18", weights="IMAGENET9K")


def test_download_failure_names_url_and_destination(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    with pytest.raises(RuntimeError) as e:
        CNNModel(8, "resnet18", weights="DEFAULT")
    weights = torchvision.models.ResNet18_Weights.DEFAULT
    assert weights.url in str(e.value)
    assert str(tmp_path / "hub" / "checkpoints" / weights.url.split("/")[-1]) in str(e.value)


def test_forward_returns_packed_logits():
    dec = LSTMModel(16, 32, 20, 1)
    captions = torch.randint(4, 20, (3, 7))
    out = dec(torch.randn(3, 16), captions, [7, 5, 2])
    assert out.shape == (7 + 5 + 2, 20)


def test_loss_ignores_padding():
    torch.manual_seed(0)
    dec = LSTMModel(16, 32, 20, 1)
    feats = torch.randn(3, 16)
    captions = torch.randint(4, 20, (3, 6))
    lengths = [6, 4, 2]
    for i, n in enumerate(lengths):
        captions[i, n:] = 0
    loss = caption_loss(dec(feats, captions, lengths), captions, lengths)
    noisy = torch.cat([captions, torch.randint(4, 20, (3, 4))], 1)  # garbage beyond each length
    for i, n in enumerate(lengths):
        noisy[i, n:6] = torch.randint(4, 20, (6 - n,))
    assert torch.allclose(loss, caption_loss(dec(feats, noisy, lengths), noisy, lengths))
    # and it is the mean cross-entropy over exactly sum(lengths) real tokens
    logits = dec(feats, captions, lengths)
    manual = sum(torch.nn.functional.cross_entropy(
        dec(feats[i:i + 1], captions[i:i + 1, :n], [n]), captions[i, :n], reduction="sum")
        for i, n in enumerate(lengths))
    assert torch.allclose(loss, manual / sum(lengths), atol=1e-5) and logits.shape[0] == sum(lengths)


def _packed(lengths, size):
    x = torch.randn(len(lengths), max(lengths), size, requires_grad=True)
    return x, torch.nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True)


def test_packed_cpu_lstm_matches_nn_lstm_outputs_and_gradients():
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(12, 20, num_layers=2, batch_first=True)
    lengths = [9, 9, 7, 4, 4, 1]                       # steps whose batch shrinks, one single-token caption
    x, _ = _packed(lengths, 12)
    weight = torch.randn(sum(lengths), 20)             # a loss that weighs every output differently
    grads = {}
    for name, run in (("ours", lambda p: packed_lstm(lstm, p)), ("nn.LSTM", lambda p: lstm(p)[0].data)):
        lstm.zero_grad()
        x.grad = None
        out = run(torch.nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True))
        (out * weight).sum().backward()
        grads[name] = [out.detach(), x.grad.clone()] + [p.grad.clone() for p in lstm.parameters()]
    assert len(grads["ours"]) == 2 + 8
    for ours, ref in zip(grads["ours"], grads["nn.LSTM"]):
        assert torch.allclose(ours, ref, atol=1e-5, rtol=1e-4)


def test_packed_cpu_lstm_backward_passes_gradcheck():
    torch.manual_seed(0)
    batch_sizes = [4, 3, 3, 1]                         # a packed batch: 4 captions of lengths 4, 3, 3, 1
    data = torch.randn(sum(batch_sizes), 3, dtype=torch.float64, requires_grad=True)
    weights = [torch.randn(*shape, dtype=torch.float64, requires_grad=True)
               for shape in ((16, 3), (16, 4), (16,), (16,))]
    assert torch.autograd.gradcheck(lambda x, *w: _PackedLSTMLayer.apply(x, batch_sizes, *w), (data, *weights))


def test_packed_cpu_lstm_falls_back_where_it_does_not_apply():
    lstm = torch.nn.LSTM(6, 8, batch_first=True)
    _, packed = _packed([3, 2], 6)
    with torch.no_grad():                              # inference: nn.LSTM's own loop
        assert packed_lstm(lstm, packed).grad_fn is None
    assert type(packed_lstm(lstm, packed).grad_fn).__name__ == "_PackedLSTMLayerBackward"
    bidirectional = torch.nn.LSTM(6, 8, batch_first=True, bidirectional=True)
    assert packed_lstm(bidirectional, packed).shape == (5, 16)


def test_decoder_trains_the_same_with_either_lstm():
    losses = {}
    for fast in (True, False):
        torch.manual_seed(0)
        dec = LSTMModel(16, 32, 20, 1)
        use_packed_cpu_lstm(dec, fast)
        _, packed = _packed([3, 2], 16)
        used = type(dec.lstm_layer(packed)[0].data.grad_fn).__name__ == "_PackedLSTMLayerBackward"
        assert used == fast and set(dec.state_dict()) == set(LSTMModel(16, 32, 20, 1).state_dict())
        opt = torch.optim.Adam(dec.parameters(), 1e-2)
        gen = torch.Generator().manual_seed(1)
        run = []
        for _ in range(5):
            captions = torch.randint(3, 20, (6, 8), generator=gen)
            lengths = [8, 8, 6, 5, 3, 2]
            loss = caption_loss(dec(torch.randn(6, 16, generator=gen), captions, lengths), captions, lengths)
            opt.zero_grad()
            loss.backward()
            opt.step()
            run.append(loss.item())
        losses[fast] = run
    assert losses[True][-1] < losses[True][0]
    assert losses[True] == pytest.approx(losses[False], abs=1e-5)


@pytest.mark.parametrize("seed", range(4))
def test_beam_of_one_is_greedy(seed):
    torch.manual_seed(seed)
    dec = LSTMModel(16, 32, 12, 1, max_seq_len=10).eval()
    feats = torch.randn(6, 16) * 3
    greedy = [cut_after_end(s) for s in dec.sample(feats).tolist()]
    assert dec.beam_search(feats, beam_size=1) == greedy


@pytest.mark.parametrize("seed", range(4))
def test_beam_never_scores_below_greedy_and_batching_changes_nothing(seed):
    torch.manual_seed(seed)
    dec = LSTMModel(16, 32, 12, 2, max_seq_len=8).eval()
    feats = torch.randn(5, 16) * 3
    greedy = [cut_after_end(s) for s in dec.sample(feats).tolist()]
    for k in (2, 3, 5):
        beams = dec.beam_search(feats, beam_size=k)
        assert all(b >= g - 1e-5 for b, g in zip(dec.score(feats, beams), dec.score(feats, greedy)))
        assert all(seq[-1] == 2 or len(seq) == 8 for seq in beams)  # cut after <end>
        assert beams == [dec.beam_search(feats[i:i + 1], beam_size=k)[0] for i in range(5)]


def _markov_decoder(probs):
    """A real LSTMModel whose weights are set by hand so that p(next | last token) = probs[last].

    Embeddings are one-hot (the image feature is one-hot at index V); input/output gates are
    saturated open and the forget gate shut, so the hidden state is tanh(1) * one-hot(last input).
    """
    V = probs.size(1)
    E = V + 1
    dec = LSTMModel(E, E, V, 1, max_seq_len=6)
    with torch.no_grad():
        for p in dec.parameters():
            p.zero_()
        dec.embedding_layer.weight[:, :V] = torch.eye(V)
        w, b = dec.lstm_layer.weight_ih_l0, dec.lstm_layer.bias_ih_l0
        b[0:E], b[E:2 * E], b[3 * E:4 * E] = 30.0, -30.0, 30.0            # gates i, f, o
        w[2 * E:3 * E] = 30.0 * torch.eye(E)                             # cell input g = tanh(30 x)
        dec.linear_layer.weight[:] = (probs.log().T / math.tanh(1.0))    # rows: next token; cols: last input
    return dec.eval()


def test_oracle_beam_search_beats_a_misled_greedy():
    # tokens: 0 pad, 1 <start>, 2 <end>, 3 <unk>, 4 "a", 5 "b"; row V (=6) is the image
    eps = 1e-4
    table = torch.full((7, 6), eps)
    table[6, 1] = 1.0                       # image -> <start>
    table[1, 4], table[1, 5] = 0.55, 0.45   # <start> -> "a" (greedy's pick) or "b"
    table[4, 2], table[4, 4], table[4, 5] = 0.4, 0.3, 0.3   # after "a": nothing is likely
    table[5, 2] = 1.0                       # after "b": <end>, surely
    for row in (0, 2, 3):
        table[row, 2] = 1.0
    table = table / table.sum(1, keepdim=True)
    dec = _markov_decoder(table)
    feature = torch.zeros(1, 7)
    feature[0, 6] = 1.0
    greedy = cut_after_end(dec.sample(feature)[0].tolist())
    assert greedy == [1, 4, 2]                                   # misled by the likelier first word
    assert dec.beam_search(feature, beam_size=2) == [[1, 5, 2]]  # finds the likelier caption
    vocab = Vocab.from_words(["<pad>", "<start>", "<end>", "<unk>", "a", "b"])
    assert decode([1, 5, 2, 0], vocab) == "b"
    assert math.isclose(dec.score(feature, [[1, 5, 2]], 0.0)[0], math.log(0.45 * 1.0), abs_tol=1e-2)


def _as_if_saved_on_cuda(path):
    """Rewrite a torch.save zip so that every storage claims to live on cuda:0 (as a GPU run writes it)."""
    with zipfile.ZipFile(path) as z:
        entries = {n: z.read(n) for n in z.namelist()}
    name = next(n for n in entries if n.endswith("data.pkl"))
    cpu, cuda = b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0"  # BINUNICODE 'cpu' (memoised, reused)
    assert cpu in entries[name]
    entries[name] = entries[name].replace(cpu, cuda)
    with zipfile.ZipFile(path, "w") as z:
        for n, data in entries.items():
            z.writestr(n, data)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks loading a CUDA checkpoint on a machine without one")
def test_cuda_checkpoint_loads_on_cpu(tmp_path):
    from captioning.checkpoint import load_checkpoint

    dec = LSTMModel(8, 16, 10, 1)
    path = tmp_path / "gpu.ckpt"
    decoder_state = {f"module.{k}": v for k, v in dec.state_dict().items()}
    torch.save({"config": {}, "vocab": [], "encoder": {}, "decoder": decoder_state}, path)
    _as_if_saved_on_cuda(path)
    locations = []
    torch.load(path, weights_only=True, map_location=lambda storage, where: locations.append(where) or storage)
    assert locations and set(locations) == {"cuda:0"}      # the file really says CUDA
    ckpt = load_checkpoint(str(path))
    fresh = LSTMModel(8, 16, 10, 1)
    fresh.load_state_dict(ckpt["decoder"])                 # "module." prefixes stripped too
    assert all(v.device.type == "cpu" for v in ckpt["decoder"].values())
    assert torch.equal(fresh.linear_layer.weight, dec.linear_layer.weight)
