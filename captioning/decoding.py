"""The decoder interface, and the searches that work for every decoder that has it.

A decoder (the chapter's `LSTMModel`, or another such as an attention decoder in its own module)
is an `nn.Module` with the methods of `Decoder`. Training, captioning, explanation and export use
only these, so a second decoder plugs in without changes there:

- what the encoder hands it: `feature_kind` "pooled", one (B, E) vector per image (the chapter's
  CNNModel), or "grid", (B, P, D) feature vectors at P positions of the image, for attention;
- `forward(features, captions, lengths)`: teacher forcing, logits packed like
  `pack_padded_sequence(captions, lengths, batch_first=True).data`, (sum(lengths), V): the
  layout the loss and the saliency maps rely on;
- `init_state(features)`: the first step, (log-probabilities of the first word (B, V), state);
  for the chapter's decoder it is the step that feeds the image embedding as the first input;
- `step(token_ids, state)`: one word id per row in, the next word's log-probabilities out;
- `reorder_state(state, index)`: the rows `index` of a state (beam search keeps the best beams);
- optionally `step_weights(state)`: (B, P) attention weights of the step that made `state`,
  where a decoder has them; `beam_search(..., return_weights=True)` then returns them per word.

`greedy_search`, `beam_search`, `score_sequences` and `sample_captions` (the draws self-critical
training learns from, with their log-probabilities) are written once against this interface.
"""
from typing import Any, Literal, NamedTuple, Protocol, cast, overload, runtime_checkable

import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from .vocabulary import END_ID, PAD, SPECIAL_TOKENS, START

LENGTH_PENALTY = 0.7  # beam search ranks finished captions by sum(log p) / length ** LENGTH_PENALTY

Ids = list[list[int]]                 # one token-id list per image
StepWeights = list[Tensor | None]     # per image: (len(ids), P) weights, or None for a decoder without them


@runtime_checkable
class Decoder(Protocol):
    feature_kind: str        # "pooled" (B, E) or "grid" (B, P, D)
    max_seq_len: int

    def forward(self, features: Tensor, captions: Tensor, lengths: list[int]) -> Tensor: ...

    def __call__(self, features: Tensor, captions: Tensor, lengths: list[int]) -> Tensor: ...

    def init_state(self, features: Tensor) -> tuple[Tensor, Any]: ...

    def step(self, token_ids: Tensor, state: Any) -> tuple[Tensor, Any]: ...

    def reorder_state(self, state: Any, index: Tensor) -> Any: ...


def _weights(decoder: Decoder, state: Any) -> Tensor | None:
    read = getattr(decoder, "step_weights", None)
    return read(state) if read is not None else None


def cut_after_end(ids: list[int], end_id: int = END_ID) -> list[int]:
    ids = list(ids)
    return ids[: ids.index(end_id) + 1] if end_id in ids else ids


@overload
def greedy_search(decoder: Decoder, features: Tensor, end_id: int = ...,
                  return_weights: Literal[False] = ...) -> Ids: ...
@overload
def greedy_search(decoder: Decoder, features: Tensor, end_id: int = ...,
                  *, return_weights: Literal[True]) -> tuple[Ids, StepWeights]: ...
@torch.no_grad()
def greedy_search(decoder: Decoder, features: Tensor, end_id: int = END_ID,
                  return_weights: bool = False) -> Ids | tuple[Ids, StepWeights]:
    """The likeliest word at each step: one token-id list per image, cut after <end>.

    With return_weights, also one (len(ids), P) tensor of per-word weights per image (None for a
    decoder without step_weights)."""
    log_probs, state = decoder.init_state(features)
    steps: list[Tensor] = []
    weights: list[Tensor | None] = []
    for _ in range(decoder.max_seq_len):
        weights.append(_weights(decoder, state))
        steps.append(log_probs.argmax(-1))
        if bool((torch.stack(steps, 1) == end_id).any(1).all()):
            break
        log_probs, state = decoder.step(steps[-1], state)
    ids = [cut_after_end(row, end_id) for row in torch.stack(steps, 1).tolist()]
    if not return_weights:
        return ids
    if any(w is None for w in weights):
        return ids, [None] * len(ids)
    stacked = torch.stack([w for w in weights if w is not None], 1)               # (B, T, P)
    return ids, [stacked[b, : len(row)] for b, row in enumerate(ids)]


