"""The CUDA paths, for a machine with a GPU: ``pytest -m gpu``. Skipped elsewhere (CI has no GPU).

What the CPU tests cannot show: that "fp32" on CUDA is fp32 (cuDNN's default for convolutions is TF32, which moves
P(PNEUMONIA) by about 1e-3), that bf16 on CUDA stays near it, and that a training epoch runs with ``--deterministic``
(adaptive pooling has no deterministic CUDA backward: cxr warns instead of stopping).
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from cxr.config import load_config
from cxr.demo import SAMPLE_DIR
from cxr.predict import predict_files
from cxr.train import train

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

FILES = sorted((SAMPLE_DIR / "test").glob("*/*.jpeg"))


def probabilities(device: str, amp: str) -> np.ndarray:
    return np.array([p.prob_pneumonia for p in predict_files("default", FILES, device=device, amp=amp)])


def test_fp32_on_cuda_gives_the_cpus_probabilities():
    # MODEL_CARD expects agreement "within about 1e-6"; TF32 left on would show as ~1e-3.
    cpu, cuda = probabilities("cpu", "off"), probabilities("cuda", "off")
    assert np.abs(cuda - cpu).max() < 1e-5, np.abs(cuda - cpu).max()


def test_bf16_on_cuda_stays_near_fp32():
    cpu, bf16 = probabilities("cpu", "off"), probabilities("cuda", "auto")
    assert np.abs(bf16 - cpu).max() < 0.05, np.abs(bf16 - cpu).max()


def test_a_deterministic_epoch_on_cuda_runs_and_says_what_it_cannot_make_deterministic(tiny_dataset, tmp_path,
                                                                                      caplog):
    cfg = load_config(overrides={"data": str(tiny_dataset), "output": str(tmp_path / "run"), "epochs": 1,
                                 "image_size": 64, "batch_size": 8, "weights": "none", "device": "cuda",
                                 "deterministic": True, "val_fraction": 0.25})
    with caplog.at_level(logging.WARNING, logger="cxr"):
        run = train(cfg)
    assert (run / "best.pt").is_file() and (run / "metrics.json").is_file()
    assert "determinis" in caplog.text
