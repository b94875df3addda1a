"""The attention decoder (captioning.attention): its grid encoder, its decoding, and training it end to end."""
import json
import os

import numpy as np
import pytest
import torch
from conftest import SMALL

from captioning.attention import AttentionDecoder, GridCNNModel, grid_cells, pick_grid_layer, position_code
from captioning.checkpoint import build_models, load_captioner
from captioning.config import DECODER_PRESETS, SCST_PRESETS, get_config
from captioning.decoding import beam_search, greedy_search, score_sequences
from captioning.inference import caption_images
from captioning.training import train
from captioning.vocabulary import SPECIAL_TOKENS, START

START_ID = SPECIAL_TOKENS.index(START)


def test_the_grid_is_the_deepest_stage_at_least_4_by_4_unless_the_preset_names_one():
    assert pick_grid_layer(224) == 4 and grid_cells(224, 4) == 7         # COCO: layer4's 7 x 7
    assert pick_grid_layer(56) == 3 and grid_cells(56, 3) == 4           # 56 px: layer3's 4 x 4 (layer4 is 2 x 2)
    assert grid_cells(56, 2) == 7 and pick_grid_layer(56, min_cells=7) == 2
    assert pick_grid_layer(32) == 2
    assert get_config("coco").resolved_grid_layer == 4 and not get_config("coco").grid_position
    tiny = get_config("tiny", decoder="attention")
    assert (tiny.resolved_grid_layer, tiny.grid_position, tiny.alpha_c) == (2, True, 0.0)   # 7 x 7, with places
    assert get_config("tiny", grid_layer=0).resolved_grid_layer == 3


def test_the_attention_decoder_keeps_its_own_number_of_views_unless_one_is_given():
    # a grid view stores 49 cells: the tiny preset's 16 pooled views would double its cache
    assert get_config("tiny").cache_views == get_config("tiny", decoder="lstm").cache_views == 16
    attention = get_config("tiny", decoder="attention")
    assert attention.cache_views == DECODER_PRESETS["tiny"]["attention"]["cache_views"] == 8
    assert get_config("tiny", decoder="attention", cache_views=3).cache_views == 3
    assert get_config("coco", decoder="attention").cache_views == get_config("coco").cache_views    # no entry
    scst = get_config("tiny", decoder="attention", objective="scst")
    assert scst.cache_views == 8 and scst.lr == SCST_PRESETS["tiny"]["lr"]                # both apply


def test_the_position_code_tells_every_cell_apart_and_is_fixed():
    code = position_code(7, 7, 128)
    assert code.shape == (49, 128) and torch.equal(code, position_code(7, 7, 128))
    assert torch.cdist(code, code).add(torch.eye(49) * 1e3).min() > 0.5          # no two cells alike
    # columns and rows have their own channels: cells of one column share the column's half
    assert torch.allclose(code[0, :64], code[7, :64]) and not torch.allclose(code[0, 64:], code[7, 64:])
    odd = position_code(3, 4, 10)                                                  # 10 = 4 * 2 + 2 spare
    assert odd.shape == (12, 10) and odd[:, 8:].abs().max() == 0


def test_the_grid_encoder_adds_each_cells_place_without_storing_it():
    torch.manual_seed(0)
    plain = GridCNNModel(16, "resnet18", None, grid_layer=2).eval()
    placed = GridCNNModel(16, "resnet18", None, grid_layer=2, position_cells=4).eval()
    placed.load_state_dict(plain.state_dict())         # nothing to add: the code is not in the state
    assert set(placed.state_dict()) == set(plain.state_dict())
    same = torch.ones(1, 128, 4, 4)                    # every cell sees the same thing
    assert plain.head(same).std(1).max() < 1e-5
    cells = placed.head(same)[0]                       # ... and now each says where it is
    assert torch.cdist(cells, cells).add(torch.eye(16) * 1e3).min() > 0.1
    assert torch.allclose(placed.head(same) - plain.head(same), position_code(4, 4, 16).unsqueeze(0), atol=1e-5)
    with pytest.raises(ValueError, match="16 cells.*position code was made for 49"):
        GridCNNModel(16, "resnet18", None, grid_layer=2, position_cells=7).eval().head(same)


