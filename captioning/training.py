"""train(config): the chapter's loop (Adam, cross-entropy on packed targets), made fast and resumable.

- CUDA when present: autocast (bf16 where supported, else fp16 + GradScaler), channels_last CNN
  (channels_last on a CPU too when the backbone is frozen).
- Frozen backbone: trains on cached features by default (features.py); `cache=False` is the
  chapter-faithful loop that runs the encoder at every step.
- models_dir/<dataset>/last.ckpt every `save_every` steps, at each epoch end and when stopped
  (max_steps or Ctrl-C); best.ckpt whenever the validation loss improves. Atomic writes.
- `resume=True` continues from last.ckpt with the same data order and augmentation.
- torchrun: DistributedDataParallel (NCCL on CUDA, gloo on CPU); only rank 0 logs and saves.
"""
import json
import math
import os
import random
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.utils.data as data
from torch.nn.utils.rnn import pack_padded_sequence

from .backbone import STANDIN, standin_path
from .checkpoint import atomic_copy, atomic_save, load_checkpoint, load_encoder_state
from .config import Config
from .data import CocoCaptionDataset, TrainTransform, collate_function, eval_transform
from .model import CNNModel, LSTMModel
from .vocabulary import load_vocabulary


class EncoderDecoder(nn.Module):
    """Encoder + decoder as one module (what DDP wraps). `cached`: inputs are pooled backbone features."""

    def __init__(self, encoder, decoder, cached=False):
        super().__init__()
        self.encoder, self.decoder, self.cached = encoder, decoder, cached

    def forward(self, inputs, captions, lengths, image_index=None):
        features = self.encoder.head(inputs) if self.cached else self.encoder(inputs)   # (B, E)
        if image_index is not None:  # captions grouped by image: one feature row per caption
            features = features[image_index]                                         # (N, E)
        return self.decoder(features, captions, lengths)


def caption_loss(logits, captions, lengths):
    """Cross-entropy over the real tokens only: packing drops the <pad> positions."""
    targets = pack_padded_sequence(captions, lengths, batch_first=True)[0]
    return nn.functional.cross_entropy(logits.float(), targets)


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


def setup_distributed():
    """(rank, world_size, device), from torchrun's environment variables when present."""
    if all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")):  # started by torchrun, even with 1 process
        rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
        if torch.cuda.is_available():
            torch.cuda.set_device(local)
            dist.init_process_group("nccl")
            return rank, world, torch.device("cuda", local)
        dist.init_process_group("gloo")
        return rank, world, torch.device("cpu")
    return 0, 1, None


def pick_device(name=""):
    return torch.device(name) if name else torch.device("cuda" if torch.cuda.is_available() else "cpu")


def amp_dtype_for(device, enabled=True):
    if not enabled or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def ensure_prerequisites(config, log=print):
    """Build what training needs and is missing: the vocabulary, the resized images, the stand-in backbone."""
    from .backbone import ensure_standin
    from .images import resize_images
    from .vocabulary import build_vocabulary, save_vocabulary

    for split in ("train", "val"):
        for path in (config.captions_json(split), config.split_images(split)):
            if not os.path.exists(path):
                raise FileNotFoundError(f"{path} not found: {config.data_dir} must be a COCO-layout folder "
                                        f"(train2014/, val2014/, annotations/captions_{{train,val}}2014.json); "
                                        f"run notebook 01 or download_coco.sh first")
    if not os.path.exists(config.vocabulary_path):
        log(f"building the vocabulary: {config.vocabulary_path}")
        save_vocabulary(build_vocabulary(config.captions_json("train"), config.vocab_threshold,
                                         progress=config.progress), config.vocabulary_path)
    for split in ("train", "val"):
        dst = config.resized_images(split)  # resize_images skips what is already done, at this size
        report = resize_images(config.split_images(split), dst, config.resize_size, progress=config.progress)
        if report["resized"]:
            log(f"resized {report['resized']} {split} images to {config.resize_size}x{config.resize_size}: {dst}")
    if config.weights == STANDIN:
        ensure_standin(config, log)


