import os

import pytest
import torch
import torch.utils.data as data

from captioning.data import (
    CocoCaptionDataset,
    TrainTransform,
    collate_function,
    encode_caption,
    eval_transform,
    get_loader,
)
from captioning.vocabulary import Vocab


def _dataset(root, vocab, transform=None, **kw):
    return CocoCaptionDataset(str(root / "train2014"), str(root / "annotations" / "captions_train2014.json"), vocab,
                              transform or eval_transform(48, 40), **kw)


def test_one_item_per_caption(tiny_data, tiny_vocab):
    ds = _dataset(tiny_data, tiny_vocab)
    assert len(ds) == 60 * 5
    image, caption = ds[0]
    assert image.shape == (3, 40, 40) and image.dtype == torch.float32
    assert caption.dtype == torch.long and caption[0] == tiny_vocab("<start>") and caption[-1] == tiny_vocab("<end>")
    assert (caption[1:-1] > 3).all()  # real words only


def test_grouped_items_hold_all_captions_of_an_image(tiny_data, tiny_vocab):
    ds = _dataset(tiny_data, tiny_vocab, group_by_image=True)
    assert len(ds) == 60
    image, captions = ds[3]
    assert image.shape == (3, 40, 40) and len(captions) == 5


def test_max_captions_keeps_the_fewest_leading_images_that_hold_them(tiny_data, tiny_vocab):
    full = _dataset(tiny_data, tiny_vocab)
    ds = _dataset(tiny_data, tiny_vocab, max_captions=12)     # 5 captions per image: 3 images hold 12
    assert ds.image_ids == full.image_ids[:3] and len(ds) == 15
    assert _dataset(tiny_data, tiny_vocab, max_captions=10).image_ids == full.image_ids[:2]
    assert len(_dataset(tiny_data, tiny_vocab, max_captions=10 ** 6)) == len(full)
    with pytest.raises(ValueError, match="max_captions"):
        _dataset(tiny_data, tiny_vocab, max_captions=0)


def test_truncation_keeps_end():
    vocab = Vocab.from_words(["<pad>", "<start>", "<end>", "<unk>", "dog"])
    ids = encode_caption("dog " * 50, vocab, max_seq_len=20)
    assert len(ids) == 20 and ids[0] == 1 and ids[-1] == 2 and (ids[1:-1] == 4).all()
    assert encode_caption("a cat.", vocab).tolist() == [1, 3, 3, 2]


def test_missing_images_are_reported_once_and_skipped(tiny_copy, tiny_vocab, capsys):
    names = sorted(os.listdir(tiny_copy / "train2014"))
    for name in names[:3]:
        os.remove(tiny_copy / "train2014" / name)
    ds = _dataset(tiny_copy, tiny_vocab)
    out = capsys.readouterr().out
    assert "3 of 60 images" in out and names[0] in out
    assert len(ds) == 57 * 5
    for i in range(0, len(ds), 37):  # every remaining item loads
        ds[i]


def test_bad_paths_are_clear_errors(tiny_data, tiny_vocab, tmp_path):
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        CocoCaptionDataset(str(tmp_path / "x"), str(tiny_data / "annotations" / "captions_train2014.json"), tiny_vocab)
    with pytest.raises(FileNotFoundError, match="captions file not found"):
        CocoCaptionDataset(str(tiny_data / "train2014"), str(tmp_path / "c.json"), tiny_vocab)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no captioned images"):
        CocoCaptionDataset(str(empty), str(tiny_data / "annotations" / "captions_train2014.json"), tiny_vocab)


def test_collate_pads_with_zero_and_sorts_by_length():
    batch = [(torch.full((3, 2, 2), float(i)), torch.arange(1, n + 1)) for i, n in enumerate((3, 5, 4))]
    images, captions, lengths = collate_function(batch)
    assert lengths == [5, 4, 3]
    assert captions.shape == (3, 5)
    assert captions[2].tolist() == [1, 2, 3, 0, 0] and captions[1].tolist() == [1, 2, 3, 4, 0]
    assert images[:, 0, 0, 0].tolist() == [1.0, 2.0, 0.0]  # images follow their captions


