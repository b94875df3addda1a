"""A trained model as a folder anyone can load: safetensors weights, ONNX graphs, JSON, a model card.

    python -m captioning export --checkpoint models_dir/tiny/best.ckpt --out exported/tiny

writes:

- model.safetensors: every weight (encoder.* and decoder.*, the backbone included), no pickle;
- config.json: the model-shaping config, the decoder kind, the vocabulary size and the graphs' inputs
  and outputs;
- vocab.json: the word list (index = token id);
- encoder.onnx: a preprocessed image batch (B, 3, crop, crop) -> what the decoder starts from: the
  first step's log-probabilities (B, V) and (h, c) (num_layers, B, H), and for an attention model its
  grid of cell embeddings (B, P, E), which every step reads again;
- decoder_step.onnx: one step, (token ids (B,), h, c[, grid]) -> (log-probabilities (B, V), the next
  h and c (h_next, c_next)[, attention weights (B, P)]). The search loop stays in Python: exporting a
  whole decode loop with a data-dependent length is fragile, one step with its state in and out is not;
- README.md: the model card (captioning.modelcard): the run's, from beside the checkpoint, with what the
  export holds and how to load it; made from the checkpoint alone where the run has none.

`load_exported(folder)` reads it back, with the library's modules (runtime "torch") or with ONNX
Runtime ("onnx"): `OnnxEncoder` and `OnnxDecoder` then stand in for the encoder and decoder, so that
the library's one batched beam search and greedy search drive decoder_step.onnx, and images go
through the same eval_transform. A file missing, or one that disagrees with another (the
vocabulary's size with the weights', the config with the weights' shapes), is refused in one line
that names the file.
"""
import json
import os
from collections.abc import Callable, Sequence
from typing import Any, cast

import numpy as np
import torch
import torch.nn as nn
from torch.nn.utils.rnn import pack_padded_sequence

from .atomic import atomic_write, atomic_write_json, move_aside
from .checkpoint import build_models, load_captioner
from .config import Config, get_config
from .data import IMAGENET_MEAN, IMAGENET_STD
from .decoding import Decoder, beam_search, greedy_search
from .vocabulary import END_ID, Vocab

FORMAT = 1
FILES = ("model.safetensors", "config.json", "vocab.json", "encoder.onnx", "decoder_step.onnx")
INT8 = "encoder.int8.onnx"
RUNTIMES = ("torch", "onnx", "onnx-int8")
CALIBRATION_IMAGES = 100
INSTALL_ONNX = "pip install onnxruntime (or: pip install -r requirements.txt)"


# ---- the two graphs ----------------------------------------------------------------------------

class _Start(nn.Module):
    """Images -> the decoder's first step: (log_probs, h, c) for the chapter's LSTM, (log_probs, h, c, grid)
    for attention."""

    def __init__(self, encoder: nn.Module, decoder: Any) -> None:
        super().__init__()
        self.encoder, self.decoder = encoder, decoder
        self.grid = getattr(decoder, "feature_kind", "pooled") == "grid"

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        features = self.encoder(images)
        log_probs, state = self.decoder.init_state(features)
        if self.grid:
            h, c, grid, _, _ = state
            return log_probs, h, c, grid
        h, c = state
        return log_probs, h, c


class _Step(nn.Module):
    """One step: (tokens, h, c[, grid]) -> (log_probs, h, c[, alpha])."""

    def __init__(self, decoder: Any) -> None:
        super().__init__()
        self.decoder = decoder
        self.grid = getattr(decoder, "feature_kind", "pooled") == "grid"

    def forward(self, tokens: torch.Tensor, h: torch.Tensor, c: torch.Tensor,
                grid: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        if self.grid:
            projected = self.decoder.attention.encoder_att(grid)
            log_probs, (h, c, _, _, alpha) = self.decoder.step(tokens, (h, c, grid, projected, h))
            return log_probs, h, c, alpha
        log_probs, (h, c) = self.decoder.step(tokens, (h, c))
        return log_probs, h, c


def _names(grid: bool) -> dict[str, list[str]]:
    state = ["h", "c"] + (["grid"] if grid else [])
    return {"encoder_inputs": ["images"], "encoder_outputs": ["log_probs"] + state, "step_inputs": ["tokens"] + state,
            "step_outputs": ["log_probs", "h_next", "c_next"] + (["alpha"] if grid else [])}


def _export_onnx(module: nn.Module, args: tuple[torch.Tensor, ...], path: str, inputs: list[str],
                 outputs: list[str], dynamic: dict[str, dict[int, Any]]) -> None:
    import warnings

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module.eval(), args, input_names=inputs, output_names=outputs,
                                    dynamic_shapes=dynamic, dynamo=True, verbose=False)
    assert program is not None
    with atomic_write(path) as f:
        f.write(program.model_proto.SerializeToString())


