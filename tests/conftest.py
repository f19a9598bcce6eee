"""Shared fixtures: small real datasets copied from the bundled sample into tmp_path, and an isolated cache."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from cxr.demo import SAMPLE_DIR

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every test gets its own image cache (never the user's ~/.cache)."""
    monkeypatch.setenv("CXR_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))


def make_dataset(root: Path, per_class: int = 16, test_per_class: int = 4) -> Path:
    """``root/{train,test}/{NORMAL,PNEUMONIA}`` with real X-rays from the bundled sample."""
    for cls in ("NORMAL", "PNEUMONIA"):
        files = sorted((SAMPLE_DIR / "train" / cls).glob("*.jpeg"))[:per_class]
        (root / "train" / cls).mkdir(parents=True)
        for f in files:
            shutil.copy(f, root / "train" / cls / f.name)
        if test_per_class:
            (root / "test" / cls).mkdir(parents=True)
            for f in sorted((SAMPLE_DIR / "test" / cls).glob("*.jpeg"))[:test_per_class]:
                shutil.copy(f, root / "test" / cls / f.name)
    return root


@pytest.fixture
def tiny_dataset(tmp_path) -> Path:
    """16 + 16 training images and 4 + 4 test images (224 px JPEGs)."""
    return make_dataset(tmp_path / "data")


# Small enough to train in seconds on two CPU cores, big enough for every stage to do real work.
TINY_TRAIN = {"image_size": 32, "batch_size": 8, "epochs": 2, "val_fraction": 0.25, "weights": "none",
              "warmup_epochs": 0.5, "patience": 0, "device": "cpu", "eval_batch_size": 32}


def read_csv(path) -> list[dict[str, str]]:
    """Rows of a CSV file as dicts."""
    import csv

    with open(path, newline="") as f:
        return list(csv.DictReader(f))