def test_grouped_collate_maps_captions_to_images():
    batch = [(torch.zeros(3, 2, 2), [torch.arange(1, 3), torch.arange(1, 6)]),
             (torch.ones(3, 2, 2), [torch.arange(1, 5)])]
    images, captions, lengths, image_index = collate_function(batch)
    assert images.shape == (2, 3, 2, 2)
    assert lengths == [5, 4, 2] and image_index.tolist() == [0, 1, 0]


def test_train_transform_is_reproducible_with_a_generator(tiny_data):
    from captioning.images import load_image

    image = load_image(next((tiny_data / "train2014").iterdir()))
    t = TrainTransform(crop_size=40, hflip=True)
    a = t(image, generator=torch.Generator().manual_seed(1))
    b = t(image, generator=torch.Generator().manual_seed(1))
    assert a.shape == (3, 40, 40) and torch.equal(a, b)
    others = [t(image, generator=torch.Generator().manual_seed(s)) for s in range(2, 8)]
    assert any(not torch.equal(a, o) for o in others)


def test_loader_with_spawned_workers(tiny_data, tiny_vocab):
    """Workers started with `spawn` (macOS/Windows) must find every class in the library."""
    ds = _dataset(tiny_data, tiny_vocab, TrainTransform(40, False))
    loader = data.DataLoader(ds, batch_size=8, num_workers=2, collate_fn=collate_function,
                             multiprocessing_context="spawn", sampler=range(16))
    batches = list(loader)
    assert len(batches) == 2 and batches[0][0].shape == (8, 3, 40, 40)


def test_get_loader_keeps_the_chapter_signature(tiny_data, tiny_vocab):
    loader = get_loader(str(tiny_data / "train2014"), str(tiny_data / "annotations" / "captions_train2014.json"),
                        tiny_vocab, eval_transform(48, 40), 16, True, 0)
    images, captions, lengths = next(iter(loader))
    assert images.shape == (16, 3, 40, 40) and captions.shape[0] == 16 and lengths == sorted(lengths, reverse=True)


def test_captions_are_encoded_once_into_one_store(tiny_data, tiny_vocab):
    """Each caption's ids are encode_caption's (truncated to max_seq_len), grouped by image or not, and
    are encoded once: asked again, the same ids in the same memory."""
    from captioning.vocabulary import load_coco

    coco = load_coco(str(tiny_data / "annotations" / "captions_train2014.json"))
    for group, max_seq_len in ((False, 20), (True, 6)):
        ds = _dataset(tiny_data, tiny_vocab, group_by_image=group, max_seq_len=max_seq_len)
        for idx in reversed(range(len(ds))):
            want = [encode_caption(coco.anns[a]["caption"], tiny_vocab, max_seq_len) for a in ds.items[idx][1]]
            got = ds.captions(idx)
            assert len(got) == len(want) and all(torch.equal(g, w) for g, w in zip(got, want))
        assert max(len(c) for i in range(len(ds)) for c in ds.captions(i)) == (20 if not group else 6) or not group
        first = ds.captions(0)[0]
        assert ds.captions(0)[0].data_ptr() == first.data_ptr() and first.dtype == torch.long


def test_encoded_captions_are_no_tensor_each(tiny_data, tiny_vocab):
    """Encoding every caption leaves no tensor behind per caption: training on cached features encodes them in
    its own process between steps, and a small tensor kept from each (as this dataset once did) pinned heap
    pages between the steps' large temporary buffers: the process grew by ~7 MB a step at COCO's vocabulary,
    ~20 GB over a COCO epoch on a CPU (benchmarks/coco_scale.py found it; a plain loop of one epoch shows it)."""
    import gc

    ds = _dataset(tiny_data, tiny_vocab)

    def tensors():
        gc.collect()
        return sum(issubclass(type(o), torch.Tensor) for o in gc.get_objects())

    before = tensors()
    lengths = [len(ds.target(i)) for i in range(len(ds))]
    assert tensors() - before < 10 and len(ds) == 300
    assert [len(ds.target(i)) for i in range(len(ds))] == lengths            # remembered
