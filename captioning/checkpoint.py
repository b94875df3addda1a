"""The checkpoint: the one model builder, and the .ckpt file's writer and readers.

A checkpoint is a plain dict of tensors and builtins, written atomically:

    {"config": {...}, "vocab": [words...], "encoder": state_dict, "decoder": state_dict,
     "backbone": {"name", "weights", "trained", "included"}, "optimizer": ..., "scaler": ...,
     "epoch": int, "batch": int (within the epoch), "step": int, "best_val_loss": float,
     "rng": {"torch", "cuda", "numpy", "python"}, "world_size": int,
     "data": {"train_captions_sha1"}, "schema": SCHEMA}
    (+ "best_val_cider" and "init_from" {"path", "step", "objective"} for a self-critical run)

`included` says whether the encoder state holds the ResNet: a frozen torchvision-pretrained
backbone is rebuilt from its weights id instead. `load_checkpoint` uses
torch.load(weights_only=True), so a checkpoint cannot run code, and maps everything to the
CPU unless told otherwise (a CUDA checkpoint loads anywhere).
"""
import errno
import hashlib
import math
import os
import random
import shutil
from collections.abc import Mapping
from typing import IO, Any, TypeVar

import numpy as np
import torch

from .atomic import atomic_write, interrupts_deferred
from .backbone import STANDIN
from .config import Config, get_config
from .model import CNNModel, LSTMModel
from .standin import find_standin, standin_path
from .vocabulary import Vocab

# The checkpoint's layout version: 2 added "schema" and "data". A newer one is refused by name rather
# than misread; an older one (no "schema") still loads.
SCHEMA = 2
_PREFIXES = ("module.", "_orig_mod.")  # added by DistributedDataParallel and torch.compile
_V = TypeVar("_V")


def strip_prefixes(state_dict: Mapping[str, _V]) -> dict[str, _V]:
    out = {}
    for key, value in state_dict.items():
        changed = True
        while changed:
            changed = False
            for prefix in _PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        out[key] = value
    return out


def write_failed(error: BaseException, path: str, folder: str | None = None) -> Exception:
    """The error to raise when writing `path` failed: one line that names the file and says why.

    A full disk says so ("no space left on device writing PATH"); torch's zip writer reports one as
    "[enforce fail at inline_container.cc:...] . unexpected pos ..." or "file write failed", which
    names nothing: its OSError is taken from the exception's chain when it is there, and otherwise
    a folder with no space left is taken as the reason."""
    link: BaseException | None = error
    depth = 0
    while link is not None and not (isinstance(link, OSError) and link.errno) and depth < 20:
        link, depth = link.__cause__ or link.__context__, depth + 1
    cause = link if isinstance(link, OSError) and link.errno else None
    if cause is None and isinstance(error, RuntimeError) and _is_write_failure(error):
        try:
            if shutil.disk_usage(folder or os.path.dirname(os.path.abspath(path))).free < 1 << 20:
                cause = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError:
            pass
    if cause is not None and cause.errno == errno.ENOSPC:
        return os_error(errno.ENOSPC, f"no space left on device writing {path}")
    if cause is not None:
        return os_error(cause.errno, f"{(cause.strerror or str(cause)).rstrip('.')} writing {path}", type(cause))
    if isinstance(error, OSError):           # no errno: its message is all there is
        return os_error(None, f"{str(error).rstrip('.')} writing {path}", type(error))
    reason = (str(error).strip().splitlines() or [""])[0][:200]
    return RuntimeError(f"writing {path} failed ({type(error).__name__}: {reason})")


def os_error(code: int | None, message: str, kind: type[OSError] = OSError) -> OSError:
    """An OSError (of `kind`, e.g. PermissionError) with this errno whose str() is `message` alone."""
    try:
        error = kind(message)
    except TypeError:
        error = OSError(message)
    error.errno = code
    return error


def _is_write_failure(error: BaseException) -> bool:
    text = str(error)
    return "unexpected pos" in text or "file write failed" in text or "PytorchStreamWriter failed" in text


class _WriteErrors:
    """A file object that remembers the OSError its write raised: torch's zip writer replaces it with a
    RuntimeError that does not say what went wrong."""

    def __init__(self, f: IO[bytes]) -> None:
        self.f = f
        self.error: OSError | None = None

    def write(self, b: bytes) -> int:
        try:
            return self.f.write(b)
        except OSError as e:
            self.error = e
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self.f, name)


def atomic_save(obj: object, path: str) -> str:
    """torch.save, all or nothing: temp file, fsync, rename; a Ctrl-C waits until it is done.

    A write that fails (a full disk, a quota, an I/O error) leaves the previous file as it was and
    raises one line that names `path` and the reason (write_failed)."""
    out = None
    try:
        with interrupts_deferred(), atomic_write(path) as f:
            out = _WriteErrors(f)
            torch.save(obj, out)
    except (OSError, RuntimeError) as e:
        if out is not None and out.error is not None and out.error is not e:
            raise write_failed(out.error, path) from e
        raise write_failed(e, path) from e
    return path


