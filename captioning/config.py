"""One Config dataclass holds every knob; presets fill it for the tiny set and for COCO.

    cfg = get_config("tiny", epochs=3)      # preset + overrides
    cfg.vocabulary_path                     # data_dir/tiny/vocabulary.pkl
    get_config(saved=checkpoint["config"])  # a checkpoint's run
    get_config(PRESET, notebook=True, data_dir=DATA_DIR, ...)   # a notebook's parameters (None: the preset's)
"""
import ast
import dataclasses
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass
class Config:
    """Every knob; its defaults are the coco preset, the chapter's recipe."""
    preset: str = "coco"
    data_dir: str = "data_dir/coco"        # a COCO-layout folder: train2014/ val2014/ annotations/
    models_dir: str = ""                   # default: models_dir/<name of data_dir>
    # vocabulary and images
    vocab_threshold: int = 4
    max_seq_len: int = 20
    resize_size: int = 256                 # images are resized to size x size once, on disk
    crop_size: int = 224                   # then randomly cropped to this for training
    hflip: bool = True                     # horizontal flips (off for the tiny set: it has left/right)
    # model
    backbone: str = "resnet152"
    weights: str | None = "DEFAULT"        # "DEFAULT", an enum name, None, a local .pth file, or "standin"
    standin_steps: int = 5600              # weights="standin": pretraining steps on synthetic scenes (this one ships)
    standin_seed: int = 0
    train_backbone: bool = False
    embedding_size: int = 256
    hidden_layer_size: int = 512
    num_layers: int = 1
    decoder: str = "lstm"                  # "lstm": the chapter's; "attention": Show, Attend and Tell (attention.py)
    grid_layer: int = 0                    # attention: the ResNet stage whose map it reads; 0 = the deepest
                                           # at least 4 x 4 at crop_size (layer4 at 224 px, layer3 at 56)
    grid_position: bool = False            # attention: add a fixed code of each cell's place to its features
    attention_size: int = 512              # attention: the additive attention MLP's width
    alpha_c: float = 1.0                   # attention: weight of the doubly stochastic regularisation
    dropout: float = 0.5                   # attention: dropout before the word layer
    # objective
    objective: str = "xe"                  # "xe": the chapter's cross-entropy; "scst": self-critical training on
                                           # CIDEr-D (scst.py), started from an XE checkpoint (train --init-from)
    scst_samples: int = 5                  # scst: captions sampled per image
    scst_baseline: str = "mean"            # scst: "mean" of the image's other samples' rewards, or "greedy"
    scst_xe: float = 0.0                   # scst: weight of a cross-entropy term on one reference per image,
                                           # which keeps what the words mean while CIDEr-D is optimised
    # optimisation
    batch_size: int = 128
    lr: float = 1e-3
    backbone_lr: float = 1e-4              # only used when train_backbone=True
    lr_decay: float = 0.0                  # this share of the epochs, at the end, runs at a tenth of the
                                           # learning rates (0: constant, the chapter's)
    epochs: int = 5
    min_steps: int = 0                     # at least this many steps: a smaller set trains for more epochs
                                           # (0: exactly `epochs`); an explicit epochs turns it off
    group_by_image: bool = False           # one item = an image with all its captions (encoder runs once)
    max_steps: int = 0                     # 0 = no limit
    seed: int = 0
    # feature cache (frozen backbone only)
    cache: bool = True
    cache_kind: str = "views"              # "views": K pooled crops per image; "maps": crops pooled from feature maps
    cache_views: int = 2                   # K augmented views per training image (views cache)
    cache_jitter: float = 2.0              # views cache: mean of K views + this x another image's crop deviation
    # bookkeeping
    save_every: int = 1000
    log_every: int = 10
    keep_epoch: int = 2                    # early.ckpt: last.ckpt as it was after this epoch (0: none), whose
                                           # mistakes notebooks 07 and 08 show beside the final model's
    val_max_captions: int = 5000           # validation loss on at most this many captions
    heldout_images: int = 5000             # evaluation: the first N val images (0 = all), unless Karpathy's split
    num_workers: int = 2
    amp: bool = True                       # autocast on CUDA (bf16 where supported, else fp16)
    channels_last: bool = True             # CNN memory format on CUDA, and on a CPU for a frozen backbone
    device: str = ""                       # "" = cuda if available, else cpu
    progress: bool = True
    tensorboard: bool = True               # event files in models_dir/tb/ (tblog.py)

    def __post_init__(self) -> None:
        if not self.models_dir:
            self.models_dir = os.path.join("models_dir", os.path.basename(os.path.normpath(self.data_dir)))
        self.check()

    # field -> the smallest value it may take (a bad one would fail late, or train silently wrong)
    MINIMUMS = {"epochs": 1, "batch_size": 1, "log_every": 1, "max_seq_len": 3, "embedding_size": 1,
                "hidden_layer_size": 1, "num_layers": 1, "resize_size": 1, "crop_size": 1, "cache_views": 1,
                "val_max_captions": 1, "vocab_threshold": 1, "standin_steps": 1, "max_steps": 0, "min_steps": 0,
                "save_every": 0, "heldout_images": 0, "num_workers": 0, "keep_epoch": 0, "grid_layer": 0,
                "attention_size": 1, "scst_samples": 1}

    def check(self) -> None:
        """Range-check the fields, naming the one that is wrong: before any expensive work starts."""
        for name, least in self.MINIMUMS.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
        for name in ("lr", "backbone_lr"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0 < value < 10:
                raise ValueError(f"{name} must be a learning rate between 0 and 10, got {value!r}")
        if not isinstance(self.lr_decay, (int, float)) or isinstance(self.lr_decay, bool) \
                or not 0 <= self.lr_decay < 1:
            raise ValueError(f"lr_decay must be a share of the epochs from 0 up to (not including) 1, "
                             f"got {self.lr_decay!r}")
        if not isinstance(self.cache_jitter, (int, float)) or isinstance(self.cache_jitter, bool) \
                or not 0 <= self.cache_jitter <= 10:
            raise ValueError(f"cache_jitter must be a number from 0 to 10, got {self.cache_jitter!r}")
        if self.decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {DECODERS}, got {self.decoder!r}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.scst_baseline not in SCST_BASELINES:
            raise ValueError(f"scst_baseline must be one of {SCST_BASELINES}, got {self.scst_baseline!r}")
        if self.objective == "scst" and self.scst_baseline == "mean" and self.scst_samples < 2:
            raise ValueError("scst_baseline 'mean' is the mean reward of an image's other samples: it needs "
                             f"scst_samples >= 2, got {self.scst_samples} (or scst_baseline='greedy')")
        if self.grid_layer > 4:
            raise ValueError(f"grid_layer must be a ResNet stage 1..4 (or 0: the deepest at least 4 x 4), "
                             f"got {self.grid_layer!r}")
        if not isinstance(self.grid_position, bool):
            raise ValueError(f"grid_position must be True or False, got {self.grid_position!r}")
        for name, top in (("alpha_c", 100), ("dropout", 0.99), ("scst_xe", 100)):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= top:
                raise ValueError(f"{name} must be a number from 0 to {top}, got {value!r}")
        if self.cache_kind not in ("maps", "views"):
            raise ValueError(f"cache_kind must be 'maps' or 'views', got {self.cache_kind!r}")
        if self.crop_size > self.resize_size:
            raise ValueError(f"crop_size ({self.crop_size}) must not exceed resize_size ({self.resize_size})")

    # --- derived paths: the state files shared by the notebooks ---
    def split_images(self, split: str) -> str:
        return os.path.join(self.data_dir, f"{split}2014")

    def resized_images(self, split: str) -> str:
        return os.path.join(self.data_dir, "resized_images", f"{split}2014")

    def captions_json(self, split: str) -> str:
        return os.path.join(self.data_dir, "annotations", f"captions_{split}2014.json")

    @property
    def vocabulary_path(self) -> str:
        return os.path.join(self.data_dir, "vocabulary.pkl")

    @property
    def features_dir(self) -> str:
        return os.path.join(self.data_dir, "features")

    @property
    def resolved_grid_layer(self) -> int:
        """grid_layer, with 0 resolved: the deepest ResNet stage at least 4 x 4 at crop_size."""
        from .attention import pick_grid_layer
        return self.grid_layer or pick_grid_layer(self.crop_size)

    @property
    def use_cache(self) -> bool:
        return self.cache and not self.train_backbone

    def hyperparameters(self) -> dict[str, Any]:
        """Every field but the runtime knobs: what a checkpoint keeps of its run."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in RUNTIME_FIELDS}


DECODERS = ("lstm", "attention")
OBJECTIVES = ("xe", "scst")
SCST_BASELINES = ("mean", "greedy")


# How this machine runs a job, not what the model is: never saved into a checkpoint.
RUNTIME_FIELDS = ("device", "progress", "num_workers", "tensorboard")

# What a resume may change. Every field is in exactly one group (a test checks it), so a field
# added later must be placed: a resume continues the same run (rundir.resume_config).
# - shaping: the model, the data, the cache. A resume keeps the checkpoint's; another value given
#   is refused, before any work. (batch_size shapes the epoch's order too: mid-epoch it must stay.)
SHAPING_FIELDS = ("vocab_threshold", "max_seq_len", "resize_size", "crop_size", "hflip", "backbone", "weights",
                  "standin_steps", "standin_seed", "train_backbone", "embedding_size", "hidden_layer_size",
                  "num_layers", "decoder", "grid_layer", "grid_position", "attention_size", "alpha_c", "dropout",
                  "group_by_image", "seed", "cache", "cache_kind", "cache_views", "cache_jitter",
                  "val_max_captions", "heldout_images", "objective", "scst_samples", "scst_baseline", "scst_xe")
# - of those, what a run started from another's weights (train --init-from) chooses for itself; the
#   others come from that checkpoint (config.initialised_config)
OBJECTIVE_FIELDS = ("objective", "scst_samples", "scst_baseline", "scst_xe")
# - optimisation: how the rest of the run goes. A new value is applied (the learning rates after the
#   optimizer's state is restored), printed and logged; the checkpoint then holds the latest.
OPTIMISATION_FIELDS = ("lr", "backbone_lr", "lr_decay", "epochs", "min_steps", "max_steps", "save_every", "log_every",
                       "batch_size", "keep_epoch")
# - execution and place: how and where this machine runs it. Taken from this start as they are.
EXECUTION_FIELDS = RUNTIME_FIELDS + ("amp", "channels_last", "preset", "data_dir", "models_dir")


PRESETS: dict[str, dict[str, Any]] = {
    # Chapter 2 on MS-COCO 2014: frozen ImageNet ResNet-152, batch 128, 5 epochs.
    "coco": dict(preset="coco", data_dir="data_dir/coco"),
    # The bundled synthetic set on a 2-core CPU, where no pretrained weights can be downloaded.
    # A small ResNet-18 pretrained on synthetic shape scenes instead of ImageNet (backbone.py's
    # stand-in, built once), then frozen and cached as for COCO.
    # No flips: its captions say "to the left of", and a mirrored image would contradict them.
    # Sixteen views of each training image: on a set of 1,500 the pooled captioner learns which
    # colour goes with which shape in its own pictures and misses it in new ones; more crops narrow
    # that gap (benchmarks/README.md, "Views against binding"), and so does running the last fifth of
    # the epochs at a tenth of the learning rate (lr_decay; "A smaller step at the end").
    # decoder="attention" reads layer2's 7 x 7 grid with each cell's place added, without the doubly
    # stochastic term (which spreads 49 cells' attention over a caption of about 20 words): on the
    # relations world the combination got the relations right where layer3's 4 x 4 grid, and layer2
    # without the places, did not (docs/design_notes.md).
    "tiny": dict(
        preset="tiny", data_dir="data_dir/tiny", vocab_threshold=2, max_seq_len=32, resize_size=64, crop_size=56,
        hflip=False, backbone="resnet18", weights="standin", train_backbone=False, cache_views=16, cache_jitter=0.0,
        embedding_size=128, hidden_layer_size=256, grid_layer=2, grid_position=True, attention_size=128, alpha_c=0.0,
        batch_size=128, lr=5e-3, backbone_lr=2e-3, lr_decay=0.2,
        epochs=14, min_steps=1650, save_every=100, log_every=10, num_workers=0, val_max_captions=1250, heldout_images=0,
    ),
}

# What objective="scst" changes in a preset, for the fields not given: self-critical training
# fine-tunes a trained model, at a far smaller learning rate, for its own number of epochs, and its
# batch counts images (each with scst_samples captions), not captions. tiny: a constant rate (lr_decay=0), as
# notebook 10's figures were measured.
# coco: the self-critical.pytorch model zoo's recipe after its cross-entropy epochs (lr 5e-5).
SCST_PRESETS: dict[str, dict[str, Any]] = {
    "coco": dict(lr=5e-5, epochs=20, batch_size=50, min_steps=0),
    "tiny": dict(lr=5e-4, lr_decay=0.0, epochs=4, batch_size=32, min_steps=0, scst_xe=1.0, save_every=50,
                 log_every=5),
}

# What decoder="attention" changes in a preset, for the fields not given. tiny: eight views, as its
# attention figures were measured; a grid view stores 49 cells where a pooled view stores one, so
# sixteen would double a 300 MB cache and its extraction for a model that already binds colours.
DECODER_PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "tiny": {"attention": dict(cache_views=8)},
}


# The chapter's own values beside the presets', and why a preset differs: preset_table() prints it
# (notebook 06), and the README carries the same table (a test compares them).
BOOK = {"backbone": "resnet152", "weights": "ImageNet (pretrained=True)", "resize_size": 256, "crop_size": 224,
        "hflip": True, "vocab_threshold": 4, "embedding_size": 256, "hidden_layer_size": 512, "num_layers": 1,
        "max_seq_len": 20, "batch_size": 128, "lr": 1e-3, "epochs": 5, "cache": "none"}
WHY = {
    "backbone": "tiny: a ResNet-18 (its stand-in ships pretrained) runs on 2 CPU cores in minutes",
    "weights": "tiny: ImageNet weights cannot be downloaded offline, and do not know drawn shapes",
    "resize_size": "tiny: its images are 64 px; the crop keeps the same 8/7 ratio as 256/224",
    "crop_size": "",
    "hflip": "tiny: its captions say left of / right of, which a mirror image would contradict",
    "vocab_threshold": "tiny: 3,000 images make fewer repeats than COCO's 83k",
    "embedding_size": "tiny: a few dozen words need a smaller model",
    "hidden_layer_size": "",
    "num_layers": "",
    "max_seq_len": "tiny: the relations world's captions (notebook 09) run to 26 tokens",
    "batch_size": "",
    "lr": "tiny: a smaller model on cached features takes a larger step; a tenth of it at the end generalises better",
    "epochs": "tiny: 3,000 images give few steps per epoch; a smaller set gets more (min_steps)",
    "cache": "both: the frozen ResNet runs once per image view, not at every step (benchmarks/train_speed.py)",
}


def preset_table(fields: Iterable[str] = tuple(BOOK)) -> list[tuple[str, Any, Any, Any, str]]:
    """Rows (field, the book's value, tiny's, coco's, why they differ) of the chapter's hyperparameters."""
    tiny, coco = get_config("tiny"), get_config("coco")

    def shown(name: str, config: Config) -> Any:
        if name == "weights":
            return "stand-in" if config.weights == "standin" else f"ImageNet ({config.weights})"
        if name == "lr" and config.lr_decay:
            return f"{config.lr}, a tenth for the last {config.lr_decay:.0%} of epochs"
        if name == "cache":
            return f"{config.cache_kind}, K={config.cache_views}" if config.use_cache else "none"
        return getattr(config, name)

    return [(name, BOOK[name], shown(name, tiny), shown(name, coco), WHY[name]) for name in fields]


def format_preset_table(markdown: bool = False) -> str:
    """preset_table() as text (or as a markdown table, as in the README)."""
    rows = [("field", "book", "tiny", "coco", "why they differ")] + \
        [tuple(str(v) for v in row) for row in preset_table()]
    if markdown:
        lines = ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines[:1] + ["|" + "---|" * 5] + lines[1:])
    widths = [max(len(r[k]) for r in rows) for k in range(4)]
    table = ["  ".join(r[k].ljust(widths[k]) for k in range(4)).rstrip() for r in rows]
    return "\n".join(table + ["", "why they differ:"] + [f"  {r[0]}: {r[4]}" for r in rows[1:] if r[4]])


PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def get_config(preset: str = "tiny", *, saved: Mapping[str, Any] | None = None, notebook: bool = False,
               root: str | None = None, **overrides: Any) -> Config:
    """The one way to make a Config, for the CLI, the notebooks and checkpoints alike.

    - `preset` ("tiny" or "coco") with any field overridden; an unknown field is an error;
    - `saved`: a checkpoint's saved fields instead of a preset: fields of other versions are
      ignored, and the runtime knobs (device, progress, ...) are this machine's, not the
      training machine's;
    - `notebook=True`: the notebooks' parameters, where None means the preset's value, and
      relative paths are taken from the project root, so a notebook finds the same files whether
      Jupyter runs it from notebooks/ or papermill from the root (`root` sets another folder).

    objective="scst" and decoder="attention" bring their own values for the fields not given
    (SCST_PRESETS, DECODER_PRESETS).

    models_dir, unless given, is derived from data_dir by Config itself. `config.given` records the
    fields asked for, not the preset's: a resume keeps the rest from its checkpoint. An `epochs`
    given without `min_steps` sets min_steps to 0: the run trains exactly the epochs asked for.
    """
    names = {f.name for f in dataclasses.fields(Config)}
    if notebook:
        overrides = {k: v for k, v in overrides.items() if v is not None}
        root = root or PROJECT_ROOT
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"unknown config field(s) {unknown}; valid fields: {sorted(names)}")
    base: dict[str, Any]
    if saved is not None:
        base = {k: v for k, v in saved.items() if k in names - set(RUNTIME_FIELDS)}
    elif preset in PRESETS:
        base = PRESETS[preset]
        if overrides.get("objective") == "scst":
            base = {**base, **SCST_PRESETS[preset]}
        base = {**base, **DECODER_PRESETS.get(preset, {}).get(overrides.get("decoder", ""), {})}
    else:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    if "epochs" in overrides and "min_steps" not in overrides:
        overrides = {**overrides, "min_steps": 0}     # the epochs asked for, not stretched to the preset's steps
    config = Config(**{**base, **overrides})
    if root:
        config.data_dir = os.path.join(root, config.data_dir)
        config.models_dir = os.path.join(root, config.models_dir)
    config.given = frozenset(overrides)  # type: ignore[attr-defined]  # not a field: never saved in a checkpoint
    return config


def resumed_config(saved: Mapping[str, Any], config: Config) -> tuple[Config, dict[str, tuple[Any, Any]]]:
    """The config of a resumed run: the checkpoint's `saved` fields, with this start's execution
    fields and the optimisation fields it was given. Returns (config, {field: (was, now)} of the
    optimisation fields that change).

    Fields given explicitly (get_config's overrides, `config.given`) that shape the run and differ
    from the checkpoint are a ValueError listing each with both values; fields not given keep the
    checkpoint's value whatever the preset says. A config made without get_config counts every
    field as given."""
    given = getattr(config, "given", None)
    given = {f.name for f in dataclasses.fields(Config)} if given is None else set(given)
    differ = [f"{name} {saved[name]!r} -> {getattr(config, name)!r}" for name in SHAPING_FIELDS
              if name in given and name in saved and saved[name] != getattr(config, name)]
    if differ:
        raise ValueError(f"a resume continues the same run, and these settings shape it: {'; '.join(differ)} "
                         f"(checkpoint -> now). Leave them out to keep the checkpoint's, or start a new run "
                         f"(another --models-dir, or --overwrite)")
    fields = {f.name for f in dataclasses.fields(Config)}
    values = {k: v for k, v in saved.items() if k in fields and k not in EXECUTION_FIELDS}
    values.update({k: getattr(config, k) for k in EXECUTION_FIELDS})
    changes = {}
    for name in OPTIMISATION_FIELDS:
        if name in given and saved.get(name, getattr(config, name)) != getattr(config, name):
            changes[name] = (saved.get(name), getattr(config, name))
            values[name] = getattr(config, name)
    out = Config(**values)
    out.given = frozenset(given)  # type: ignore[attr-defined]
    return out, changes


def initialised_config(saved: Mapping[str, Any], config: Config, checkpoint: str) -> Config:
    """The config of a run that starts from another run's weights (train --init-from CHECKPOINT).

    The model and its data come from the checkpoint's `saved` fields (every shaping field but
    OBJECTIVE_FIELDS): a differing one given explicitly (config.given) is a ValueError naming each.
    The objective, the optimisation and the execution fields are this start's. Not given, data_dir
    is the checkpoint's, and models_dir is the checkpoint's folder with "-<objective>" added: a new
    folder, never the one that holds the checkpoint."""
    given = getattr(config, "given", None)
    given = {f.name for f in dataclasses.fields(Config)} if given is None else set(given)
    inherited = [name for name in SHAPING_FIELDS if name not in OBJECTIVE_FIELDS and name in saved]
    differ = [f"{name} {saved[name]!r} -> {getattr(config, name)!r}" for name in inherited
              if name in given and saved[name] != getattr(config, name)]
    if differ:
        raise ValueError(f"--init-from {checkpoint}: the model and its data come from that checkpoint, and these "
                         f"settings differ: {'; '.join(differ)} (checkpoint -> now). Leave them out")
    values = dataclasses.asdict(config)
    values.update({name: saved[name] for name in inherited})
    if "data_dir" not in given and "data_dir" in saved:
        values["data_dir"] = saved["data_dir"]
    if "models_dir" not in given:
        folder = os.path.dirname(os.path.abspath(checkpoint))
        values["models_dir"] = os.path.join(os.path.dirname(folder), f"{os.path.basename(folder)}-{config.objective}")
    out = Config(**values)
    out.given = frozenset(given)  # type: ignore[attr-defined]
    return out


INJECTED = "# Parameters\n"          # how papermill's injected cell begins


def assigned_names(source: str) -> list[str]:
    """The UPPER_CASE names a cell's source assigns at top level (a parameters cell's knobs)."""
    names: list[str] = []
    for node in ast.parse(source).body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] \
            if isinstance(node, ast.AnnAssign) else []
        names += [t.id for t in targets if isinstance(t, ast.Name) and t.id.isupper()]
    return names


def check_parameters(namespace: Mapping[str, Any], history: Iterable[str] | None = None) -> None:
    """Refuse parameters a notebook does not declare, before any work: the cell after a notebook's
    parameters cell calls check_parameters(globals()).

    papermill does not check the names it is given (`-p HIDDEN_LAYR_SIZE 64` only logs a warning, and
    the notebook would train the default size): it injects a cell of assignments right after the
    parameters cell. Each name assigned there must be one the parameters cell (the cell run just
    before it) assigns; anything else is a ValueError naming it and listing the known ones. Run by
    hand, without papermill, there is nothing to check."""
    history = list(namespace.get("In", [])) if history is None else list(history)
    injected = [k for k, source in enumerate(history) if source.startswith(INJECTED)]
    if not injected or injected[-1] == 0:
        return
    k = injected[-1]
    declared = assigned_names(history[k - 1])
    unknown = [name for name in assigned_names(history[k]) if name not in declared]
    if unknown:
        raise ValueError(f"unknown notebook parameter{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}: "
                         f"this notebook's parameters are {', '.join(declared)}")
