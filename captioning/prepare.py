"""What training reads, made first where it is missing: the data's COCO layout, the vocabulary,
the resized images and the stand-in backbone.

Notebooks 01, 02, 03 and 05 make each of these in turn; `ensure_prerequisites` lets `train()`,
notebook 06 and the CLI start from a folder of images and captions alone. Each step reuses what
is already on disk, and each builds under a lock, so two runs on the same data wait for one
another instead of writing the same file twice.
"""
import os
from collections.abc import Callable

from .backbone import STANDIN
from .config import Config
from .derived import build_lock
from .images import resize_images
from .karpathy import ensure_coco_layout
from .standin import ensure_standin
from .vocabulary import build_vocabulary, load_vocabulary, save_vocabulary


def ensure_prerequisites(config: Config, log: Callable[[str], object] = print, standin: bool = True) -> None:
    """Build what training needs and is missing: the COCO layout of a Karpathy-format folder, the vocabulary,
    the resized images, the stand-in backbone (standin=False: not needed, a run that starts from a
    checkpoint holding it)."""
    ensure_coco_layout(config.data_dir, log, config.progress)   # a Karpathy-format folder: once, in place
    for split in ("train", "val"):
        for path in (config.captions_json(split), config.split_images(split)):
            if not os.path.exists(path):
                raise FileNotFoundError(f"{path} not found: {config.data_dir} must be a COCO-layout folder "
                                        f"(train2014/, val2014/, annotations/captions_{{train,val}}2014.json) or "
                                        f"hold a Karpathy dataset_*.json and its images; "
                                        f"run notebook 01 or download_coco.sh first")
    # the vocabulary of these captions at this threshold (cheap once the tokens are cached): an
    # existing vocabulary.pkl built otherwise would be used while the checkpoint records this threshold.
    # Under a lock (vocabulary.pkl.lock): a second run on this data waits, then finds it built and uses it.
    with build_lock(config.vocabulary_path, "the vocabulary", log):
        vocab = build_vocabulary(config.captions_json("train"), config.vocab_threshold, progress=config.progress)
        if not os.path.exists(config.vocabulary_path):
            log(f"building the vocabulary: {config.vocabulary_path}")
            save_vocabulary(vocab, config.vocabulary_path)
        elif load_vocabulary(config.vocabulary_path).words() != vocab.words():
            log(f"{config.vocabulary_path} is not the vocabulary of these captions at vocab_threshold="
                f"{config.vocab_threshold}: rebuilding it ({len(vocab)} words)")
            save_vocabulary(vocab, config.vocabulary_path)
    for split in ("train", "val"):
        dst = config.resized_images(split)  # resize_images skips what is already done, at this size
        report = resize_images(config.split_images(split), dst, config.resize_size, progress=config.progress)
        if report["resized"]:
            log(f"resized {report['resized']} {split} images to {config.resize_size}x{config.resize_size}: {dst}")
    if config.weights == STANDIN and standin:
        ensure_standin(config, log)
