import os

from conftest import free_port, http_status, make_server


def test_make_lab_starts_headless_as_root_and_prints_a_working_url(tmp_path):
    """What a Docker or SSH user runs: no display, maybe root. The URL it prints must answer."""
    port = free_port()
    env = dict(os.environ, JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"), JUPYTER_CONFIG_DIR=str(tmp_path / "config"))
    with make_server(["lab", f"LAB_ARGS=--ip=127.0.0.1 --port={port}"],
                     rf"(http://127\.0\.0\.1:{port}/lab\?token=\w+)", env) as (match, seen):
        assert any(f"ssh -L {port}:localhost:{port}" in line for line in seen)   # the port-forward hint
        token = match.group(1).split("token=")[1]
        assert http_status(f"http://127.0.0.1:{port}/api/status?token={token}") == 200
        assert http_status(f"http://127.0.0.1:{port}/api/status") == 403  # and nothing without it
