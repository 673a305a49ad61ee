"""Process-wide runtime settings. Only entry points (the ``slidesam`` command, benches) apply
them, never an import: a library must not change the allocator of the program that imports it.
"""

from __future__ import annotations

import contextlib
import ctypes
import sys
from collections.abc import Iterator

__all__ = ["reuse_freed_memory", "torch_threads"]

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def reuse_freed_memory(threshold_bytes: int = 1 << 30) -> bool:
    """Let glibc's malloc keep freed blocks of up to ``threshold_bytes`` for reuse.

    By default glibc serves every allocation above 32 MB with a fresh ``mmap`` and returns it to
    the system on free, and trims the heap as soon as its free top exceeds 64 MB. Torch's CPU
    tensors are plain malloc blocks, so every large activation (attention biases, padded
    windows, residual sums) is then new memory whose pages fault in one by one when first
    written. On our 2-core VM a fault costs ~1.5 us per 4 KB page: filling a fresh 46 MB tensor
    took 19 ms, a reused one 2 ms, and the vit_b encoder at 1024 px ran ~15 % faster with this
    setting (``bench/encoder.py --default-malloc`` shows the difference). The effect is the one the
    PyTorch CPU tuning guides get from jemalloc or tcmalloc.

    Cost: memory freed by torch stays with the process (up to its own peak) instead of going
    back to the system until the process ends; the peak itself does not grow.

    Returns:
        True when applied (Linux with glibc); False elsewhere (nothing is changed).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # glibc; musl has no mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    value = int(threshold_bytes)
    return bool(mallopt(_M_MMAP_THRESHOLD, value)) and bool(mallopt(_M_TRIM_THRESHOLD, value))


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run a block with ``torch.set_num_threads(n)``; the previous count is restored after."""
    import torch  # here, not at the top: slidesam.core does not import torch

    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)
