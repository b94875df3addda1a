import hashlib
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# sizes that keep a training run in the tests to seconds
SMALL = dict(resize_size=36, crop_size=32, batch_size=8, embedding_size=16, hidden_layer_size=32, num_workers=0,
             progress=False, vocab_threshold=1, val_max_captions=20, standin_steps=2)


def tree_digest(folder):
    """One SHA-1 over a folder's file names and contents: two generated sets are the same, byte for byte."""
    h = hashlib.sha1()
    for root, _, files in sorted(os.walk(folder)):
        for f in sorted(files):
            h.update(f.encode())
            with open(os.path.join(root, f), "rb") as data:
                h.update(data.read())
    return h.hexdigest()


def run_cli(*args, timeout=300, check=True, **kwargs):
    """Run `python -m captioning ...` from the repo root; returns the CompletedProcess."""
    proc = subprocess.run([sys.executable, "-m", "captioning", *map(str, args)], cwd=kwargs.pop("cwd", ROOT),
                          capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def cli_main(*args):
    """The CLI's main() in this process (its parser and error handler), sparing a Python start-up per case."""
    from captioning.__main__ import main

    return main([str(a) for a in args])


def cli_error(*args):
    """main(args) in this process: the one-line "error: ..." message it exits with."""
    with pytest.raises(SystemExit) as exit_:
        cli_main(*args)
    message = exit_.value.code
    assert isinstance(message, str) and message.startswith("error: ") and "\n" not in message, message
    return message


# Tests over about 5 s on the 2-core machine (pytest --durations), or that run notebooks, torchrun or
# several processes: `make test-fast` (pytest -m "not slow") leaves them out, `make test` runs them.
# Marked here, by file and test name (a name without "[" covers all its parameters), rather than in
# each file, so that one list says what the fast loop skips.
SLOW = {
    "test_notebooks.py": "*",                   # executes every notebook
    "test_lab.py": "*",                         # starts `make lab`
    "test_saliency.py": {"test_colour_words_point_at_their_objects", "test_cli_writes_one_png_per_image",
                         "test_gradcam_gives_one_map_per_word_and_rejects_unknown_methods"},   # trains a model first
    "test_training.py": {"test_resume_reproduces_the_uninterrupted_run",
                         "test_bad_data_dir_and_bad_overrides_are_clear_errors",
                         "test_cached_features_are_built_once_and_keyed",
                         "test_ctrl_c_during_checkpoint_writes_always_saves_and_exits_130",
                         "test_training_builds_prerequisites_and_writes_a_self_contained_checkpoint",
                         "test_torchrun_ddp_on_cpu", "test_kill_9_during_training_then_resume",
                         "test_min_steps_gives_a_small_set_more_epochs_and_an_explicit_epochs_is_kept",
                         "test_lr_decay_trains_the_last_epochs_at_a_tenth_and_a_resume_keeps_each_epochs_rate",
                         "test_train_trains_prebuilt_modules_in_place_and_says_when_the_library_cannot_rebuild_them",
                         "test_train_refuses_prebuilt_modules_that_do_not_fit"},
    "test_run_safety.py": {"test_a_second_trainer_is_kept_out_and_a_killed_ones_files_are_cleaned",
                           "test_a_fresh_run_refuses_a_folder_holding_a_run_and_overwrite_replaces_it",
                           "test_resume_with_another_batch_size_mid_epoch_is_refused",
                           "test_a_resume_that_would_change_the_run_is_refused_first_naming_every_field",
                           "test_a_new_vocab_threshold_rebuilds_the_vocabulary_and_a_resume_keeps_its_own",
                           "test_sigterm_under_torchrun_stops_every_rank_at_the_same_step",
                           "test_sigterm_saves_like_ctrl_c_exits_143_and_the_run_resumes_from_its_step",
                           "test_a_resume_keeps_the_checkpoints_settings_and_applies_a_new_learning_rate",
                           "test_a_resume_on_other_data_or_from_a_newer_checkpoint_is_refused",
                           "test_an_early_checkpoint_is_kept_for_the_notebooks_and_moved_aside_with_the_run"},
    "test_attention.py": {"test_training_reads_cached_grids_and_the_checkpoint_says_attention",
                          "test_the_coco_preset_trains_attention_on_its_own_code_path"},
    "test_attention_maps.py": {"test_caption_explain_draws_an_attention_checkpoints_own_attention"},
    "test_bad_images.py": "*",                  # trains on 210 images, with and without the cache
    "test_inference_evaluation.py": {
        "test_evaluate_reports_diagnostics_intervals_signature_and_compares_runs", "test_caption_cli_clear_errors",
        "test_collapse_warning_on_a_decoder_that_says_one_thing",
        "test_evaluate_without_ground_truth_has_no_semantic_block",
        "test_evaluate_skips_counts_and_names_unreadable_images_and_refuses_above_one_percent",
        "test_metrics_reward_the_right_caption", "test_evaluate_cli_writes_metrics_and_coco_results",
        "test_evaluate_names_the_images_folder_that_lacks_the_split",
        "test_checkpoints_of_earlier_versions_still_caption",
        "test_a_one_image_split_reports_cider_and_intervals_as_na",
        "test_frozen_pretrained_backbone_is_rebuilt_from_its_weights_file",
        "test_caption_cli_reports_bad_files_and_captions_the_rest"},
    "test_features.py": {"test_training_on_a_maps_cache_resumes_exactly",
                         "test_prune_keeps_a_cache_that_is_being_extracted_or_read",
                         "test_a_damaged_cache_is_reported_by_path_and_extracted_again",
                         "test_maps_cache_holds_the_whole_image_and_its_mirror"},
    "test_backbone.py": {"test_standin_pretraining_is_deterministic_and_learns",
                         "test_training_builds_the_standin_once_and_checkpoints_carry_it"},
    "test_evaluation_java.py": {"test_meteor_and_ptb_match_pycocoevalcaps_own_wrappers",
                                "test_an_empty_last_caption_keeps_the_java_tokenizer_and_meteor"},
    "test_disk_full.py": {"test_training_on_a_full_disk_stops_naming_the_checkpoint_and_keeps_the_last_one"},
    "test_chapter_io.py": {"test_import_gives_the_books_greedy_ids_then_the_cli_captions_a_folder"},
    "test_images.py": {"test_a_corrupt_resized_image_above_one_percent_stops_training_in_one_line"},
    "test_karpathy.py": {"test_vocabulary_notebooks_training_and_evaluation_run_on_a_karpathy_folder"},
    "test_data.py": {"test_loader_with_spawned_workers"},                    # spawns DataLoader workers
    "test_build_lock.py": {"test_two_resize_processes_the_second_waits_then_reuses"},
    "test_scst.py": {"test_scst_under_torchrun_on_cpu"},                     # torchrun, two processes
    "test_modelcard.py": {"test_training_writes_the_card_and_evaluating_best_ckpt_completes_it"},   # trains first
    "test_export.py": {"test_an_export_loads_back_and_onnx_captions_as_the_checkpoint_does",
                       "test_int8_encoder_and_the_cli", "test_a_broken_export_is_refused_naming_the_file",
                       "test_the_exports_model_card"},
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        names = SLOW.get(item.path.name, ())
        if names == "*" or item.name in names or item.originalname in names:
            item.add_marker(pytest.mark.slow)
    modules = {item.path.name: item.module for item in items if getattr(item, "module", None)}
    for name, tests in SLOW.items():        # a renamed test must not drop silently into the fast loop
        named = () if tests == "*" or name not in modules else tests
        missing = sorted(t for t in named if not hasattr(modules[name], t))
        if missing:
            raise pytest.UsageError(f"conftest.SLOW names tests that {name} does not have: {', '.join(missing)}")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A small tiny-set in COCO layout (60 train / 16 val images), shared read-only by the tests."""
    from captioning.tinyset import make_tinyset

    out = tmp_path_factory.mktemp("data") / "tiny"
    make_tinyset(str(out), train=60, val=16, seed=1)
    return out


@pytest.fixture(scope="session")
def tiny_vocab(tiny_data):
    from captioning.vocabulary import build_vocabulary

    return build_vocabulary(str(tiny_data / "annotations" / "captions_train2014.json"), threshold=1, progress=False)


@pytest.fixture
def tiny_copy(tiny_data, tmp_path):
    """A private, writable copy of the tiny data (for tests that build vocabularies, caches, resized images)."""
    import shutil

    dst = tmp_path / "tiny"
    shutil.copytree(tiny_data, dst)
    return dst


@pytest.fixture
def readonly_dir(tmp_path):
    """A folder in which nothing can be created: a chmod 555 folder, or /sys where permissions do not
    stop us (root)."""
    folder = tmp_path / "readonly"
    folder.mkdir()
    folder.chmod(0o555)
    for candidate in (folder, "/sys"):
        try:
            os.mkdir(os.path.join(candidate, "probe"))
        except OSError:
            return str(candidate)
        os.rmdir(os.path.join(candidate, "probe"))
    pytest.skip("no read-only folder available here")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_status(url, wait=30):
    """The HTTP status of url; the server may print its URL a moment before it listens."""
    deadline = time.time() + wait
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code
        except urllib.error.URLError:
            if time.time() > deadline:
                raise
            time.sleep(0.5)


@contextmanager
def make_server(args, url_pattern, env=None, timeout=90):
    """Run `make -s ARGS` as a user without a display would, until it prints a line matching url_pattern.

    Yields (the match, every line printed so far); the server's whole process group is stopped on exit.
    """
    env = {k: v for k, v in (env or os.environ).items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    proc = subprocess.Popen(["make", "-s", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    seen, match = [], None
    try:
        deadline = time.time() + timeout
        while match is None and time.time() < deadline:
            try:
                seen.append(lines.get(timeout=1))
            except queue.Empty:
                assert proc.poll() is None, "".join(seen)
                continue
            match = re.search(url_pattern, seen[-1])
        assert match, "no URL printed:\n" + "".join(seen)
        yield match, seen
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
