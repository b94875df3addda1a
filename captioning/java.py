"""Runs the Java programs that evaluation needs (pycocoevalcap's PTB tokenizer, METEOR, SPICE) so they cannot hang it.

pycocoevalcap's own wrappers wait on Java without a limit: a JVM that cannot start (say
JAVA_TOOL_OPTIONS=-Xms3g against METEOR's -Xmx2G) or that never answers stalls the whole evaluation.
Here each program runs in its own process group, its output read by threads, so that every wait has
a timeout and the whole group can be killed (a `java` on the PATH may be a wrapper script). A program
that fails, or runs out of time, raises JavaFailed naming what Java said last; the caller skips that
metric and keeps the others.

The limits: CAPTIONING_JAVA_TIMEOUT seconds per answer (default 120) for the tokenizer and METEOR;
CAPTIONING_SPICE_TIMEOUT seconds for SPICE's whole run (default 1800), as SPICE is one long batch
job (CoreNLP parses every caption) rather than a dialogue.
"""
import collections
import os
import queue
import shutil
import signal
import subprocess
import threading
from collections.abc import Callable
from typing import IO


def java_available() -> bool:
    """Whether a `java` is on the PATH (it may still fail to start: JavaProcess says so)."""
    return shutil.which("java") is not None


class JavaFailed(RuntimeError):
    """A Java scorer could not start, failed, or did not answer in time."""


def java_timeout() -> float:
    """Seconds to wait for each answer of the PTB tokenizer or METEOR (CAPTIONING_JAVA_TIMEOUT, default 120)."""
    return float(os.environ.get("CAPTIONING_JAVA_TIMEOUT", "120"))


def spice_timeout() -> float:
    """Seconds SPICE may run in all (CAPTIONING_SPICE_TIMEOUT, default 1800); a bad value is a ValueError naming it."""
    text = os.environ.get("CAPTIONING_SPICE_TIMEOUT", "1800")
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise ValueError(f"CAPTIONING_SPICE_TIMEOUT must be a number of seconds > 0, got {text!r}")
    return value


class JavaProcess:
    """A Java program in its own process group, read by a thread, so that every wait has a timeout
    and the whole group can be killed (a `java` on the PATH may be a wrapper script)."""

    def __init__(self, cmd: list[str], cwd: str) -> None:
        try:
            self.p = subprocess.Popen(cmd, cwd=cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, start_new_session=True)
        except OSError as e:
            raise JavaFailed(f"cannot start {cmd[0]}: {e}") from None
        if self.p.stdin is None or self.p.stdout is None or self.p.stderr is None:   # never: all three are PIPEs
            raise JavaFailed(f"cannot talk to {cmd[0]}: a pipe is missing")
        self.stdin, self.stdout, self.stderr = self.p.stdin, self.p.stdout, self.p.stderr
        self.lines: queue.Queue[bytes | None] = queue.Queue()
        # the last lines of stdout, stderr
        self.said: tuple[collections.deque[bytes], collections.deque[bytes]] = \
            (collections.deque(maxlen=3), collections.deque(maxlen=3))
        self.readers = [threading.Thread(target=self._read, args=(pipe, put, said), daemon=True)
                        for pipe, put, said in ((self.stdout, self.lines.put, self.said[0]),
                                                (self.stderr, None, self.said[1]))]
        for reader in self.readers:
            reader.start()

    @staticmethod
    def _read(pipe: IO[bytes], put: Callable[[bytes | None], None] | None, said: collections.deque[bytes]) -> None:
        for line in pipe:
            said.append(line)
            if put:
                put(line)
        if put:
            put(None)

    def why(self, default: str) -> str:
        """What Java said last before it died (a JVM that cannot start says it on stdout), else `default`."""
        for reader in self.readers:
            reader.join(timeout=2)
        said = [line.decode(errors="replace").strip() for line in [*self.said[0], *self.said[1]]]
        said = [line for line in said if line and not line.startswith("Picked up JAVA_TOOL_OPTIONS")]
        return ": ".join(said[-2:]) if said else default

    def finish(self, timeout: float) -> None:
        """Wait for the program to end by itself; an exit code other than 0 is a failure."""
        try:
            self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            raise JavaFailed(f"it did not end within {timeout:g} s") from None
        if self.p.returncode:
            raise JavaFailed(self.why(f"java exited with code {self.p.returncode}"))

    def ask(self, text: str, answers: int, timeout: float) -> list[str]:
        """Send one line; return the next `answers` lines of output."""
        try:
            self.stdin.write(text.encode() + b"\n")
            self.stdin.flush()
        except OSError:                             # BrokenPipeError: the JVM is gone
            self.p.wait()
            raise JavaFailed(self.why(f"java exited with code {self.p.returncode}")) from None
        return [self.read(timeout) for _ in range(answers)]

    def read(self, timeout: float) -> str:
        """The next line of output, within `timeout` seconds."""
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise JavaFailed(f"no answer within {timeout:g} s") from None
        if line is None:
            self.p.wait()
            raise JavaFailed(self.why(f"java exited with code {self.p.returncode}"))
        return line.decode(errors="replace").rstrip("\n")

    def close(self) -> None:
        """Kill the whole process group (if it is still there) and close the pipes."""
        try:
            os.killpg(self.p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.p.wait()
        for pipe in (self.stdin, self.stdout, self.stderr):
            try:
                pipe.close()
            except OSError:
                pass
