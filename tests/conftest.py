"""Shared fixtures: the real-data location and torch thread limits for a 2-core machine."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("LEUKOTYPE_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def _require_shared_data() -> bool:
    return os.environ.get("LEUKOTYPE_REQUIRE_SHARED_DATA", "") not in {"", "0"}


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data``: skipped with a reason in a user's clone, required in CI."""
    if not (SHARED_DATA / "pbc" / "manifest.csv").is_file():
        message = (
            f"real data not found at {SHARED_DATA} (expected pbc/ and all_subtypes/ with "
            "manifest.csv); set LEUKOTYPE_SHARED_DATA to its location"
        )
        if _require_shared_data():
            pytest.fail(message + " — LEUKOTYPE_REQUIRE_SHARED_DATA=1 makes it required")
        pytest.skip(message)
    return SHARED_DATA


@pytest.fixture(autouse=True, scope="session")
def _limit_threads() -> None:
    import torch

    torch.set_num_threads(min(2, os.cpu_count() or 1))
