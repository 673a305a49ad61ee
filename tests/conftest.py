"""Shared test fixtures. Real CT fixtures live in ../shared/fixtures (never copied here);
tests that need them skip when the folder is absent."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REAL = REPO.parent / "shared" / "fixtures" / "real"


@pytest.fixture
def real_fixtures() -> Path:
    """Folder with the real CT fixtures; skips the test when it is absent."""
    if not REAL.is_dir():
        pytest.skip(f"real fixtures not found at {REAL}")
    return REAL