def test_a_checkpoint_from_before_grid_position_loads_without_it():
    saved = get_config("tiny", decoder="attention", grid_layer=0).hyperparameters()
    del saved["grid_position"]                          # written before the field existed
    old = get_config(saved=saved)
    assert not old.grid_position and old.resolved_grid_layer == 3
    encoder, _ = build_models(get_config(saved={**saved, "weights": None}), 20)
    assert encoder.position is None


@pytest.mark.parametrize("field, value", [("decoder", "transformer"), ("grid_layer", 5), ("dropout", 1.5),
                                          ("alpha_c", -1), ("attention_size", 0), ("grid_position", "yes")])
def test_bad_attention_settings_are_refused_by_name(field, value):
    with pytest.raises(ValueError, match=field):
        get_config("tiny", **{field: value})


def test_grid_encoder_keeps_the_map_and_embeds_every_cell():
    torch.manual_seed(0)
    encoder = GridCNNModel(16, "resnet18", None, grid_layer=3).eval()
    images = torch.randn(2, 3, 56, 56)
    grid = encoder.extract(images)
    assert grid.shape == (2, 256, 4, 4) and encoder.feature_size == 256
    cells = encoder.head(grid)
    assert cells.shape == (2, 16, 16)
    assert torch.allclose(encoder(images), cells)
    # the feature cache's extractor (BatchNorm folded) gives the same grid
    assert torch.allclose(encoder.frozen_extractor()(images), grid, atol=1e-4)


def _decoder(seed=0, **kw):
    torch.manual_seed(seed)
    return AttentionDecoder(16, 32, 30, 24, max_seq_len=9, **kw).eval()


def test_teacher_forcing_and_step_by_step_decoding_agree():
    decoder = _decoder()
    features = torch.randn(3, 16, 16)
    sequences = [[START_ID, 5, 7, 9, 2], [START_ID, 4, 2], [START_ID, 8, 2]]
    scores = score_sequences(decoder, features, sequences, length_penalty=0.0)
    with torch.no_grad():
        for b, seq in enumerate(sequences):
            log_probs, state = decoder.init_state(features[b:b + 1])
            total = log_probs[0, seq[0]]
            for prev, word in zip(seq, seq[1:]):
                log_probs, state = decoder.step(torch.tensor([prev]), state)
                total += log_probs[0, word]
            assert abs(float(total) - scores[b]) < 1e-4


def test_beam_1_is_greedy_and_every_word_carries_attention_weights():
    decoder = _decoder(1)
    features = torch.randn(4, 16, 16)
    greedy, greedy_weights = greedy_search(decoder, features, return_weights=True)
    beam, beam_weights = beam_search(decoder, features, 1, return_weights=True)
    assert beam == greedy
    assert [cut for cut in greedy] == [[int(i) for i in row][:len(cut)] for row, cut in
                                       zip(decoder.sample(features), greedy)]
    for ids, w, bw in zip(greedy, greedy_weights, beam_weights):
        assert w.shape == (len(ids), 16) and torch.allclose(w.sum(1), torch.ones(len(ids)), atol=1e-5)
        assert torch.allclose(w, bw)
    three, weights = beam_search(decoder, features, 3, return_weights=True)
    assert [w.shape[0] for w in weights] == [len(ids) for ids in three]


def test_the_doubly_stochastic_penalty_follows_alpha_c():
    features, captions = torch.randn(2, 16, 16), torch.randint(3, 30, (2, 6))
    decoder = _decoder(alpha_c=1.0).train()
    decoder(features, captions, [6, 4])
    assert decoder.penalty is not None and float(decoder.penalty.detach()) > 0
    decoder.alpha_c = 0.0
    decoder(features, captions, [6, 4])
    assert float(decoder.penalty.detach()) == 0.0


