"""Self-critical sequence training (Rennie et al. 2017): fine-tuning a trained captioner on CIDEr-D itself.

Cross-entropy teaches the decoder the next reference word after the previous reference words; at
inference it reads its own words instead, and is judged by CIDEr, which it never saw. SCST lets it
caption each training image in its own words, scores each caption against the image's
references, and makes the better-than-usual captions likelier (REINFORCE):

    loss = - sum_t (reward - baseline) * log p(word_t)        over the words of each sampled caption

- samples: `scst_samples` captions per image, each word drawn from the decoder's distribution
  (decoding.sample_captions), not its greedy choice;
- reward: CIDEr-D (captioning.cider) against the image's reference captions, with document
  frequencies from the training references, counted once. An <end> token is appended to every
  finished caption and every reference, so that a caption that stops mid-phrase ("... left of a")
  misses the n-grams that end a reference sentence; a caption cut off at max_seq_len without its
  <end> gets 0;
- baseline: the mean reward of the image's other samples (the "new SCST" of self-critical.pytorch),
  or the reward of the greedy caption (the paper's), so that only a better-than-usual caption is
  made likelier;
- validation: CIDEr-D of the greedy captions of the validation images (document frequencies from
  their references, as pycocoevalcap counts them): best.ckpt follows it, where cross-entropy runs
  follow the validation loss, which SCST makes worse.

Training itself (resume, checkpoints, progress, TensorBoard) is training.py's loop; this module
is the objective it runs: `SelfCritical`, beside training.CrossEntropy.
"""
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.utils.data as data

from .cider import CiderD
from .data import CocoCaptionDataset, Unreadable, collate_function, images_of
from .vocabulary import END, PAD, START, Vocab

# ---- the loss, on screen in notebook 10 ---------------------------------------------------------

def mean_of_others(rewards: torch.Tensor, samples: int) -> torch.Tensor:
    """(B * samples,) rewards, image b's in rows b*samples..: each one's baseline is the mean of its image's
    other samples' rewards."""
    per_image = rewards.view(-1, samples)                                       # (B, samples)
    return ((per_image.sum(1, keepdim=True) - per_image) / (samples - 1)).view(-1)


def reinforce_loss(log_probs: torch.Tensor, mask: torch.Tensor, rewards: torch.Tensor,
                   baseline: torch.Tensor) -> torch.Tensor:
    """REINFORCE with a baseline: -(reward - baseline) x log p of each word of each sampled caption, averaged
    over the words. log_probs, mask (N, T); rewards, baseline (N,)."""
    advantage = (rewards - baseline).detach().unsqueeze(1)                      # (N, 1)
    mask = mask.float()
    return -(advantage * log_probs * mask).sum() / mask.sum().clamp(min=1)


# ---- the data: one item per image ---------------------------------------------------------------

class PerImage(data.Subset):
    """One item per image of a per-caption training dataset (images or cached features): (input, caption,
    image row).

    Item k is one of image k's items in the dataset, drawn afresh at each epoch (from seed, epoch and k,
    so a resumed run draws the same), so the input is what the dataset gives for it (one of the cached
    views, or the image's random crop) and the caption is one of the image's references (for the
    cross-entropy term, scst_xe); the row says whose references score the sampled captions."""

    def __init__(self, dataset: data.Dataset, seed: int = 0) -> None:
        self.captions = _captions_of(dataset)
        items: dict[int, list[int]] = {}
        for idx in range(len(dataset)):  # type: ignore[arg-type]
            items.setdefault(_image_row(dataset, idx), []).append(idx)
        self.rows = sorted(items)
        self.items_of = [items[row] for row in self.rows]
        super().__init__(dataset, [of[0] for of in self.items_of])
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.dataset.set_epoch(epoch)                                           # type: ignore[attr-defined]

    def __getitem__(self, idx):
        return self.__getitems__([idx])[0]

    def __getitems__(self, indices: list[int]) -> list[Any]:
        picks = [self._pick(i) for i in indices]
        get = getattr(self.dataset, "__getitems__", None)
        items = get(picks) if get is not None else [self.dataset[i] for i in picks]
        return [item if isinstance(item, Unreadable) else (item[0], self._caption(item[1], i), self.rows[i])
                for item, i in zip(items, indices)]

    def _pick(self, k: int) -> int:
        of = self.items_of[k]
        return of[hash((self.seed, self.epoch, k)) % len(of)]

    def _caption(self, target: Any, k: int) -> torch.Tensor:
        """The item's caption; of an item grouped by image (all its captions), one drawn as _pick draws."""
        return target[hash((self.seed, self.epoch, k)) % len(target)] if isinstance(target, list) else target


def _captions_of(dataset: Any) -> CocoCaptionDataset:
    """The CocoCaptionDataset under a dataset of images or of cached features."""
    found = images_of(dataset) or images_of(getattr(dataset, "ds", None))
    if found is None:
        raise TypeError(f"SCST needs a CocoCaptionDataset (or cached features over one), got {type(dataset).__name__}")
    return found


def _image_row(dataset: Any, idx: int) -> int:
    """The image (its index into image_ids, its feature-cache row) that item idx of `dataset` shows."""
    if isinstance(dataset, CocoCaptionDataset):
        return dataset.image_index(idx)
    items = getattr(dataset, "items", None)                                     # CachedCaptionDataset
    return dataset.ds.image_index(idx if items is None else items[idx])


