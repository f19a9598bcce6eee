"""Heatmaps of where the model looked: Grad-CAM on the last convolutional block, and overlays on the X-ray.

Grad-CAM (Selvaraju et al., 2017) weighs each channel of the last block's activations by the mean gradient of
the class score with respect to it, sums the channels, keeps the positive part and upsamples the map to the
input's size. The block is ``features`` for DenseNets (the output of ``norm5`` after the final ReLU, which
torchvision applies in place to the block's output) and ``layer4`` for ResNets.

The score explained is the log-odds of the target class (its logit minus the other's), not its raw logit: with
two classes that is what the decision depends on, and the maps of the two classes are then each other's
complement instead of two near-copies of "where the lungs are".

Research software, not a medical device: a heatmap is not a finding.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import numbers
import os
import threading
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cxr.config import CLASS_NAMES
from cxr.errors import CxrError, UsageError
from cxr.fileio import CSV_TEXT, atomic_path, display_name, fit_name, shorten_middle, spreadsheet_cells
from cxr.images import (  # noqa: F401 - overlay and HEATMAP_CMAP re-exported: they lived here
    HEATMAP_CMAP,
    ImageError,
    heat_legend_cmap,
    image_stem,
    load_image,
    overlay,
)

log = logging.getLogger(__name__)

DISCLAIMER = "Research software, not a medical device: predictions and heatmaps are not a diagnosis."


def target_layer(model: nn.Module) -> nn.Module:
    """The module whose output Grad-CAM explains: DenseNet ``features`` (norm5) or ResNet ``layer4``."""
    if hasattr(model, "features") and hasattr(model.features, "norm5"):
        return model.features
    if hasattr(model, "layer4"):
        return model.layer4
    raise ValueError(f"no Grad-CAM layer known for {type(model).__name__} (expected a torchvision DenseNet or ResNet)")


_GRAD_CAM_LOCK = threading.Lock()


def grad_cam(model: nn.Module, x: torch.Tensor,
             target: int | torch.Tensor | Callable[[torch.Tensor], torch.Tensor] | None = None,
             layer: nn.Module | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Grad-CAM heatmaps for a batch of normalised inputs.

    Args:
        model: a two-class classifier; it runs in eval mode, its parameters get no gradients, and it is left in the
            mode it was in (a model in training had been left in eval mode: batch norm's statistics frozen).
        x: (B, 1, H, W) float input, normalised as for the model, on the model's device.
        target: class index to explain (an int, or a (B,) tensor of indices); None explains each image's
            predicted class (argmax of the logits); a callable is given the (B, C) float32 logits of this forward
            pass and returns the (B,) indices (a class chosen at a threshold, with no second pass to know it).
        layer: the block whose activations are weighed (default :func:`target_layer`).

    Returns:
        ``(heatmaps, logits)``: (B, H, W) float32 maps scaled to [0, 1] per image (min-max; all zeros where the
        map is flat, e.g. nothing speaks for the target), and the (B, C) float32 logits of the same forward pass.
    """
    layer = layer if layer is not None else target_layer(model)
    captured: list[torch.Tensor] = []

    def start_the_graph_here(_module, _inputs, out: torch.Tensor) -> torch.Tensor:
        # Gradients are needed from the block's output on, not before: the graph starts at it. With the input and
        # every parameter requiring gradients, autograd had kept the whole network's activations: a peak of 2.6 GB
        # for 16 images at 224 px, 0.9 GB now, the same maps (BENCHMARKS.md, figure 11). "* 1": not a leaf, which
        # DenseNet's in-place ReLU after its features would refuse.
        captured.append(out.detach().requires_grad_(True) * 1)
        return captured[-1]

    # One call at a time: the hook and the parameters' flags are the model's, and two threads' calls on one model
    # had fired each other's hooks, and left every parameter frozen (a later fine-tune trained nothing).
    with _GRAD_CAM_LOCK:
        handle = layer.register_forward_hook(start_the_graph_here)
        wanted = [p.requires_grad for p in model.parameters()]
        modes = [(m, m.training) for m in model.modules()]  # each module's: a fine-tune may keep batch norm in eval
        try:
            model.eval()
            for p in model.parameters():
                p.requires_grad_(False)
            # Works when called under torch.inference_mode() or no_grad() too: this needs a graph.
            with torch.inference_mode(False), torch.enable_grad():
                x = x.detach().clone()  # a normal tensor, not an inference one
                logits = model(x).float()
                activations = captured[-1]
                if target is None:
                    idx = logits.argmax(dim=1)
                elif callable(target):
                    idx = torch.as_tensor(target(logits.detach()), device=logits.device).long()
                else:
                    idx = torch.as_tensor(target, device=logits.device).long().expand(len(logits))
                chosen = logits.gather(1, idx[:, None])[:, 0]
                # Log-odds of the target against the other classes (see the module docstring).
                others = (logits.sum(dim=1) - chosen) / max(logits.shape[1] - 1, 1)
                score = (chosen - others).sum()
                (grads,) = torch.autograd.grad(score, activations)
        finally:
            handle.remove()
            for m, mode in modes:
                m.training = mode
            for p, w in zip(model.parameters(), wanted, strict=True):
                p.requires_grad_(w)
    weights = grads.mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * activations).sum(dim=1, keepdim=True)).detach().float()
    # Min-max per image (as pytorch-grad-cam does): the least weighed region becomes transparent in overlays. Whether
    # the map varies at all is judged on the grid, before upsampling: a 1x1 grid (DenseNet below 61 px) had been
    # upsampled into values 2e-7 apart, and that rounding noise stretched to [0, 1] and shown as evidence.
    high = cam.flatten(1).max(dim=1).values
    varies = (high - cam.flatten(1).min(dim=1).values) > 1e-5 * high
    cam = nn.functional.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    low = cam.flatten(1).min(dim=1).values[:, None, None]
    span = cam.flatten(1).max(dim=1).values[:, None, None] - low
    # A map alike over the whole grid: all ones where it is positive (no place stands out: evidence everywhere, or a
    # grid of one cell), all zeros where nothing raised the score (flat).
    cam = torch.where(varies[:, None, None], (cam - low) / span.clamp_min(1e-30),
                      (high > 0).float()[:, None, None].expand_as(cam))
    return cam.cpu().numpy().astype(np.float32), logits.detach().cpu().numpy().astype(np.float32)