@torch.no_grad()
def score_sequences(decoder: Decoder, features: Tensor, sequences: list[list[int]],
                    length_penalty: float = LENGTH_PENALTY) -> list[float]:
    """sum(log p) / length**length_penalty of token-id lists, by teacher forcing: what beam search maximises."""
    lengths = torch.tensor([len(s) for s in sequences])
    order = lengths.argsort(descending=True)                  # packing wants the longest first
    captions = torch.zeros(len(sequences), int(lengths.max()), dtype=torch.long, device=features.device)
    for i, seq in enumerate(sequences):
        captions[i, : len(seq)] = torch.as_tensor(seq)
    captions, sorted_lengths = captions[order.to(captions.device)], lengths[order].tolist()
    logits = decoder(features[order.to(features.device)], captions, sorted_lengths)   # (sum(lengths), V)
    targets = pack_padded_sequence(captions, sorted_lengths, batch_first=True)
    token_lp = logits.float().log_softmax(-1).gather(1, targets.data.unsqueeze(1)).squeeze(1)
    padded, _ = pad_packed_sequence(PackedSequence(token_lp, targets.batch_sizes), batch_first=True)
    totals = torch.empty(len(sequences), device=padded.device)
    totals[order.to(padded.device)] = padded.sum(1)
    return (totals / lengths.to(totals.device).float() ** length_penalty).tolist()


class _Beams:
    """The beams of a batch: scores (B, K), last tokens, each beam's history, its weights, the best finished."""

    def __init__(self, log_probs: Tensor, K: int, weights: Tensor | None) -> None:
        B, V = log_probs.shape
        k0 = min(K, V)
        self.scores, self.tokens = log_probs.topk(k0, dim=1)                     # (B, k0)
        if k0 < K:  # pad with dead beams
            self.scores = torch.cat([self.scores, self.scores.new_full((B, K - k0), float("-inf"))], 1)
            self.tokens = torch.cat([self.tokens, self.tokens.new_zeros(B, K - k0)], 1)
        self.history = self.tokens.unsqueeze(2)                                  # (B, K, t)
        self.weights = None if weights is None else weights.unsqueeze(1).unsqueeze(2).expand(-1, K, 1, -1)
        # (normalised score, ids, weights)
        self.best: list[tuple[float, list[int] | None, Tensor | None]] = [(float("-inf"), None, None)] * B

    def finish(self, t: int, end_id: int, last: bool, length_penalty: float) -> None:
        ended = (self.tokens == end_id) | last
        for b, k in ended.logical_and(self.scores > float("-inf")).nonzero().tolist():
            norm = self.scores[b, k].item() / t ** length_penalty
            if norm > self.best[b][0]:
                weights = None if self.weights is None else self.weights[b, k]
                self.best[b] = (norm, self.history[b, k].tolist(), weights)
        self.scores = self.scores.masked_fill(self.tokens == end_id, float("-inf"))

    def grow(self, log_probs: Tensor, K: int) -> Tensor:
        """Keep the K best continuations; returns the flat index of each one's parent row, (B*K,)."""
        B = self.scores.size(0)
        V = log_probs.size(1)
        candidates = (self.scores.view(B * K, 1) + log_probs).view(B, K * V)    # (B, K*V)
        self.scores, flat = candidates.topk(K, dim=1)                            # (B, K)
        parent = torch.div(flat, V, rounding_mode="floor")                      # (B, K)
        self.tokens = flat % V
        self.history = torch.cat([self.history.gather(1, parent.unsqueeze(2).expand_as(self.history)),
                                  self.tokens.unsqueeze(2)], 2)
        if self.weights is not None:
            index = parent.view(B, K, 1, 1).expand(-1, -1, *self.weights.shape[2:])
            self.weights = self.weights.gather(1, index)
        return (parent + torch.arange(B, device=parent.device).unsqueeze(1) * K).view(-1)

    def add_weights(self, weights: Tensor | None, K: int) -> None:
        if self.weights is not None and weights is not None:
            self.weights = torch.cat([self.weights, weights.view(-1, K, 1, weights.size(-1))], 2)


@overload
def beam_search(decoder: Decoder, features: Tensor, beam_size: int = ..., length_penalty: float = ...,
                end_id: int = ..., return_weights: Literal[False] = ...) -> Ids: ...
@overload
def beam_search(decoder: Decoder, features: Tensor, beam_size: int = ..., length_penalty: float = ...,
                end_id: int = ..., *, return_weights: Literal[True]) -> tuple[Ids, StepWeights]: ...
