"""The book's own files, both ways: its encoder/decoder state dicts and `__main__.Vocab` pickle.

A reader who trained with the chapter's notebook has `encoder-5-3000.ckpt` and
`decoder-5-3000.ckpt` (bare `state_dict`s of its CNNModel and LSTMModel) and a
`vocabulary.pkl` pickled from the notebook (`__main__.Vocab`).

- `import_chapter` turns them into one of this project's self-contained checkpoints, which
  `caption`, `evaluate` and notebook 07 read. The state-dict keys are the same on both sides
  (`resnet_module.*`, `linear_layer.*`, `batch_norm.*`; `embedding_layer.*`, `lstm_layer.*`,
  `linear_layer.*`): model.py keeps the chapter's attribute names for this reason.
  Every size is read off the weights; a size given by hand that disagrees with them is an error.
- `export_chapter` writes what the chapter's inference cells load: the two state dicts (with
  the whole ResNet, also when the checkpoint left a frozen pretrained one out) and a pickle
  that `pickle.load` resolves to the notebook's own `Vocab` class.
"""
import os
import pickle
import re
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from .atomic import atomic_write, move_aside
from .config import get_config

# torch, nltk (vocabulary) and the checkpoint code are imported by the functions that use them,
# so that the CLI, which imports this module for its parser (BOOK), starts without them.
if TYPE_CHECKING:          # for the annotations only
    import torch

    from .vocabulary import Vocab

# The chapter's sizes: CNNModel(256), LSTMModel(256, 512, len(vocabulary), 1), max_seq_len=20.
BOOK = {"backbone": "resnet152", "embedding_size": 256, "hidden_size": 512, "num_layers": 1, "max_seq_len": 20}

# (block type, blocks in layer1..layer4) -> torchvision ResNet
_RESNETS: dict[tuple[str, tuple[int, ...]], str] = {
    ("basic", (2, 2, 2, 2)): "resnet18", ("basic", (3, 4, 6, 3)): "resnet34",
    ("bottleneck", (3, 4, 6, 3)): "resnet50", ("bottleneck", (3, 4, 23, 3)): "resnet101",
    ("bottleneck", (3, 8, 36, 3)): "resnet152"}


def _load_state_dict(path: str, what: str, required: Iterable[str]) -> "dict[str, torch.Tensor]":
    """A bare state dict of tensors from `path` (loaded weights_only), with DDP/compile prefixes removed."""
    import torch  # lazy, both: torch (see the note at the top)

    from .checkpoint import strip_prefixes

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} weights not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path} is not a loadable state dict: {type(e).__name__}: {e}") from e
    if isinstance(state, dict) and {"config", "vocab", "encoder", "decoder"} <= set(state):
        raise ValueError(f"{path} is already one of this project's checkpoints: use it as it is "
                         f"(--checkpoint), or export-chapter to get the book's files")
    if not isinstance(state, dict) or not state or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"{path} does not hold a state_dict of tensors (the book saves "
                         f"{what}_model.state_dict())")
    state = strip_prefixes(state)
    missing = [k for k in required if k not in state]
    if missing:
        raise ValueError(f"{path} is not the book's {what}: it has no {', '.join(missing)} "
                         f"(were --encoder and --decoder swapped?)")
    return state


def infer_backbone(encoder_state: "Mapping[str, torch.Tensor]", path: str = "the encoder") -> str:
    """The torchvision ResNet whose blocks `resnet_module.4..7.*` hold (the chapter's Sequential of its children)."""
    blocks: list[int] = []
    for layer in (4, 5, 6, 7):
        found = {int(m.group(1)) for k in encoder_state if (m := re.match(rf"resnet_module\.{layer}\.(\d+)\.", k))}
        blocks.append(max(found) + 1 if found else 0)
    if not any(blocks):
        raise ValueError(f"{path} holds no ResNet weights (resnet_module.*): the book's encoder file always does")
    kind = "bottleneck" if "resnet_module.4.0.conv3.weight" in encoder_state else "basic"
    name = _RESNETS.get((kind, tuple(blocks)))
    if name is None:
        raise ValueError(f"{path}: a ResNet with {kind} blocks {blocks} is none of {sorted(_RESNETS.values())}")
    return name


