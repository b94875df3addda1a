"""Show, Attend and Tell (Xu et al. 2015): a decoder that looks at a grid of the image at every word.

The chapter's CNNModel average-pools the ResNet's last feature map into one vector, so the
LSTM hears about the image once, as a summary in which "where" is mostly averaged away. Here
the encoder keeps the map as a grid of P = h x w cells, each a feature vector for its patch,
and the decoder chooses, before each word, how much of each cell to read:

- GridCNNModel: the ResNet cut after a stage (`grid_layer`), then the chapter's Linear +
  BatchNorm applied to every cell: (B, 3, H, W) -> (B, P, E).
- Attention: the additive ("soft") attention MLP, alpha = softmax(w . relu(W_f f_p + W_h h)).
- AttentionDecoder: an LSTMCell whose input is the word's embedding and the context, the
  alpha-weighted sum of the cells, scaled by a gate sigmoid(f_beta(h)); h and c start from
  the mean cell; dropout before the word layer; `penalty` is the doubly stochastic
  regularisation alpha_c * mean((1 - sum_t alpha_t)^2), which asks every cell to be looked
  at about once over the caption.

It follows the layout of sgrvinod's tutorial, with one difference that keeps the chapter's
convention: step 0 reads the image alone (a zero word) and predicts <start>, as the chapter's
LSTM does after its image embedding, so teacher forcing, the loss, beam search and scoring are
the same code for both decoders (captioning.decoding.Decoder).

Which grid: the tiny preset reads layer2's 7 x 7 map of its 56-pixel crops (grid_layer=2); with
grid_layer=0, the deepest ResNet stage whose map is at least 4 x 4 at the crop size: layer4's 7 x 7 at
224 px (COCO), layer3's 4 x 4 at 56 px. The stand-in backbone is used as it is, without retraining it
for another crop size. The trade-off, measured on the relations world (docs/design_notes.md): a layer3
cell sees more than the whole crop, so every cell knows the scene's layout, but the attention need not
land on what it names; layer2's cells see little beyond their patch, so the attention lands on the
objects more often, but a cell does not say where it is.

Where a cell is: `grid_position` (the tiny preset's) adds a fixed sinusoidal code of each cell's row
and column to its embedding (`position_code`; not in Xu et al., who read layer4 of a 224-pixel
crop, where the padding tells a cell where it lies). The context then carries where the decoder
looked as well as what it saw there, which is what a relation ("to the left of") needs.
"""
import math

import torch
import torch.nn as nn
from torch.nn.utils.rnn import pack_padded_sequence

from .decoding import LENGTH_PENALTY, beam_search, cut_after_end, greedy_search, score_sequences
from .model import CNNModel
from .vocabulary import END_ID

AttentionState = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
# (h, c, features (B, P, E), projected features (B, P, A), the last step's alpha (B, P))


def pick_grid_layer(crop_size: int, min_cells: int = 4) -> int:
    """The deepest ResNet stage (1..4) whose feature map is at least min_cells wide at crop_size.

    Stage L's stride is 2**(L + 1): layer4 gives 7 x 7 at 224 px, layer3 gives 4 x 4 at 56 px."""
    return max([1] + [layer for layer in (1, 2, 3, 4) if math.ceil(crop_size / 2 ** (layer + 1)) >= min_cells])


def position_code(rows: int, columns: int, size: int) -> torch.Tensor:
    """(rows * columns, size): a fixed code of each cell's place, in reading order.

    A quarter of the channels are sin(k * pi / 2 * x) and a quarter cos(...) of the column's place x in
    [-1, 1], for k = 1 .. size // 4, and the other half the same of the row's; the channels that do
    not divide into four stay zero. Nothing in it is learned, so a checkpoint need not store it."""
    k = size // 4
    frequencies = torch.arange(1, k + 1, dtype=torch.float64) * math.pi / 2
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, rows, dtype=torch.float64),
                            torch.linspace(-1, 1, columns, dtype=torch.float64), indexing="ij")
    parts = []
    for place in (xs.flatten(), ys.flatten()):
        angles = place[:, None] * frequencies
        parts += [angles.sin(), angles.cos()]
    code = torch.cat(parts, 1).float()
    return nn.functional.pad(code, (0, size - code.size(1)))


def grid_cells(crop_size: int, grid_layer: int) -> int:
    """The side h = w of the grid that stage `grid_layer` gives for crop_size-pixel images."""
    return math.ceil(crop_size / 2 ** (grid_layer + 1))


