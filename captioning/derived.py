"""Files derived from a data set: built once, under a lock, and written without a per-file fsync
(no torch import: the CLI's resize uses it).

    with build_lock(path, "the vocabulary", log):      # locks path + ".lock"
        if not os.path.exists(path):       # look again: another process may have built it meanwhile
            build(path)

`build_lock` holds an exclusive flock (on a small `<path>.lock` file, or on a folder itself) for as
long as something is built. A second run on the same data waits, saying so, then finds what the
first built and uses it. The lock file is left in place (deleting it would let a third process
lock a different file); the lock itself goes with the process that held it, so a killed run never
leaves a stale lock.

    with write_derived(dst) as f:          # temp file, rename; fsync_dir(folder) once at the end
        image.save(f, "JPEG")

`write_derived` is atomic_write without the file's fsync, for outputs that can be made again from
their source (resized images, the tokenized captions): a rename means a crash leaves the old file
or the new one; after a power cut a renamed file may be empty or cut short, and the readers of
these files check that (resize's end-marker check, the token cache's JSON and source stamp) and
make it again. Checkpoints, the vocabulary and the feature cache's index keep their fsync.
"""
import contextlib
import fcntl
import os
import tempfile
from collections.abc import Callable, Iterator
from typing import IO, Any

from .atomic import _umask


@contextlib.contextmanager
def build_lock(path: str, what: str, log: Callable[[str], object] = print) -> Iterator[None]:
    """Hold an exclusive flock for the block: on `path` itself when it is a folder (no file is added to
    it), else on `path + ".lock"`, created beside it if needed.

    When another process holds it, say "waiting for another process building <what>" once and
    wait. Where no lock file can be created (read-only data) the block runs without a lock:
    nothing can be built there anyway, and the caller's own write will name the problem."""
    try:
        if os.path.isdir(path):
            fd = os.open(path, os.O_RDONLY)
        else:
            lock_path = path + ".lock"
            os.makedirs(os.path.dirname(os.path.abspath(lock_path)), exist_ok=True)
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for another process building {what} ({path}) to finish")
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:           # a file system without flock: build as before, unlocked
            pass
        yield
    finally:
        os.close(fd)              # closing the last descriptor lets the lock go


@contextlib.contextmanager
def write_derived(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[IO[Any]]:
    """Yield a file open in `mode`; on success rename it over `path` (no fsync: see the module's note).

    The temp file is `<name>.<random>.tmp` in the same folder, as atomic_write's, so that the
    clean-ups that know those names (images._TEMP_FILE) know these too. A failed write leaves none."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, mode) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except FileNotFoundError:
            pass
        raise
