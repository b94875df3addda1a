"""train(config): the chapter's loop (Adam, cross-entropy on packed targets), made fast and resumable.

- CUDA when present: autocast (bf16 where supported, else fp16 + GradScaler), channels_last CNN
  (channels_last on a CPU too when the backbone is frozen).
- Frozen backbone: trains on cached features by default (features.py); `cache=False` is the
  chapter-faithful loop that runs the encoder at every step.
- models_dir/<dataset>/last.ckpt every `save_every` steps, at each epoch end and when stopped
  (max_steps or Ctrl-C); best.ckpt whenever the validation loss improves. Atomic writes.
- `lr_decay`: the last share of the epochs at a tenth of the learning rates (constant, as the chapter's,
  by default; the tiny preset's last fifth).
- `resume=True` continues from last.ckpt with the same data order and augmentation.
- torchrun: DistributedDataParallel (NCCL on CUDA, gloo on CPU); only rank 0 logs and saves.
"""
import errno
import json
import math
import os
import signal
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.utils.data as data
from torch.nn.utils.rnn import pack_padded_sequence

from .atomic import interrupts_deferred
from .checkpoint import (
    atomic_copy,
    atomic_save,
    build_models,
    checkpoint_state,
    data_identity,
    load_checkpoint,
    load_encoder_state,
    os_error,
    restore_training_state,
)
from .config import Config, initialised_config
from .data import (
    CocoCaptionDataset,
    CountingLoader,
    TrainTransform,
    Unreadable,
    collate_function,
    eval_transform,
    seeded_generator,
    skipped_images,
    too_many_unreadable,
)
from .decoding import sample_captions
from .device import amp_dtype_for, pick_device, setup_distributed
from .features import cached_datasets
from .lstm import use_packed_cpu_lstm
from .prepare import ensure_prerequisites
from .rundir import RunLock, prepare_run_dir, resume_config, trim_log
from .vocabulary import load_vocabulary


class EncoderDecoder(nn.Module):
    """Encoder + decoder as one module (what DDP wraps). `cached`: inputs are pooled backbone features."""

    def __init__(self, encoder, decoder, cached=False):
        super().__init__()
        self.encoder, self.decoder, self.cached = encoder, decoder, cached

    def forward(self, inputs, captions=None, lengths=None, image_index=None, samples=0, greedy=False):
        """Teacher forcing: logits of `captions` (the loss's input); or, with samples=N, N captions per image
        drawn by decoding.sample_captions (greedy=True: the likeliest words), what self-critical training
        learns from, and with captions too, (the draws, their logits). All pass through here so that
        DistributedDataParallel sees one forward pass per step."""
        features = self.encoder.head(inputs) if self.cached else self.encoder(inputs)   # (B, E)
        if samples:
            drawn = sample_captions(self.decoder, features, samples, greedy=greedy)
            if captions is None:
                return drawn
            return drawn, self.decoder(features[image_index], captions, lengths)   # and teacher forcing beside
        if image_index is not None:  # captions grouped by image: one feature row per caption
            features = features[image_index]                                         # (N, E)
        return self.decoder(features, captions, lengths)