def atomic_copy(src: str, dst: str) -> str:
    """Copy `src` to `dst` with the same all-or-nothing guarantee (used for best.ckpt)."""
    try:
        with interrupts_deferred(), atomic_write(dst) as out, open(src, "rb") as f:
            shutil.copyfileobj(f, out)
    except OSError as e:
        if e.filename == src:                   # reading, not writing, failed: its own message names src
            raise
        raise write_failed(e, dst) from e
    return dst


def load_checkpoint(path: str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path} (train one with notebook 06 or "
                                f"`python -m captioning train`)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # a text file, a truncated copy, a pickle of other objects
        reason = (str(e).strip().splitlines() or [""])[0][:160]
        raise RuntimeError(f"{path} is not a loadable checkpoint ({type(e).__name__}: {reason})") from e
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path} is not a captioning checkpoint (it holds {type(ckpt).__name__}, not a dict)")
    schema = ckpt.get("schema", 1)
    if not isinstance(schema, int) or schema > SCHEMA:
        raise ValueError(f"{path} was written by a newer version of this project (checkpoint schema {schema!r}; "
                         f"this one reads up to {SCHEMA}): update it (git pull, then make) to load this file")
    for key, kind in (("config", dict), ("vocab", list), ("encoder", dict), ("decoder", dict)):
        if key not in ckpt:
            raise ValueError(f"{path} is not a captioning checkpoint: it has no {key!r} entry")
        if not isinstance(ckpt[key], kind):
            raise ValueError(f"{path}: its {key!r} entry is a {type(ckpt[key]).__name__}, not a {kind.__name__}")
    for key in ("encoder", "decoder"):
        ckpt[key] = strip_prefixes(ckpt[key])
    backbone = ckpt.get("backbone")
    if backbone is not None and not isinstance(backbone, dict):
        raise ValueError(f"{path}: its 'backbone' entry is a {type(backbone).__name__}, not a dict")
    if backbone is not None and "included" not in backbone:   # written before checkpoints said so
        backbone["included"] = any(k.startswith("resnet_module.") for k in ckpt["encoder"])
    return ckpt


_FROM_CONFIG = object()


def build_models(config: Config, vocab_size: int, weights: Any = _FROM_CONFIG) -> tuple[CNNModel, Any]:
    """(encoder, decoder) with every size from `config`: training and loading build the same shapes.

    config.decoder "lstm": the chapter's (CNNModel, LSTMModel); "attention": (GridCNNModel,
    AttentionDecoder) from captioning.attention.

    `weights` defaults to config.weights; weights="standin" needs ensure_standin first.
    """
    weights = config.weights if weights is _FROM_CONFIG else weights
    if weights == STANDIN:
        found = find_standin(config)
        if found is None:
            raise FileNotFoundError(f"the stand-in backbone {standin_path(config)} is not built yet: run notebook 05, "
                                    f"or captioning.standin.ensure_standin(config), or train() which builds it")
        weights = found
    if config.decoder == "attention":
        from .attention import AttentionDecoder, GridCNNModel, grid_cells
        layer = config.resolved_grid_layer
        encoder: CNNModel = GridCNNModel(config.embedding_size, config.backbone, weights, config.train_backbone, layer,
                                         grid_cells(config.crop_size, layer) if config.grid_position else 0)
        decoder: Any = AttentionDecoder(config.embedding_size, config.hidden_layer_size, vocab_size,
                                        config.attention_size, config.max_seq_len, config.dropout, config.alpha_c)
        return encoder, decoder
    encoder = CNNModel(config.embedding_size, config.backbone, weights, config.train_backbone)
    decoder = LSTMModel(config.embedding_size, config.hidden_layer_size, vocab_size, config.num_layers,
                        config.max_seq_len)
    return encoder, decoder


def data_identity(config: Config) -> dict[str, str]:
    """What the run's data is, by content, not by path: the SHA-1 of its training captions file
    (a resume on other data is refused, rundir.resume_config)."""
    digest = hashlib.sha1()
    with open(config.captions_json("train"), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"train_captions_sha1": digest.hexdigest()}