def collate_images(batch: Sequence[Any]) -> tuple[Any, ...] | None:
    """The readable items as (inputs (B, ...), captions (B, T) padded and sorted longest first, lengths,
    each caption's input row (B,), image rows (B,)); None when none of them is readable."""
    good = [item for item in batch if not isinstance(item, Unreadable)]
    if not good:
        return None
    inputs, captions, lengths, *order = collate_function([(torch.as_tensor(x), [c]) for x, c, _ in good])
    return inputs, captions, lengths, order[0], torch.tensor([row for _, _, row in good])


# ---- rewards ------------------------------------------------------------------------------------

def words_of(ids: Sequence[int], vocab: Vocab) -> list[str]:
    """Token ids -> words, up to <end> (excluded), without <start> and <pad>."""
    out = []
    for i in ids:
        word = vocab.i2w[int(i)]
        if word == END:
            break
        if word not in (START, PAD):
            out.append(word)
    return out


class Rewards:
    """CIDEr-D rewards against each training image's references, document frequencies counted once.

    Every reference and every finished caption gets an <end> token appended, so that the n-grams
    ending a sentence count: a caption that stops mid-phrase misses them. A caption without <end>
    (cut off at max_seq_len) gets 0."""

    def __init__(self, references: Sequence[Sequence[str]]) -> None:
        self.references = [[f"{r} {END}" for r in refs] for refs in references]
        self.cider = CiderD(self.references)

    def __call__(self, ids: torch.Tensor, finished: torch.Tensor, rows: Sequence[int], vocab: Vocab) -> np.ndarray:
        """(N,) rewards of sampled captions ids (N, T) of images `rows` (N,)."""
        candidates = [" ".join(words_of(seq, vocab) + [END]) for seq in ids.tolist()]
        scores = self.cider.score(candidates, [self.references[r] for r in rows], keys=list(rows))
        return np.where(finished.cpu().numpy(), scores, 0.0)


# ---- the objective that training.py runs ---------------------------------------------------------

class SelfCritical:
    """The SCST objective: what training.train_one_epoch and validate ask of an objective
    (training.CrossEntropy is the chapter's): its per-image dataset and collate, the loss of a batch with
    the scalars to log, and the validation score that picks best.ckpt (higher is better)."""

    name = "scst"
    metric = "val_cider"
    higher_is_better = True
    collate = staticmethod(collate_images)

    def __init__(self, config: Any, vocab: Vocab, train_ds: data.Dataset, val_ds: data.Dataset) -> None:
        self.config, self.vocab = config, vocab
        self.samples, self.greedy_baseline = config.scst_samples, config.scst_baseline == "greedy"
        self.xe = config.scst_xe
        self.train = PerImage(train_ds, config.seed)
        captions = self.train.captions
        self.rewards = Rewards([captions.references(r) for r in range(len(captions.image_ids))])
        self.val = PerImage(val_ds, config.seed)
        val_captions = self.val.captions
        self.val_references = {r: val_captions.references(r) for r in self.val.rows}
        self.val_cider = CiderD(self.val_references.values())      # as pycocoevalcap counts them on these images

    def dataset(self, train_ds: data.Dataset) -> data.Dataset:
        return self.train

    def loss(self, run: Any, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        """Sample, reward, baseline, REINFORCE (+ scst_xe x cross-entropy): the loss of one batch of images,
        and what to log of it."""
        from .training import caption_loss, decoder_penalty

        inputs, captions, lengths, order, rows = batch
        inputs = inputs.to(run.device, non_blocking=True)
        if run.channels_last and inputs.dim() == 4:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        rows = rows.repeat_interleave(self.samples).tolist()
        if self.xe:                                   # one forward pass: the draws, and teacher forcing
            captions = captions.to(run.device)
            drawn, logits = run.ddp_model(inputs, captions, lengths, order.to(run.device), samples=self.samples)
            xe = caption_loss(logits, captions, lengths) + decoder_penalty(run.decoder)
        else:
            drawn, xe = run.ddp_model(inputs, samples=self.samples), None
        rewards = torch.as_tensor(self.rewards(drawn.ids, drawn.finished, rows, self.vocab),
                                  dtype=torch.float32, device=run.device)
        if self.greedy_baseline:
            with torch.no_grad():
                run.model.eval()
                greedy = run.model(inputs, samples=1, greedy=True)
                run.model.train()
            baseline = torch.as_tensor(self.rewards(greedy.ids, greedy.finished, rows[::self.samples], self.vocab),
                                       dtype=torch.float32, device=run.device).repeat_interleave(self.samples)
        else:
            baseline = mean_of_others(rewards, self.samples)
        loss = reinforce_loss(drawn.log_probs, drawn.mask, rewards, baseline)
        logged = {"reward": float(rewards.mean()), "baseline": float(baseline.mean()),
                  "sample_length": float(drawn.mask.sum(1).float().mean()),
                  "finished": float(drawn.finished.float().mean())}
        if xe is not None:
            loss = loss + self.xe * xe
            logged["xe"] = float(xe.detach())
        return loss, logged

    @torch.no_grad()
    def validate(self, run: Any) -> float:
        """CIDEr-D of the greedy captions of the validation images (the model is left in eval mode)."""
        run.model.eval()
        loader = data.DataLoader(self.val, batch_size=run.config.batch_size, collate_fn=collate_images)
        candidates, references = [], []
        for batch in loader:
            if batch is None:
                continue
            inputs, *_, rows = batch
            greedy = run.model(inputs.to(run.device), samples=1, greedy=True)
            candidates += [" ".join(words_of(seq, self.vocab)) for seq in greedy.ids.tolist()]
            references += [self.val_references[r] for r in rows.tolist()]
        return float(self.val_cider.score(candidates, references).mean()) if candidates else 0.0

