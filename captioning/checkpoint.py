"""Self-contained checkpoints: a plain dict of tensors and builtins, written atomically.

    {"config": {...}, "vocab": [words...], "encoder": state_dict, "decoder": state_dict,
     "backbone": {"name", "weights", "trained"}, "optimizer": ..., "scaler": ...,
     "epoch": int, "step": int, "best_val_loss": float, "rng": {...}}

`load_checkpoint` uses torch.load(weights_only=True), so a checkpoint cannot run code,
and maps everything to the CPU unless told otherwise (a CUDA checkpoint loads anywhere).
"""
import contextlib
import os
import shutil
import signal
import threading

import torch

from .atomic import atomic_write

_PREFIXES = ("module.", "_orig_mod.")  # added by DistributedDataParallel and torch.compile


def strip_prefixes(state_dict):
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


@contextlib.contextmanager
def interrupts_deferred():
    """Hold Ctrl-C (SIGINT) until the block has finished, then deliver it.

    A KeyboardInterrupt raised inside torch.save leaves its zip writer broken, and the next
    save fails with a cryptic "unexpected pos" error: the interrupted run would lose its state.
    Outside the main thread signals cannot be handled, and the block runs as it is.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(frame))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received and callable(previous):
        previous(signal.SIGINT, received[-1])          # default_int_handler raises KeyboardInterrupt


def atomic_save(obj, path):
    """torch.save, all or nothing: temp file, fsync, rename; a Ctrl-C waits until it is done."""
    with interrupts_deferred(), atomic_write(path) as f:
        torch.save(obj, f)
    return path


def atomic_copy(src, dst):
    """Copy `src` to `dst` with the same all-or-nothing guarantee (used for best.ckpt)."""
    with interrupts_deferred(), atomic_write(dst) as out, open(src, "rb") as f:
        shutil.copyfileobj(f, out)
    return dst


def load_checkpoint(path, map_location="cpu"):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path} (train one with notebook 06 or "
                                f"`python -m captioning train`)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise RuntimeError(f"{path} is not a loadable checkpoint: {type(e).__name__}: {e}") from e
    missing = [k for k in ("config", "vocab", "encoder", "decoder") if k not in ckpt]
    if missing:
        raise ValueError(f"{path} is not a captioning checkpoint (missing {missing})")
    for key in ("encoder", "decoder"):
        ckpt[key] = strip_prefixes(ckpt[key])
    return ckpt


def load_encoder_state(encoder, ckpt):
    """Load a checkpoint's encoder state; a frozen pretrained backbone is not in it (rebuilt from its weights)."""
    missing, unexpected = encoder.load_state_dict(ckpt["encoder"], strict=False)
    allowed_missing = () if ckpt["backbone"]["included"] else ("resnet_module.",)
    bad = [k for k in missing if not k.startswith(allowed_missing)]
    if bad or unexpected:
        raise ValueError(f"checkpoint does not match the encoder: missing {bad[:5]}, unexpected {unexpected[:5]}")


def load_captioner(path, device="cpu", weights=None):
    """(encoder, decoder, vocab, config) from one .ckpt, in eval mode on `device`.

    Nothing is repeated from training: the config and the vocabulary come from the file.
    A frozen pretrained backbone is rebuilt from its weights id, or from `weights`
    (a local .pth file) on a machine that cannot download it.
    """
    from .config import config_from_dict
    from .model import CNNModel, LSTMModel
    from .vocabulary import Vocab

    ckpt = load_checkpoint(path)
    config = config_from_dict(ckpt["config"])
    vocab = Vocab.from_words(ckpt["vocab"])
    backbone = ckpt["backbone"]
    if backbone["included"]:
        backbone_weights = None  # the trained (or random) backbone is in the file
    else:
        backbone_weights = weights or backbone["weights"]
    encoder = CNNModel(config.embedding_size, backbone["name"], backbone_weights, backbone["trained"])
    load_encoder_state(encoder, ckpt)
    decoder = LSTMModel(config.embedding_size, config.hidden_layer_size, len(vocab), config.num_layers,
                        config.max_seq_len)
    if decoder.linear_layer.out_features != ckpt["decoder"]["linear_layer.weight"].shape[0]:
        raise ValueError(f"{path}: vocabulary ({len(vocab)} words) does not match the decoder")
    decoder.load_state_dict(ckpt["decoder"])
    device = torch.device(device)
    return encoder.to(device).eval(), decoder.to(device).eval(), vocab, config
