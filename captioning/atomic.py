"""All-or-nothing file writes (no torch import: the vocabulary and the CLI use it too).

    with atomic_write(path, "w") as f:
        json.dump(obj, f)

The file is written under a temporary name in the same folder, fsynced, then renamed over
`path`. A crash or kill at any point leaves either the old file or the new one, never a
torn one, and a failed write leaves no temporary file behind.
"""
import contextlib
import os
import tempfile


def _fsync_dir(path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not supported on some platforms
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path, mode="wb"):
    """Yield a file open in `mode`; on success fsync it and rename it over `path`."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(folder)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