def checkpoint_state(config: Config, vocab: Vocab, encoder: CNNModel, decoder: LSTMModel,
                     optimizer: torch.optim.Optimizer | None = None, scaler: torch.amp.GradScaler | None = None,
                     epoch: int = 0, batch: int = 0, step: int = 0, best_val_loss: float = math.inf,
                     world_size: int = 1, data: Mapping[str, str] | None = None,
                     extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The plain dict written to a .ckpt (tensors and builtins only: loads with weights_only=True).

    `world_size`: the number of processes that trained it; with the batch size, it says which items
    of the epoch `batch` batches were, which a resume skips. `data`: data_identity of its data.
    `extra`: more entries (builtins), such as a self-critical run's best validation CIDEr and the
    checkpoint it started from."""
    # A frozen pretrained backbone is rebuilt from its weights id at load time; a random, trained
    # or stand-in one (a file of this machine's) travels in the checkpoint.
    keep_backbone = encoder.train_backbone or encoder.weights_id is None or config.weights == STANDIN
    encoder_state = {k: v for k, v in encoder.state_dict().items()
                     if keep_backbone or not k.startswith("resnet_module.")}
    return {
        "config": config.hyperparameters(), "vocab": vocab.words(),
        "encoder": encoder_state, "decoder": decoder.state_dict(),
        "backbone": {"name": encoder.backbone_name, "weights": encoder.weights_id,
                     "trained": encoder.train_backbone, "included": keep_backbone},
        "optimizer": optimizer.state_dict() if optimizer else None,
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        "epoch": epoch, "batch": batch, "step": step, "best_val_loss": best_val_loss, "rng": _rng_state(),
        "world_size": world_size, "data": data, "schema": SCHEMA, **(extra or {}),
    }


def _rng_state() -> dict[str, Any]:
    """Every random generator's state, so a resumed run draws what the uninterrupted one would."""
    state = np.random.get_state()
    assert isinstance(state, tuple)        # legacy=True, the default: ("MT19937", keys, pos, has_gauss, gauss)
    _, keys, pos, has_gauss, gauss = state
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
            "python": list(random.getstate()[1])}


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate((3, tuple(state["python"]), None))


def restore_training_state(path: str, vocab: Vocab, encoder: CNNModel, decoder: LSTMModel,
                           optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                           device: str | torch.device, best: str = "best_val_loss",
                           default: float = math.inf) -> tuple[int, int, int, float, dict[str, Any] | None]:
    """Load last.ckpt into a run being resumed; returns (epoch, batch in epoch, step, the best validation
    value under the key `best` (`default` when absent), the checkpoint the run started from or None)."""
    ckpt = load_checkpoint(path, map_location=device)
    if ckpt["vocab"] != vocab.words():
        raise ValueError(f"{path} was trained with a different vocabulary than this run's vocabulary.pkl")
    load_encoder_state(encoder, ckpt)
    decoder.load_state_dict(ckpt["decoder"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    _set_rng_state(ckpt["rng"])
    return ckpt["epoch"], ckpt["batch"], ckpt["step"], ckpt.get(best, default), ckpt.get("init_from")


def load_encoder_state(encoder: CNNModel, ckpt: Mapping[str, Any]) -> None:
    """Load a checkpoint's encoder state; a frozen pretrained backbone is not in it (rebuilt from its weights)."""
    missing, unexpected = encoder.load_state_dict(ckpt["encoder"], strict=False)
    allowed_missing = () if ckpt["backbone"]["included"] else ("resnet_module.",)
    bad = [k for k in missing if not k.startswith(allowed_missing)]
    if bad or unexpected:
        raise ValueError(f"checkpoint does not match the encoder: missing {bad[:5]}, unexpected {unexpected[:5]}")


def load_captioner(path: str, device: str | torch.device = "cpu",
                   weights: str | None = None) -> tuple[CNNModel, LSTMModel, Vocab, Config]:
    """(encoder, decoder, vocab, config) from one .ckpt, in eval mode on `device`.

    Nothing is repeated from training: the config and the vocabulary come from the file.
    A frozen pretrained backbone is rebuilt from its weights id, or from `weights`
    (a local .pth file) on a machine that cannot download it.
    """
    ckpt = load_checkpoint(path)
    backbone = ckpt.get("backbone")
    if backbone is None:
        raise ValueError(f"{path} has no 'backbone' entry (which ResNet, whether trained): it was not written by "
                         f"this project's train(); re-train, or rebuild the encoder by hand from its state dict")
    for key in ("name", "trained", "weights"):
        if key not in backbone:
            raise ValueError(f"{path}: its 'backbone' entry has no {key!r}: re-train, or rebuild the encoder by hand")
    if "linear_layer.weight" not in ckpt["decoder"]:
        raise ValueError(f"{path}: its 'decoder' state has no 'linear_layer.weight': not this project's LSTMModel")
    config = get_config(saved=ckpt["config"])
    vocab = Vocab.from_words(ckpt["vocab"])
    config.backbone, config.train_backbone = backbone["name"], backbone["trained"]
    # the backbone in the file (trained, random or stand-in), or rebuilt from its pretrained weights
    backbone_weights = None if backbone["included"] else weights or backbone["weights"]
    encoder, decoder = build_models(config, len(vocab), backbone_weights)
    load_encoder_state(encoder, ckpt)
    if decoder.linear_layer.out_features != ckpt["decoder"]["linear_layer.weight"].shape[0]:
        raise ValueError(f"{path}: vocabulary ({len(vocab)} words) does not match the decoder")
    decoder.load_state_dict(ckpt["decoder"])
    device = torch.device(device)
    return encoder.to(device).eval(), decoder.to(device).eval(), vocab, config