# ---- export --------------------------------------------------------------------------------------

def export_model(checkpoint: str, out: str, weights: str | None = None, overwrite: bool = False,
                 int8: str | None = None, log: Callable[[str], object] = print) -> dict[str, str]:
    """Write the export folder of `checkpoint` into `out`; returns {file name: path}.

    `weights`: a local .pth of the frozen pretrained backbone, for a checkpoint that leaves it out (coco)
    on a machine that cannot download it. An `out` holding an earlier export is refused unless
    `overwrite`, which moves it into out/previous-<timestamp>/. `int8`: a folder of images (the
    training images) to calibrate a statically quantized encoder.int8.onnx on (quantize_encoder)."""
    from safetensors.torch import save

    encoder, decoder, vocab, config = load_captioner(checkpoint, "cpu", weights)
    present = [n for n in (*FILES, INT8, "README.md") if os.path.exists(os.path.join(out, n))]
    if present and not overwrite:
        raise FileExistsError(f"{out} already holds an export ({', '.join(present)}): give another --out, or "
                              f"--overwrite to move it into {out}/previous-<timestamp>/")
    os.makedirs(out, exist_ok=True)
    if present:
        move_aside(out, (*FILES, INT8, "README.md"), log, what="the previous export")
    grid = config.decoder == "attention"
    paths = {name: os.path.join(out, name) for name in FILES}
    tensors = {f"encoder.{k}": v.detach().contiguous().clone() for k, v in encoder.state_dict().items()}
    tensors.update({f"decoder.{k}": v.detach().contiguous().clone() for k, v in decoder.state_dict().items()})
    with atomic_write(paths["model.safetensors"]) as f:
        f.write(save(tensors, metadata={"format": "pt", "captioning_format": str(FORMAT)}))
    atomic_write_json(paths["vocab.json"], vocab.words(), indent=1)
    atomic_write_json(paths["config.json"], {
        "format": FORMAT, "config": config.hyperparameters(), "decoder": config.decoder,
        "feature_kind": "grid" if grid else "pooled", "vocab_size": len(vocab),
        "image_size": config.crop_size, "resize_size": config.resize_size,
        "normalize": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}, **_names(grid)}, indent=1)
    batch = torch.export.Dim("batch", min=1)
    images = torch.zeros(2, 3, config.crop_size, config.crop_size)
    start = _Start(encoder, decoder)
    names = _names(grid)
    log(f"exporting encoder.onnx ({config.backbone} at {config.crop_size} px) and decoder_step.onnx ...")
    _export_onnx(start, (images,), paths["encoder.onnx"], names["encoder_inputs"], names["encoder_outputs"],
                 {"images": {0: batch}})
    with torch.no_grad():
        first = start(images)
    state = first[1:]
    axis = 0 if grid else 1                    # LSTMCell's h, c are (B, H); nn.LSTM's (layers, B, H)
    dynamic: dict[str, dict[int, Any]] = {"tokens": {0: batch}, "h": {axis: batch}, "c": {axis: batch}}
    if grid:
        dynamic["grid"] = {0: batch}
    _export_onnx(_Step(decoder), (torch.ones(2, dtype=torch.long), *state), paths["decoder_step.onnx"],
                 names["step_inputs"], names["step_outputs"], dynamic)
    if int8:
        log(f"quantizing the encoder to int8, calibrated on up to {CALIBRATION_IMAGES} images of {int8}")
        paths["encoder.int8.onnx"] = quantize_encoder(out, int8, config, log=log)
    paths["README.md"] = _write_card(checkpoint, out, config, len(vocab), sorted(paths), log)
    log(f"exported {checkpoint} to {out}: {', '.join(sorted(paths))}")
    return paths