def infer_sizes(encoder_state: "Mapping[str, torch.Tensor]", decoder_state: "Mapping[str, torch.Tensor]",
                encoder_path: str = "the encoder", decoder_path: str = "the decoder") -> dict[str, Any]:
    """Every size the two state dicts fix: backbone, embedding, hidden, layers, vocabulary."""
    linear = encoder_state["linear_layer.weight"]                     # (embedding, resnet features)
    embedding = decoder_state["embedding_layer.weight"]               # (vocabulary, embedding)
    if linear.shape[0] != embedding.shape[1]:
        raise ValueError(f"{encoder_path} embeds images in {linear.shape[0]} numbers but {decoder_path} expects "
                         f"{embedding.shape[1]}: they are not from the same model")
    layers = sum(1 for k in decoder_state if re.fullmatch(r"lstm_layer\.weight_ih_l\d+", k))
    outputs = decoder_state["linear_layer.weight"].shape[0]
    if outputs != embedding.shape[0]:
        raise ValueError(f"{decoder_path}: its embedding has {embedding.shape[0]} words but its output layer "
                         f"{outputs}")
    backbone = infer_backbone(encoder_state, encoder_path)
    features = 2048 if backbone not in ("resnet18", "resnet34") else 512
    if linear.shape[1] != features:
        raise ValueError(f"{encoder_path}: linear_layer takes {linear.shape[1]} features, but its {backbone} "
                         f"gives {features}")
    return {"backbone": backbone, "embedding_size": linear.shape[0],
            "hidden_size": decoder_state["lstm_layer.weight_hh_l0"].shape[1], "num_layers": layers,
            "vocabulary_size": embedding.shape[0]}


def _check_vocabulary(vocab: Any, path: str) -> "Vocab":
    """The book's Vocab, checked: ids 0..n-1 both ways, the special tokens first."""
    from .vocabulary import SPECIAL_TOKENS, Vocab  # lazy: nltk (see the note at the top)

    n = len(vocab.w2i)
    if sorted(vocab.i2w) != list(range(n)) or any(vocab.w2i.get(w) != i for i, w in vocab.i2w.items()):
        raise ValueError(f"{path}: w2i and i2w disagree (ids must run 0..{n - 1} both ways)")
    if tuple(vocab.i2w[i] for i in range(min(n, 4))) != SPECIAL_TOKENS:
        raise ValueError(f"{path}: a vocabulary must start with {SPECIAL_TOKENS}, as the book's build_vocabulary "
                         f"adds them")
    return Vocab.from_words([vocab.i2w[i] for i in range(n)])


def _check_given_sizes(given: dict[str, Any], found: dict[str, Any], encoder_path: str, decoder_path: str,
                       log: Callable[[str], object]) -> None:
    """A size flag that disagrees with the weights is an error; sizes that differ from the book's are said."""
    for name, value in given.items():
        if value is not None and value != found[name]:
            source = encoder_path if name in ("backbone", "embedding_size") else decoder_path
            raise ValueError(f"--{name.replace('_', '-')} {value} disagrees with the weights, which say "
                             f"{found[name]} ({source}); leave the flag out to use what the weights say")
    differ = [f"{name.replace('_', ' ')} {found[name]} (the book: {BOOK[name]})" for name in given
              if given[name] is None and found[name] != BOOK[name]]
    if differ:
        log("inferred from the weights: " + ", ".join(differ))


