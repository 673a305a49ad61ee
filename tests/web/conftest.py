"""Fixtures of the web tests: one small phantom case on disk, the embedded model, app clients."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")

pytest.importorskip("fastapi", reason="the web extra is not installed: pip install 'slidesam[web]'")

from fastapi.testclient import TestClient

from slidesam.data.io import write_image
from slidesam.web.app import create_app
from slidesam.web.state import ServerConfig
from tests.web.phantoms import SmallCase, small_case

REPO = Path(__file__).resolve().parents[2]
#: screenshots of the end-to-end test (git-ignored)
ARTIFACTS = REPO / "artifacts" / "web"


@pytest.fixture(scope="session")
def case() -> SmallCase:
    return small_case(seed=4)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory, case) -> Path:
    """A data folder with ``case/plain.nii.gz`` and ``case/arterial.nii.gz``."""
    root = tmp_path_factory.mktemp("data")
    for phase, volume in case.images.items():
        write_image(volume, root / "case" / f"{phase}.nii.gz")
    return root


@pytest.fixture(scope="session")
def model():
    import torch

    torch.set_num_threads(1)
    from slidesam.inference.models import default_model

    return default_model()


@pytest.fixture
def make_client(model, data_dir):
    """``make_client(**ServerConfig overrides) -> TestClient`` on a fresh app."""
    clients = []

    def make(**overrides) -> TestClient:
        config = ServerConfig(**{"data_dir": data_dir, **overrides})
        client = TestClient(create_app(config, model=model), raise_server_exceptions=False)
        clients.append(client)
        return client

    yield make
    for c in clients:
        c.close()


def wait_job(client: TestClient, session_id: str, timeout: float = 60.0) -> dict:
    """Poll the job endpoint until the job is no longer running; returns the final job."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        job = client.get(f"/api/sessions/{session_id}/job").json()
        if job["state"] != "running":
            return job
        time.sleep(0.05)
    raise AssertionError(f"job still running after {timeout} s: {job}")
