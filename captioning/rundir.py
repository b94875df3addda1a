"""The run folder (models_dir/<dataset>/) of a training run: who may write it, and what a new start finds.

- `RunLock`: `train.lock`, created atomically (O_CREAT|O_EXCL) by rank 0 and holding its PID and host,
  keeps a second trainer out of the folder. A lock whose process is gone (same host) is stale: it is
  taken over with a warning.
- `prepare_run_dir`: before any expensive work, a fresh run refuses a folder that holds a run (unless
  `overwrite`, which moves the old run into `previous-<timestamp>/`; only `overwrite="delete"`
  deletes it), a resume finds its last.ckpt, and the temporary files of writes that a `kill -9`
  interrupted are removed.
- `read_log` / `trim_log`: train_log.jsonl read line by line, a torn last line (a kill during a
  write) dropped with a warning.
"""
import fcntl
import json
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Callable
from typing import Any

from .atomic import atomic_write, move_aside
from .checkpoint import data_identity, load_checkpoint
from .config import Config, resumed_config

RUN_FILES = ("last.ckpt", "best.ckpt", "train_log.jsonl")   # a folder holding any of these holds a run
OLD_RUN_FILES = RUN_FILES + ("early.ckpt", "evaluation.json", "val_results.json", "tb")   # what --overwrite moves
OVERWRITE_CHOICES = (False, True, "move", "delete")          # True is "move"
LOCK_NAME = "train.lock"
# atomic_write's temporary names for the checkpoints: last.ckpt.<8 mkstemp characters>.tmp
TEMP_FILE = re.compile(r"^(last|best|early)\.ckpt\.[a-z0-9_]{8}\.tmp$")


class RunInUse(RuntimeError):
    """Another trainer holds the run folder."""