@torch.no_grad()
def beam_search(decoder: Decoder, features: Tensor, beam_size: int = 3, length_penalty: float = LENGTH_PENALTY,
                end_id: int = END_ID, return_weights: bool = False) -> Ids | tuple[Ids, StepWeights]:
    """Batched beam search over any Decoder. Returns one token-id list per image, cut after <end>.

    Beams are ranked by their summed log-probability while they grow; finished captions are
    compared by sum(log p) / length**length_penalty (the GNMT-style normalisation of the peers;
    0 = raw sum, 1 = mean log-probability), so that short captions are not favoured just for
    having fewer terms. The greedy caption is scored the same way and kept if it beats every
    beam, so the result never scores below greedy; beam_size=1 is exactly greedy. With
    return_weights, also each caption's per-word weights (see greedy_search).
    """
    if not isinstance(beam_size, int) or beam_size < 1:
        raise ValueError(f"beam_size must be a whole number >= 1, got {beam_size!r}")
    B, K, T = features.size(0), beam_size, decoder.max_seq_len
    log_probs, state = decoder.init_state(features)                              # (B, V)
    beams = _Beams(log_probs, K, _weights(decoder, state) if return_weights else None)
    state = decoder.reorder_state(state, torch.arange(B, device=features.device).repeat_interleave(K))
    for t in range(1, T + 1):
        beams.finish(t, end_id, t == T, length_penalty)
        if t == T or bool((beams.scores == float("-inf")).all()):
            break
        log_probs, state = decoder.step(beams.tokens.reshape(-1), state)
        state = decoder.reorder_state(state, beams.grow(log_probs, K))
        if return_weights:
            beams.add_weights(_weights(decoder, state), K)
    results = [(norm, ids, weights) for norm, ids, weights in beams.best]
    if K > 1:  # never below greedy under the same score
        greedy = greedy_search(decoder, features, end_id, return_weights=True)
        greedy_scores = score_sequences(decoder, features, greedy[0], length_penalty)
        results = [(gs, g, gw) if gs > bs + 1e-6 else (bs, ids, w)
                   for g, gw, gs, (bs, ids, w) in zip(*greedy, greedy_scores, results)]
    ids = cast(Ids, [r[1] for r in results])        # not None: every row is finished at max_seq_len (last=True)
    return (ids, [r[2] for r in results]) if return_weights else ids


START_ID, PAD_ID = SPECIAL_TOKENS.index(START), SPECIAL_TOKENS.index(PAD)


class Sampled(NamedTuple):
    """Captions drawn by sample_captions, one row per caption, <start> left out.

    ids (N, T): the words, then <pad> after <end>; log_probs (N, T): log p of each drawn word, with
    the gradient when drawn with it; mask (N, T): True for the words of the caption, its <end>
    included; finished (N,): the caption ended with <end> within max_seq_len (False: cut off)."""
    ids: Tensor
    log_probs: Tensor
    mask: Tensor
    finished: Tensor


def sample_captions(decoder: Decoder, features: Tensor, samples: int = 1, greedy: bool = False,
                    end_id: int = END_ID, generator: torch.Generator | None = None) -> Sampled:
    """`samples` captions per image, each word drawn from the decoder's distribution (multinomial
    sampling), or its likeliest word with greedy=True; rows b*samples .. b*samples+samples-1 are image b's.

    Unlike greedy_search it keeps the graph: the log-probabilities of the drawn words carry the
    gradient that REINFORCE needs (call it under torch.no_grad() for a baseline). <start> is fed,
    not drawn, as every search here does; a caption stops at its <end> or after max_seq_len - 1 words."""
    if not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be a whole number >= 1, got {samples!r}")
    B = features.size(0)
    _, state = decoder.init_state(features)          # step 0 predicts <start>, which is fed instead
    if samples > 1:
        state = decoder.reorder_state(state, torch.arange(B, device=features.device).repeat_interleave(samples))
    tokens = torch.full((B * samples,), START_ID, dtype=torch.long, device=features.device)
    running = torch.ones(B * samples, dtype=torch.bool, device=features.device)
    ids, log_probs, mask = [], [], []
    for _ in range(decoder.max_seq_len - 1):
        step_lp, state = decoder.step(tokens, state)                                     # (N, V)
        if greedy:
            tokens = step_lp.argmax(-1)
        else:
            tokens = torch.multinomial(step_lp.detach().exp(), 1, generator=generator).squeeze(1)
        log_probs.append(step_lp.gather(1, tokens.unsqueeze(1)).squeeze(1))
        mask.append(running)
        ids.append(tokens.masked_fill(~running, PAD_ID))
        running = running & (tokens != end_id)
        if not bool(running.any()):
            break
    return Sampled(torch.stack(ids, 1), torch.stack(log_probs, 1), torch.stack(mask, 1), ~running)