def _write_card(checkpoint: str, out: str, config: Config, vocab_size: int, files: list[str],
                log: Callable[[str], object]) -> str:
    """out/README.md: the run's model card (the README.md training wrote beside the checkpoint, modelcard.py)
    with what this export holds and how to load it. Without such a card (a checkpoint moved on its own, or a
    run from before cards) one is made from the checkpoint, the hardware and wall time unknown. The card's
    evaluation is kept only when it was of this very checkpoint file: best.ckpt's scores are not last.ckpt's."""
    from .checkpoint import load_checkpoint
    from .modelcard import CARD_NAME, read_card_info, training_info, write_card

    ckpt = load_checkpoint(checkpoint)
    name = os.path.basename(checkpoint)
    info = read_card_info(os.path.join(os.path.dirname(os.path.abspath(checkpoint)), CARD_NAME))
    if info is None:
        log(f"no model card beside {checkpoint}: the export's README.md is made from the checkpoint alone")
        info = {"training": training_info(config, vocab_size, step=ckpt["step"], epoch=ckpt["epoch"], device=None,
                                          wall_seconds=None, train_images=None, val_images=None,
                                          init_from=ckpt.get("init_from"))}
    evaluation = info.get("evaluation")
    if evaluation and evaluation.get("checkpoint") != name:
        log(f"the model card's scores are {evaluation.get('checkpoint')}'s, not {name}'s: left out of the export's")
        info = {k: v for k, v in info.items() if k != "evaluation"}
    info["export"] = {"checkpoint": name, "epoch": ckpt["epoch"], "step": ckpt["step"], "files": files,
                      "int8": INT8 in files}
    return write_card(out, info)


# ---- loading -------------------------------------------------------------------------------------

