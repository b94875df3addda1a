"""The decoder interface and the searches written once against it (captioning/decoding.py)."""
import math

import pytest
import torch

from captioning.decoding import Decoder, beam_search, greedy_search, score_sequences
from captioning.model import LSTMModel

END = 2


class TableDecoder(torch.nn.Module):
    """The next word's probabilities depend on the last word only (a table); the state is that word.

    Its "attention weights" are the one-hot of the word fed in, so a caption's weights must follow
    its own words through the beams' reordering."""

    feature_kind = "pooled"

    def __init__(self, table, first, max_seq_len=6):
        super().__init__()
        self.table, self.first, self.max_seq_len = table.log(), first.log(), max_seq_len

    def init_state(self, features):
        return self.first.expand(len(features), -1), torch.full((len(features),), 5)

    def step(self, token_ids, state):
        return self.table[token_ids], token_ids

    def reorder_state(self, state, index):
        return state[index]

    def step_weights(self, state):
        return torch.nn.functional.one_hot(state, 6).float()

    def forward(self, features, captions, lengths):
        previous = torch.nn.utils.rnn.pack_padded_sequence(
            torch.cat([torch.full((len(captions), 1), -1), captions[:, :-1]], 1), lengths, batch_first=True).data
        return torch.where(previous.unsqueeze(1) < 0, self.first, self.table[previous.clamp(min=0)])


def table_decoder():
    # greedy takes word 3 (0.5) and then is stuck with a weak ending; word 4 (0.4) leads surely to <end>
    first = torch.tensor([1e-6, 1e-6, 1e-6, 0.5, 0.4, 0.1 - 4e-6])
    table = torch.full((6, 6), 1e-6)
    table[3] = torch.tensor([1e-6, 1e-6, 0.3, 1e-6, 1e-6, 0.7 - 4e-6])   # 3 -> 5 (0.7) or <end> (0.3)
    table[5] = torch.tensor([1e-6, 1e-6, 0.2, 0.8 - 4e-6, 1e-6, 1e-6])   # 5 -> 3 mostly
    table[4, END] = 1.0
    table[2, END] = 1.0
    return TableDecoder(table / table.sum(1, keepdim=True), first / first.sum())


def test_beam_search_finds_the_likelier_caption_and_its_weights_follow_its_words():
    dec, features = table_decoder(), torch.zeros(2, 1)
    greedy, weights = greedy_search(dec, features, END, return_weights=True)
    assert greedy[0] == [3, 5, 3, 5, 3, 5] and weights[0].shape == (6, 6)
    ids, weights = beam_search(dec, features, beam_size=3, length_penalty=0.0, end_id=END, return_weights=True)
    assert ids == [[4, END], [4, END]]
    # row t is the weights of the step that chose word t: the start state (5), then the word fed in
    assert weights[0].argmax(1).tolist() == [5, 4]
    scores = score_sequences(dec, features, [[4, END], [3, END]], length_penalty=0.0)
    assert scores == pytest.approx([math.log(0.4), math.log(0.5 * 0.3)], abs=1e-4)
    assert beam_search(dec, features, beam_size=1, end_id=END) == greedy   # beam 1 is greedy


def test_the_chapters_decoder_has_the_interface_and_beam_search_checks_its_size():
    torch.manual_seed(0)
    dec = LSTMModel(8, 16, 12, 1, max_seq_len=5).eval()
    assert isinstance(dec, Decoder) and dec.feature_kind == "pooled"
    features = torch.randn(3, 8)
    with torch.no_grad():
        log_probs, state = dec.init_state(features)
        first = dec.sample(features)[:, 0]
        assert torch.equal(log_probs.argmax(1), first)        # init_state is sample()'s first step
        next_lp, _ = dec.step(first, state)
        assert torch.equal(next_lp.argmax(1), dec.sample(features)[:, 1])
    ids, weights = beam_search(dec, features, beam_size=2, return_weights=True)
    assert weights == [None, None, None] and ids == dec.beam_search(features, beam_size=2)
    for bad in (0, 2.5, "3"):
        with pytest.raises(ValueError, match="beam_size"):
            beam_search(dec, features, beam_size=bad)