ATTENTION = dict(SMALL, decoder="attention", attention_size=16, train_backbone=False, weights=None, cache=True,
                 cache_views=2, log_every=1, epochs=2)


def test_training_reads_cached_grids_and_the_checkpoint_says_attention(tiny_copy, tmp_path):
    config = get_config("tiny", data_dir=str(tiny_copy), models_dir=str(tmp_path / "m"), max_steps=12, **ATTENTION)
    summary = train(config)
    grids = [f for f in os.listdir(tiny_copy / "features") if "-grids-" in f]
    assert sorted(f.split("-")[0] for f in grids) == ["train", "val"]
    train_folder = tiny_copy / "features" / next(f for f in grids if f.startswith("train"))
    meta = json.load(open(train_folder / "meta.json"))
    feats = np.load(train_folder / "features.npy", mmap_mode="r")
    assert feats.shape == (60, 2, 128, 4, 4) and meta["map"] == [4, 4]   # resnet18 layer2 at 32 px
    losses = [json.loads(line)["loss"] for line in open(summary["log"]) if '"loss"' in line]
    assert len(losses) == 12 and losses[-1] < losses[0]
    encoder, decoder, vocab, loaded = load_captioner(summary["last"])          # no flag: the checkpoint says
    assert isinstance(decoder, AttentionDecoder) and isinstance(encoder, GridCNNModel)
    assert loaded.decoder == "attention" and loaded.resolved_grid_layer == 2
    assert loaded.grid_position and encoder.position is not None and encoder.position.shape == (16, 16)
    images = sorted(str(p) for p in (tiny_copy / "val2014").glob("*.jpg"))[:3]
    for beam in (1, 3):
        results = caption_images(images, encoder, decoder, vocab, loaded, beam_size=beam)
        assert all(caption is not None and error is None for _, caption, error in results)
    # a resume continues the same run: another decoder is refused, the checkpoint's is kept without a flag
    with pytest.raises(ValueError, match="decoder"):
        train(get_config("tiny", data_dir=str(tiny_copy), models_dir=str(tmp_path / "m"),
                         **{**ATTENTION, "decoder": "lstm"}), resume=True)
    resumed = train(get_config("tiny", data_dir=str(tiny_copy), models_dir=str(tmp_path / "m"), max_steps=14,
                               **{k: v for k, v in ATTENTION.items() if k != "decoder"}), resume=True)
    assert resumed["step"] == 14


def test_build_models_gives_the_chapters_pair_by_default():
    encoder, decoder = build_models(get_config("tiny", weights=None), 20)
    assert type(encoder).__name__ == "CNNModel" and type(decoder).__name__ == "LSTMModel"
    encoder, decoder = build_models(get_config("tiny", weights=None, decoder="attention"), 20)
    assert isinstance(encoder, GridCNNModel) and isinstance(decoder, AttentionDecoder)
    assert decoder.linear_layer.out_features == 20 and decoder.attention.encoder_att.out_features == 128


def test_the_coco_preset_trains_attention_on_its_own_code_path(tiny_copy, tmp_path):
    """decoder=attention on the coco preset: flips, K=2 views with jitter (which grids leave out), a random
    backbone's BatchNorm calibrated on the cut ResNet, layer4's grid (2 x 2 here, at 64 px)."""
    config = get_config("coco", data_dir=str(tiny_copy), models_dir=str(tmp_path / "m"), decoder="attention",
                        weights=None, backbone="resnet18", resize_size=72, crop_size=64, batch_size=8, max_steps=3,
                        vocab_threshold=1, progress=False, num_workers=0, val_max_captions=20, grid_layer=4)
    summary = train(config)
    assert summary["step"] == 3
    encoder, decoder, vocab, loaded = load_captioner(summary["last"])
    assert loaded.preset == "coco" and loaded.hflip and isinstance(decoder, AttentionDecoder)
    folder = next(f for f in os.listdir(tiny_copy / "features") if f.startswith("train-resnet18-grids"))
    assert np.load(tiny_copy / "features" / folder / "features.npy", mmap_mode="r").shape == (60, 2, 512, 2, 2)
