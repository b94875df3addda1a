"""Dataset, collate and loader (the chapter's names), plus the image transforms.

Everything is defined at module level, so DataLoader workers also work under the
`spawn` start method (macOS, Windows), where classes defined in a notebook cannot be found.
"""
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.utils.data as data
from PIL import Image
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import functional as TF

from .images import ImageReadError, load_image
from .vocabulary import END, START, Vocab, caption_tokens, load_coco, tokenize

# what collate_function returns: images, captions, lengths (and, grouped by image, each caption's image)
Batch = tuple[torch.Tensor, torch.Tensor, list[int]] | tuple[torch.Tensor, torch.Tensor, list[int], torch.Tensor]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def seeded_generator(*key: int) -> torch.Generator:
    """A torch.Generator seeded from a tuple of ints (seed, epoch, item...): the same key, the same
    random crop, in any process and after a resume (hash() of ints is not randomised)."""
    return torch.Generator().manual_seed(hash(key) & 0x7FFF_FFFF_FFFF)


def _to_normalized_tensor(image: Image.Image) -> torch.Tensor:
    tensor = TF.to_dtype(TF.to_image(image), torch.float32, scale=True)
    return TF.normalize(tensor, IMAGENET_MEAN, IMAGENET_STD)


class TrainTransform:
    """RandomCrop + optional horizontal flip + ImageNet normalisation, as in the chapter.

    It takes an optional torch.Generator, so a resumed run and the feature cache can
    reproduce exactly the same crops.
    """

    def __init__(self, crop_size: int = 224, hflip: bool = True) -> None:
        self.crop_size, self.hflip = crop_size, hflip

    def __call__(self, image: Image.Image, generator: torch.Generator | None = None) -> torch.Tensor:
        w, h = image.size
        c = self.crop_size
        if w < c or h < c:
            image = TF.resize(image, [max(c, h * c // w), max(c, w * c // h)])
            w, h = image.size
        top = int(torch.randint(0, h - c + 1, (1,), generator=generator))
        left = int(torch.randint(0, w - c + 1, (1,), generator=generator))
        image = TF.crop(image, top, left, c, c)
        if self.hflip and torch.rand(1, generator=generator).item() < 0.5:
            image = TF.horizontal_flip(image)
        return _to_normalized_tensor(image)

    def __repr__(self) -> str:
        return f"TrainTransform(crop_size={self.crop_size}, hflip={self.hflip})"


def eval_transform(resize_size: int = 256, crop_size: int = 224) -> Callable[[Image.Image], torch.Tensor]:
    """Deterministic: resize to the training size (a no-op on resized images), then centre-crop."""
    return T.Compose([T.Resize((resize_size, resize_size), antialias=True), T.CenterCrop(crop_size),
                      T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def encode_caption(caption: str, vocabulary: Vocab, max_seq_len: int = 20) -> torch.Tensor:
    """'A dog.' -> LongTensor [<start>, a, dog, <end>], at most max_seq_len long, <end> always kept."""
    return encode_tokens(tokenize(caption), vocabulary, max_seq_len)


def encode_tokens(tokens: Iterable[str], vocabulary: Vocab, max_seq_len: int = 20) -> torch.Tensor:
    ids = [vocabulary(t) for t in tokens][: max_seq_len - 2]
    return torch.tensor([vocabulary(START)] + ids + [vocabulary(END)], dtype=torch.long)


class CocoCaptionDataset(data.Dataset):
    """One item per caption, as in the chapter: (image tensor, caption LongTensor).

    With `group_by_image=True` an item is one image with all its captions: (image, [captions]).
    The encoder then runs once per image instead of once per caption, which is what makes
    fine-tuning the backbone affordable (the decoder is cheap; the CNN's backward is not).
    `max_captions` keeps only the fewest leading images (in image-id order) that hold that many
    captions: a validation subset whose images are all used, so a feature cache built over it
    encodes no image that validation never reads.
    """

    def __init__(self, data_path: str, coco_json_path: str, vocabulary: Vocab,
                 transform: Callable[..., torch.Tensor] | None = None, max_seq_len: int = 20, seed: int = 0,
                 group_by_image: bool = False, progress: bool = True, max_captions: int | None = None) -> None:
        if not os.path.isdir(data_path):
            raise FileNotFoundError(f"image folder not found: {data_path} (resized images come from notebook 03)")
        if not os.path.isfile(coco_json_path):
            raise FileNotFoundError(f"captions file not found: {coco_json_path} (get the data with notebook 01 first)")
        self.data_path, self.vocabulary, self.transform = data_path, vocabulary, transform
        self.max_seq_len, self.seed, self.epoch, self.group_by_image = max_seq_len, seed, 0, group_by_image
        # file name -> why it could not be read (met in this process, or reported to it)
        self.skipped: dict[str, str | None] = {}
        self.skipped_said = 0   # how many of them a CountingLoader has named already
        self.coco = load_coco(coco_json_path)
        self._tokens = caption_tokens(coco_json_path, self.coco, progress)  # tokenized once, cached on disk
        present = set(os.listdir(data_path))
        image_ids = sorted(self.coco.imgs)
        missing = [self.coco.imgs[i]["file_name"] for i in image_ids if self.coco.imgs[i]["file_name"] not in present]
        if missing:
            print(f"warning: {len(missing)} of {len(image_ids)} images listed in {coco_json_path} are missing "
                  f"from {data_path} and will be skipped, e.g. {', '.join(missing[:5])}")
        absent = set(missing)
        # images that are present and captioned, in a fixed order
        self.image_ids = [i for i in image_ids if self.coco.imgs[i]["file_name"] not in absent
                          and self.coco.imgToAnns.get(i)]
        if not self.image_ids:
            raise ValueError(f"no captioned images found: {coco_json_path} lists none present in {data_path}")
        if max_captions is not None:
            if max_captions < 1:
                raise ValueError(f"max_captions must be >= 1, got {max_captions}")
            kept: list[int] = []
            held = 0
            for i in self.image_ids:
                if held >= max_captions:
                    break
                kept.append(i)
                held += len(self.coco.imgToAnns[i])
            self.image_ids = kept
        # items: (index into image_ids, annotation ids)
        anns = [sorted(a["id"] for a in self.coco.imgToAnns[i]) for i in self.image_ids]
        self.items: list[tuple[int, list[int]]]
        if group_by_image:
            self.items = list(enumerate(anns))
        else:
            self.items = sorted(((k, [a]) for k, ids in enumerate(anns) for a in ids), key=lambda it: it[1][0])
        self._make_caption_store([a for ids in anns for a in ids])

    def _make_caption_store(self, annotation_ids: list[int]) -> None:
        """Room for every caption's ids, reserved now and filled as each caption is first used (captions()).

        One flat array, not a tensor per caption: training on cached features encodes the captions in
        its own process between steps, and a small tensor kept from each pinned heap pages between the
        steps' large temporary buffers, so the process grew by megabytes a step (benchmarks/coco_scale.py:
        ~7 MB a step at COCO's vocabulary on a CPU, ~20 GB over one COCO epoch)."""
        self._slot = {a: k for k, a in enumerate(annotation_ids)}            # annotation id -> its slot
        # at most max_seq_len ids: <start>, the words, <end>
        room = np.fromiter((min(len(self._tokens[a].split()), self.max_seq_len - 2) + 2 for a in annotation_ids),
                           dtype=np.int64, count=len(annotation_ids))
        self._start = np.concatenate(([0], np.cumsum(room)))
        self._ids = np.zeros(int(self._start[-1]), dtype=np.int64)
        self._length = np.zeros(len(annotation_ids), dtype=np.int64)       # 0: not encoded yet

    def set_epoch(self, epoch: int) -> None:
        """Seeds the random crops of this epoch (call before creating the DataLoader iterator)."""
        self.epoch = epoch

    def image_path(self, image_index: int) -> str:
        return os.path.join(self.data_path, self.coco.imgs[self.image_ids[image_index]]["file_name"])

    def captions(self, idx: int) -> list[torch.Tensor]:
        """The encoded caption(s) of item `idx`, as a list of LongTensors (encoded once, then remembered:
        views of the dataset's one store of caption ids, _make_caption_store)."""
        out = []
        for a in self.items[idx][1]:
            k = self._slot[a]
            start = int(self._start[k])
            if not self._length[k]:
                ids = encode_tokens(self._tokens[a].split(), self.vocabulary, self.max_seq_len).numpy()
                self._ids[start:start + len(ids)] = ids
                self._length[k] = len(ids)
            out.append(torch.from_numpy(self._ids[start:start + int(self._length[k])]))
        return out

    def references(self, image_index: int) -> list[str]:
        """The tokenized captions of image `image_index` (an index into image_ids), as space-separated words."""
        return [self._tokens[a["id"]] for a in self.coco.imgToAnns[self.image_ids[image_index]]]

    def image_index(self, idx: int) -> int:
        """Which image item `idx` shows: its index into image_ids (also its row in a feature cache)."""
        return self.items[idx][0]

    def target(self, idx: int) -> torch.Tensor | list[torch.Tensor]:
        """What item `idx` teaches: its caption, or all of its image's captions when grouped by image."""
        captions = self.captions(idx)
        return captions if self.group_by_image else captions[0]

    def load(self, idx: int) -> Any:
        """The transformed image of item `idx` (its random crop is fixed by seed, epoch and idx)."""
        image = load_image(self.image_path(self.image_index(idx)))
        if isinstance(self.transform, TrainTransform):
            return self.transform(image, generator=seeded_generator(self.seed, self.epoch, idx))
        return self.transform(image) if self.transform is not None else image

    def __getitem__(self, idx: int) -> "tuple[Any, torch.Tensor | list[torch.Tensor]] | Unreadable":
        """(image, caption(s)); an Unreadable marker for an image that cannot be decoded (collate_function
        leaves it out, and the loaders of training.py count and name it)."""
        try:
            return self.load(idx), self.target(idx)
        except ImageReadError as e:
            name = os.path.basename(self.image_path(self.image_index(idx)))
            self.skipped[name] = e.reason
            return Unreadable(name, e.reason, self, idx)

    def __len__(self) -> int:
        return len(self.items)

    def substitute(self, idx: int, tries: int = 100) -> tuple[Any, torch.Tensor | list[torch.Tensor]]:
        """The first readable item after `idx` that shows another image: what a batch gets when every image
        it drew is unreadable (a training step needs one item at least)."""
        bad = {self.image_index(idx)}
        for k in range(1, len(self.items)):
            j = (idx + k) % len(self.items)
            if self.image_index(j) in bad:
                continue
            item = self[j]
            if not isinstance(item, Unreadable):
                return item
            bad.add(self.image_index(j))
            if len(bad) > tries:
                break
        raise ImageReadError(self.image_path(self.image_index(idx)),
                             f"{self.skipped.get(os.path.basename(self.image_path(self.image_index(idx))))} "
                             f"(and no readable image among the {len(bad) - 1} after it)")


class Unreadable:
    """What CocoCaptionDataset gives for an item whose image cannot be decoded: its file name and why."""

    def __init__(self, name: str, reason: str | None, dataset: CocoCaptionDataset | None = None,
                 idx: int | None = None) -> None:
        self.name, self.reason, self._dataset, self._idx = name, reason, dataset, idx

    def substitute(self) -> tuple[Any, torch.Tensor | list[torch.Tensor]]:
        if self._dataset is None or self._idx is None:    # unpickled: its dataset stayed where it was made
            raise ImageReadError(self.name, f"{self.reason} (and no dataset here to take another image from)")
        return self._dataset.substitute(self._idx)

    # pickled without its dataset (the substitute is found where it was made)
    def __reduce__(self) -> tuple[type, tuple[str, str | None]]:
        return type(self), (self.name, self.reason)

    def __repr__(self) -> str:
        return f"Unreadable({self.name!r}, {self.reason!r})"


def unreadable_items(data_batch: Iterable[Any]) -> dict[str, str | None]:
    """{file name: reason} of the Unreadable items in a list of dataset items."""
    return {item.name: item.reason for item in data_batch if isinstance(item, Unreadable)}


def too_many_unreadable(skipped: Mapping[str, str | None], total: int, where: str | os.PathLike[str],
                        limit: float = 0.01) -> ValueError | None:
    """A ValueError to raise when more than `limit` (1%) of `total` images are unreadable, else None.
    It names the count, the split's folder and a few files."""
    if len(skipped) <= limit * total:
        return None
    names = sorted(skipped)
    shown = "; ".join(f"{n} ({skipped[n]})" if skipped[n] else n for n in names[:5])
    more = f" and {len(names) - 5} more" if len(names) > 5 else ""
    return ValueError(f"{len(names)} of {total} images of {os.path.basename(str(where).rstrip('/'))} ({where}) are "
                      f"unreadable, more than {limit:.0%}: {shown}{more}; repair or remove them "
                      f"(a resized copy is redone from its original once it is deleted)")


def skipped_line(skipped: Iterable[str]) -> str:
    """'2 unreadable images skipped: a.jpg, b.jpg' (what a run prints once and its summary lists)."""
    names = sorted(skipped)
    return f"{len(names)} unreadable image{'s' if len(names) != 1 else ''} skipped: {', '.join(names)}"


def collate_function(data_batch: Sequence[Any]) -> Batch:
    """Pad captions with <pad>=0 and sort by length, longest first (what pack_padded_sequence wants).

    Returns images (B, ...), captions (N, max_len) LongTensor and lengths (a list of ints).
    For items grouped by image, a 4th value maps each caption to its image: (N,) LongTensor.
    Items whose image could not be read (Unreadable) are left out; a batch of nothing else gets the
    first one's substitute, the next readable item of the dataset.
    """
    readable = [item for item in data_batch if not isinstance(item, Unreadable)]
    data_batch = readable or [data_batch[0].substitute()]
    grouped = isinstance(data_batch[0][1], list)
    pairs = [(k, c) for k, item in enumerate(data_batch) for c in (item[1] if grouped else [item[1]])]
    pairs.sort(key=lambda kc: len(kc[1]), reverse=True)
    lengths = [len(c) for _, c in pairs]
    targets = torch.zeros(len(pairs), max(lengths), dtype=torch.long)
    for i, (_, c) in enumerate(pairs):
        targets[i, : lengths[i]] = c
    if grouped:
        images = torch.stack([item[0] for item in data_batch], 0)
        return images, targets, lengths, torch.tensor([k for k, _ in pairs])
    images = torch.stack([data_batch[k][0] for k, _ in pairs], 0)  # in caption order
    return images, targets, lengths


def get_loader(data_path: str, coco_json_path: str, vocabulary: Vocab, transform: Callable[..., torch.Tensor] | None,
               batch_size: int, shuffle: bool, num_workers: int, sampler: data.Sampler | None = None,
               max_seq_len: int = 20, seed: int = 0, pin_memory: bool = False,
               group_by_image: bool = False) -> data.DataLoader:
    """The chapter's loader; `sampler` (e.g. a DistributedSampler) replaces `shuffle` when given."""
    coco_dataset = CocoCaptionDataset(data_path, coco_json_path, vocabulary, transform, max_seq_len, seed,
                                      group_by_image)
    return data.DataLoader(coco_dataset, batch_size=batch_size, shuffle=shuffle if sampler is None else False,
                           sampler=sampler, num_workers=num_workers, collate_fn=collate_function,
                           pin_memory=pin_memory, persistent_workers=False)


def images_of(dataset: Any) -> CocoCaptionDataset | None:
    """The CocoCaptionDataset under a Subset (or a Subset of a Subset), or None (cached features)."""
    while isinstance(dataset, data.Subset):
        dataset = dataset.dataset
    return dataset if isinstance(dataset, CocoCaptionDataset) else None


def skipped_images(*datasets: Any) -> list[str]:
    """The sorted file names of the unreadable images that these datasets (or loaders, Subsets) skipped."""
    names: set[str] = set()
    for d in datasets:
        d = getattr(d, "dataset", d) if isinstance(d, (data.DataLoader, CountingLoader)) else d
        while isinstance(d, data.Subset):
            d = d.dataset
        names |= set(getattr(d, "skipped", None) or ())
    return sorted(names)


class _Counting:
    """A collate_fn that also returns the batch's unreadable images: (collate(batch), {name: reason})."""

    def __init__(self, collate: Callable[[Any], Any]) -> None:
        self.collate = collate

    def __call__(self, data_batch: Sequence[Any]) -> tuple[Any, dict[str, str | None]]:
        return self.collate(data_batch), unreadable_items(data_batch)


class CountingLoader:
    """A DataLoader (same arguments, collate_function) that counts and names the unreadable images it meets.

    Workers are other processes: each batch carries the names of the images they could not read back to
    this one, where they are added to the dataset's `skipped`. The names are printed once (when a pass
    over the data ends, or stops early) and a split with more than 1% unreadable stops the run.
    """

    def __init__(self, dataset: data.Dataset, log: Callable[[str], object] = print,
                 collate_fn: Callable[[Any], Any] | None = None, **kwargs: Any) -> None:
        self.dataset, self.log = dataset, log
        self.images = images_of(dataset)
        self.loader = data.DataLoader(dataset, collate_fn=_Counting(collate_fn or collate_function), **kwargs)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        try:
            for batch, unreadable in self.loader:
                if unreadable and self.images is not None:
                    self.images.skipped.update(unreadable)
                    error = too_many_unreadable(self.images.skipped, len(self.images.image_ids),
                                                self.images.data_path)
                    if error:
                        raise error
                yield batch
        finally:
            self._report()

    def _report(self) -> None:
        images = self.images
        if images is not None and len(images.skipped) > getattr(images, "skipped_said", 0):
            images.skipped_said = len(images.skipped)
            self.log(f"{skipped_line(images.skipped)} ({images.data_path}: their captions are left out)")
