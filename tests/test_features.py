"""The map cache (crops taken in feature space, kind="maps") and the views cache's jitter."""
import gc
import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import SMALL, run_cli

from captioning.config import get_config
from captioning.data import CocoCaptionDataset, eval_transform
from captioning.features import (
    CachedCaptionDataset,
    build_feature_cache,
    meta_checksum,
    pool_window,
    window_weights,
)
from captioning.model import CNNModel
from captioning.training import train
from captioning.vocabulary import Vocab


def test_window_weights_take_the_cut_share_of_each_cell():
    w = window_weights(torch.tensor([0.0, 0.5, 1.25]), torch.tensor([2.0, 2.0, 1.5]), 4)
    assert torch.allclose(w, torch.tensor([[0.5, 0.5, 0, 0], [0.25, 0.5, 0.25, 0], [0, 0.5, 0.5, 0]]))


def test_pool_window_is_the_crop_average_of_the_map():
    maps = torch.randn(2, 5, 4, 4)
    # the whole map: what extract() gives for the whole image
    whole = pool_window(maps, torch.zeros(2), torch.zeros(2), torch.full((2,), 4.0))
    assert torch.allclose(whole, maps.mean((2, 3)), atol=1e-6)
    # a window on cell borders: the plain mean of those cells
    cells = pool_window(maps, torch.tensor([1.0, 2.0]), torch.tensor([0.0, 1.0]), torch.tensor([2.0, 2.0]))
    assert torch.allclose(cells[0], maps[0, :, 1:3, 0:2].mean((1, 2)), atol=1e-6)
    assert torch.allclose(cells[1], maps[1, :, 2:4, 1:3].mean((1, 2)), atol=1e-6)
    # a sub-cell shift moves the result continuously between the two aligned windows
    half = pool_window(maps[:1], torch.tensor([1.5]), torch.tensor([0.0]), torch.tensor([2.0]))
    rows = maps[0, :, 1:4, 0:2].mean(-1)                           # (C, 3): rows 1, 2, 3 of the window's columns
    expected = 0.25 * rows[:, 0] + 0.5 * rows[:, 1] + 0.25 * rows[:, 2]
    assert torch.allclose(half[0], expected, atol=1e-6)


@pytest.fixture
def dataset(tiny_copy):
    vocab = Vocab.from_words(["<pad>", "<start>", "<end>", "<unk>"])
    return CocoCaptionDataset(str(tiny_copy / "train2014"), str(tiny_copy / "annotations" / "captions_train2014.json"),
                              vocab)


def test_maps_cache_holds_the_whole_image_and_its_mirror(dataset, tmp_path):
    torch.manual_seed(0)
    encoder = CNNModel(8, "resnet18", weights=None).eval()
    tf = eval_transform(64, 64)
    cache = build_feature_cache(encoder, dataset, tf, 2, str(tmp_path / "f"), "train", torch.device("cpu"),
                                batch_size=16, progress=False, kind="maps")
    assert cache.shape == (len(dataset.image_ids), 2, 512, 2, 2) and cache.dtype == np.float16
    from captioning.images import load_image

    image = tf(load_image(dataset.image_path(3)))[None]
    with torch.no_grad():
        assert np.allclose(cache[3, 0], encoder.extract_map(image)[0].numpy(), atol=2e-2, rtol=2e-2)
        assert np.allclose(cache[3, 1], encoder.extract_map(image.flip(-1))[0].numpy(), atol=2e-2, rtol=2e-2)
        # a crop of the whole image, pooled from the map, is extract() of the whole image
        whole = CachedCaptionDataset(dataset, cache, crop_fraction=1.0)
        item = next(i for i in range(len(dataset)) if dataset.image_index(i) == 3)
        pooled = whole[item][0]
        assert any(torch.allclose(pooled, encoder.extract(x)[0], atol=2e-2, rtol=2e-2) for x in (image, image.flip(-1)))
    folder = tmp_path / "f" / os.listdir(tmp_path / "f")[0]
    meta = json.load(open(folder / "meta.json"))
    assert meta["kind"] == "maps" and meta["map"] == [2, 2] and "-maps-" in folder.name
    with pytest.raises(ValueError, match="1-2 views"):
        build_feature_cache(encoder, dataset, tf, 3, str(tmp_path / "g"), "train", torch.device("cpu"), kind="maps")
    with pytest.raises(ValueError, match="kind"):
        build_feature_cache(encoder, dataset, tf, 1, str(tmp_path / "g"), "train", torch.device("cpu"), kind="tiles")