def quantize_encoder(folder: str, images: str, config: Config, count: int = CALIBRATION_IMAGES,
                     log: Callable[[str], object] = print) -> str:
    """folder/encoder.onnx -> folder/encoder.int8.onnx, its convolutions statically quantized to int8 (QDQ,
    per channel) by ONNX Runtime, calibrated on the first `count` images of the folder `images` through
    eval_transform. Only the convolutions: they are the CNN's time, and the decoder's first step keeps
    fp32. Dynamic quantization would not help here: it quantizes matrix products, not convolutions."""
    from onnxruntime.quantization import (  # type: ignore[import-untyped]
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    from .data import eval_transform
    from .images import list_images, load_image

    names = list_images(images)[:count] if os.path.isdir(images) else []
    if not names:
        raise FileNotFoundError(f"--int8 {images}: no images there to calibrate the int8 encoder on")
    transform = eval_transform(config.resize_size, config.crop_size)

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(range(0, len(names), 16))

        def get_next(self) -> dict[str, np.ndarray] | None:
            start = next(self.items, None)
            if start is None:
                return None
            batch = [transform(load_image(os.path.join(images, n))) for n in names[start:start + 16]]
            return {"images": torch.stack(batch).numpy()}

    source, target = os.path.join(folder, "encoder.onnx"), os.path.join(folder, INT8)
    prepared = target + ".prepared.onnx"
    try:
        quant_pre_process(source, prepared, skip_symbolic_shape=True)
        quantize_static(prepared, target, Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, op_types_to_quantize=["Conv"])
    finally:
        if os.path.exists(prepared):
            os.remove(prepared)
    log(f"quantized the encoder's convolutions to int8, calibrated on {len(names)} images of {images}: {target}")
    return target


class ExportError(ValueError):
    """An export folder that is incomplete or inconsistent: the message names the file."""


def _read_json(folder: str, name: str) -> Any:
    path = os.path.join(folder, name)
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise ExportError(f"{path} is missing: {folder} is not a complete export (python -m captioning export "
                          f"writes {', '.join(FILES)})") from None
    except (OSError, ValueError) as e:
        raise ExportError(f"{path} cannot be read as JSON ({e})") from None


def read_export(folder: str) -> tuple[dict[str, Any], Vocab, Config]:
    """(config.json, the vocabulary, the Config) of an export folder, checked against each other."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"no export folder at {folder}")
    meta = _read_json(folder, "config.json")
    words = _read_json(folder, "vocab.json")
    if not isinstance(meta, dict) or "config" not in meta or "vocab_size" not in meta:
        raise ExportError(f"{os.path.join(folder, 'config.json')} is not an export's config (no 'config' or "
                          f"'vocab_size')")
    if meta.get("format", 0) > FORMAT:
        raise ExportError(f"{os.path.join(folder, 'config.json')} is format {meta.get('format')}; this version "
                          f"reads up to {FORMAT}: update the project")
    if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
        raise ExportError(f"{os.path.join(folder, 'vocab.json')} is not a list of words")
    if len(words) != meta["vocab_size"]:
        raise ExportError(f"{os.path.join(folder, 'vocab.json')} holds {len(words)} words, but config.json says "
                          f"the model predicts {meta['vocab_size']}")
    for name in FILES:
        if not os.path.isfile(os.path.join(folder, name)):
            raise ExportError(f"{os.path.join(folder, name)} is missing: {folder} is not a complete export")
    return meta, Vocab.from_words(words), get_config(saved=meta["config"])


def load_exported(folder: str, runtime: str = "torch", device: str | torch.device = "cpu"
                  ) -> tuple[Any, Any, Vocab, Config]:
    """(encoder, decoder, vocab, config) from an export folder, as load_captioner gives them from a checkpoint.

    runtime "torch": the library's modules with model.safetensors' weights; "onnx": ONNX Runtime running
    encoder.onnx and decoder_step.onnx (on the CPU), behind the same interface; "onnx-int8": the same with
    the int8 encoder (export --int8)."""
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
    meta, vocab, config = read_export(folder)
    if runtime in ("onnx", "onnx-int8"):
        if runtime == "onnx-int8" and not os.path.isfile(os.path.join(folder, INT8)):
            raise ExportError(f"{os.path.join(folder, INT8)} is missing: export with --int8 IMAGES_DIR to quantize "
                              f"the encoder")
        return (OnnxEncoder(folder, meta, INT8 if runtime == "onnx-int8" else "encoder.onnx"),
                OnnxDecoder(folder, meta, config), vocab, config)
    from safetensors.torch import load_file

    path = os.path.join(folder, "model.safetensors")
    try:
        tensors = load_file(path)
    except Exception as e:
        raise ExportError(f"{path} cannot be read as safetensors ({type(e).__name__}: {e})") from None
    encoder, decoder = build_models(config, len(vocab), weights=None)
    for prefix, module in (("encoder.", encoder), ("decoder.", decoder)):
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        try:
            module.load_state_dict(state, strict=True)
        except RuntimeError as e:
            first = str(e).strip().splitlines()[0][:200]
            raise ExportError(f"{path} does not match config.json's model ({first}...)") from None
    device = torch.device(device)
    return encoder.to(device).eval(), decoder.to(device).eval(), vocab, config


def _session(path: str) -> Any:
    try:
        import onnxruntime as ort  # type: ignore[import-untyped]
    except ImportError:
        raise ImportError(f"--runtime onnx needs ONNX Runtime, which is not installed: {INSTALL_ONNX}") from None
    options = ort.SessionOptions()
    options.log_severity_level = 3
    # ONNX Runtime's threads spin for a while after each run by default, taking the cores from whatever runs
    # next: the other graph (encoder, then decoder steps) or PyTorch in the same process. They sleep instead.
    options.intra_op_num_threads = torch.get_num_threads()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise ExportError(f"{path} cannot be loaded by ONNX Runtime ({type(e).__name__}: "
                          f"{str(e).strip()[:200]})") from None


class OnnxEncoder:
    """encoder.onnx behind the encoder's call: images -> every output of the first step, packed in one
    (B, N) tensor that OnnxDecoder.init_state unpacks (the library's searches pass "features" through)."""

    def __init__(self, folder: str, meta: dict[str, Any], file: str = "encoder.onnx") -> None:
        self.session = _session(os.path.join(folder, file))
        self.outputs = meta["encoder_outputs"]
        self.layered = meta["feature_kind"] == "pooled"      # nn.LSTM's h, c are (layers, B, H); LSTMCell's (B, H)

    def eval(self) -> "OnnxEncoder":
        return self

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        values = self.session.run(self.outputs, {"images": images.detach().cpu().numpy().astype(np.float32)})
        B = images.size(0)
        rows = [np.moveaxis(v, 1, 0) if self.layered and name in ("h", "c") else v
                for name, v in zip(self.outputs, values)]
        return torch.from_numpy(np.concatenate([r.reshape(B, -1) for r in rows], 1))


class OnnxDecoder:
    """decoder_step.onnx behind the library's Decoder interface (captioning.decoding): init_state unpacks
    what OnnxEncoder gave, step runs one ONNX step, reorder_state picks rows; beam_search, greedy_search,
    score_sequences and sample() are the library's."""

    def __init__(self, folder: str, meta: dict[str, Any], config: Config) -> None:
        self.session = _session(os.path.join(folder, "decoder_step.onnx"))
        self.inputs, self.outputs = meta["step_inputs"], meta["step_outputs"]
        self.feature_kind, self.max_seq_len = meta["feature_kind"], config.max_seq_len
        self.vocab_size = meta["vocab_size"]
        self.layers, self.hidden = config.num_layers, config.hidden_layer_size
        self.grid = meta["feature_kind"] == "grid"
        self.embedding = config.embedding_size

    def eval(self) -> "OnnxDecoder":
        return self

    def _unpack(self, packed: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        B, V, H = packed.size(0), self.vocab_size, self.hidden
        layers = 1 if self.grid else self.layers
        log_probs = packed[:, :V]
        h = packed[:, V:V + layers * H].reshape(B, layers, H)
        c = packed[:, V + layers * H:V + 2 * layers * H].reshape(B, layers, H)
        state: tuple[torch.Tensor, ...] = (h, c)
        if self.grid:
            state += (packed[:, V + 2 * layers * H:].reshape(B, -1, self.embedding),)
        return log_probs, state

    def init_state(self, packed: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """State rows are images: h, c (B, layers, H) (an LSTMCell's have no layer axis: layers 1), [grid]."""
        return self._unpack(packed)

    def step(self, token_ids: torch.Tensor, state: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, tuple[Any, ...]]:
        h, c, *grid = state
        feed = {"tokens": token_ids.cpu().numpy().astype(np.int64)}
        for name, value in zip(("h", "c"), (h, c)):
            array = value.cpu().numpy()
            feed[name] = array[:, 0] if self.grid else np.ascontiguousarray(np.moveaxis(array, 1, 0))
        if grid:
            feed["grid"] = grid[0].cpu().numpy()
        out = dict(zip(self.outputs, self.session.run(self.outputs, feed)))
        if self.grid:
            h_new, c_new = torch.from_numpy(out["h_next"][:, None]), torch.from_numpy(out["c_next"][:, None])
        else:
            h_new, c_new = (torch.from_numpy(np.ascontiguousarray(np.moveaxis(out[k], 1, 0)))
                            for k in ("h_next", "c_next"))
        self.last_alpha = torch.from_numpy(out["alpha"]) if self.grid else None
        return torch.from_numpy(out["log_probs"]), (h_new, c_new, *grid)

    def reorder_state(self, state: tuple[torch.Tensor, ...], index: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(part[index] for part in state)

    def __call__(self, packed: torch.Tensor, captions: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        """Teacher forcing by stepping (for score_sequences): packed like the eager decoders' logits."""
        log_probs, state = self.init_state(packed)
        steps = [log_probs]
        for t in range(1, max(lengths)):
            log_probs, state = self.step(captions[:, t - 1], state)
            steps.append(log_probs)
        return pack_padded_sequence(torch.stack(steps, 1), lengths, batch_first=True).data

    forward = __call__

    @torch.no_grad()
    def sample(self, packed: torch.Tensor) -> torch.Tensor:
        """Greedy ids (B, max_seq_len), <pad> after <end>, as LSTMModel.sample gives them up to <end>."""
        ids = greedy_search(cast(Decoder, self), packed)
        out = torch.zeros(len(ids), self.max_seq_len, dtype=torch.long)
        for row, seq in enumerate(ids):
            out[row, :len(seq)] = torch.tensor(seq)
        return out

    def beam_search(self, packed: torch.Tensor, beam_size: int = 3, length_penalty: float | None = None,
                    end_id: int = END_ID) -> list[list[int]]:
        from .decoding import LENGTH_PENALTY

        return beam_search(cast(Decoder, self), packed, beam_size,
                           LENGTH_PENALTY if length_penalty is None else length_penalty, end_id)


def load_model(checkpoint: str | None = None, model: str | None = None, runtime: str = "torch",
               device: str | torch.device = "cpu", weights: str | None = None) -> tuple[Any, Any, Vocab, Config]:
    """The captioner of --checkpoint CKPT or --model DIR (exactly one), on `runtime` (torch or onnx)."""
    if (checkpoint is None) == (model is None):
        raise ValueError("give exactly one of --checkpoint CKPT and --model DIR (an exported folder)")
    if checkpoint is not None:
        if runtime != "torch":
            raise ValueError(f"--runtime {runtime} runs an exported folder: export the checkpoint first "
                             f"(python -m captioning export --checkpoint {checkpoint} --out DIR), then --model DIR")
        return load_captioner(checkpoint, device, weights)
    assert model is not None
    return load_exported(model, runtime, device)


__all__: Sequence[str] = ("export_model", "load_exported", "load_model", "read_export", "OnnxEncoder",
                          "OnnxDecoder", "ExportError", "RUNTIMES")
