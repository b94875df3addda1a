"""The chapter's CNN encoder and LSTM decoder, with batched greedy and beam-search decoding."""
import torch
import torch.nn as nn
from torch.nn.utils.rnn import pack_padded_sequence

from .backbone import build_resnet, calibrate_batchnorm, fold_batchnorm, resolve_weights, weights_id
from .vocabulary import END, END_ID, PAD, START

LENGTH_PENALTY = 0.7  # beam search ranks finished captions by sum(log p) / length ** LENGTH_PENALTY


class CNNModel(nn.Module):
    """ResNet without its fc layer -> Linear -> BatchNorm1d(momentum=0.01): one embedding per image."""

    def __init__(self, embedding_size, backbone="resnet152", weights="DEFAULT", train_backbone=False):
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

    def train(self, mode=True):
        super().train(mode)
        if not self.train_backbone:  # a frozen backbone's BatchNorm statistics must not drift
            self.resnet_module.eval()
        return self

    def calibrate_batchnorm(self, batches):
        """Estimate a random backbone's BatchNorm statistics from image batches, then freeze them again.

        Pretrained weights (ImageNet, or the tiny preset's stand-in) carry their own statistics
        and never need this.
        """
        calibrate_batchnorm(self.resnet_module, batches)
        self.train(self.training)                              # a frozen backbone goes back to eval mode

    def extract(self, input_images):
        """(B, 3, H, W) -> pooled backbone features (B, feature_size): what the feature cache stores."""
        with torch.set_grad_enabled(self.train_backbone and torch.is_grad_enabled()):
            return self.resnet_module(input_images).flatten(1)

    def extract_map(self, input_images):
        """(B, 3, H, W) -> the last convolutional feature map (B, feature_size, h, w), before pooling.

        `extract` is its average over h x w. The map cache stores it, so that a crop can be pooled
        from it later (features.pool_window).
        """
        with torch.set_grad_enabled(self.train_backbone and torch.is_grad_enabled()):
            return self.resnet_module[:-1](input_images)

    def frozen_extractor(self, maps=False):
        """A frozen copy of the backbone for bulk extraction (the feature cache): images -> what
        `extract` gives, or `extract_map` with maps=True, with every BatchNorm folded into the
        convolution before it (backbone.fold_batchnorm), which saves a pass over each activation."""
        backbone = fold_batchnorm(self.resnet_module)
        return backbone[:-1] if maps else nn.Sequential(backbone, nn.Flatten(1))

    def head(self, resnet_features):
        """Pooled features -> image embedding (B, embedding_size); always trained."""
        return self.batch_norm(self.linear_layer(resnet_features.float()))

    def forward(self, input_images):
        return self.head(self.extract(input_images))