def heatmaps_for_images(model: nn.Module, images: np.ndarray, *, mean: float, std: float,
                        target: int | str | np.ndarray | None = None, batch_size: int = 16,
                        threshold: float | None = None, image_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Grad-CAM maps and P(PNEUMONIA) for uint8 model inputs (N, S, S), in batches.

    Both come from one forward pass, in fp32 (TF32 off on CUDA): the probabilities are those of ``cxr predict
    --amp off`` and ``cxr evaluate`` (on the CPU the same bits, for the same batches), so a caller that predicts in
    fp32 needs no pass of its own to know the label before it explains it.

    Args:
        target: the class to explain: an index or class name for all, one index per image (N,), or None for each
            image's predicted class.
        threshold: with ``target`` None, the predicted class is PNEUMONIA where P(PNEUMONIA) >= threshold (the
            model's decision rule); without it, the larger logit (threshold 0.5, ties to the first class).
        image_size: the model's (``cfg.image_size``): images of another size are refused, as ``Inference.probs``
            refuses them (a 64 px image for a 224 px model had given a map and a probability, 0.987 against 1.000).
            :meth:`cxr.evaluate.Inference.heatmaps` passes it, with the model's mean, std and threshold.

    Returns:
        ``(heatmaps (N, S, S) float32 in [0, 1], probs (N,) float64)``.
    """
    from cxr.evaluate import probabilities
    from cxr.model import check_model_inputs, exact_fp32, normalize

    check_model_inputs(images, batch_size, image_size)
    if isinstance(target, str):
        if target.upper() not in CLASS_NAMES:
            raise UsageError(f"target {target!r}: not a class ({', '.join(CLASS_NAMES)})")
        target = CLASS_NAMES.index(target.upper())
    if target is not None:
        t = np.asarray(target)
        if t.dtype.kind not in "iu" or not set(t.ravel().tolist()) <= set(range(len(CLASS_NAMES))):
            raise UsageError(f"target must be a class index 0 or 1 ({', '.join(CLASS_NAMES)}), one for each image or "
                             f"one for all, or None; got {target!r}")
        if t.ndim == 0:
            target = int(t)
        elif t.shape != (len(images),):
            raise UsageError(f"target: one class for all images or one for each of {len(images)}, got {t.shape}")
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, numbers.Real)
                                  or not 0 <= threshold <= 1):
        raise UsageError(f"threshold must be a number in [0, 1], got {threshold!r}")
    device = next(model.parameters()).device

    def at_threshold(logits: torch.Tensor) -> torch.Tensor:
        # The decision rule of predict and evaluate, on the same float64 probabilities they compare.
        return torch.from_numpy((probabilities(logits.cpu()) >= threshold).astype(np.int64))

    from cxr.evaluate import forward_batch

    maps, probs = [], []
    batch_size = forward_batch(batch_size, device, np.shape(images)[-1])  # as predictions run on the CPU
    for start in range(0, len(images), batch_size):
        x = torch.as_tensor(np.asarray(images[start:start + batch_size]))[:, None].to(device)
        if target is None:
            t = None if threshold is None else at_threshold
        else:
            t = target if np.isscalar(target) else torch.as_tensor(target[start:start + batch_size])
        with exact_fp32(device):
            cam, logits = grad_cam(model, normalize(x, mean, std), t)
        maps.append(cam)
        probs.append(probabilities(torch.from_numpy(logits)))
    if not maps:
        size = images.shape[-1] if np.ndim(images) == 3 else 0
        return np.zeros((0, size, size), np.float32), np.zeros(0)
    return np.concatenate(maps), np.concatenate(probs)


@dataclass
class Explanation:
    """One explained file: where its picture went, and what the model said."""

    path: str
    output: str | None
    prob_pneumonia: float | None
    predicted: str | None
    error: str | None = None  # why the file could not be read; the other fields are then None
    inference_dtype: str | None = None  # of the probability: bfloat16 (as `cxr predict --amp`) or float32


def _unique_name(path: Path, used: set[str]) -> str:
    from cxr.predict import EXPLAIN_SUFFIX

    # Only an image extension comes off: a UID-named DICOM (1.2.826.0.1.3680043.8.498.1234) keeps every part, where
    # Path.stem had cut its last, and a study's files all came out as 1.2.826.0.1.3680043.8.498_<n>_gradcam.png.
    stem = image_stem(path.name)
    name, n = fit_name(stem, EXPLAIN_SUFFIX), 1  # an input's name of 240 bytes, plus the suffix, was too long to write
    # Compared without case and in one Unicode form: on macOS and Windows Scan_gradcam.png and scan_gradcam.png are
    # one file, and on macOS café_gradcam.png in NFC and in NFD too.
    def key(text: str) -> str:
        return unicodedata.normalize("NFC", text).casefold()

    while key(name) in used:
        n += 1
        name = fit_name(stem, f"_{n}{EXPLAIN_SUFFIX}")
    used.add(key(name))
    return name


def grid_cells(model: nn.Module, size: int) -> int:
    """The side of the grid Grad-CAM weighs for ``size`` px inputs (the target layer's output, measured: DenseNet's
    stem rounds up, so ``size // 32`` said 5x5 for 190 px where the grid is 6x6)."""
    shapes: list[torch.Size] = []
    handle = target_layer(model).register_forward_hook(lambda _m, _i, out: shapes.append(out.shape))
    param = next(model.parameters())
    try:
        with torch.no_grad():
            model.eval()(torch.zeros((1, 1, size, size), dtype=param.dtype, device=param.device))
    finally:
        handle.remove()
    return int(shapes[-1][-1])


def _explanation_figure(image: np.ndarray, heat: np.ndarray, *, title: str, path: Path, cells: int,
                        dpi: int = 110) -> None:
    # A bare Figure renders with Agg and touches no global pyplot state (safe in servers and threads).
    from matplotlib import cm, colors
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8.4, 4.6), layout="constrained")
    axes = fig.subplots(1, 2)
    axes[0].imshow(image, cmap="gray", vmin=0, vmax=255)
    # What the model saw, and how coarse its map is: the square input (the X-ray's aspect ratio not kept) and the
    # last block's grid (3x3 at 96 px), smoothed up to the picture; "input" alone invited reading fine localisation.
    side = image.shape[0]
    axes[0].set_title(f"model input: {side}x{side} px\nsquare, aspect ratio not kept", fontsize=9.5)
    axes[1].imshow(overlay(image, heat))
    axes[1].set_title(f"Grad-CAM overlay\n{cells}x{cells} cells, interpolated", fontsize=9.5)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(cm.ScalarMappable(colors.Normalize(0, 1), heat_legend_cmap()), ax=axes[1], shrink=0.8,
                 label="relative importance (Grad-CAM),\nas laid over mid grey")
    fig.suptitle(title, fontsize=11, parse_math=False)  # a "$" in a file name is not TeX
    fig.text(0.5, 0.005, DISCLAIMER, ha="center", va="bottom", fontsize=7.5, color="#555555")
    fig.get_layout_engine().set(rect=(0, 0.035, 1, 0.965))  # room below the pictures: the line was drawn over them
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")


def explain_files(model: str | os.PathLike, paths: list[str | os.PathLike], output_dir: str | os.PathLike, *,
                  device: str = "auto", target: str = "predicted", threshold: float | None = None,
                  batch_size: int = 8, amp: str = "auto") -> list[Path]:
    """Write one Grad-CAM picture (input beside overlay, with the prediction) per readable image file.

    Also writes ``explanations.csv`` (path, prob_pneumonia, predicted, output, error, threshold, model_id,
    inference_dtype, note) in ``output_dir``, one row per file in input order: an unreadable file is logged, and
    listed there with its error.

    Args:
        model: a checkpoint file or a run directory.
        paths: image files, or folders searched recursively.
        output_dir: where ``<stem>_gradcam.png`` files go.
        device: auto | cpu | cuda.
        target: which class the heatmap explains: ``predicted`` (each image's predicted class at the
            model's threshold), ``PNEUMONIA`` or ``NORMAL``.
        threshold: decision threshold (default: the checkpoint's).
        batch_size: images per Grad-CAM pass.
        amp: bf16 autocast for the probabilities, as ``cxr predict --amp``: auto (bf16 where the device is fast at
            it), on, or off (fp32, TF32 off on CUDA: the probabilities of ``cxr evaluate``).

    Returns:
        The written picture paths, in input order, for the files that could be read: an unreadable file has no
        picture, so this list is not parallel to ``paths``. ``explanations.csv`` has one row per file, with its
        probability, label and picture, or its error.
    """
    from cxr.errors import DataError
    from cxr.evaluate import load_for_inference
    from cxr.export import model_id
    from cxr.fileio import check_paths, check_writable
    from cxr.model import load_checkpoint
    from cxr.predict import (
        EXPLAIN_SUFFIX,
        check_inference_args,
        collect_files,
        leans_away,
        path_list,
        prob_text,
        threshold_decimals,
    )
    from cxr.progress import progress_bar
    from cxr.video import drawable

    check_inference_args(threshold=threshold, amp=amp, batch_size=batch_size)
    check_paths(output_dir=output_dir)
    if not isinstance(target, str):
        raise UsageError(f"target {target!r}: use predicted, NORMAL or PNEUMONIA")
    paths = path_list(paths)  # a generator, read once, is kept; None is a UsageError
    out = Path(output_dir)
    if out.suffix.lower() in (".png", ".jpg", ".jpeg", ".csv", ".pdf") and not out.is_dir():
        # `--output x.png` had made a folder named x.png
        raise UsageError(f"--output {out}: a folder for the pictures and explanations.csv, not a file; give a folder "
                         f"name, such as {out.with_suffix('')}")

    # Not the output folder: explaining a folder twice into a folder inside it would read the first run's figures
    # back as X-rays.
    files = collect_files(paths, skip=Path(output_dir))
    if not files:  # as `cxr predict`
        raise UsageError(f"no image files in {', '.join(map(str, paths))}" if paths
                         else "no image files: no paths given")
    check_writable(output_dir, folder=True)  # now, not after the heatmaps
    check_writable(Path(output_dir) / "explanations.csv")
    ckpt = load_checkpoint(model)
    names = [c.upper() for c in ckpt.class_names]
    if target.upper() not in names and target != "predicted":  # before the model is built
        raise UsageError(f"--target {target!r}: use predicted, {' or '.join(ckpt.class_names)}")
    # Probabilities with the numerics of `cxr predict --amp` of the same value, so the two agree (`cxr evaluate`
    # computes in fp32 unless given --amp auto); the heatmaps never use bf16.
    run = load_for_inference(ckpt, device=device, amp=amp, threshold=threshold)
    cfg, net, t = run.cfg, run.net, run.threshold
    out_dir = Path(output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    used: set[str] = set()
    indexed: list[tuple[int, Explanation]] = []  # by position in `files`: a file named twice is two rows in place
    mid = model_id(ckpt)
    cells = grid_cells(net, cfg.image_size)
    shown = contextlib.ExitStack()  # 50 pictures had taken minutes without a word (drawing them, most of it)
    bar = shown.enter_context(progress_bar("explain", len(files), unit="img"))
    try:
        for start in range(0, len(files), batch_size):
            images, good = [], []
            for i, f in enumerate(files[start:start + batch_size], start):
                try:
                    images.append(load_image(f, cfg.image_size, max_pixels=cfg.max_pixels, draft=cfg.draft))
                    good.append((i, f))
                except ImageError as e:
                    log.warning("skipping unreadable image: %s", e)
                    indexed.append((i, Explanation(str(f), None, None, None, error=str(e))))
                    bar.advance()
            if not images:
                continue
            stack = np.stack(images)
            dtype = "bfloat16" if run.bf16 else "float32"
            # The prediction uses the checkpoint's threshold, so the explained class is the one the user is shown.
            fixed = None if target == "predicted" else names.index(target.upper())
            if run.bf16 or run.channels_last:
                # bf16 probabilities as `cxr predict --amp` gives them (or channels_last's kernels, which change the
                # last digits): the maps, in fp32 and the default memory format, take a pass of their own.
                probs = run.probs(stack)
                heats, _ = heatmaps_for_images(net, stack, mean=cfg.mean, std=cfg.std, batch_size=batch_size,
                                               image_size=cfg.image_size,
                                               target=(probs >= t).astype(np.int64) if fixed is None else fixed)
            else:  # fp32: the maps' forward pass gives predict's probabilities too, to the bit (one pass, not two)
                heats, probs = heatmaps_for_images(net, stack, mean=cfg.mean, std=cfg.std, target=fixed, threshold=t,
                                                   image_size=cfg.image_size,
                                                   batch_size=batch_size)
            predicted = (probs >= t).astype(np.int64)
            classes = predicted if fixed is None else np.full(len(stack), fixed)
            for (i, f), im, heat, prob, pred, cls in zip(good, stack, heats, probs, predicted, classes, strict=True):
                out = out_dir / _unique_name(f, used)
                d = threshold_decimals(t, [prob])
                # Three lines: on two, a flat map's note ran past both edges of the picture, and "flat" was cut off.
                # the name in its start and end: a long one had run off both edges, neither end of it to be seen
                title = (f"{shorten_middle(drawable(display_name(f.name)), 80)}\npredicted {ckpt.class_names[pred]}   "
                         f"P(pneumonia) {prob_text(prob, t, d)}{' (bf16)' if run.bf16 else ''}   "
                         f"threshold {t:.{d}f}\n"
                         + (f"heatmap: flat, no region raised the score of {ckpt.class_names[cls]}"
                            + (f"; the output leans {ckpt.class_names[1 - cls]}" if leans_away(prob, cls) else "")
                            if not heat.any() else
                            # P between 0.5 and the threshold: a bright map had read as the reason for a label the
                            # model's own output leans away from; "heatmap of", as the report and the video say.
                            f"heatmap of {ckpt.class_names[cls]}; the output leans {ckpt.class_names[1 - cls]}"
                            if leans_away(prob, cls) else f"heatmap: evidence for {ckpt.class_names[cls]}"))
                _explanation_figure(im, heat, title=title, path=out, cells=cells)
                indexed.append((i, Explanation(str(f), str(out), float(prob), ckpt.class_names[pred],
                                               inference_dtype=dtype)))
                bar.advance()
    except BaseException:
        # Interrupted (Ctrl-C) or failed: the pictures made so far are listed, not left beside no explanations.csv
        # (or beside an earlier run's, which describes other files).
        shown.close()
        if indexed:
            try:
                _write_explanations(out_dir, [e for _, e in sorted(indexed, key=lambda r: r[0])], t, mid)
            except (OSError, CxrError) as e:  # a full disk, say: the error that stopped the run is the one raised
                log.warning("stopped after %d of %d file(s), which could not be listed: %s", len(indexed), len(files),
                            e)
            else:
                log.warning("stopped after %d of %d file(s): %s lists those", len(indexed), len(files),
                            out_dir / "explanations.csv")
        raise
    finally:
        shown.close()
    rows = [e for _, e in sorted(indexed, key=lambda r: r[0])]
    _write_explanations(out_dir, rows, t, mid)
    done = [e for e in rows if e.error is None]
    ours = {Path(e.output).name for e in done}
    stale = sorted(p.name for p in out_dir.glob(f"*{EXPLAIN_SUFFIX}") if p.name not in ours)
    if stale:  # an earlier run's pictures: explanations.csv, replaced, no longer describes them
        log.warning("%s also holds %d picture(s) of an earlier run (e.g. %s), which explanations.csv, now this run's, "
                    "does not list", out_dir, len(stale), stale[0])
    if files and not done:  # as `cxr predict`: nothing explained is no result
        raise DataError(f"none of the {len(rows)} file(s) could be read (each error is in "
                        f"{out_dir / 'explanations.csv'}); the first: {rows[0].error}")
    return [Path(e.output) for e in done]


def _write_explanations(out_dir: Path, rows: list[Explanation], threshold: float, mid: str) -> None:
    """``explanations.csv``: one row per file, in input order."""
    with atomic_path(out_dir / "explanations.csv") as tmp, open(tmp, "w", **CSV_TEXT) as fh:
        w = csv.writer(fh)
        # inference_dtype: a bf16 probability differs in its last digits from `cxr evaluate`'s fp32 one, as in the
        # report beside it (0.134 against 0.137), and nothing had said which this is
        w.writerow(["path", "prob_pneumonia", "predicted", "output", "error", "threshold", "model_id",
                    "inference_dtype", "note"])
        for e in rows:  # probabilities to the last bit, as `cxr predict` writes them
            prob = "" if e.prob_pneumonia is None else repr(e.prob_pneumonia)
            path, error = spreadsheet_cells(e.path, e.error or "")
            # The picture's path is a path too: "./=1+1_gradcam.png" (it had been "'=1+1_gradcam.png", no file)
            output = spreadsheet_cells(e.output)[0] if e.output else ""
            w.writerow([path, prob, e.predicted or "", output, error, repr(float(threshold)), mid,
                        e.inference_dtype or "", DISCLAIMER])