def import_chapter(encoder_path: str, decoder_path: str, vocabulary_path: str, out: str, backbone: str | None = None,
                   embedding_size: int | None = None, hidden_size: int | None = None, num_layers: int | None = None,
                   max_seq_len: int | None = None, log: Callable[[str], object] = print,
                   overwrite: bool = False) -> dict[str, Any]:
    """The book's encoder/decoder .ckpt and vocabulary.pkl -> one checkpoint at `out`; returns its sizes.

    Sizes left as None are read off the weights (the book's, unless the weights say otherwise);
    one given that disagrees with the weights is a ValueError naming the flag. max_seq_len is
    not in the weights: the book's 20 unless given. An existing `out` is refused unless
    `overwrite`; then it is moved into a previous-<timestamp>/ folder beside it, never deleted.
    """
    # lazy: torch and nltk (see the note at the top)
    from .checkpoint import atomic_save, build_models, checkpoint_state
    from .vocabulary import load_vocabulary

    if os.path.isdir(out):
        raise ValueError(f"--out {out} is a folder: give the checkpoint's file name, e.g. {out}/chapter.ckpt")
    if os.path.lexists(out) and not overwrite:
        raise FileExistsError(f"--out {out} already exists: choose another name, or pass --overwrite to move "
                              f"it into a previous-<timestamp>/ folder beside it")
    vocab = _check_vocabulary(load_vocabulary(vocabulary_path), vocabulary_path)   # the restricted unpickler
    enc = _load_state_dict(encoder_path, "encoder", ("linear_layer.weight", "batch_norm.running_mean"))
    dec = _load_state_dict(decoder_path, "decoder", ("embedding_layer.weight", "lstm_layer.weight_hh_l0",
                                                     "linear_layer.weight"))
    found = infer_sizes(enc, dec, encoder_path, decoder_path)
    if found["vocabulary_size"] != len(vocab):
        raise ValueError(f"{vocabulary_path} has {len(vocab)} words but {decoder_path} was trained with "
                         f"{found['vocabulary_size']}: not the vocabulary of these weights")
    given = {"backbone": backbone, "embedding_size": embedding_size, "hidden_size": hidden_size,
             "num_layers": num_layers}
    _check_given_sizes(given, found, encoder_path, decoder_path, log)
    sizes = {**{k: found[k] for k in given}, "max_seq_len": max_seq_len or BOOK["max_seq_len"],
             "vocabulary_size": len(vocab)}
    # The book's backbone is in the encoder file, with BatchNorm statistics that drifted while
    # the chapter trained it in train mode: it travels in the checkpoint instead of being
    # rebuilt from ImageNet weights (weights=None: no download; everything is loaded below).
    config = get_config("coco", backbone=sizes["backbone"], weights=None, embedding_size=sizes["embedding_size"],
                        hidden_layer_size=sizes["hidden_size"], num_layers=sizes["num_layers"],
                        max_seq_len=sizes["max_seq_len"])
    encoder, decoder = build_models(config, len(vocab), weights=None)
    for module, weights, path in ((encoder, enc, encoder_path), (decoder, dec, decoder_path)):
        missing, unexpected = module.load_state_dict(weights, strict=False)
        if missing or unexpected:
            raise ValueError(f"{path} does not fit the chapter's {type(module).__name__}: missing {missing[:4]}, "
                             f"unexpected {unexpected[:4]}")
    state = checkpoint_state(config, vocab, encoder.eval(), decoder.eval())
    state["imported_from"] = {"encoder": os.path.abspath(encoder_path), "decoder": os.path.abspath(decoder_path),
                              "vocabulary": os.path.abspath(vocabulary_path)}
    move_aside(os.path.dirname(os.path.abspath(out)), [os.path.basename(out)], log, what=f"the existing {out}")
    atomic_save(state, out)
    log(f"wrote {out}: {sizes['backbone']}, embedding {sizes['embedding_size']}, hidden {sizes['hidden_size']}, "
        f"{sizes['num_layers']} layer(s), {len(vocab)} words, max_seq_len {sizes['max_seq_len']}")
    return sizes