def _rng_state():
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
            "python": list(random.getstate()[1])}


def _set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate((3, tuple(state["python"]), None))


def _loader(dataset, sampler, config, device, persistent=False):
    """Images: `num_workers` processes decode and augment. Cached features: the main process, since
    a batch is one gather from a memmap and starting workers would cost more than the work."""
    workers = 0 if config.use_cache else config.num_workers
    return data.DataLoader(dataset, batch_size=config.batch_size, sampler=sampler, collate_fn=collate_function,
                           num_workers=workers, pin_memory=device.type == "cuda",
                           persistent_workers=persistent and workers > 0)


@torch.no_grad()
def evaluate_loss(model, loader, device, amp_dtype=None, channels_last=False):
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


def build_models(config, vocab_size):
    """(CNNModel, LSTMModel) with every size from `config`; weights="standin" needs ensure_standin first."""
    weights = config.weights
    if weights == STANDIN:
        weights = standin_path(config)
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"the stand-in backbone {weights} is not built yet: run notebook 05, or "
                                    f"captioning.backbone.ensure_standin(config), or train() which builds it")
    encoder = CNNModel(config.embedding_size, config.backbone, weights, config.train_backbone)
    decoder = LSTMModel(config.embedding_size, config.hidden_layer_size, vocab_size, config.num_layers,
                        config.max_seq_len)
    return encoder, decoder


def checkpoint_state(config, vocab, encoder, decoder, optimizer=None, scaler=None, epoch=0, batch=0, step=0,
                     best_val_loss=math.inf):
    """The plain dict written to a .ckpt (tensors and builtins only: loads with weights_only=True)."""
    # A frozen pretrained backbone is rebuilt from its weights id at load time; a random, trained
    # or stand-in one (a file of this machine's) travels in the checkpoint.
    keep_backbone = encoder.train_backbone or encoder.weights_id is None or config.weights == STANDIN
    encoder_state = {k: v for k, v in encoder.state_dict().items()
                     if keep_backbone or not k.startswith("resnet_module.")}
    return {
        "config": config.to_dict(), "vocab": vocab.words(),
        "encoder": encoder_state, "decoder": decoder.state_dict(),
        "backbone": {"name": encoder.backbone_name, "weights": encoder.weights_id,
                     "trained": encoder.train_backbone, "included": keep_backbone},
        "optimizer": optimizer.state_dict() if optimizer else None,
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        "epoch": epoch, "batch": batch, "step": step, "best_val_loss": best_val_loss, "rng": _rng_state(),
    }


