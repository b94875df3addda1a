"""Writes that lose nothing (no torch import: the vocabulary and the CLI use it too).

    with atomic_write(path, "w") as f:
        json.dump(obj, f)

The file is written under a temporary name in the same folder, fsynced, then renamed over
`path`. A crash or kill at any point leaves either the old file or the new one, never a
torn one, and a failed write leaves no temporary file behind.

    move_aside(folder, ["last.ckpt", "tb"])   # -> folder/previous-20261206-221503/

What a user made and a command is about to replace (a run, an imported checkpoint, an
export) is moved into a `previous-<timestamp>/` folder beside it, and the move is printed:
replacing never deletes.
"""
import contextlib
import json
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from types import FrameType
from typing import IO, Any

# what signal.signal() returns and accepts: a handler, SIG_DFL/SIG_IGN, or None (not set from Python)
_Handler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None


def fsync_dir(path: str | os.PathLike[str]) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not supported on some platforms
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "wb", sync_dir: bool = True) -> Iterator[IO[Any]]:
    """Yield a file open in `mode`; on success fsync it and rename it over `path`.

    The file gets the mode a plain open() would give it (0666 less the umask), not mkstemp's 0600.
    `sync_dir=False` leaves the folder's fsync to the caller (one for many files)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        if sync_dir:
            fsync_dir(folder)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


PREVIOUS_PREFIX = "previous-"


def atomic_write_json(path: str | os.PathLike[str], obj: Any, indent: int | None = None,
                      sync_dir: bool = True) -> None:
    """json.dump(obj) into `path` through atomic_write: the old file or the whole new one, never half."""
    with atomic_write(path, "w", sync_dir=sync_dir) as f:
        json.dump(obj, f, indent=indent)


def move_aside(folder: str, names: Iterable[str], log: Callable[[str], object] = print,
               what: str = "the previous files") -> str | None:
    """Move the entries `names` of `folder` (files or folders; absent ones are ignored) into a new
    `folder/previous-<timestamp>/`, and say so. Returns that folder, or None when nothing was there.

    A rename within one folder: instant whatever the size, and nothing is copied or deleted."""
    present = [n for n in names if os.path.lexists(os.path.join(folder, n))]
    if not present:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for k in range(1000):               # two replacements in one second get their own folders
        aside = os.path.join(folder, PREVIOUS_PREFIX + stamp + (f"-{k + 1}" if k else ""))
        try:
            os.mkdir(aside)
            break
        except FileExistsError:
            continue
    else:
        raise FileExistsError(f"cannot make a {PREVIOUS_PREFIX}{stamp} folder in {folder}")
    for name in present:
        os.rename(os.path.join(folder, name), os.path.join(aside, name))
    fsync_dir(folder)
    log(f"moved {what} ({', '.join(present)}) to {aside}/ (delete it when you no longer need it)")
    return aside


STOP_SIGNALS: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)   # Ctrl-C; docker stop, Kubernetes, Slurm, spot reclaim


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold Ctrl-C (SIGINT) and SIGTERM until the block has finished, then deliver the first one.

    A KeyboardInterrupt raised inside torch.save leaves its zip writer broken, and the next
    save fails with a cryptic "unexpected pos" error: the interrupted run would lose its state;
    a SIGTERM's default action would end the process in the middle of the write. A held signal
    goes to the handler that was there before (a SIGTERM with none is re-sent once the write is
    done, so the process still ends). Outside the main thread signals cannot be handled, and the
    block runs as it is.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[tuple[int, FrameType | None]] = []
    previous: dict[int, _Handler] = {}

    def hold(signum: int, frame: FrameType | None) -> None:
        if not received and not getattr(previous.get(signum), "holds_interrupts", False):   # said once
            name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
            print(f"{name}: finishing the checkpoint write first", file=sys.stderr, flush=True)
        received.append((signum, frame))

    hold.holds_interrupts = True  # type: ignore[attr-defined]  # a function attribute, which mypy does not model
    for signum in STOP_SIGNALS:
        previous[signum] = signal.signal(signum, hold)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
    if received:
        signum, frame = received[0]
        handler = previous[signum]
        if callable(handler):
            handler(signum, frame)                     # default_int_handler raises KeyboardInterrupt
        elif handler in (signal.SIG_DFL, None):
            os.kill(os.getpid(), signum)               # the default action, now that the file is whole
