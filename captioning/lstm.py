"""The decoder's LSTM on packed captions, for training on a CPU.

`nn.LSTM` on a CPU runs a packed sequence one time step at a time through autograd, and its
backward pass turns each step's slice of the precomputed input projection into a zero-filled
gradient the size of all tokens' projections, (N, 4H), then adds it to the total: one
full-size fill and one full-size add per time step, a large share of a training step at the
chapter's shapes (`python benchmarks/decoder_speed.py --profile` shows it). This is the same LSTM, same weights, same
numbers up to float rounding (tests/test_model.py compares outputs and gradients with
nn.LSTM), with a hand-written backward pass that does step by step only what is sequential:
- forward: one matrix product for every token's input projection, then per step h @ W_hh
  and the gates;
- backward: per step the gate gradients and dh @ W_hh; then the weight and input gradients
  as one matrix product each over all tokens.

`packed_lstm(lstm, packed)` uses it when it applies (CPU, gradients on, a unidirectional LSTM
with biases, no projection, no dropout between layers) and calls `lstm` itself otherwise:
CUDA keeps cuDNN, and inference keeps nn.LSTM's C++ loop. `use_packed_cpu_lstm(decoder)` puts
it under a decoder from outside, so that the chapter's LSTMModel reads as it does in the book.
benchmarks/decoder_speed.py times both.
"""
from typing import Any

import torch
import torch.nn as nn
from torch.nn.utils.rnn import PackedSequence


class _PackedLSTMLayer(torch.autograd.Function):
    """One LSTM layer over packed data (N, I) with per-step batch sizes, from zero states -> (N, H)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, batch_sizes: list[int], w_ih: torch.Tensor, w_hh: torch.Tensor,
                b_ih: torch.Tensor, b_hh: torch.Tensor) -> torch.Tensor:
        H = w_hh.size(1)
        gates = torch.addmm(b_ih + b_hh, x, w_ih.t())             # (N, 4H): every input projection at once
        hs, cs = x.new_empty(x.size(0), H), x.new_empty(x.size(0), H)
        h = c = None
        off = 0
        for bs in batch_sizes:                                      # gate order: input, forget, cell, output
            g = gates[off: off + bs]
            if h is not None:
                g.addmm_(h[:bs], w_hh.t())
            g[:, : 2 * H].sigmoid_()
            g[:, 2 * H: 3 * H].tanh_()
            g[:, 3 * H:].sigmoid_()
            i, f, cell, o = g.chunk(4, 1)
            c = i * cell if c is None else torch.addcmul(i * cell, f, c[:bs])
            h = o * c.tanh()
            cs[off: off + bs], hs[off: off + bs] = c, h
            off += bs
        ctx.save_for_backward(x, w_ih, w_hh, gates, hs, cs)        # gates hold the activations
        ctx.batch_sizes = batch_sizes
        return hs

    @staticmethod
    def backward(ctx: Any, grad_hs: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, w_ih, w_hh, gates, hs, cs = ctx.saved_tensors
        sizes = ctx.batch_sizes
        starts = [0]
        for bs in sizes[:-1]:
            starts.append(starts[-1] + bs)
        H = w_hh.size(1)
        grad_gates = torch.empty_like(gates)
        dh = grad_hs.new_zeros(sizes[0], H)                         # carried from step t+1 (rows beyond its
        dc = grad_hs.new_zeros(sizes[0], H)                         # batch size stay zero)
        for t in range(len(sizes) - 1, -1, -1):
            bs, off = sizes[t], starts[t]
            i, f, cell, o = gates[off: off + bs].chunk(4, 1)
            tanh_c = cs[off: off + bs].tanh()
            dh_t = grad_hs[off: off + bs] + dh[:bs]
            dc_t = dc[:bs] + dh_t * o * (1 - tanh_c * tanh_c)
            di, df, dcell, do = grad_gates[off: off + bs].chunk(4, 1)
            torch.mul(dh_t * tanh_c, o * (1 - o), out=do)
            torch.mul(dc_t * cell, i * (1 - i), out=di)
            torch.mul(dc_t * i, 1 - cell * cell, out=dcell)
            if t == 0:
                df.zero_()                                          # no previous cell state
                continue
            c_prev = cs[starts[t - 1]: starts[t - 1] + bs]
            torch.mul(dc_t * c_prev, f * (1 - f), out=df)
            torch.mul(dc_t, f, out=dc[:bs])
            torch.mm(grad_gates[off: off + bs], w_hh, out=dh[:bs])
        grad_x = grad_gates @ w_ih if ctx.needs_input_grad[0] else None
        grad_w_ih = grad_gates.t() @ x
        # the h that fed each token's gates: the previous step's rows (none for step 0)
        h_prev = torch.cat([hs[starts[t - 1]: starts[t - 1] + sizes[t]] for t in range(1, len(sizes))]) \
            if len(sizes) > 1 else hs[:0]
        grad_w_hh = grad_gates[sizes[0]:].t() @ h_prev
        grad_b = grad_gates.sum(0)
        return grad_x, None, grad_w_ih, grad_w_hh, grad_b, grad_b


def _applies(lstm: nn.LSTM, data: torch.Tensor) -> bool:
    return (data.device.type == "cpu" and torch.is_grad_enabled() and lstm.bias and not lstm.bidirectional
            and lstm.proj_size == 0 and (lstm.dropout == 0 or lstm.num_layers == 1 or not lstm.training))


def packed_lstm(lstm: nn.LSTM, packed: PackedSequence) -> torch.Tensor:
    """lstm(packed)[0].data from zero initial states: the last layer's hidden states, (N, H)."""
    if not _applies(lstm, packed.data):
        return lstm(packed)[0].data
    out, sizes = packed.data, packed.batch_sizes.tolist()
    for layer in range(lstm.num_layers):
        out = _PackedLSTMLayer.apply(out, sizes, *(getattr(lstm, f"{name}_l{layer}")
                                                   for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")))
    return out


class PackedCPULSTM(nn.LSTM):
    """nn.LSTM whose forward over a packed sequence from zero states goes through packed_lstm.

    The same parameters and the same state_dict as nn.LSTM; only the training step on a CPU
    differs. The final (h, c) states are not computed on that path (teacher forcing never
    reads them), so it returns None for them.
    """

    # ignore[override]: on the packed path the final (h, c) are None, unlike nn.LSTM's (see the docstring)
    def forward(self, input: torch.Tensor | PackedSequence,  # type: ignore[override]
                hx: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> tuple[torch.Tensor | PackedSequence, tuple[torch.Tensor, torch.Tensor] | None]:
        if isinstance(input, PackedSequence) and hx is None and _applies(self, input.data):
            out = packed_lstm(self, input)
            return PackedSequence(out, input.batch_sizes, input.sorted_indices, input.unsorted_indices), None
        return super().forward(input, hx)


def use_packed_cpu_lstm(decoder: nn.Module, enabled: bool = True) -> nn.Module:
    """Give the decoder's LSTM (`decoder.lstm_layer`, an nn.LSTM) PackedCPULSTM's forward, or nn.LSTM's back.

    The module stays the same object with the same tensors: only its class changes, so
    optimizers, DDP and checkpoints see no difference. A decoder whose recurrent layer is not an
    nn.LSTM (a GRU, a module of a reader's own) is left as it is.
    """
    if type(getattr(decoder, "lstm_layer", None)) in (nn.LSTM, PackedCPULSTM):
        decoder.lstm_layer.__class__ = PackedCPULSTM if enabled else nn.LSTM
    return decoder

