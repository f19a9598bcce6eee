"""``cxr demo``: a few minutes of training on the bundled sample, then evaluation and prediction (on the CPU unless a
GPU is present)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from cxr.config import load_config
from cxr.errors import UsageError

log = logging.getLogger(__name__)

SAMPLE_DIR = Path(__file__).resolve().parent / "sample" / "kermany-mini"


def _is_demo_run(run_dir: Path) -> bool:
    """Whether ``run_dir`` is a run trained on the bundled sample (by this or another cxr install)."""
    import yaml

    try:
        data = (yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) or {}).get("data", "")
    except (OSError, yaml.YAMLError, AttributeError):
        return False
    return Path(str(data)).parts[-3:] == SAMPLE_DIR.parts[-3:]


# What a demo run writes (README's run directory table). Only these are removed before the next demo: it once deleted
# the whole --output folder, a user's own files in it included.
_RUN_OUTPUTS = frozenset({"config.yaml", "split.csv", "history.csv", "best.pt", "last.pt", "swa.pt", "metrics.json",
                          "summary.json", "report.html", "report"})


def _remove_demo_outputs(out: Path) -> None:
    for f in out.iterdir():
        temporary = f.name.startswith(".") and f.name.endswith(".tmp")  # left by a killed write
        if f.name in _RUN_OUTPUTS or temporary or (f.name.startswith("predictions_") and f.suffix == ".csv"):
            if f.is_dir() and not f.is_symlink():
                shutil.rmtree(f)
            else:
                f.unlink()


def run_demo(output: str = "runs/demo", *, epochs: int = 8, device: str = "auto") -> Path:
    """Train a small DenseNet-121 from scratch on the bundled sample's 300 training images (240 after the validation
    carve; 128 px), evaluate it, predict its test folder,
    and write its report (plots, heatmap grid, fly-through video, report.html).

    A previous demo run in ``output`` is replaced. The model is far too small-data to be useful: the point is
    to show every stage and artifact in minutes.
    """
    from cxr.predict import predict_files
    from cxr.report import make_report
    from cxr.train import train

    out = Path(output)
    if (out / "last.pt").exists() or (out / "split.csv").exists():
        if not _is_demo_run(out):  # `cxr demo --output` a real run's folder must not delete it
            raise UsageError(f"{out} holds a training run that is not a demo run; pick another --output")
        from cxr.train import folder_in_use

        if folder_in_use(out):  # its files had been deleted under a run still training there, before the refusal
            raise UsageError(f"{out} is in use by another cxr train; wait for it to end, or pick another --output")
        _remove_demo_outputs(out)
    cfg = load_config(overrides={"data": str(SAMPLE_DIR), "output": str(out), "epochs": epochs, "image_size": 128,
                                 "batch_size": 16, "lr": 1e-3, "weights": "none", "val_fraction": 0.2,
                                 "patience": 0, "device": device, "warmup_epochs": 0.5})
    run_dir = train(cfg)
    preds = predict_files(run_dir, [SAMPLE_DIR / "test"], device=device)
    right = sum((p.label == Path(p.path).parent.name) for p in preds if p.label)
    log.info("demo: predicted the %d held-out sample images, %d right; artifacts in %s", len(preds), right, run_dir)
    log.info("report: %s (open it in a browser)", make_report(run_dir, device=device))
    # Not inside run_dir: the next `cxr demo` starts by deleting it.
    log.info("next: cxr evaluate --model %s --data %s --output %s-eval", run_dir, SAMPLE_DIR / "test", run_dir)
    return run_dir
