"""The speed switches keep results equal: each fast path against the plain one, within a stated tolerance.

Tolerances are on P(PNEUMONIA) from the bundled model (224 px since session 11, 192 px before) over
full-resolution Kermany originals from ``../shared/data`` (every other one of the 116), set above what was measured
over all 116 (noted at each test).
Timings live in ``benchmarks/``, not here.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from cxr.config import load_config
from cxr.data import XrayDataset, prepare, scan, train_transform
from cxr.evaluate import predict_logits, probabilities
from cxr.images import load_image
from cxr.model import build_model, load_checkpoint

from .conftest import SHARED_DATA, make_dataset

ORIGINALS = SHARED_DATA / "kermany-original-sample"
CPU = torch.device("cpu")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Several inference passes over 116 images: one intra-op thread keeps them quick on a busy shared CPU.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def bundled():
    ckpt = load_checkpoint("default")
    return ckpt, ckpt.build("cpu")


@pytest.fixture(scope="module")
def originals(bundled):
    files = sorted(ORIGINALS.glob("*/*/*.jpeg"))
    if len(files) < 100:
        pytest.skip(f"{ORIGINALS} not present")
    files = files[::2]  # 58 of the 116, both splits and classes: half the time, the same conclusions
    size = bundled[0].config.image_size
    return files, np.stack([load_image(f, size) for f in files])


def probs(bundled, images: np.ndarray, *, bf16: bool = False, channels_last: bool = False) -> np.ndarray:
    ckpt, net = bundled
    cfg = ckpt.config
    if channels_last:
        net = ckpt.build("cpu").to(memory_format=torch.channels_last)
    logits = predict_logits(net, images, mean=cfg.mean, std=cfg.std, device=CPU, batch_size=32, bf16=bf16,
                            channels_last=channels_last)
    return probabilities(logits)


@pytest.fixture(scope="module")
def plain(bundled, originals) -> np.ndarray:
    """fp32, NCHW, full JPEG decode: the reference every fast path is held to."""
    return probs(bundled, originals[1])


def assert_same_decisions(fast: np.ndarray, plain: np.ndarray, threshold: float, tol: float) -> None:
    assert np.abs(fast - plain).max() <= tol, f"max |dP| {np.abs(fast - plain).max():.4g} > {tol}"
    flipped = np.flatnonzero((fast >= threshold) != (plain >= threshold))
    assert flipped.size == 0, f"{flipped.size} label(s) changed, e.g. image {flipped[0]}"


def test_draft_decode_same_predictions(bundled, originals, plain):
    # Measured (bundled model of session 3): max |dP| 0.048, mean 0.0019, no label changed (116 images; the closest to
    # the threshold is 0.045 away). The first bundled model: max 0.033. Session 11's 224 px model: max 0.044, mean
    # 0.0015, no label changed (the closest is 0.28 away).
    files, _ = originals
    size = bundled[0].config.image_size
    draft = np.stack([load_image(f, size, draft=True) for f in files])
    assert_same_decisions(probs(bundled, draft), plain, bundled[0].threshold, tol=0.05)


def test_bf16_autocast_same_predictions(bundled, originals, plain):
    # Measured (AVX512-BF16 CPU): max |dP| 0.0034, mean 0.0002, no label changed (first bundled model: 0.0025).
    # Session 11's 224 px model, bf16 emulated on a Xeon without AVX512-BF16: max 0.0045, mean 0.0003.
    assert_same_decisions(probs(bundled, originals[1], bf16=True), plain, bundled[0].threshold, tol=0.01)


def test_channels_last_same_predictions(bundled, originals, plain):
    # Measured: max |dP| 3.0e-7 (same arithmetic, another memory order; first bundled model: 1.5e-7; session 11's:
    # 2.7e-7).
    assert_same_decisions(probs(bundled, originals[1], channels_last=True), plain, bundled[0].threshold, tol=1e-5)


def test_build_without_init_is_the_plain_build(bundled):
    # Checkpoint.build skips the random initialisation; the weights and outputs must be exactly the plain build's.
    ckpt, fast = bundled
    inits = {n: getattr(torch.nn.init, n) for n in ("kaiming_normal_", "constant_", "kaiming_uniform_")}
    ckpt.build("cpu")
    assert {n: getattr(torch.nn.init, n) for n in inits} == inits  # the initialisers are restored
    slow = build_model(ckpt.arch, "none", num_classes=len(ckpt.class_names))
    slow.load_state_dict(ckpt.state_dict)
    slow.eval()
    assert not any(t.is_meta for t in [*fast.parameters(), *fast.buffers()])
    for (k, a), b in zip(fast.state_dict().items(), slow.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    x = torch.randn(2, 1, ckpt.config.image_size, ckpt.config.image_size)
    with torch.inference_mode():
        assert torch.equal(fast(x), slow(x))


def test_cached_and_uncached_pixels_are_identical(tmp_path):
    # The cache stores exactly what load_image returns: cold build (parallel and serial), warm read and the
    # uncached path that predict uses all give the same bytes.
    root = make_dataset(tmp_path / "data", per_class=20, test_per_class=0)
    split = scan(root)["train"]
    cfg = load_config(overrides={"cache_dir": str(tmp_path / "cache"), "image_size": 64})
    parallel = prepare(split, cfg, workers=2)
    warm = prepare(split, cfg, workers=2)
    serial = prepare(split, dataclasses.replace(cfg, cache_dir=str(tmp_path / "cache2")), workers=1)
    direct = np.stack([load_image(s.path, 64) for s in split.samples])
    for p in (parallel, warm, serial):
        np.testing.assert_array_equal(p.images, direct)
        np.testing.assert_array_equal(p.labels, [s.label for s in split.samples])


def test_cached_and_uncached_predictions_agree(tmp_path, bundled):
    # predict_files decodes each file itself; training and evaluation read the cache. Same model, same pixels, same
    # numerics (bf16 where the CPU has it, as predict uses): the same probabilities.
    import copy

    from cxr.model import use_bf16, use_channels_last
    from cxr.predict import predict_files

    ckpt, net = bundled
    cfg = dataclasses.replace(ckpt.config, cache_dir=str(tmp_path / "cache"), device="cpu")
    channels_last = use_channels_last(cfg, CPU)  # as predict_files and evaluate set it: bf16 kernels depend on it
    if channels_last:
        net = copy.deepcopy(net).to(memory_format=torch.channels_last)
    root = make_dataset(tmp_path / "data", per_class=6, test_per_class=0)
    prepared = prepare(scan(root)["train"], cfg)
    cached = probabilities(predict_logits(net, prepared.images, mean=cfg.mean, std=cfg.std, device=CPU,
                                          batch_size=32, bf16=use_bf16(cfg, CPU), channels_last=channels_last))
    uncached = {p.path: p.prob_pneumonia for p in predict_files("default", [root / "train"], device="cpu")}
    np.testing.assert_allclose([uncached[s.path] for s in prepared.samples], cached, atol=1e-6)


def test_augmentation_pixels_do_not_depend_on_threads():
    # XrayDataset runs the per-image augmentation on one intra-op thread (much faster; BENCHMARKS.md, figure 2). The
    # pixels must be those the process's own thread count gives, and the thread count must be left as it was.
    cfg = load_config()
    transform = train_transform(cfg)
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (12, 1, 64, 64), dtype=np.uint8))
    before = torch.get_num_threads()
    try:
        for i, image in enumerate(images):
            out = {}
            for threads in (1, 2):
                torch.set_num_threads(threads)
                torch.manual_seed(i)
                out[threads] = transform(image)
            assert torch.equal(out[1], out[2]), i
        prepared = type("Prepared", (), {"images": images[:, 0].numpy(), "labels": np.zeros(12, np.int64)})()
        dataset = XrayDataset(prepared, transform, seed=3)
        torch.set_num_threads(2)
        first = dataset[5][0]
        assert torch.get_num_threads() == 2
        assert torch.equal(first, dataset[5][0])  # seeded per image: the same draw again
    finally:
        torch.set_num_threads(before)