def caption_loss(logits: torch.Tensor, captions: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """Cross-entropy over the real tokens only: packing drops the <pad> positions."""
    targets = pack_padded_sequence(captions, lengths, batch_first=True)[0]
    return nn.functional.cross_entropy(logits.float(), targets)


def decoder_penalty(decoder: nn.Module) -> torch.Tensor | float:
    """A decoder's own regularisation term from its last forward pass (the attention decoder's doubly
    stochastic alpha_c term), 0 for the chapter's LSTM."""
    penalty = getattr(decoder, "penalty", None)
    return 0.0 if penalty is None else penalty


class CrossEntropy:
    """The chapter's objective: cross-entropy of each reference word given the words before it (teacher
    forcing), plus the decoder's own regularisation. What training asks of an objective (scst.SelfCritical
    is the other): its training dataset and collate, the loss of a batch with the scalars to log beside it,
    and, where it has one, a validation score (`validate(run)`) that picks best.ckpt instead of the loss."""

    name = "xe"
    metric = "val_loss"
    higher_is_better = False
    collate = staticmethod(collate_function)
    validate = None

    def dataset(self, train_ds: data.Dataset) -> data.Dataset:
        return train_ds

    def loss(self, run: "Run", batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        inputs, captions, lengths, *image_index = batch
        inputs = inputs.to(run.device, non_blocking=True)
        if run.channels_last and inputs.dim() == 4:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        captions = captions.to(run.device, non_blocking=True)
        logits = run.ddp_model(inputs, captions, lengths, *[i.to(run.device) for i in image_index])
        return caption_loss(logits, captions, lengths) + decoder_penalty(run.decoder), {}


def make_objective(config: Config, vocab: Any, train_ds: data.Dataset, val_ds: data.Dataset) -> Any:
    """config.objective's objective: CrossEntropy, or scst.SelfCritical (its rewards' document frequencies
    are counted here, once)."""
    if config.objective == "scst":
        from .scst import SelfCritical
        return SelfCritical(config, vocab, train_ds, val_ds)
    return CrossEntropy()


class _SkipSampler(data.Sampler):
    """Wraps a sampler and drops its first `skip` indices (resuming mid-epoch)."""

    def __init__(self, sampler, skip):
        self.sampler, self.skip = sampler, skip

    def __iter__(self):
        it = iter(self.sampler)
        for _ in range(self.skip):
            next(it, None)
        return it

    def __len__(self):
        return max(0, len(self.sampler) - self.skip)


def _loader(dataset, sampler, config, device, persistent=False, collate=collate_function):
    """Images: `num_workers` processes decode and augment; so do maps (a batch of maps is 32 MB at
    COCO's size, and pooling it takes a while). Cached views: the main process, since a batch is
    one small gather from a memmap and starting workers would cost more than the work."""

    workers = 0 if config.use_cache and config.cache_kind == "views" else config.num_workers
    # a DataLoader that leaves an unreadable image out of its batch, counts and names it (once), and stops
    # the run when more than 1% of a split is unreadable
    quiet = dist.is_initialized() and dist.get_rank() != 0
    # its own generator: a DataLoader otherwise draws its workers' base seed from torch's global generator,
    # where a resumed run would draw it at another step than the uninterrupted one, and every sampled
    # caption (self-critical training) and dropout mask after it would differ
    return CountingLoader(dataset, log=(lambda *a, **k: None) if quiet else print, batch_size=config.batch_size,
                          sampler=sampler, collate_fn=collate, num_workers=workers,
                          generator=seeded_generator(config.seed, 1),
                          pin_memory=device.type == "cuda", persistent_workers=persistent and workers > 0)


@torch.no_grad()
def evaluate_loss(model: nn.Module, loader: Any, device: torch.device, amp_dtype: torch.dtype | None = None,
                  channels_last: bool = False) -> float:
    """Mean per-token cross-entropy over a loader (model in eval mode)."""
    model.eval()
    total, tokens = 0.0, 0
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext()
    for inputs, captions, lengths, *image_index in loader:
        inputs = inputs.to(device, non_blocking=True)
        if channels_last and inputs.dim() == 4:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        with autocast:
            logits = model(inputs, captions.to(device), lengths, *[i.to(device) for i in image_index])
        total += caption_loss(logits, captions.to(device), lengths) * sum(lengths)   # stays on the device
        tokens += sum(lengths)
    model.train()
    return float(total) / max(tokens, 1)


class Stopped(KeyboardInterrupt):
    """SIGTERM (docker stop, Kubernetes, Slurm preemption, a spot reclaim): saved as Ctrl-C is; the CLI exits 143."""


@dataclass
class StopRequest:
    """A stop signal received during training, acted on between steps (stop_if_requested), so that
    the step it arrived in finishes and is logged; under torchrun every rank then stops at the same
    step (a rank that stopped alone would hang the others)."""
    signum: int = 0
    acted: bool = False

    def raise_for(self, signum):
        self.acted = True
        raise Stopped if signum == signal.SIGTERM else KeyboardInterrupt


@dataclass
class Run:
    """Everything one training run holds: built once by setup_run, used by the parts below."""
    config: Config
    vocab: object
    encoder: nn.Module
    decoder: nn.Module
    model: nn.Module                  # EncoderDecoder (what is saved and validated)
    ddp_model: nn.Module              # the same, wrapped by DistributedDataParallel under torchrun
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    train_ds: data.Dataset
    val_loader: data.DataLoader
    sampler: data.DistributedSampler
    device: torch.device
    amp_dtype: object
    channels_last: bool
    master: bool
    log: object
    steps_per_epoch: int
    total_steps: int
    epochs: int                       # config.epochs, or more to reach config.min_steps (planned_epochs)
    # where the run is: what a checkpoint saves and a resume restores
    epoch: int = 0
    batch: int = 0                    # batches done in the current epoch
    step: int = 0
    best_val: float = math.inf
    last_loss: float | None = None
    loss: torch.Tensor | None = None   # the latest step's loss, read (a GPU sync) only when logged
    log_file: object = None
    board: object = None              # tblog.TrainingBoard on rank 0 (None: no TensorBoard events)
    changes: str = ""                 # what a resume changed ("lr 0.001 -> 0.0005"), for TensorBoard
    stop: StopRequest | None = None   # a stop signal received (Ctrl-C, SIGTERM)
    bar: object = None                # the progress bar, which shows the latest validation loss
    last_val: float | None = None
    data: dict | None = None          # checkpoint.data_identity: what a resume must find again
    objective: Any = None             # CrossEntropy, or scst.SelfCritical (make_objective)
    scalars: dict | None = None       # what the objective's latest loss said beside it (reward, baseline...)
    init_from: dict | None = None     # the checkpoint a run started from (train --init-from): path and step

    def __post_init__(self):
        self.stop = self.stop or StopRequest()

    def path(self, name):
        return os.path.join(self.config.models_dir, name)

    def write_log(self, row):
        if self.log_file:
            self.log_file.write(json.dumps(row) + "\n")
            self.log_file.flush()


def build_datasets(config, vocab, encoder, device, master, amp_dtype, channels_last, log, calibrated=False):
    """(training dataset, validation loader, grouped): images, or cached features with a frozen backbone.
    `calibrated`: a random backbone's BatchNorm statistics are loaded already (a run started from a checkpoint)."""
    train_tf = TrainTransform(config.crop_size, config.hflip)
    val_tf = eval_transform(config.resize_size, config.crop_size)
    group = config.group_by_image and not config.use_cache  # cached features are cheap per caption anyway
    train_ds = CocoCaptionDataset(config.resized_images("train"), config.captions_json("train"), vocab, train_tf,
                                  config.max_seq_len, config.seed, group_by_image=group, progress=config.progress)
    # Only the images validation reads: on COCO 5,000 captions are ~1,000 of val2014's 40,504 images,
    # and the feature cache would otherwise encode all of them.
    val_captions = max(1, config.val_max_captions)
    val_ds = CocoCaptionDataset(config.resized_images("val"), config.captions_json("val"), vocab, val_tf,
                                config.max_seq_len, config.seed, group_by_image=group, progress=config.progress,
                                max_captions=val_captions)
    if not config.train_backbone and encoder.weights_id is None and not calibrated:

        log("frozen randomly initialised backbone: estimating its BatchNorm statistics from training images")
        calibration = CocoCaptionDataset(config.resized_images("train"), config.captions_json("train"), vocab,
                                         val_tf, group_by_image=True)
        picks = list(range(0, len(calibration), max(1, len(calibration) // 1024)))[:1024]

        def batches():             # unreadable images are left out, and counted and named with training's
            for j in range(0, len(picks), 64):
                images = [item[0] for item in map(calibration.__getitem__, picks[j:j + 64])
                          if not isinstance(item, Unreadable)]
                train_ds.skipped.update(calibration.skipped)
                error = too_many_unreadable(train_ds.skipped, len(train_ds.image_ids), train_ds.data_path)
                if error:
                    raise error
                if images:
                    yield torch.stack(images).to(device)

        encoder.calibrate_batchnorm(batches())
    if config.use_cache:
        train_ds, val_ds = cached_datasets(config, encoder, train_ds, val_ds, train_tf, val_tf, device, master,
                                           amp_dtype, channels_last, log)
    # grouped items are whole images, already only those that hold val_captions captions
    val_subset = val_ds if group else data.Subset(val_ds, range(min(len(val_ds), val_captions)))
    return train_ds, _loader(val_subset, None, config, device, persistent=True), group  # workers kept


def planned_epochs(config: Config, steps_per_epoch: int) -> int:
    """How many epochs a run trains: config.epochs, or more where that many would stop short of
    config.min_steps. A preset's recipe is a number of steps as much as of epochs: a set half the
    size of the one it was tuned on would otherwise get half the updates."""
    if not config.min_steps:
        return config.epochs
    return max(config.epochs, math.ceil(config.min_steps / max(1, steps_per_epoch)))


def make_optimizer(config, encoder, decoder):
    """The chapter's Adam over the decoder and the encoder's head (everything but the ResNet: the chapter's
    linear_layer and batch_norm, and whatever a subclass adds); the backbone at its own rate when trained."""
    head_params = list(decoder.parameters()) + [p for name, p in encoder.named_parameters()
                                                if not name.startswith("resnet_module.")]
    groups = [{"params": head_params, "lr": config.lr}]
    if config.train_backbone:
        groups.append({"params": list(encoder.resnet_module.parameters()), "lr": config.backbone_lr})
    return torch.optim.Adam(groups)


def decay_epoch(config, epochs):
    """The first epoch (counted from 0) run at a tenth of the learning rates: the last `lr_decay` share of
    `epochs`, rounded to whole epochs, never the first; `epochs` (none) when the rates stay constant."""
    return max(1, epochs - int(epochs * config.lr_decay + 0.5))


def set_learning_rates(optimizer, config, epoch, epochs):
    """The config's learning rates for this epoch into the optimizer's groups (make_optimizer's order): a
    tenth of them from decay_epoch on. Set at every epoch's start, so that a resume, which restores the
    optimizer's state, or changes --lr or --epochs, still trains each epoch at its own rate."""
    factor = 0.1 if epoch >= decay_epoch(config, epochs) else 1.0
    for group, lr in zip(optimizer.param_groups, [config.lr, config.backbone_lr]):
        group["lr"] = lr * factor


def check_prebuilt(config: Config, vocab: Any, encoder: Any, decoder: nn.Module, log: Any) -> None:
    """Prebuilt modules must fit the run's vocabulary; a checkpoint the library's classes cannot load is said.

    Training and captioning in the notebook work either way; 07, 08 and the CLI rebuild the models
    from captioning/model.py and the checkpoint's config, so there the change must be in model.py."""
    device = next(decoder.parameters()).device
    with torch.no_grad():
        was = decoder.training
        size = encoder.linear_layer.out_features
        features = torch.zeros((1, 4, size) if getattr(decoder, "feature_kind", "pooled") == "grid" else (1, size),
                               device=device)
        logits = decoder.eval()(features, torch.ones(1, 2, dtype=torch.long, device=device), [2])
        decoder.train(was)
    size = logits.shape[-1]
    if size != len(vocab):
        raise ValueError(f"the prebuilt decoder predicts {size} words, but the vocabulary {config.vocabulary_path} "
                         f"has {len(vocab)}: build it for len(vocab) words")
    with torch.device("meta"):                     # shapes only: no memory, no initialisation
        library = build_models(config, len(vocab), weights=None)
    for name, built, ours in (("encoder", encoder, library[0]), ("decoder", decoder, library[1])):
        theirs = {k: v.shape for k, v in built.state_dict().items()}
        if theirs != {k: v.shape for k, v in ours.state_dict().items()}:
            log(f"note: this {name} is not what captioning/model.py builds from this config, so its checkpoints "
                f"load here (load_state_dict) but not in 07, 08 or the CLI until the change is in "
                f"captioning/model.py")


def _unwrapped(dataset):
    """The dataset under a Subset (or a Subset of a Subset)."""
    while isinstance(dataset, data.Subset):
        dataset = dataset.dataset
    return dataset


def _holds_backbone(init_from: str | None) -> bool:
    """Whether the checkpoint a run starts from holds its backbone (a stand-in, random or trained one): then
    that backbone is loaded from it and need not be built or downloaded first."""
    return init_from is not None and bool(load_checkpoint(init_from)["backbone"]["included"])


def start_from(path: str, vocab: Any, encoder: Any, decoder: nn.Module, log: Any) -> dict[str, Any]:
    """Load another run's weights (train --init-from) into a new run's models; its vocabulary must be this
    run's. Returns what the new run's checkpoints record of it: the path and its step and objective."""
    ckpt = load_checkpoint(path)
    if ckpt["vocab"] != vocab.words():
        raise ValueError(f"--init-from {path}: that checkpoint was trained with another vocabulary than "
                         f"this run's {len(vocab)} words (another data set, or another vocab_threshold)")
    load_encoder_state(encoder, ckpt)
    decoder.load_state_dict(ckpt["decoder"])
    objective = ckpt["config"].get("objective", "xe")
    log(f"starting from {path} ({objective}, step {ckpt.get('step')})")
    return {"path": os.path.abspath(path), "step": ckpt.get("step"), "objective": objective}


def setup_run(config, resume, rank, world, device, master, log, changes=None, prebuilt=None, init_from=None):
    """Build the models, data and optimizer of a run, and restore last.ckpt when resuming.

    `changes`: the optimisation fields a resume changes ({field: (was, now)}): the learning rates are
    set after the optimizer's state is restored, and each change is printed and logged.
    `prebuilt`: (encoder, decoder) to train instead of the ones build_models makes from config.
    `init_from`: a checkpoint whose weights a fresh run starts from (train --init-from)."""
    torch.manual_seed(config.seed)
    vocab = load_vocabulary(config.vocabulary_path)
    if prebuilt:
        encoder, decoder = prebuilt
        check_prebuilt(config, vocab, encoder, decoder, log)
    elif init_from and not resume:            # the checkpoint's weights, its backbone too where it holds it
        encoder, decoder = build_models(config, len(vocab), None if _holds_backbone(init_from) else config.weights)
        init_from = start_from(init_from, vocab, encoder, decoder, log)
    else:
        encoder, decoder = build_models(config, len(vocab))
    use_packed_cpu_lstm(decoder, device.type == "cpu")     # lstm.py's faster backward; CUDA keeps cuDNN
    amp_dtype = amp_dtype_for(device, config.amp)
    # channels_last: on CUDA always; on a CPU only for a frozen backbone (a CNN's forward is faster
    # in it there, but ResNet's backward is slower).
    channels_last = config.channels_last and (device.type == "cuda" or not config.train_backbone)
    encoder.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
    decoder.to(device)
    train_ds, val_loader, group = build_datasets(config, vocab, encoder, device, master, amp_dtype, channels_last,
                                                 log, calibrated=isinstance(init_from, dict))
    objective = make_objective(config, vocab, train_ds, _unwrapped(val_loader.dataset))
    train_ds = objective.dataset(train_ds)              # scst: one item per image
    model = EncoderDecoder(encoder, decoder, cached=config.use_cache)
    optimizer = make_optimizer(config, encoder, decoder)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    ddp_model = nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None) if dist.is_initialized() else model
    sampler = data.DistributedSampler(train_ds, num_replicas=world, rank=rank, shuffle=True, seed=config.seed)
    steps_per_epoch = math.ceil(len(sampler) / config.batch_size)
    epochs = planned_epochs(config, steps_per_epoch)
    if epochs > config.epochs and master:
        log(f"{steps_per_epoch} steps per epoch on this data: training {epochs} epochs instead of {config.epochs}, "
            f"to reach min_steps={config.min_steps} (an explicit epochs, or min_steps=0, trains exactly that many)")
    total_steps = epochs * steps_per_epoch
    if config.max_steps:
        total_steps = min(total_steps, config.max_steps)
    run = Run(config, vocab, encoder, decoder, model, ddp_model, optimizer, scaler, train_ds, val_loader, sampler,
              device, amp_dtype, channels_last, master, log, steps_per_epoch, total_steps, epochs)
    run.data = data_identity(config) if master else None
    run.objective = objective
    run.init_from = init_from if isinstance(init_from, dict) else None

    os.makedirs(config.models_dir, exist_ok=True)
    log_path = run.path("train_log.jsonl")
    run.best_val = -math.inf if objective.higher_is_better else math.inf
    if resume:
        run.epoch, run.batch, run.step, run.best_val, run.init_from = restore_training_state(
            run.path("last.ckpt"), vocab, encoder, decoder, optimizer, scaler, device, best=f"best_{objective.metric}",
            default=run.best_val)
        log(f"resumed from {run.path('last.ckpt')} at epoch {run.epoch}, step {run.step}")
        if master:  # drop rows logged after that checkpoint was written, and a torn last line
            trim_log(log_path, run.step, log)
    elif master and os.path.exists(log_path):
        os.remove(log_path)  # a fresh run starts a fresh log
    run.log_file = open(log_path, "a") if master else None
    if changes:
        said = ", ".join(f"{k} {was} -> {now}" for k, (was, now) in changes.items())
        log(f"changed on resume: {said}")
        run.write_log({"step": run.step, "epoch": run.epoch, "changed_on_resume": {k: list(v) for k, v in
                                                                                   changes.items()}})
        run.changes = said
    processes = f"{world} process{'es' if world > 1 else ''}{', DDP' if dist.is_initialized() else ''}"
    log(f"training on {device} ({processes}), {len(train_ds)} items, "
        f"{steps_per_epoch} steps/epoch{' (all captions of an image per item)' if group else ''}, "
        f"{'cached features' if config.use_cache else 'images'}, "
        f"amp={amp_dtype}, checkpoints in {config.models_dir}")
    decay_from = decay_epoch(config, epochs)
    if decay_from < epochs:
        log(f"learning rates {config.lr:g} until epoch {decay_from - 1}, a tenth of that after "
            f"(lr_decay={config.lr_decay:g}: the last {epochs - decay_from} of {epochs} epochs)")
    return run


def save_checkpoint(run):
    """last.ckpt from rank 0, atomically, saying where a resume starts: this epoch, this batch, this step."""
    if run.master:
        metric = run.objective.metric
        state = checkpoint_state(run.config, run.vocab, run.encoder, run.decoder, run.optimizer, run.scaler,
                                 run.epoch, run.batch, run.step, run.best_val if metric == "val_loss" else math.inf,
                                 world_size=dist.get_world_size() if dist.is_initialized() else 1, data=run.data,
                                 extra={f"best_{metric}": run.best_val, "init_from": run.init_from})
        try:
            atomic_save(state, run.path("last.ckpt"))
        except OSError as e:          # a full disk: atomic_save named the file; the one before is intact
            if not os.path.exists(run.path("last.ckpt")):
                raise
            when = " once there is room" if e.errno == errno.ENOSPC else ""
            raise os_error(e.errno, f"{e} (step {run.step}); the previous {run.path('last.ckpt')} is kept: "
                                    f"resume from it{when}", type(e)) from e


def _show_progress(run):
    """The bar's postfix: epoch, the latest training loss and perplexity (self-critical training: the mean
    reward), the latest validation value (loss, or CIDEr-D)."""
    shown = {"epoch": run.epoch}
    if run.scalars and "reward" in run.scalars:
        shown["reward"] = f"{run.scalars['reward']:.3f}"
    elif run.last_loss is not None:
        shown.update(loss=f"{run.last_loss:.3f}", ppl=f"{math.exp(min(run.last_loss, 50)):.1f}")
    if run.last_val is not None:
        shown["cider" if run.objective.higher_is_better else "val"] = f"{run.last_val:.3f}"
    run.bar.set_postfix(shown)


def train_one_epoch(run, bar, t0):
    """The chapter's loop over the rest of this epoch: forward, loss (the objective's: the chapter's packed
    cross-entropy, or self-critical's REINFORCE), backward, Adam step.

    Stops early at total_steps; saves every save_every steps; logs every log_every steps.
    """
    config, device = run.config, run.device
    autocast = torch.autocast(device.type, dtype=run.amp_dtype) if run.amp_dtype else nullcontext()
    run.sampler.set_epoch(run.epoch)
    run.train_ds.set_epoch(run.epoch)
    set_learning_rates(run.optimizer, config, run.epoch, run.epochs)
    run.model.train()
    loader = _loader(run.train_ds, _SkipSampler(run.sampler, run.batch * config.batch_size), config, device,
                     collate=run.objective.collate)
    for batch in loader:
        if batch is not None:                 # None: a batch of unreadable images only (self-critical's collate)
            with autocast:
                loss, run.scalars = run.objective.loss(run, batch)
            run.loss = loss
            run.optimizer.zero_grad(set_to_none=True)
            run.scaler.scale(loss).backward()
            run.scaler.step(run.optimizer)
            run.scaler.update()
        run.step += 1
        run.batch += 1
        bar.update()
        if run.loss is not None and (run.step % config.log_every == 0 or run.step == run.total_steps):
            # .item() waits for the GPU: only here, so the CPU prepares the next batches meanwhile
            run.last_loss = run.loss.item()
            row = {"step": run.step, "epoch": run.epoch, "loss": run.last_loss,
                   "lr": run.optimizer.param_groups[0]["lr"]}
            if run.scalars:
                row.update(run.scalars)
            else:
                row["perplexity"] = math.exp(min(run.last_loss, 50))
            _show_progress(run)
            run.write_log({**row, "elapsed_s": round(time.time() - t0, 2)})
            if run.board:
                run.board.training(run.step, run.last_loss, run.optimizer, run.scalars)
        if run.step >= run.total_steps:
            return
        if config.save_every and run.step % config.save_every == 0:
            save_checkpoint(run)
        stop_if_requested(run)                # torchrun: every rank stops after the same, logged step


def validate(run, epoch=None):
    """At an epoch's end, on rank 0: the validation loss, and the objective's validation score where it has
    one (self-critical: CIDEr-D), logged; last.ckpt, and best.ckpt when the run's rule improved (a lower
    loss, a higher score). `epoch`: the epoch just done (-1: before the first, a self-critical run's start)."""
    if not run.master:
        return
    epoch = run.epoch - 1 if epoch is None else epoch
    val_loss = evaluate_loss(run.model, run.val_loader, run.device, run.amp_dtype, run.channels_last)
    row = {"step": run.step, "epoch": epoch, "val_loss": val_loss, "val_perplexity": math.exp(min(val_loss, 50))}
    said = f"epoch {epoch}: val loss {val_loss:.4f} (perplexity {math.exp(min(val_loss, 50)):.2f})"
    value = val_loss
    if run.objective.validate is not None:
        value = row[run.objective.metric] = run.objective.validate(run)
        said += f", {run.objective.metric} {value:.4f}"
    run.write_log(row)
    run.last_val = value
    if run.bar is not None and not run.bar.disable and epoch >= 0:   # on the bar, not a line per epoch under it
        _show_progress(run)
    else:
        run.log(said)
    if run.board:
        run.board.validation(run.step, val_loss, run.encoder, run.decoder,
                             {f"val/{run.objective.metric[4:]}": value} if run.objective.validate else None)
    improved = value > run.best_val if run.objective.higher_is_better else value < run.best_val
    with interrupts_deferred():                   # last.ckpt and best.ckpt agree, even after a Ctrl-C
        if improved:
            run.best_val = value
        save_checkpoint(run)
        if improved:
            atomic_copy(run.path("last.ckpt"), run.path("best.ckpt"))


def train(config: Config, resume: bool = False, overwrite: bool | str = False, encoder: nn.Module | None = None,
          decoder: nn.Module | None = None, init_from: str | None = None) -> dict[str, Any]:
    """Train with `config`; returns a summary dict (paths, steps, losses). Safe to interrupt.

    A models_dir that holds a run is refused unless `resume` (continue it) or `overwrite` (start afresh:
    True moves the old run into models_dir/previous-<timestamp>/, "delete" deletes it).

    `init_from`: a checkpoint whose weights a new run starts from, such as a cross-entropy run's best.ckpt
    for objective="scst" (self-critical fine-tuning). The model and data settings are the checkpoint's
    (config.initialised_config: one given otherwise is refused); models_dir must be another folder than
    the checkpoint's (default: that folder + "-scst"), so that --overwrite can never touch it.

    `encoder` / `decoder`: modules to train instead of the ones captioning/model.py builds from
    config, such as a notebook's edited CNNModel or LSTMModel (give both, or the decoder alone).
    The encoder keeps the library's interface (linear_layer, batch_norm, resnet_module); the
    decoder takes forward(features, captions, lengths) and predicts one score per vocabulary word.
    """
    if encoder is not None and decoder is None:
        raise ValueError("a prebuilt encoder needs its decoder too: train(config, encoder=..., decoder=...)")
    if init_from is not None:
        config = _init_config(config, init_from, resume, decoder)
    elif config.objective == "scst" and not resume:
        raise ValueError("objective 'scst' fine-tunes a trained model: give the checkpoint to start from "
                         "(--init-from CKPT, e.g. a cross-entropy run's best.ckpt)")
    rank, world, ddp_device = setup_distributed()
    master = rank == 0
    device = ddp_device or pick_device(config.device)
    log = print if master else (lambda *a, **k: None)
    lock = RunLock(config.models_dir) if master else None
    changes: dict[str, tuple[Any, Any]] = {}
    try:
        if lock:  # rank 0, the cheap checks first: one trainer per folder, no run replaced unasked, resumable
            lock.acquire(log)
            prepare_run_dir(config.models_dir, resume, overwrite, log)
            if resume:     # the run's own config, from its checkpoint: refused here if it would change
                config, changes = resume_config(os.path.join(config.models_dir, "last.ckpt"), config, world)
            ensure_prerequisites(config, log, standin=not _holds_backbone(init_from))
        if dist.is_initialized():
            dist.barrier()
            if resume and not master:
                config, changes = resume_config(os.path.join(config.models_dir, "last.ckpt"), config, world)
        if decoder is not None and encoder is None:
            vocab_size = len(load_vocabulary(config.vocabulary_path))
            encoder = build_models(config, vocab_size)[0]
        prebuilt = (encoder, decoder) if decoder is not None else None
        return _fit(setup_run(config, resume, rank, world, device, master, log, changes, prebuilt, init_from))
    finally:
        if lock:
            lock.release()
        if dist.is_initialized():
            dist.destroy_process_group()


def _init_config(config: Config, init_from: str, resume: bool, decoder: nn.Module | None) -> Config:
    """The config of a run started from `init_from`'s weights; the refusals come before any work."""
    if resume:
        raise ValueError("--init-from starts a new run from a checkpoint's weights, --resume continues a run: "
                         "give one of them (a resumed run remembers what it started from)")
    if decoder is not None:
        raise ValueError("--init-from loads the checkpoint's own models: give no prebuilt encoder or decoder")
    config = initialised_config(load_checkpoint(init_from)["config"], config, init_from)
    here = os.path.realpath(config.models_dir)
    if here == os.path.realpath(os.path.dirname(os.path.abspath(init_from))):
        raise ValueError(f"--models-dir {config.models_dir} is the folder that holds --init-from {init_from}: "
                         f"train into another folder (the default is {os.path.dirname(os.path.abspath(init_from))}"
                         f"-{config.objective}), so that the checkpoint it starts from stays as it is")
    return config


def stop_if_requested(run):
    """Between steps: stop if a signal came (under torchrun: if any rank received one, and which).

    Under torchrun the ranks agree by an all_reduce, whose .item() waits for the GPU; so they ask only
    at the steps where the loss is read anyway (every log_every steps): the same steps on every rank,
    and well within the grace period between SIGTERM and SIGKILL."""
    if not dist.is_initialized():
        if run.stop.signum:
            run.stop.raise_for(run.stop.signum)
        return
    if run.step % run.config.log_every:
        return
    flag = torch.tensor([run.stop.signum], device=run.device if run.device.type == "cuda" else "cpu")
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)          # SIGTERM (15) outranks SIGINT (2)
    if flag.item():
        run.stop.raise_for(int(flag.item()))


@contextmanager
def _interrupt_once(stop):
    """The first Ctrl-C or SIGTERM stops the loop after the current step (KeyboardInterrupt, or Stopped
    for SIGTERM); the final checkpoint follows. A second one before the loop has stopped (a step that
    hangs) stops it at once; later ones are let go, so that an impatient signal cannot lose the
    checkpoint. (A signal during any checkpoint write waits for the write: atomic.interrupts_deferred.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    # leave a signal alone that is ignored or handled by someone else
    ours = [s for s, default in ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL))
            if signal.getsignal(s) is default]
    count = []

    def handler(signum, frame):
        count.append(signum)
        if len(count) == 1:
            stop.signum = signum
        elif not stop.acted and not dist.is_initialized():
            stop.raise_for(stop.signum)

    previous = {s: signal.signal(s, handler) for s in ours}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _caption_images(dataset):
    """The CocoCaptionDataset under a training or validation dataset: a Subset, a feature cache's wrapper
    (CachedCaptionDataset's .ds), scst.PerImage, a loader; None when there is none."""
    for _ in range(8):
        if isinstance(dataset, CocoCaptionDataset):
            return dataset
        inner = getattr(dataset, "dataset", None)
        dataset = inner if inner is not None else getattr(dataset, "ds", None)
    return None


def _write_model_card(run, t0):
    """models_dir/README.md, the model card (modelcard.py) of the run just saved, with no evaluation yet.
    Training has succeeded whatever happens here: a card that cannot be written is a warning."""
    from .modelcard import training_info, write_card

    try:
        train, val = _caption_images(run.train_ds), _caption_images(run.val_loader)
        device = torch.cuda.get_device_name(run.device) if run.device.type == "cuda" else str(run.device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            device = f"{dist.get_world_size()} x {device}"
        info = training_info(run.config, len(run.vocab), step=run.step, epoch=run.epoch, epochs=run.epochs,
                             device=device,
                             wall_seconds=time.time() - t0, init_from=run.init_from,
                             train_images=len(train.image_ids) if train is not None else None,
                             val_images=len(val.image_ids) if val is not None else None,
                             synthetic=any("objects" in image for image in train.coco.dataset.get("images", []))
                             if train is not None else None)
        write_card(run.config.models_dir, {"training": info})
    except Exception as e:            # OSError (a full disk, a read-only folder), or a card this run breaks
        run.log(f"warning: the model card {run.path('README.md')} could not be written ({type(e).__name__}: {e}); "
                f"the checkpoints are saved")


def _fit(run):
    """Epochs of train_one_epoch + validate until done or interrupted; then the final checkpoint."""
    from .progress import tqdm

    config, interrupted, t0 = run.config, False, time.time()
    if run.master and config.tensorboard:
        from .tblog import open_board

        run.board = open_board(config, run.vocab, run.device, resume_step=run.step, log=run.log)
        if run.board and run.changes:
            run.board.note(run.step, "changed_on_resume", run.changes)
    bar = run.bar = tqdm(total=run.total_steps, initial=min(run.step, run.total_steps), desc="training",
                         unit="step", disable=not (run.master and config.progress))
    with _interrupt_once(run.stop):
        try:
            if run.step == 0 and run.objective.validate is not None:   # where the fine-tuning starts from
                validate(run, epoch=-1)
                if dist.is_initialized():
                    dist.barrier()
            while run.epoch < run.epochs and run.step < run.total_steps:
                train_one_epoch(run, bar, t0)
                if run.batch >= run.steps_per_epoch:  # the epoch is complete: validate, checkpoint
                    run.epoch, run.batch = run.epoch + 1, 0
                    validate(run)
                    if run.master and run.epoch == config.keep_epoch and run.step < run.total_steps:
                        atomic_copy(run.path("last.ckpt"), run.path("early.ckpt"))   # its mistakes teach
                    if dist.is_initialized():
                        dist.barrier()
        except KeyboardInterrupt as e:
            interrupted = "SIGTERM" if isinstance(e, Stopped) else "SIGINT"
            run.log(f"\n{'SIGTERM: stopped' if interrupted == 'SIGTERM' else 'interrupted'} at step {run.step}; "
                    f"saving {run.path('last.ckpt')} (continue with resume=True / --resume)")
        finally:
            bar.close()
            if run.board:
                run.board.close()
        with interrupts_deferred():               # a Ctrl-C now is answered once everything is written
            if run.loss is not None:
                run.last_loss = run.loss.item()
            save_checkpoint(run)
            if run.master and not os.path.exists(run.path("best.ckpt")):  # no epoch finished: best is what we have
                atomic_copy(run.path("last.ckpt"), run.path("best.ckpt"))
            if run.log_file:
                run.log_file.close()
            if run.master:
                _write_model_card(run, t0)
    metric = run.objective.metric
    if math.isfinite(run.best_val):
        best = f"best {metric.replace('_', ' ')} {run.best_val:.4f}"
        if metric == "val_loss":
            best += f" (perplexity {math.exp(min(run.best_val, 50)):.2f})"
        run.log(f"{best}: {run.path('best.ckpt')}; the log has every epoch's ({run.path('train_log.jsonl')})")
    run.log(f"saved {run.path('last.ckpt')} at step {run.step}")
    return {"last": run.path("last.ckpt"), "best": run.path("best.ckpt"), "step": run.step, "epoch": run.epoch,
            "loss": run.last_loss, f"best_{metric}": run.best_val, "interrupted": interrupted,  # False, or the signal
            "log": run.path("train_log.jsonl"), "skipped_images": skipped_images(run.train_ds, run.val_loader)}