def train(config: Config, resume=False):
    """Train with `config`; returns a summary dict (paths, steps, losses). Safe to interrupt."""
    from .progress import tqdm

    rank, world, ddp_device = setup_distributed()
    master = rank == 0
    device = ddp_device or pick_device(config.device)
    log = print if master else (lambda *a, **k: None)
    try:
        if master:
            ensure_prerequisites(config, log)
        if dist.is_initialized():
            dist.barrier()
        return _train(config, resume, rank, world, device, master, log, tqdm)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _train(config, resume, rank, world, device, master, log, tqdm):
    torch.manual_seed(config.seed)
    vocab = load_vocabulary(config.vocabulary_path)
    encoder, decoder = build_models(config, len(vocab))
    amp_dtype = amp_dtype_for(device, config.amp)
    # channels_last: on CUDA always; on a CPU only for a frozen backbone. Measured on 2 cores,
    # ResNet forward passes run 1.15-1.19x faster in it, but ResNet-18's backward 5% slower.
    channels_last = config.channels_last and (device.type == "cuda" or not config.train_backbone)
    encoder.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
    decoder.to(device)

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
    if not config.train_backbone and encoder.weights_id is None:
        log("frozen randomly initialised backbone: estimating its BatchNorm statistics from training images")
        calibration = CocoCaptionDataset(config.resized_images("train"), config.captions_json("train"), vocab, val_tf,
                                         group_by_image=True)
        picks = list(range(0, len(calibration), max(1, len(calibration) // 1024)))[:1024]
        encoder.calibrate_batchnorm(torch.stack([calibration.load(i) for i in picks[j:j + 64]]).to(device)
                                    for j in range(0, len(picks), 64))
    if config.use_cache:
        from .features import CachedCaptionDataset, build_feature_cache

        caches = {}
        for split, ds, tf, views in (("train", train_ds, train_tf, config.cache_views), ("val", val_ds, val_tf, 1)):
            if master:
                caches[split] = build_feature_cache(
                    encoder, ds, tf, views, config.features_dir, split, device, batch_size=config.batch_size,
                    num_workers=config.num_workers, seed=config.seed, amp_dtype=amp_dtype,
                    channels_last=channels_last, progress=config.progress)
            if dist.is_initialized():
                dist.barrier()
            if not master:  # rank 0 has written it: this only opens it
                caches[split] = build_feature_cache(encoder, ds, tf, views, config.features_dir, split, device,
                                                    seed=config.seed, progress=False)
        train_ds = CachedCaptionDataset(train_ds, caches["train"], config.seed)
        val_ds = CachedCaptionDataset(val_ds, caches["val"], config.seed)
    # grouped items are whole images, already only those that hold val_captions captions
    val_subset = val_ds if group else data.Subset(val_ds, range(min(len(val_ds), val_captions)))
    val_loader = _loader(val_subset, None, config, device, persistent=True)  # workers kept across epochs

    model = EncoderDecoder(encoder, decoder, cached=config.use_cache)
    head_params = list(decoder.parameters()) + list(encoder.linear_layer.parameters()) + \
        list(encoder.batch_norm.parameters())
    groups = [{"params": head_params, "lr": config.lr}]
    if config.train_backbone:
        groups.append({"params": list(encoder.resnet_module.parameters()), "lr": config.backbone_lr})
    optimizer = torch.optim.Adam(groups)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    os.makedirs(config.models_dir, exist_ok=True)
    last_path = os.path.join(config.models_dir, "last.ckpt")
    best_path = os.path.join(config.models_dir, "best.ckpt")
    log_path = os.path.join(config.models_dir, "train_log.jsonl")
    epoch, batch_in_epoch, step, best_val = 0, 0, 0, math.inf
    if resume:
        if not os.path.exists(last_path):
            raise FileNotFoundError(f"--resume: no checkpoint at {last_path}")
        ckpt = load_checkpoint(last_path, map_location=device)
        if ckpt["vocab"] != vocab.words():
            raise ValueError(f"{last_path} was trained with a different vocabulary than {config.vocabulary_path}")
        load_encoder_state(encoder, ckpt)
        decoder.load_state_dict(ckpt["decoder"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        epoch, batch_in_epoch, step = ckpt["epoch"], ckpt["batch"], ckpt["step"]
        best_val = ckpt.get("best_val_loss", math.inf)
        _set_rng_state(ckpt["rng"])
        log(f"resumed from {last_path} at epoch {epoch}, step {step}")
        if master and os.path.exists(log_path):  # drop rows logged after that checkpoint was written
            with open(log_path) as f:
                rows = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
            with open(log_path, "w") as f:
                f.writelines(rows)
    elif master and os.path.exists(log_path):
        os.remove(log_path)  # a fresh run starts a fresh log
    ddp_model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if dist.is_initialized() else model

    log_file = open(log_path, "a") if master else None

    def write_log(row):
        if log_file:
            log_file.write(json.dumps(row) + "\n")
            log_file.flush()

    def save(path_epoch, path_batch):
        if master:
            atomic_save(checkpoint_state(config, vocab, encoder, decoder, optimizer, scaler,
                                         path_epoch, path_batch, step, best_val), last_path)

    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext()
    sampler = data.DistributedSampler(train_ds, num_replicas=world, rank=rank, shuffle=True, seed=config.seed)
    steps_per_epoch = math.ceil(len(sampler) / config.batch_size)
    total_steps = config.epochs * steps_per_epoch
    if config.max_steps:
        total_steps = min(total_steps, config.max_steps)
    log(f"training on {device} ({world} process{'es' if world > 1 else ''}{', DDP' if dist.is_initialized() else ''}), {len(train_ds)} items, "
        f"{steps_per_epoch} steps/epoch{' (all captions of an image per item)' if group else ''}, {'cached features' if config.use_cache else 'images'}, "
        f"amp={amp_dtype}, checkpoints in {config.models_dir}")
    bar = tqdm(total=total_steps, initial=min(step, total_steps), desc="training", unit="step",
               disable=not (master and config.progress))
    model.train()
    interrupted, last_loss, loss, t0 = False, None, None, time.time()
    try:
        while epoch < config.epochs and step < total_steps:
            sampler.set_epoch(epoch)
            train_ds.set_epoch(epoch)
            loader = _loader(train_ds, _SkipSampler(sampler, batch_in_epoch * config.batch_size), config, device)
            for inputs, captions, lengths, *image_index in loader:
                inputs = inputs.to(device, non_blocking=True)
                if channels_last and inputs.dim() == 4:
                    inputs = inputs.contiguous(memory_format=torch.channels_last)
                captions = captions.to(device, non_blocking=True)
                with autocast:
                    logits = ddp_model(inputs, captions, lengths, *[i.to(device) for i in image_index])
                loss = caption_loss(logits, captions, lengths)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                step += 1
                batch_in_epoch += 1
                bar.update()
                if step % config.log_every == 0 or step == total_steps:
                    # .item() waits for the GPU: only here, so the CPU prepares the next batches meanwhile
                    last_loss = loss.item()
                    bar.set_postfix(epoch=epoch, loss=f"{last_loss:.3f}", ppl=f"{math.exp(min(last_loss, 50)):.1f}")
                    write_log({"step": step, "epoch": epoch, "loss": last_loss, "perplexity": math.exp(min(last_loss, 50)),
                               "elapsed_s": round(time.time() - t0, 2)})
                if step >= total_steps:
                    break
                if config.save_every and step % config.save_every == 0:
                    save(epoch, batch_in_epoch)
            if batch_in_epoch >= steps_per_epoch:  # the epoch is complete: validate, checkpoint
                epoch, batch_in_epoch = epoch + 1, 0
                if master:
                    val_loss = evaluate_loss(model, val_loader, device, amp_dtype, channels_last)
                    write_log({"step": step, "epoch": epoch - 1, "val_loss": val_loss,
                               "val_perplexity": math.exp(min(val_loss, 50))})
                    log(f"epoch {epoch - 1}: val loss {val_loss:.4f} (perplexity {math.exp(min(val_loss, 50)):.2f})")
                    improved = val_loss < best_val
                    best_val = min(best_val, val_loss)
                    save(epoch, 0)
                    if improved:
                        atomic_copy(last_path, best_path)
                if dist.is_initialized():
                    dist.barrier()
    except KeyboardInterrupt:
        interrupted = True
        log(f"\ninterrupted at step {step}; saving {last_path} (continue with resume=True / --resume)")
    finally:
        bar.close()
    if loss is not None:
        last_loss = loss.item()
    save(epoch, batch_in_epoch)
    if master and not os.path.exists(best_path):  # no epoch finished yet: best is what we have
        atomic_copy(last_path, best_path)
    if log_file:
        log_file.close()
    log(f"saved {last_path} at step {step}")
    return {"last": last_path, "best": best_path, "step": step, "epoch": epoch, "loss": last_loss,
            "best_val_loss": best_val, "interrupted": interrupted, "log": log_path}