def test_map_crops_are_fresh_each_epoch_and_reproducible(dataset):
    rng = np.random.default_rng(0)
    cache = rng.standard_normal((len(dataset.image_ids), 2, 6, 3, 3)).astype(np.float16)
    cached = CachedCaptionDataset(dataset, cache, seed=1, crop_fraction=0.75)
    indices = [5, 0, 5, len(dataset) - 1]
    cached.set_epoch(0)
    first = torch.stack([f for f, _ in cached.__getitems__(indices)])
    assert torch.equal(first[1], cached[0][0])                     # a batch is its items, one by one
    again = CachedCaptionDataset(dataset, cache, seed=1, crop_fraction=0.75)
    assert torch.equal(torch.stack([f for f, _ in again.__getitems__(indices)]), first)   # a resume sees the same
    cached.set_epoch(1)
    second = torch.stack([f for f, _ in cached.__getitems__(indices)])
    assert not torch.allclose(first, second)                       # a new epoch, new crops
    # over many items: both maps are used, and the windows vary continuously (not K fixed views)
    windows = [cached._window(i) for i in range(len(dataset))]
    assert {f for f, _, _ in windows} == {0, 1}
    assert len({round(t, 3) for _, t, _ in windows}) > len(dataset) // 2
    with pytest.raises(ValueError, match="crop_fraction"):
        CachedCaptionDataset(dataset, cache)


