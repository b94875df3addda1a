"""Caption image files in batches with a trained encoder/decoder (greedy or beam search)."""
import os

import torch
import torch.utils.data as data

from .data import eval_transform
from .images import ImageReadError, list_images, load_image
from .model import decode


def expand_paths(inputs, missing=None):
    """Files stay as given; folders expand to the images they hold (sorted).

    A path that is neither a folder nor a regular file is an error, or, when a `missing` list
    is given, is appended to it so that the rest can still be captioned.
    """
    paths = []
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
    def __init__(self, paths, transform):
        self.paths, self.transform = paths, transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            return i, self.transform(load_image(self.paths[i])), None
        except ImageReadError as e:  # report the file, keep captioning the rest
            return i, None, e.reason
        except Exception as e:
            return i, None, f"{type(e).__name__}: {e}"


def _collate(batch):
    ok = [(i, x) for i, x, err in batch if err is None]
    errors = [(i, err) for i, x, err in batch if err is not None]
    images = torch.stack([x for _, x in ok]) if ok else None
    return [i for i, _ in ok], images, errors


@torch.no_grad()
def generate(encoder, decoder, images, beam_size=1):
    """(B, 3, H, W) images -> one token-id list per image, cut after <end>."""
    features = encoder(images)
    if beam_size > 1:
        return decoder.beam_search(features, beam_size)
    return decoder.greedy(features)


def caption_images(paths, encoder, decoder, vocab, config, device="cpu", beam_size=1, batch_size=32,
                   num_workers=0, progress=False):
    """Returns [(path, caption or None, error or None)] in the order of `paths`."""
    from .progress import tqdm

    device = torch.device(device)
    encoder.eval(), decoder.eval()
    transform = eval_transform(config.resize_size, config.crop_size)
    loader = data.DataLoader(_ImageFiles(paths, transform), batch_size=batch_size, num_workers=num_workers,
                             collate_fn=_collate)
    results = [None] * len(paths)
    with tqdm(total=len(paths), desc=f"captioning (beam {beam_size})", unit="img", disable=not progress) as bar:
        for indices, images, errors in loader:
            for i, err in errors:
                results[i] = (paths[i], None, err)
            if images is not None:
                for i, ids in zip(indices, generate(encoder, decoder, images.to(device), beam_size)):
                    results[i] = (paths[i], decode(ids, vocab), None)
            bar.update(len(indices) + len(errors))
    return results