class GridCNNModel(CNNModel):
    """The chapter's CNNModel without the pooling: ResNet up to `grid_layer`, then Linear + BatchNorm per cell.

    extract() gives the frozen grid (B, D, h, w), which the feature cache stores; head() turns it
    into (B, P, E), what AttentionDecoder reads. With `position_cells` = h (the grid's side at the
    crop size), head() adds position_code to every cell, so that a cell says where it is."""

    feature_kind = "grid"

    def __init__(self, embedding_size: int, backbone: str = "resnet152", weights=None,
                 train_backbone: bool = False, grid_layer: int = 4, position_cells: int = 0) -> None:
        super().__init__(embedding_size, backbone, weights, train_backbone)
        if grid_layer not in (1, 2, 3, 4):
            raise ValueError(f"grid_layer must be a ResNet stage 1..4, got {grid_layer!r}")
        self.grid_layer = grid_layer
        # children: conv1, bn1, relu, maxpool, layer1..layer4, avgpool: keep up to layer<grid_layer>
        self.resnet_module = self.resnet_module[: 4 + grid_layer]
        last_stage = self.resnet_module[-1]
        self.feature_size = [m for m in last_stage.modules() if isinstance(m, nn.BatchNorm2d)][-1].num_features
        self.linear_layer = nn.Linear(self.feature_size, embedding_size)
        self.batch_norm = nn.BatchNorm1d(embedding_size, momentum=0.01)
        self.position: torch.Tensor | None
        # not persistent: made from the sizes, so a checkpoint holds nothing of it
        self.register_buffer("position", position_code(position_cells, position_cells, embedding_size)
                             if position_cells else None, persistent=False)

    def extract(self, input_images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> the stage's feature map (B, D, h, w): what the feature cache stores."""
        with torch.set_grad_enabled(self.train_backbone and torch.is_grad_enabled()):
            return self.resnet_module(input_images)

    extract_map = extract

    def frozen_extractor(self, maps: bool = False) -> nn.Module:
        """A frozen copy of the cut backbone, BatchNorm folded, for the feature cache: images -> grids."""
        from .backbone import fold_batchnorm
        return fold_batchnorm(self.resnet_module)

    def head(self, resnet_features: torch.Tensor) -> torch.Tensor:
        """(B, D, h, w) grids -> (B, P, E) cell embeddings, P = h * w in reading order; always trained.
        With a position code, each cell's place is added to its embedding."""
        cells = self.linear_layer(resnet_features.float().flatten(2).transpose(1, 2))      # (B, P, E)
        cells = self.batch_norm(cells.transpose(1, 2)).transpose(1, 2)
        if self.position is None:
            return cells
        if cells.size(1) != self.position.size(0):
            raise ValueError(f"this grid has {cells.size(1)} cells, but the model's position code was made for "
                             f"{self.position.size(0)}: feed images at the crop size it was trained on")
        return cells + self.position


class Attention(nn.Module):
    """Additive attention: scores w . relu(W_f f_p + W_h h) over the P cells, softmax, weighted sum."""

    def __init__(self, encoder_size: int, hidden_size: int, attention_size: int) -> None:
        super().__init__()
        self.encoder_att = nn.Linear(encoder_size, attention_size)   # W_f, applied once per image
        self.decoder_att = nn.Linear(hidden_size, attention_size)    # W_h, once per step
        self.full_att = nn.Linear(attention_size, 1)                 # w

    def forward(self, features: torch.Tensor, projected: torch.Tensor,
                hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """features (B, P, E), projected = encoder_att(features) (B, P, A), hidden (B, H)
        -> (context (B, E), alpha (B, P))."""
        scores = self.full_att(torch.relu(projected + self.decoder_att(hidden).unsqueeze(1))).squeeze(2)
        alpha = scores.softmax(1)
        return (features * alpha.unsqueeze(2)).sum(1), alpha


class AttentionDecoder(nn.Module):
    """Show, Attend and Tell's decoder on (B, P, E) cell embeddings; a captioning.decoding.Decoder."""

    feature_kind = "grid"

    def __init__(self, embedding_size: int, hidden_layer_size: int, vocabulary_size: int, attention_size: int,
                 max_seq_len: int = 20, dropout: float = 0.5, alpha_c: float = 1.0) -> None:
        super().__init__()
        self.embedding_layer = nn.Embedding(vocabulary_size, embedding_size)
        self.attention = Attention(embedding_size, hidden_layer_size, attention_size)
        self.init_h = nn.Linear(embedding_size, hidden_layer_size)     # h0 and c0 from the mean cell
        self.init_c = nn.Linear(embedding_size, hidden_layer_size)
        self.f_beta = nn.Linear(hidden_layer_size, embedding_size)     # the gate on the context
        self.lstm_cell = nn.LSTMCell(2 * embedding_size, hidden_layer_size)
        self.dropout = nn.Dropout(dropout)
        self.linear_layer = nn.Linear(hidden_layer_size, vocabulary_size)
        self.max_seq_len, self.alpha_c = max_seq_len, alpha_c
        self.penalty: torch.Tensor | None = None       # the last forward's doubly stochastic term

    def _advance(self, word: torch.Tensor, h: torch.Tensor, c: torch.Tensor, features: torch.Tensor,
                 projected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """One step: attend with h, gate the context, run the cell. -> (logits (B, V), h, c, alpha (B, P))."""
        context, alpha = self.attention(features, projected, h)
        gate = torch.sigmoid(self.f_beta(h))
        h, c = self.lstm_cell(torch.cat([word, gate * context], 1), (h, c))
        return self.linear_layer(self.dropout(h)), h, c, alpha

    def _start(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(h0, c0, projected features) for (B, P, E) features."""
        mean = features.mean(1)
        return self.init_h(mean), self.init_c(mean), self.attention.encoder_att(features)

    def forward(self, features: torch.Tensor, captions: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        """Teacher forcing, lengths sorted longest first. Returns logits packed like
        `pack_padded_sequence(captions, lengths)[0]` and sets `self.penalty`: step 0 (a zero word)
        predicts <start>, word t-1 predicts word t."""
        features = features.float()
        h, c, projected = self._start(features)
        words = self.embedding_layer(captions)                                          # (B, T, E)
        first = words.new_zeros(words.size(0), words.size(2))
        sizes = pack_padded_sequence(captions, lengths, batch_first=True).batch_sizes.tolist()
        logits, alphas = [], words.new_zeros(features.size(0), features.size(1))
        for t, n in enumerate(sizes):                     # n: the captions still running at step t
            word = first[:n] if t == 0 else words[:n, t - 1]
            step_logits, h, c, alpha = self._advance(word, h[:n], c[:n], features[:n], projected[:n])
            logits.append(step_logits)
            alphas = alphas + nn.functional.pad(alpha, (0, 0, 0, alphas.size(0) - n))
        self.penalty = self.alpha_c * ((1 - alphas) ** 2).mean()
        return torch.cat(logits)                                                        # (sum(lengths), V)

    # ---- the decoder interface (captioning.decoding.Decoder) ----

    def init_state(self, features: torch.Tensor) -> tuple[torch.Tensor, AttentionState]:
        """Step 0: the image alone. -> ((B, V) log-probabilities, state)."""
        features = features.float()
        h, c, projected = self._start(features)
        return self._step(features.new_zeros(features.size(0), features.size(2)), (h, c, features, projected, h))

    def step(self, token_ids: torch.Tensor, state: AttentionState) -> tuple[torch.Tensor, AttentionState]:
        """(B,) word ids -> ((B, V) log-probabilities of the next word, the new state)."""
        return self._step(self.embedding_layer(token_ids), state)

    def _step(self, word: torch.Tensor, state: AttentionState) -> tuple[torch.Tensor, AttentionState]:
        h, c, features, projected, _ = state
        logits, h, c, alpha = self._advance(word, h, c, features, projected)
        return logits.float().log_softmax(-1), (h, c, features, projected, alpha)

    def reorder_state(self, state: AttentionState, index: torch.Tensor) -> AttentionState:
        """The batch rows `index` of every part of the state (alpha too: beams carry their weights)."""
        return tuple(part[index] for part in state)  # type: ignore[return-value]

    def step_weights(self, state: AttentionState) -> torch.Tensor:
        """(B, P): the attention that produced the state's last log-probabilities."""
        return state[4]

    # ---- decoding, as LSTMModel offers it ----

    @torch.no_grad()
    def sample(self, input_features: torch.Tensor) -> torch.Tensor:
        """Batched greedy decoding: (B, P, E) -> (B, max_seq_len) token ids, like LSTMModel.sample."""
        log_probs, state = self.init_state(input_features)
        sampled = []
        for t in range(self.max_seq_len):
            sampled.append(log_probs.argmax(-1))
            if t + 1 < self.max_seq_len:
                log_probs, state = self.step(sampled[-1], state)
        return torch.stack(sampled, 1)

    def greedy(self, input_features: torch.Tensor, end_id: int = END_ID) -> list[list[int]]:
        return greedy_search(self, input_features, end_id)

    def score(self, input_features: torch.Tensor, sequences: list[list[int]],
              length_penalty: float = LENGTH_PENALTY) -> list[float]:
        return score_sequences(self, input_features, sequences, length_penalty)

    def beam_search(self, input_features: torch.Tensor, beam_size: int = 3, length_penalty: float = LENGTH_PENALTY,
                    end_id: int = END_ID) -> list[list[int]]:
        return beam_search(self, input_features, beam_size, length_penalty, end_id)


__all__ = ["Attention", "AttentionDecoder", "GridCNNModel", "cut_after_end", "grid_cells", "pick_grid_layer"]
