"""``slidesam serve``: argument errors are one line, and the server answers on its port."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from slidesam.cli.main import main


def test_bad_data_dir_is_a_one_line_error(tmp_path, capsys):
    assert main(["serve", "--data-dir", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"slidesam: error: --data-dir {tmp_path / 'missing'}: no such folder"


def test_serve_starts_on_localhost(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "slidesam.cli.main", "serve", "--port", str(port)]
    cmd += ["--data-dir", str(tmp_path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        end = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/info") as r:
                    info = json.load(r)
                break
            except OSError:
                assert proc.poll() is None, proc.communicate()
                assert time.monotonic() < end, "the server did not answer within 60 s"
                time.sleep(0.2)
        assert info["data_dir"] is True
        assert info["sessions"] == 0
        assert info["model"].startswith("embedded default")
        # a foreign Host header (DNS rebinding) is refused on a localhost server
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/api/info", headers={"Host": "evil.example"}
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(req)
        assert refused.value.code == 400
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=20)
    assert f"open http://localhost:{port}/" in out