def chapter_vocab_pickle(vocab: "Vocab") -> bytes:
    """Pickle bytes that load as the notebook's own `__main__.Vocab`, with `w2i`, `i2w` and `index`.

    pickle.dumps cannot name a class that this process has not defined in __main__, so the
    few opcodes around the attribute dict are written by hand (protocol 2): the class
    `__main__.Vocab`, an instance made without __init__, its __dict__ set from the state,
    exactly what pickling the chapter's Vocab in its notebook gives.
    """
    state = pickle.dumps({"w2i": dict(vocab.w2i), "i2w": dict(vocab.i2w), "index": vocab.index}, protocol=2)
    assert state[:2] == pickle.PROTO + b"\x02" and state[-1:] == pickle.STOP
    return (pickle.PROTO + b"\x02" + pickle.GLOBAL + b"__main__\nVocab\n" + pickle.EMPTY_TUPLE + pickle.NEWOBJ
            + state[2:-1] + pickle.BUILD + pickle.STOP)


def export_chapter(checkpoint: str, out_dir: str, weights: str | None = None, log: Callable[[str], object] = print,
                   overwrite: bool = False) -> dict[str, Any]:
    """One checkpoint -> out_dir/{encoder.ckpt, decoder.ckpt, vocabulary.pkl} for the book's inference cells.

    The encoder state is complete: a frozen pretrained ResNet the checkpoint left out is rebuilt
    from its weights (downloaded, or `weights`, a local .pth) and saved with it. A folder that
    already holds any of the three files is refused unless `overwrite`; then the old ones are
    moved into out_dir/previous-<timestamp>/ first, so that no export is a mix of two.
    Returns {"encoder", "decoder", "vocabulary": paths, "sizes": ...}.
    """
    from .checkpoint import atomic_save, load_captioner  # lazy: torch (see the note at the top)

    if os.path.isfile(out_dir):
        raise ValueError(f"--out {out_dir} is a file: give a folder for encoder.ckpt, decoder.ckpt, vocabulary.pkl")
    paths = {name: os.path.join(out_dir, name + ext) for name, ext in
             (("encoder", ".ckpt"), ("decoder", ".ckpt"), ("vocabulary", ".pkl"))}
    there = [os.path.basename(p) for p in paths.values() if os.path.lexists(p)]
    if there and not overwrite:
        raise FileExistsError(f"--out {out_dir} already holds an export ({', '.join(there)}): choose another "
                              f"folder, or pass --overwrite to move those into {out_dir}/previous-<timestamp>/")
    encoder, decoder, vocab, config = load_captioner(checkpoint, "cpu", weights)
    os.makedirs(out_dir, exist_ok=True)
    move_aside(out_dir, there, log, what="the previous export")
    atomic_save({k: v.contiguous() for k, v in encoder.state_dict().items()}, paths["encoder"])
    atomic_save(decoder.state_dict(), paths["decoder"])
    with atomic_write(paths["vocabulary"]) as f:
        f.write(chapter_vocab_pickle(vocab))
    sizes = {"backbone": config.backbone, "embedding_size": config.embedding_size,
             "hidden_size": config.hidden_layer_size, "num_layers": config.num_layers,
             "max_seq_len": config.max_seq_len, "vocabulary_size": len(vocab)}
    log(f"wrote {paths['encoder']}, {paths['decoder']} and {paths['vocabulary']}. In the book's notebook:")
    log(f"    encoder_model = CNNModel({config.embedding_size}).eval()")
    seq = f", max_seq_len={config.max_seq_len}" if config.max_seq_len != BOOK["max_seq_len"] else ""
    log(f"    decoder_model = LSTMModel({config.embedding_size}, {config.hidden_layer_size}, len(vocabulary), "
        f"{config.num_layers}{seq})")
    if config.backbone != BOOK["backbone"]:
        log(f"    (this encoder is a {config.backbone}: in CNNModel, build models.{config.backbone} instead of "
            f"models.resnet152)")
    return {**paths, "sizes": sizes}
