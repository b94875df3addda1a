"""The chapter's CNN encoder and LSTM decoder; the searches they decode with are in decoding.py."""
from collections.abc import Iterable

import torch
import torch.nn as nn
from torch.nn.utils.rnn import pack_padded_sequence
from torchvision.models import WeightsEnum

from .backbone import build_resnet, calibrate_batchnorm, fold_batchnorm, resolve_weights, weights_id
from .decoding import LENGTH_PENALTY, beam_search, cut_after_end, score_sequences
from .vocabulary import END, END_ID, PAD, START, Vocab

LSTMState = tuple[torch.Tensor, torch.Tensor]     # (h, c), each (num_layers, B, H)

__all__ = ["CNNModel", "LSTMModel", "LENGTH_PENALTY", "cut_after_end", "decode", "count_parameters"]


class CNNModel(nn.Module):
    """ResNet without its fc layer -> Linear -> BatchNorm1d(momentum=0.01): one embedding per image."""

    def __init__(self, embedding_size: int, backbone: str = "resnet152", weights: str | WeightsEnum | None = "DEFAULT",
                 train_backbone: bool = False) -> None:
        super().__init__()
        self.backbone_name, self.train_backbone = backbone, train_backbone
        weights = resolve_weights(backbone, weights)
        self.weights_id = weights_id(weights)
        resnet = build_resnet(backbone, weights)
        self.feature_size = resnet.fc.in_features
        self.resnet_module = nn.Sequential(*list(resnet.children())[:-1])  # drop the fc layer
        self.linear_layer = nn.Linear(self.feature_size, embedding_size)
        self.batch_norm = nn.BatchNorm1d(embedding_size, momentum=0.01)
        if not train_backbone:
            self.resnet_module.requires_grad_(False)
            self.resnet_module.eval()

    def train(self, mode: bool = True) -> "CNNModel":
        super().train(mode)
        if not self.train_backbone:  # a frozen backbone's BatchNorm statistics must not drift
            self.resnet_module.eval()
        return self

    def calibrate_batchnorm(self, batches: Iterable[torch.Tensor]) -> None:
        """Estimate a random backbone's BatchNorm statistics from image batches, then freeze them again.

        Pretrained weights (ImageNet, or the tiny preset's stand-in) carry their own statistics
        and never need this.
        """
        calibrate_batchnorm(self.resnet_module, batches)
        self.train(self.training)                              # a frozen backbone goes back to eval mode

    def extract(self, input_images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> pooled backbone features (B, feature_size): what the feature cache stores."""
        with torch.set_grad_enabled(self.train_backbone and torch.is_grad_enabled()):
            return self.resnet_module(input_images).flatten(1)

    def extract_map(self, input_images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> the last convolutional feature map (B, feature_size, h, w), before pooling.

        `extract` is its average over h x w. The map cache stores it, so that a crop can be pooled
        from it later (features.pool_window).
        """
        with torch.set_grad_enabled(self.train_backbone and torch.is_grad_enabled()):
            return self.resnet_module[:-1](input_images)

    def frozen_extractor(self, maps: bool = False) -> nn.Module:
        """A frozen copy of the backbone for bulk extraction (the feature cache): images -> what
        `extract` gives, or `extract_map` with maps=True, with every BatchNorm folded into the
        convolution before it (backbone.fold_batchnorm), which saves a pass over each activation."""
        backbone = fold_batchnorm(self.resnet_module)
        return backbone[:-1] if maps else nn.Sequential(backbone, nn.Flatten(1))

    def head(self, resnet_features: torch.Tensor) -> torch.Tensor:
        """Pooled features -> image embedding (B, embedding_size); always trained."""
        return self.batch_norm(self.linear_layer(resnet_features.float()))

    def forward(self, input_images: torch.Tensor) -> torch.Tensor:
        return self.head(self.extract(input_images))


class LSTMModel(nn.Module):
    """Image embedding first, then the caption's word embeddings, through an LSTM to word logits.

    It is a `captioning.decoding.Decoder` on pooled features: beam search, scoring, captioning and
    saliency go through init_state / step / reorder_state."""

    feature_kind = "pooled"

    def __init__(self, embedding_size: int, hidden_layer_size: int, vocabulary_size: int, num_layers: int,
                 max_seq_len: int = 20) -> None:
        super().__init__()
        self.embedding_layer = nn.Embedding(vocabulary_size, embedding_size)
        self.lstm_layer = nn.LSTM(embedding_size, hidden_layer_size, num_layers, batch_first=True)
        self.linear_layer = nn.Linear(hidden_layer_size, vocabulary_size)
        self.max_seq_len = max_seq_len
        # Start with the forget gates mostly open (bias_ih + bias_hh = 2) so the image, seen only
        # at step 0, is remembered while the words are learned: the decoder starts using the
        # image sooner.
        with torch.no_grad():
            for name, bias in self.lstm_layer.named_parameters():
                if name.startswith("bias"):
                    bias[hidden_layer_size: 2 * hidden_layer_size] = 1.0

    def forward(self, input_features: torch.Tensor, captions: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        """Teacher forcing. Returns logits packed like `pack_padded_sequence(captions, lengths)[0]`:
        (sum(lengths), vocabulary_size). The image predicts <start>, <start> predicts word 1, ..."""
        embeddings = self.embedding_layer(captions)                              # (B, T, E)
        lstm_input = torch.cat((input_features.unsqueeze(1), embeddings), 1)     # (B, 1+T, E)
        packed = pack_padded_sequence(lstm_input, lengths, batch_first=True)
        hidden_variables, _ = self.lstm_layer(packed)                            # packed (sum(lengths), H)
        return self.linear_layer(hidden_variables.data)                          # (sum(lengths), V)

    # ---- the decoder interface (captioning.decoding.Decoder) ----

    def init_state(self, input_features: torch.Tensor) -> tuple[torch.Tensor, LSTMState]:
        """The first step: the image embedding goes in as the first input. -> ((B, V) log-probs, (h, c))."""
        return self._step(input_features, None)

    def step(self, token_ids: torch.Tensor, lstm_states: LSTMState) -> tuple[torch.Tensor, LSTMState]:
        """One step: (B,) word ids in, (B, V) log-probabilities of the next word and the new (h, c) out."""
        return self._step(self.embedding_layer(token_ids), lstm_states)

    def reorder_state(self, lstm_states: LSTMState, index: torch.Tensor) -> LSTMState:
        """The batch rows `index` of (h, c), each (num_layers, B, H)."""
        h, c = lstm_states
        return h[:, index], c[:, index]

    def _step(self, lstm_input: torch.Tensor, lstm_states: LSTMState | None) -> tuple[torch.Tensor, LSTMState]:
        hidden, lstm_states = self.lstm_layer(lstm_input.unsqueeze(1), lstm_states)
        return self.linear_layer(hidden.squeeze(1)).float().log_softmax(-1), lstm_states

    # ---- decoding ----

    @torch.no_grad()
    def sample(self, input_features: torch.Tensor, lstm_states: LSTMState | None = None) -> torch.Tensor:
        """Batched greedy decoding, the chapter's: (B, E) features -> (B, max_seq_len) token ids."""
        sampled_indices = []
        lstm_input = input_features
        for _ in range(self.max_seq_len):
            log_probs, lstm_states = self._step(lstm_input, lstm_states)
            predicted = log_probs.argmax(-1)                                     # (B,)
            sampled_indices.append(predicted)
            lstm_input = self.embedding_layer(predicted)
        return torch.stack(sampled_indices, 1)

    def greedy(self, input_features: torch.Tensor, end_id: int = END_ID) -> list[list[int]]:
        """sample() as one token-id list per image, cut after <end> (the shape beam_search returns)."""
        return [cut_after_end(seq, end_id) for seq in self.sample(input_features).tolist()]

    def score(self, input_features: torch.Tensor, sequences: list[list[int]],
              length_penalty: float = LENGTH_PENALTY) -> list[float]:
        """sum(log p) / length**length_penalty of token-id lists: what beam search maximises."""
        return score_sequences(self, input_features, sequences, length_penalty)

    def beam_search(self, input_features: torch.Tensor, beam_size: int = 3, length_penalty: float = LENGTH_PENALTY,
                    end_id: int = END_ID) -> list[list[int]]:
        """Batched beam search (captioning.decoding.beam_search): one token-id list per image, cut after <end>."""
        return beam_search(self, input_features, beam_size, length_penalty, end_id)


def decode(ids: torch.Tensor | Iterable[int], vocab: Vocab) -> str:
    """Token ids -> a clean sentence: stops at <end>, drops <start> and <pad>."""
    words: list[str] = []
    for i in (ids.tolist() if torch.is_tensor(ids) else ids):
        word = vocab.i2w[int(i)]
        if word == END:
            break
        if word not in (START, PAD):
            words.append(word)
    return " ".join(words)


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """(trainable, frozen) parameter counts."""
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in module.parameters()) - trainable