def test_training_on_a_maps_cache_resumes_exactly(tiny_copy, tmp_path):
    def config(models, **kw):
        return get_config("tiny", data_dir=str(tiny_copy), models_dir=str(tmp_path / models), cache_kind="maps",
                          hflip=True, weights=None, epochs=2, **{**SMALL, **kw})

    whole = train(config("a"))
    folders = os.listdir(tiny_copy / "features")
    assert any(name.startswith("train-resnet18-maps-") for name in folders)
    first = train(config("b", max_steps=whole["step"] // 2 + 1))
    resumed = train(config("b", max_steps=0), resume=True)     # max_steps not given would keep the first's
    assert first["step"] < resumed["step"] == whole["step"]
    a = torch.load(whole["last"], weights_only=True)["decoder"]
    b = torch.load(resumed["last"], weights_only=True)["decoder"]
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_cache_kind_is_checked():
    with pytest.raises(ValueError, match="cache_kind"):
        get_config("tiny", cache_kind="tiles")


def test_jitter_adds_another_images_crop_deviation_to_the_mean_of_the_views(dataset):
    rng = np.random.default_rng(0)
    cache = rng.standard_normal((len(dataset.image_ids), 3, 16)).astype(np.float16)
    views = torch.from_numpy(cache.astype(np.float32))
    deviations = (views - views.mean(1, keepdim=True)).flatten(0, 1)           # every (image, view) of the cache
    cached = CachedCaptionDataset(dataset, cache, seed=1, jitter=2.0)
    indices = [5, 0, 5, len(dataset) - 1]
    first = torch.stack([f for f, _ in cached.__getitems__(indices)])
    for feature, i in zip(first, indices):
        own = views[dataset.image_index(i)]
        borrowed = (feature - own.mean(0)) / 2.0
        assert (deviations - borrowed).abs().amax(1).min() < 1e-4               # exactly one of the cache's deviations
        assert not any(torch.allclose(feature, v, atol=1e-3) for v in own)      # not one of its own views
    assert torch.equal(first[1], cached[0][0])                                  # a batch is its items, one by one
    again = CachedCaptionDataset(dataset, cache, seed=1, jitter=2.0)
    assert torch.equal(torch.stack([f for f, _ in again.__getitems__(indices)]), first)   # a resume sees the same
    cached.set_epoch(1)
    assert not torch.allclose(torch.stack([f for f, _ in cached.__getitems__(indices)]), first)   # fresh each epoch
    # across items the borrowed deviations come from many images, not the K views of a few
    picked = {int((deviations - (f - views[dataset.image_index(i)].mean(0)) / 2.0).abs().amax(1).argmin())
              for i in range(len(dataset)) for f in [cached[i][0]]}
    assert len(picked) > min(len(deviations), len(dataset)) // 3


def test_jitter_off_or_one_view_gives_the_stored_views(dataset):
    rng = np.random.default_rng(1)
    two = rng.standard_normal((len(dataset.image_ids), 2, 8)).astype(np.float16)
    one = two[:, :1].copy()
    for cache, jitter in ((two, 0.0), (one, 2.0)):
        cached = CachedCaptionDataset(dataset, cache, jitter=jitter)
        for i in range(0, len(dataset), 7):
            stored = torch.from_numpy(cache[dataset.image_index(i)].astype(np.float32))
            assert any(torch.equal(cached[i][0], v) for v in stored)
    with pytest.raises(ValueError, match="jitter"):
        CachedCaptionDataset(dataset, two, jitter=-1)
    for bad in (-0.5, "2", True, 11):
        with pytest.raises(ValueError, match="cache_jitter"):
            get_config("coco", cache_jitter=bad)


def test_the_cache_is_keyed_by_the_weights_not_by_the_weights_file_path(dataset, tmp_path):
    """The same stand-in weights reached through two models folders are one cache; other weights another."""
    import torchvision

    torch.manual_seed(0)
    first, second, other = tmp_path / "a" / "standin.pth", tmp_path / "b" / "standin.pth", tmp_path / "other.pth"
    first.parent.mkdir()
    second.parent.mkdir()
    resnet = torchvision.models.resnet18(weights=None)
    torch.save(resnet.state_dict(), first)
    torch.save(resnet.state_dict(), second)
    with torch.no_grad():
        resnet.layer4[1].conv2.weight.mul_(1.5)
    torch.save(resnet.state_dict(), other)
    tf = eval_transform(32, 32)
    calls = []

    def cache(weights):
        encoder = CNNModel(8, "resnet18", weights=str(weights)).eval()
        real = encoder.frozen_extractor
        encoder.frozen_extractor = lambda maps=False: calls.append(weights) or real(maps)
        out = build_feature_cache(encoder, dataset, tf, 1, str(tmp_path / "f"), "train", torch.device("cpu"),
                                  batch_size=32, progress=False)
        return os.path.dirname(out.filename)

    a = cache(first)
    assert cache(second) == a and calls == [first]        # found, not extracted again
    c = cache(other)
    assert c != a and calls == [first, other]
    assert sorted(os.listdir(tmp_path / "f")) == sorted({os.path.basename(a), os.path.basename(c)})


def _on_batch(encoder, batch, action):
    """Make the cache's extractor call `action()` when it reaches its `batch`-th batch (1-based)."""
    real, calls = encoder.frozen_extractor, []

    def extractor(maps=False):
        inner = real(maps)

        class Hooked(torch.nn.Module):
            def forward(self, images):
                calls.append(1)
                if len(calls) == batch:
                    action()
                return inner(images)
        return Hooked()

    encoder.frozen_extractor = extractor
    return calls


def test_prune_keeps_a_cache_that_is_being_extracted_or_read(dataset, tiny_copy, tmp_path):

    from captioning.features import list_feature_caches, prune_feature_caches

    features_dir = str(tiny_copy / "features")
    torch.manual_seed(0)
    encoder = CNNModel(8, "resnet18", weights=None).eval()
    tf = eval_transform(32, 32)

    def build(seed):
        return build_feature_cache(encoder, dataset, tf, 1, features_dir, "train", torch.device("cpu"),
                                   batch_size=16, progress=False, seed=seed)

    old = os.path.dirname(build(1).filename)           # read, then let go: prunable
    gc.collect()
    seen = {}

    def prune_now():                                    # `features --prune --keep 0` during the extraction
        seen["removed"], seen["in_use"] = prune_feature_caches(features_dir, keep=0)
        seen["cli"] = run_cli("features", "--data-dir", tiny_copy, "--prune", "--keep", "0").stdout

    _on_batch(encoder, 2, prune_now)
    cache = build(2)
    folder = os.path.dirname(cache.filename)
    assert [c["folder"] for c in seen["removed"]] == [old] and not os.path.exists(old)
    assert [c["folder"] for c in seen["in_use"]] == [folder]
    assert f"kept {os.path.basename(folder)}: in use" in seen["cli"], seen["cli"]
    assert np.isfinite(cache).all() and json.load(open(os.path.join(folder, "meta.json")))["complete"] is True
    # open in a "trainer" (the memmap is alive): still kept; let go of it: pruned
    (listed,) = list_feature_caches(features_dir)
    assert listed["in_use"] and listed["complete"] and "(in use)" in run_cli("features", "--data-dir", tiny_copy).stdout
    assert prune_feature_caches(features_dir, keep=0) == ([], [listed])
    del cache
    gc.collect()
    removed, in_use = prune_feature_caches(features_dir, keep=0)
    assert [c["folder"] for c in removed] == [folder] and not in_use and not os.path.exists(folder)


def test_an_interrupted_extraction_is_never_reported_complete(dataset, tmp_path):
    import shutil

    from captioning.features import format_caches, list_feature_caches

    features_dir = tmp_path / "f"
    torch.manual_seed(0)
    encoder = CNNModel(8, "resnet18", weights=None).eval()
    tf = eval_transform(32, 32)

    def build():
        return build_feature_cache(encoder, dataset, tf, 1, str(features_dir), "train", torch.device("cpu"),
                                   batch_size=16, progress=False)

    def interrupt():
        raise KeyboardInterrupt

    _on_batch(encoder, 3, interrupt)
    with pytest.raises(KeyboardInterrupt):
        build()
    (cache,) = list_feature_caches(str(features_dir))
    meta = json.load(open(os.path.join(cache["folder"], "meta.json")))
    assert meta["done"] == 32 and meta["complete"] is False
    assert not cache["complete"] and not cache["in_use"] and "(incomplete)" in format_caches([cache])
    # the folder deleted under a running extraction (by hand, or a prune that ignores the lock): it stops,
    # and writes no meta.json claiming rows that are nowhere
    shutil.rmtree(cache["folder"])
    unhooked = CNNModel.frozen_extractor.__get__(encoder)
    encoder.frozen_extractor = unhooked
    _on_batch(encoder, 2, lambda: shutil.rmtree(cache["folder"]))
    with pytest.raises(RuntimeError, match="was deleted while its features were being extracted"):
        build()
    assert not os.path.exists(os.path.join(cache["folder"], "meta.json"))
    encoder.frozen_extractor = unhooked
    build()
    (cache,) = list_feature_caches(str(features_dir))
    assert cache["complete"] and cache["done"] == cache["images"] == len(dataset.image_ids)


def _extract_and_release(encoder, dataset, tf, features_dir, log):
    """Build (or open) a one-view train cache: (its values, its folder), the memmap closed again so that
    its shared lock goes with it."""
    cache = build_feature_cache(encoder, dataset, tf, 1, str(features_dir), "train", torch.device("cpu"),
                                batch_size=16, progress=False, log=log)
    values, folder = np.array(cache), os.path.dirname(cache.filename)
    del cache
    gc.collect()
    return values, folder


@pytest.fixture
def cache_builder(dataset, tmp_path):
    """build() extracts a random ResNet-18's cache of `dataset` into tmp_path/f (_extract_and_release),
    its log lines going to .said; .encoder and .transform are what it extracts with."""
    torch.manual_seed(0)
    encoder = CNNModel(8, "resnet18", weights=None).eval()
    tf = eval_transform(32, 32)
    said: list[str] = []

    def build():
        return _extract_and_release(encoder, dataset, tf, tmp_path / "f", said.append)

    return SimpleNamespace(build=build, said=said, encoder=encoder, transform=tf)


def test_a_damaged_cache_is_reported_by_path_and_extracted_again(dataset, tmp_path, cache_builder):
    """A truncated or grown features.npy, a corrupted header, a meta.json that does not match: each is
    found before anything is read, named, and extracted again to the same features."""
    build, said = cache_builder.build, cache_builder.said
    encoder, tf = cache_builder.encoder, cache_builder.transform

    good, folder = build()
    array, meta_path = os.path.join(folder, "features.npy"), os.path.join(folder, "meta.json")
    meta = json.load(open(meta_path))
    size = os.path.getsize(array)
    assert meta["array"] == {"shape": [len(dataset.image_ids), 1, 512], "dtype": "float16", "offset": 128,
                             "bytes": size, "header_sha1": meta["array"]["header_sha1"]} and meta["checksum"]
    assert not any("damaged" in s for s in said)

    def damage(how, why):
        said.clear()
        how()
        values, again = build()
        assert again == folder and np.array_equal(values, good)
        damaged = [s for s in said if "damaged" in s]
        assert damaged == [f"feature cache {folder} is damaged ({why}): extracting it again"]
        # and what training reads from it are the right features
        items = CachedCaptionDataset(dataset, build_feature_cache(encoder, dataset, tf, 1, str(tmp_path / "f"),
                                                                  "train", torch.device("cpu"), progress=False))
        assert torch.equal(items[7][0], torch.from_numpy(good[dataset.image_index(7), 0].astype(np.float32)))

    def truncate():
        with open(array, "r+b") as f:
            f.truncate(size - 1000)

    def grow():
        with open(array, "ab") as f:
            f.write(b"\0" * 64)

    def corrupt_header():              # '<f2' -> '<i2': still a valid header, of another dtype
        raw = bytearray(open(array, "rb").read())
        at = raw.index(b"<f2")
        raw[at + 1] = ord("i")
        open(array, "wb").write(raw)

    def edit_meta():
        edited = json.load(open(meta_path))
        edited["done"] = 5                 # without its checksum
        json.dump(edited, open(meta_path, "w"))

    damage(truncate, f"features.npy is {size - 1000:,} bytes, expected {size:,}")
    damage(grow, f"features.npy is {size + 64:,} bytes, expected {size:,}")
    damage(corrupt_header, "the header of features.npy does not match its checksum")
    damage(edit_meta, "meta.json does not match its checksum")
    damage(lambda: open(meta_path, "w").write("{not json"),
           "meta.json cannot be read: Expecting property name enclosed in double quotes: line 1 column 2 (char 1)")


def test_images_made_again_under_the_same_names_are_extracted_again(dataset, cache_builder):
    """A data folder generated anew keeps its file names: the cache sees the new files by their sizes and
    extracts them again, instead of serving the old images' features. A cache from before the sizes
    were recorded keeps its folder and is read as it is."""

    from PIL import Image

    build, said = cache_builder.build, cache_builder.said

    old, folder = build()
    row = 3
    path = dataset.image_path(row)
    before = os.path.getsize(path)
    Image.new("RGB", Image.open(path).size, (250, 20, 20)).save(path, format=Image.open(path).format)
    assert os.path.getsize(path) != before
    said.clear()
    new, again = build()
    assert again == folder                                 # the same folder, extracted again
    assert said == [f"feature cache {folder} is damaged (its images have changed since it was extracted: their "
                    f"file sizes differ): extracting it again"]
    assert not np.array_equal(new[row], old[row]) and np.array_equal(np.delete(new, row, 0), np.delete(old, row, 0))

    meta_path = os.path.join(folder, "meta.json")          # as written before "image_sizes" existed
    meta = json.load(open(meta_path))
    del meta["image_sizes"], meta["checksum"]
    json.dump({**meta, "checksum": meta_checksum(meta)}, open(meta_path, "w"))
    said.clear()
    kept, same = build()
    assert same == folder and np.array_equal(kept, new) and not any("damaged" in s for s in said)


@pytest.mark.parametrize("kind", ["maps", "grids"])
def test_a_map_or_grid_cache_is_opened_again_not_extracted_again(dataset, tmp_path, kind):
    """meta.json gives its map size back as a list: a reopened cache must match it, not count as another cache."""
    from captioning.attention import GridCNNModel

    torch.manual_seed(0)
    encoder = (GridCNNModel(8, "resnet18", None, grid_layer=2) if kind == "grids" else
               CNNModel(8, "resnet18", weights=None)).eval()
    tf = eval_transform(64, 64)
    said = []
    first = build_feature_cache(encoder, dataset, tf, 1, str(tmp_path / "f"), "train", torch.device("cpu"),
                                progress=False, kind=kind, log=said.append)
    again = build_feature_cache(encoder, dataset, tf, 1, str(tmp_path / "f"), "train", torch.device("cpu"),
                                progress=False, kind=kind, log=said.append)
    assert said == [] and np.array_equal(first, again)
    assert first.shape == ((len(dataset.image_ids), 1, 128, 8, 8) if kind == "grids" else
                           (len(dataset.image_ids), 1, 512, 2, 2))
