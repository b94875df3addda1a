import os
import queue
import re
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request

from conftest import ROOT


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _status(url, wait=30):
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


def test_make_lab_starts_headless_as_root_and_prints_a_working_url(tmp_path):
    """What a Docker or SSH user runs: no display, maybe root. The URL it prints must answer."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    env.update(JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"), JUPYTER_CONFIG_DIR=str(tmp_path / "config"))
    proc = subprocess.Popen(["make", "-s", "lab", f"LAB_ARGS=--ip=127.0.0.1 --port={port}"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    seen, url = [], None
    try:
        deadline = time.time() + 90
        while url is None and time.time() < deadline:
            try:
                seen.append(lines.get(timeout=1))
            except queue.Empty:
                assert proc.poll() is None, "".join(seen)
                continue
            match = re.search(rf"(http://127\.0\.0\.1:{port}/lab\?token=\w+)", seen[-1])
            url = match and match.group(1)
        assert url, "no URL with a token printed:\n" + "".join(seen)
        assert any(f"ssh -L {port}:localhost:{port}" in line for line in seen)   # the port-forward hint
        token = url.split("token=")[1]
        assert _status(f"http://127.0.0.1:{port}/api/status?token={token}") == 200
        assert _status(f"http://127.0.0.1:{port}/api/status") == 403  # and nothing without it
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
