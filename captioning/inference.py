"""Caption image files in batches with a trained encoder/decoder (greedy or beam search)."""
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.utils.data as data

from .config import Config
from .data import eval_transform
from .images import ImageReadError, list_images, load_image
from .model import CNNModel, LSTMModel, cut_after_end, decode
from .progress import tqdm
from .vocabulary import Vocab


def expand_paths(inputs: Iterable[str], missing: list[str] | None = None) -> list[str]:
    """Files stay as given; folders expand to the images they hold (sorted).

    A path that is neither a folder nor a regular file is an error, or, when a `missing` list
    is given, is appended to it so that the rest can still be captioned.
    """
    paths: list[str] = []
    for p in inputs:
        if os.path.isdir(p):
            paths += [os.path.join(p, f) for f in list_images(p)]
        elif os.path.isfile(p):
            paths.append(p)
        elif missing is not None:
            missing.append(p)
        else:
            raise FileNotFoundError(f"no such image or folder: {p}")
    return paths


class _ImageFiles(data.Dataset):
    def __init__(self, paths: Sequence[str], transform: Callable[[Any], torch.Tensor]) -> None:
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            return i, self.transform(load_image(self.paths[i])), None
        except ImageReadError as e:  # report the file, keep captioning the rest
            return i, None, e.reason
        except Exception as e:
            return i, None, f"{type(e).__name__}: {e}"


def _collate(batch: Sequence[tuple[int, torch.Tensor | None, str | None]]
             ) -> tuple[list[int], torch.Tensor | None, list[tuple[int, str]]]:
    ok = [(i, x) for i, x, err in batch if x is not None]      # an item has an image or an error
    errors = [(i, err) for i, x, err in batch if err is not None]
    images = torch.stack([x for _, x in ok]) if ok else None
    return [i for i, _ in ok], images, errors


@torch.no_grad()
def generate(encoder: CNNModel, decoder: LSTMModel, images: torch.Tensor, beam_size: int = 1) -> list[list[int]]:
    """(B, 3, H, W) images -> one token-id list per image, cut after <end>.

    Greedy decoding needs only the chapter's `sample()`, so any decoder with it captions (a
    notebook's edited LSTMModel included); beam search needs `beam_search()`."""
    features = encoder(images)
    if beam_size > 1:
        return decoder.beam_search(features, beam_size)
    return [cut_after_end(ids) for ids in decoder.sample(features).tolist()]


def caption_images(paths: Sequence[str], encoder: CNNModel, decoder: LSTMModel, vocab: Vocab, config: Config,
                   device: str | torch.device = "cpu", beam_size: int = 1, batch_size: int = 32, num_workers: int = 0,
                   progress: bool = False) -> list[tuple[str, str | None, str | None]]:
    """Returns [(path, caption or None, error or None)] in the order of `paths`."""
    device = torch.device(device)
    encoder.eval(), decoder.eval()
    transform = eval_transform(config.resize_size, config.crop_size)
    loader = data.DataLoader(_ImageFiles(paths, transform), batch_size=batch_size, num_workers=num_workers,
                             collate_fn=_collate)
    results: dict[int, tuple[str, str | None, str | None]] = {}     # every index gets a caption or an error
    with tqdm(total=len(paths), desc=f"captioning (beam {beam_size})", unit="img", disable=not progress) as bar:
        for indices, images, errors in loader:
            for i, err in errors:
                results[i] = (paths[i], None, err)
            if images is not None:
                for i, ids in zip(indices, generate(encoder, decoder, images.to(device), beam_size)):
                    results[i] = (paths[i], decode(ids, vocab), None)
            bar.update(len(indices) + len(errors))
    return [results[i] for i in range(len(paths))]
