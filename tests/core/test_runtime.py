from __future__ import annotations

import ctypes
import sys
from types import SimpleNamespace

import pytest

from slidesam.cli import main as cli_main
from slidesam.core import runtime


def test_reuse_freed_memory_sets_both_glibc_thresholds(monkeypatch):
    calls = []

    def mallopt(param, value):
        calls.append((param, value))
        return 1

    monkeypatch.setattr(runtime.sys, "platform", "linux")
    monkeypatch.setattr(runtime.ctypes, "CDLL", lambda name: SimpleNamespace(mallopt=mallopt))
    assert runtime.reuse_freed_memory(256 << 20) is True
    assert calls == [(runtime._M_MMAP_THRESHOLD, 256 << 20), (runtime._M_TRIM_THRESHOLD, 256 << 20)]
    assert mallopt.argtypes == (ctypes.c_int, ctypes.c_int)  # no silent int truncation


def test_reuse_freed_memory_on_this_machine():
    try:
        glibc = sys.platform.startswith("linux") and hasattr(ctypes.CDLL(None), "mallopt")
    except OSError:
        glibc = False
    if not glibc:
        pytest.skip("needs Linux with glibc's mallopt")
    assert runtime.reuse_freed_memory() is True  # glibc accepted both values


def test_reuse_freed_memory_without_mallopt_changes_nothing(monkeypatch):
    monkeypatch.setattr(runtime.sys, "platform", "linux")
    monkeypatch.setattr(runtime.ctypes, "CDLL", lambda name: SimpleNamespace())  # e.g. musl
    assert runtime.reuse_freed_memory() is False


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


def test_torch_threads_restores_the_previous_count():
    import torch

    before = torch.get_num_threads()
    seen = []

    def body():
        with runtime.torch_threads(before + 1):
            seen.append(torch.get_num_threads())
            raise RuntimeError("the count comes back even on error")

    with pytest.raises(RuntimeError):
        body()
    assert seen == [before + 1]
    assert torch.get_num_threads() == before