def _process_start(pid: int) -> int | None:
    """When `pid` started (clock ticks since boot, Linux), to tell a reused PID from the lock's owner."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int, start: int | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:       # another user's process: alive
        return True
    now = _process_start(pid)
    return start is None or now is None or now == start


class RunLock:
    """`with RunLock(folder):` or acquire()/release(). Only the process that took it removes it."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.path = os.path.join(folder, LOCK_NAME)
        self.token: str | None = None

    def acquire(self, log: Callable[[str], object] = print) -> "RunLock":
        os.makedirs(self.folder, exist_ok=True)
        token = uuid.uuid4().hex
        me = {"pid": os.getpid(), "host": socket.gethostname(), "start": _process_start(os.getpid()),
              "token": token, "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._remove_if_stale(log)       # raises RunInUse while its owner runs
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
                f.flush()
                os.fsync(f.fileno())
            self.token = token
            return self
        raise RunInUse(f"could not take the lock {self.path}: other processes keep taking it")

    def _remove_if_stale(self, log: Callable[[str], object]) -> None:
        try:
            f = open(self.path)
        except FileNotFoundError:
            return                                   # released meanwhile: try again
        with f:
            # One process at a time judges this lock file; another one that judged it stale and
            # removed it meanwhile leaves us holding a file that is no longer the lock.
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                if os.stat(self.path).st_ino != os.fstat(f.fileno()).st_ino:
                    return
            except FileNotFoundError:
                return
            try:
                owner = json.loads(f.read())
                pid, host = int(owner["pid"]), str(owner["host"])
            except (ValueError, KeyError, TypeError):
                if time.time() - os.fstat(f.fileno()).st_mtime < 10:   # its owner may be writing it now
                    raise RunInUse(f"{self.folder} is being locked by another trainer ({self.path})") from None
                log(f"warning: removing the unreadable lock file {self.path} (left by a crash)")
                os.remove(self.path)
                return
            if host != socket.gethostname():
                raise RunInUse(f"another training run (PID {pid} on host {host}) is using {self.folder}; "
                               f"if none runs there any more, delete {self.path}")
            if _alive(pid, owner.get("start")):
                raise RunInUse(f"another training run (PID {pid}) is using {self.folder}: wait for it to end, "
                               f"stop it, or train into another --models-dir")
            log(f"warning: taking over the stale lock {self.path}: its process {pid} is no longer running")
            os.remove(self.path)

    def release(self) -> None:
        """Remove the lock file if it is still ours."""
        if self.token is None:
            return
        try:
            with open(self.path) as f:
                ours = json.load(f).get("token") == self.token
            if ours:
                os.remove(self.path)
        except (OSError, ValueError):
            pass
        self.token = None

    def __enter__(self) -> "RunLock":
        return self if self.token else self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def remove_temp_files(folder: str, log: Callable[[str], object] = print) -> list[str]:
    """Delete the temporary files of checkpoint writes that a kill -9 interrupted (only ours, by name).
    Call it while holding the lock: then no write of another trainer can be under way."""
    removed = []
    for name in os.listdir(folder) if os.path.isdir(folder) else ():
        if TEMP_FILE.match(name):
            try:
                os.remove(os.path.join(folder, name))
                removed.append(name)
            except FileNotFoundError:
                pass
    if removed:
        log(f"removed {len(removed)} temporary file(s) of an interrupted checkpoint write from {folder}: "
            f"{', '.join(removed)}")
    return removed


def prepare_run_dir(models_dir: str, resume: bool = False, overwrite: bool | str = False,
                    log: Callable[[str], object] = print) -> None:
    """What a start finds in the run folder, checked before any expensive work (call it holding the lock).

    A fresh run into a folder that holds a run refuses, unless `overwrite`: True (or "move") moves
    the old run's files into `models_dir/previous-<timestamp>/` and says so; only "delete" deletes
    them. `resume` needs last.ckpt. Leftover temporary files of interrupted writes are removed.
    """
    if overwrite not in OVERWRITE_CHOICES:
        raise ValueError(f"overwrite must be one of {OVERWRITE_CHOICES}, got {overwrite!r}")
    if resume and overwrite:
        raise ValueError("--resume and --overwrite contradict each other: continue the run, or replace it")
    os.makedirs(models_dir, exist_ok=True)
    remove_temp_files(models_dir, log)
    if resume:
        last = os.path.join(models_dir, "last.ckpt")
        if not os.path.isfile(last):
            raise FileNotFoundError(f"--resume: no checkpoint at {last} (train without --resume first)")
        return
    present = [n for n in RUN_FILES if os.path.exists(os.path.join(models_dir, n))]
    if present and not overwrite:
        raise FileExistsError(f"{models_dir} already holds a training run ({', '.join(present)}): continue it "
                              f"with --resume (resume=True), move it aside and start afresh with --overwrite "
                              f"(overwrite=True), or train into another --models-dir")
    old = OLD_RUN_FILES + _model_card(models_dir)
    if overwrite == "delete":
        removed = [n for n in old if os.path.lexists(os.path.join(models_dir, n))]
        for name in removed:
            path = os.path.join(models_dir, name)
            shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
        if removed:
            log(f"overwrite=delete: deleted the previous run's {', '.join(removed)} from {models_dir}")
    else:                             # no run files, but leftovers of one (tb/, evaluation.json): aside too
        move_aside(models_dir, old, log, what="the previous run")


def _model_card(models_dir: str) -> tuple[str, ...]:
    """("README.md",) where models_dir holds the model card a run wrote (modelcard.py): it belongs to that run
    and goes with it. A README.md of anyone else stays where it is."""
    from .modelcard import CARD_NAME, read_card_info

    return (CARD_NAME,) if read_card_info(os.path.join(models_dir, CARD_NAME)) is not None else ()


RESUME_KEYS = ("optimizer", "epoch", "batch", "step", "rng")


def resume_config(path: str, config: Config, world_size: int = 1) -> tuple[Config, dict[str, tuple[Any, Any]]]:
    """Before a resume's expensive setup: the config that continues the run in `path`, and the
    optimisation fields that change ({field: (was, now)}); see config.resumed_config.

    The checkpoint must hold a training state. Mid-epoch, another batch size or number of
    processes would skip the wrong captions: refused (from an epoch's end any batch size is fine)."""
    ckpt = load_checkpoint(path)
    missing = [k for k in RESUME_KEYS if ckpt.get(k) is None]
    if missing:
        raise ValueError(f"{path} cannot be resumed: it has no {missing[0]!r} (a checkpoint for inference only?)")
    try:
        config, changes = resumed_config(ckpt["config"], config)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    was = (ckpt.get("data") or {}).get("train_captions_sha1")
    if was and os.path.isfile(config.captions_json("train")):
        if data_identity(config)["train_captions_sha1"] != was:
            raise ValueError(f"{path} was trained on other data: {config.captions_json('train')} is not the "
                             f"captions file it was trained with (another data set, or the file changed); "
                             f"resume with its --data-dir, or start a new run")
    if ckpt["batch"]:
        where = f"{path} stopped in the middle of epoch {ckpt['epoch']}"
        if "batch_size" in changes:
            was = changes["batch_size"][0]
            raise ValueError(f"{where} with batch_size {was}: resuming with {config.batch_size} would skip "
                             f"the wrong captions; resume with --batch-size {was} (another batch size can "
                             f"start from an epoch's end)")
        world = ckpt.get("world_size")
        if world is not None and world != world_size:
            raise ValueError(f"{where} with {world} process(es): resuming with {world_size} would skip the wrong "
                             f"captions; resume with {world} (torchrun --nproc_per_node={world})")
    return config, changes


def read_log(path: str, warn: Callable[[str], object] | None = None) -> list[dict[str, Any]]:
    """The rows of a train_log.jsonl. A line that is not JSON (a torn last line after a kill) is
    skipped, with `warn(message)` called when given."""
    rows: list[dict[str, Any]] = []
    bad = 0
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                bad += 1
                continue
            if isinstance(row, dict):
                rows.append(row)
            else:
                bad += 1
    if bad and warn:
        warn(f"warning: {path}: dropped {bad} unreadable line(s) (a write cut short by a kill?)")
    return rows


def trim_log(path: str, step: int, log: Callable[[str], object] = print) -> None:
    """On resume: keep the rows logged up to the checkpoint's `step`, drop later and torn ones."""
    if not os.path.exists(path):
        return
    rows = [r for r in read_log(path, warn=log) if isinstance(r.get("step"), int) and r["step"] <= step]
    with atomic_write(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