class LSTMModel(nn.Module):
    """Image embedding first, then the caption's word embeddings, through an LSTM to word logits."""

    def __init__(self, embedding_size, hidden_layer_size, vocabulary_size, num_layers, max_seq_len=20):
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

    def forward(self, input_features, captions, lengths):
        """Teacher forcing. Returns logits packed like `pack_padded_sequence(captions, lengths)[0]`:
        (sum(lengths), vocabulary_size). The image predicts <start>, <start> predicts word 1, ..."""
        embeddings = self.embedding_layer(captions)                              # (B, T, E)
        lstm_input = torch.cat((input_features.unsqueeze(1), embeddings), 1)     # (B, 1+T, E)
        packed = pack_padded_sequence(lstm_input, lengths, batch_first=True)
        hidden_variables, _ = self.lstm_layer(packed)                            # packed (sum(lengths), H)
        return self.linear_layer(hidden_variables.data)                          # (sum(lengths), V)

    def step(self, lstm_input, lstm_states=None):
        """One time step: (B, E) input -> (B, V) log-probabilities and the new states."""
        hidden, lstm_states = self.lstm_layer(lstm_input.unsqueeze(1), lstm_states)
        return self.linear_layer(hidden.squeeze(1)).float().log_softmax(-1), lstm_states

    @torch.no_grad()
    def sample(self, input_features, lstm_states=None):
        """Batched greedy decoding: (B, E) features -> (B, max_seq_len) token ids."""
        sampled_indices = []
        lstm_input = input_features
        for _ in range(self.max_seq_len):
            log_probs, lstm_states = self.step(lstm_input, lstm_states)
            predicted = log_probs.argmax(-1)                                     # (B,)
            sampled_indices.append(predicted)
            lstm_input = self.embedding_layer(predicted)
        return torch.stack(sampled_indices, 1)

    def greedy(self, input_features, end_id=END_ID):
        """sample() as one token-id list per image, cut after <end> (the shape beam_search returns)."""
        return [cut_after_end(seq, end_id) for seq in self.sample(input_features).tolist()]

    @torch.no_grad()
    def score(self, input_features, sequences, length_penalty=LENGTH_PENALTY):
        """sum(log p) / length**length_penalty of token-id lists: what beam search maximises."""
        lengths = torch.tensor([len(s) for s in sequences], device=input_features.device)
        captions = torch.zeros(len(sequences), int(lengths.max()), dtype=torch.long, device=input_features.device)
        for i, seq in enumerate(sequences):
            captions[i, : len(seq)] = torch.as_tensor(seq)
        embeddings = self.embedding_layer(captions[:, :-1])                      # (B, T-1, E)
        hidden, _ = self.lstm_layer(torch.cat((input_features.unsqueeze(1), embeddings), 1))
        log_probs = self.linear_layer(hidden).float().log_softmax(-1)            # (B, T, V)
        token_lp = log_probs.gather(2, captions.unsqueeze(2)).squeeze(2)        # (B, T)
        mask = torch.arange(captions.size(1), device=captions.device) < lengths.unsqueeze(1)
        return ((token_lp * mask).sum(1) / lengths.float() ** length_penalty).tolist()

    @torch.no_grad()
    def beam_search(self, input_features, beam_size=3, length_penalty=LENGTH_PENALTY, end_id=END_ID):
        """Batched beam search. Returns one token-id list per image, cut after <end>.

        Beams are ranked by their summed log-probability while they grow; finished
        captions are compared by sum(log p) / length**length_penalty (the GNMT-style
        normalisation of the peers; 0 = raw sum, 1 = mean log-probability), so that
        short captions are not favoured just for having fewer terms. The greedy caption
        is scored the same way and kept if it beats every beam, so the result never
        scores below greedy; beam_size=1 is exactly greedy.
        """
        B, K, T = input_features.size(0), beam_size, self.max_seq_len
        device = input_features.device
        log_probs, states = self.step(input_features)                            # (B, V)
        V = log_probs.size(1)
        k0 = min(K, V)
        scores, tokens = log_probs.topk(k0, dim=1)                               # (B, k0)
        if k0 < K:  # pad with dead beams
            scores = torch.cat([scores, scores.new_full((B, K - k0), float("-inf"))], 1)
            tokens = torch.cat([tokens, tokens.new_zeros(B, K - k0)], 1)
        states = tuple(s.repeat_interleave(K, dim=1) for s in states)            # (L, B*K, H)
        history = tokens.unsqueeze(2)                                            # (B, K, t)
        best = [(float("-inf"), None)] * B                                       # (normalised score, ids)

        def finish(b, k, t):
            norm = scores[b, k].item() / t ** length_penalty
            if norm > best[b][0]:
                best[b] = (norm, history[b, k].tolist())

        for t in range(1, T + 1):
            ended = (tokens == end_id) | (t == T)
            for b, k in ended.logical_and(scores > float("-inf")).nonzero().tolist():
                finish(b, k, t)
            scores = scores.masked_fill(tokens == end_id, float("-inf"))
            if t == T or bool((scores == float("-inf")).all()):
                break
            log_probs, states = self.step(self.embedding_layer(tokens.view(-1)), states)
            candidates = (scores.view(B * K, 1) + log_probs).view(B, K * V)     # (B, K*V)
            scores, flat = candidates.topk(K, dim=1)                             # (B, K)
            parent = torch.div(flat, V, rounding_mode="floor")                  # (B, K)
            tokens = flat % V
            gather = (parent + torch.arange(B, device=device).unsqueeze(1) * K).view(-1)
            states = tuple(s[:, gather] for s in states)
            history = torch.cat([history.gather(1, parent.unsqueeze(2).expand_as(history)),
                                 tokens.unsqueeze(2)], 2)
        results = [ids for _, ids in best]
        if K > 1:  # never below greedy under the same score
            greedy = self.greedy(input_features, end_id)
            greedy_scores = self.score(input_features, greedy, length_penalty)
            results = [g if gs > bs + 1e-6 else r
                       for g, gs, r, (bs, _) in zip(greedy, greedy_scores, results, best)]
        return results


def cut_after_end(ids, end_id=END_ID):
    ids = list(ids)
    return ids[: ids.index(end_id) + 1] if end_id in ids else ids


def decode(ids, vocab):
    """Token ids -> a clean sentence: stops at <end>, drops <start> and <pad>."""
    words = []
    for i in (ids.tolist() if torch.is_tensor(ids) else ids):
        word = vocab.i2w[int(i)]
        if word == END:
            break
        if word not in (START, PAD):
            words.append(word)
    return " ".join(words)


def count_parameters(module):
    """(trainable, frozen) parameter counts."""
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in module.parameters()) - trainable
