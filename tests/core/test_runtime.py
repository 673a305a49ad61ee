from __future__ import annotations

import ctypes
import sys

import pytest

from slidesam.cli import main as cli_main
from slidesam.core import runtime


def _has_mallopt() -> bool:
    try:
        return sys.platform.startswith("linux") and hasattr(ctypes.CDLL(None), "mallopt")
    except OSError:
        return False


def test_reuse_freed_memory_sets_both_glibc_thresholds(monkeypatch):
    if not _has_mallopt():
        pytest.skip("needs Linux with glibc's mallopt")
    calls = []
    real = ctypes.CDLL

    class Recording:
        def __init__(self, name):
            self._lib = real(name)

        @property
        def mallopt(self):
            fn = self._lib.mallopt

            def record(param, value):
                calls.append((param, value))
                return fn(param, value)

            record.argtypes = record.restype = None
            return record

    monkeypatch.setattr(runtime.ctypes, "CDLL", Recording)
    assert runtime.reuse_freed_memory(256 << 20) is True
    assert calls == [(runtime._M_MMAP_THRESHOLD, 256 << 20), (runtime._M_TRIM_THRESHOLD, 256 << 20)]


def test_reuse_freed_memory_is_a_no_op_off_linux(monkeypatch):
    monkeypatch.setattr(runtime.sys, "platform", "darwin")
    assert runtime.reuse_freed_memory() is False


def test_the_command_applies_it_before_running_a_subcommand(monkeypatch, tmp_path, capsys):
    seen = []
    monkeypatch.setattr(cli_main, "reuse_freed_memory", lambda: seen.append(True) or True)
    with pytest.raises(SystemExit):
        cli_main.main(["--version"])
    assert seen == []  # argparse exits before any command runs: nothing to tune
    missing = str(tmp_path / "missing")
    assert cli_main.main(["evaluate", "--pred", missing, "--gt", missing]) == 2
    assert seen == [True]
    assert "ground-truth folder does not exist" in capsys.readouterr().err
