"""Exceptions raised at the toolkit's boundaries.

``InputError`` is a ``ValueError`` whose message is one line that says what was wrong and
what to do; the CLI prints it as ``slidesam: error: ...`` without a traceback.
"""

from __future__ import annotations

__all__ = ["InputError"]


class InputError(ValueError):
    """Bad user input: a file, a folder, a flag value or a combination of them."""
