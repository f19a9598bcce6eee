"""The ``cxr`` command: parses flags and calls library functions; nothing here that a script could not do itself."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import glob
import json
import logging
import os
import re
import sys
from pathlib import Path

from cxr import __version__
from cxr.config import MAX_PER_GROUP, MAX_UPLOAD_MB, MAX_VIDEO_IMAGES, Config
from cxr.errors import ConfigError, CxrError, DataError, FolderInUse, UsageError, WriteError

log = logging.getLogger("cxr")


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line on stderr (``cxr train: error: ...``), exit status 2. No abbreviated flags: ``cxr
    train --threshold 0.5`` had been taken for ``--threshold-policy`` and refused as a policy the user never named."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        if self.prog == "cxr train" and re.search(r"unrecognized arguments:.*--threshold\b(?!-)", message):
            message += ("; train chooses the threshold on validation (--threshold-policy says how): give --threshold "
                        "to evaluate, predict, explain or serve")
        # A file whose name begins with "-" is read as a flag: "the following arguments are required: PATH" had been
        # said of a command that named one.
        given = _ARGV[:_ARGV.index("--")] if "--" in _ARGV else _ARGV  # after --, names are names already
        dashed = [a for a in given if a.startswith("-") and a != "-" and os.path.exists(a)]
        value = re.match(r"argument (--[\w-]+): expected one argument", message)
        # the flag's own value only where the name follows it (`-x.jpeg --threshold` lacks a value, not a file name)
        value = value if value and any(given[i - 1] == value.group(1) for i, a in enumerate(given)
                                       if i and a in dashed) else None
        if dashed and value:  # the value of a flag: -- cannot help there
            message += (f"; {dashed[0]} is a file whose name begins with '-': write {value.group(1)}={dashed[0]} or "
                        f"{value.group(1)} ./{dashed[0]}")
        elif dashed and ("required" in message or "unrecognized arguments" in message):
            message += (f"; {dashed[0]} is a file whose name begins with '-': write it ./{dashed[0]}, or put -- "
                        "before it")
        # Under torchrun every process parses the same flags: rank 0 alone says what is wrong.
        # display_name: file names among unrecognized arguments had reached the terminal with their escape sequences
        from cxr.fileio import display_name

        self.exit(2, f"{self.prog}: error: {display_name(message)} (see {self.prog} --help)\n" if _first_rank()
                  else None)


def _batch_help(default: int) -> str:
    return (f"images per forward pass (default {default}; with the torch backend on the CPU at most 8 at 224 px, "
            "which is faster there)")


_ARGV: list[str] = []  # the arguments being parsed, for the parser's errors to look at


def _first_rank() -> bool:
    """Not one of several torchrun processes other than the first (whose words every process would repeat)."""
    try:
        several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        several = False
    return not several or os.environ.get("RANK", "0").strip() in ("0", "")


class _SameOnEveryRank(ConfigError):
    """Wrong usage that every torchrun process finds alike (its command, its flags), as a ConfigError: said by the
    first alone. Other errors, such as a path one node lacks, are each process's own to say."""


def _probability(text: str) -> float:
    """A threshold on P(PNEUMONIA): a number from 0 to 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value <= 1.0:  # also refuses nan and inf
        percent = f" ({value / 100:g}?)" if 1 < value <= 100 else ""  # 57 meant as 57 %
        raise argparse.ArgumentTypeError(f"{text} is not a probability from 0 to 1{percent}")
    return value


def _count(minimum: int, maximum: int | None = None):
    """An integer of at least ``minimum`` (and at most ``maximum``: 100,000 threads crashed the process, a grid of
    100,000 columns ran for good)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{text} is below {minimum}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"{text} is above {maximum:,}")
        return value
    parse.__name__ = "count"  # argparse names the type in its messages
    return parse


def _port(text: str) -> int:
    """A TCP port, 0 to 65535 (0: any free one)."""
    value = _count(0)(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"{text} is not a TCP port (0 to 65535)")
    return value


def _positive(text: str, maximum: float = float("inf")) -> float:
    """A finite number above 0 (and at most ``maximum``)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text} is not a number above 0")
    if value > maximum:
        raise argparse.ArgumentTypeError(f"{text} is above {maximum:g}")
    return value


def _positive_upto(maximum: float):
    def parse(text: str) -> float:
        return _positive(text, maximum)
    parse.__name__ = "number"
    return parse


MAX_THREADS = 1024  # more than any machine's cores; 100,000 crashed predict (segmentation fault)
TABLE_MAX = 200  # predict prints a table of its results up to this many, unless told (--table / --no-table)


_DEVICE_HELP = "auto (default: CUDA where there is one, else the CPU), cpu, cuda or cuda:N"
_THRESHOLD_HELP = "decision threshold on P(PNEUMONIA) (default: the model's, chosen on its validation split)"
_CACHE_DIR_HELP = "where decoded images are cached (default $CXR_CACHE_DIR, else $XDG_CACHE_HOME/cxr or ~/.cache/cxr)"
_INFERENCE_AMP_HELP = ("bf16 autocast (torch backend; default auto: bf16 where the device is fast at it; off: fp32, "
                       "the probabilities `cxr evaluate` gives by default)")


_D = Config()  # the defaults each train flag's help names: taken from the config, so that they stay true


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", help="dataset root (train/val/test with NORMAL/PNEUMONIA), a MedMNIST-style .npz, or a "
                   "CSV listing images (columns path, label; split, patient if wished)")
    p.add_argument("--output", help="run directory (default runs/cxr)")
    p.add_argument("--config", help="YAML file of config fields; flags override it")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last checkpoint, or "
                   "extend one (of the run's settings only --epochs, --device, --swa-epochs, --swa-lr, "
                   "--num-workers and --cache-dir may change; --no-report applies as usual)")
    p.add_argument("--epochs", type=int, help=f"epochs of the learning-rate schedule (default {_D.epochs})")
    p.add_argument("--batch-size", type=int, help="images per optimiser step, over all processes under torchrun "
                   f"(the global batch; default {_D.batch_size})")
    p.add_argument("--image-size", type=int, help=f"square side in pixels (default {_D.image_size})")
    p.add_argument("--lr", type=float, help=f"peak learning rate (Adam; default {_D.lr:g})")
    p.add_argument("--weights", help="imagenet | none | PATH to a local state dict | a cxr model to fine-tune: "
                   "default (the bundled one), RUN_DIR, CKPT or .safetensors (default none)")
    p.add_argument("--arch", help="densenet121 (default), densenet169, resnet18, ...")
    p.add_argument("--seed", type=int, help=f"for the weights, the batches and the augmentation (default {_D.seed})")
    p.add_argument("--device", help="auto | cpu | cuda (default auto)")
    p.add_argument("--val-source", choices=["carve", "folder"],
                   help="carve a patient-disjoint val split from train and the dataset's own val split pooled "
                        "(default), or use the dataset's own val split as it is (a val/ folder, val_images in an "
                        ".npz, rows of split val in a CSV listing)")
    p.add_argument("--val-fraction", type=float,
                   help=f"share of the pooled train and val patients carved out for validation (default "
                        f"{_D.val_fraction:g})")
    p.add_argument("--patient-pattern", help="regular expression searched in each image's path below its class folder; "
                   "its first group is the patient id, e.g. '^([^/]+)/' for one folder per patient")
    p.add_argument("--cache-dir", help=_CACHE_DIR_HELP)
    p.add_argument("--scheduler", choices=["cosine", "plateau", "none"],
                   help="learning-rate schedule: cosine (default; a linear warm-up of warmup_epochs, then cosine decay "
                   "to 0), plateau (the rate times plateau_factor, 0.1, once more than plateau_patience epochs "
                   "in a row bring no better validation loss; no warm-up) or none (--lr throughout)")
    p.add_argument("--patience", type=int, help=f"early-stopping patience in epochs (default {_D.patience}; 0: off)")
    p.add_argument("--swa-epochs", type=int, help="epochs of stochastic weight averaging after the schedule (default "
                   "0: off); the average is kept when its validation loss is the lowest")
    p.add_argument("--swa-lr", type=float,
                   help=f"constant learning rate of the weight-averaging epochs (default {_D.swa_lr:g})")
    p.add_argument("--threshold-policy", choices=["youden", "sensitivity"],
                   help="how the decision threshold is chosen on validation: Youden's J (default), or the "
                        "highest that keeps --target-sensitivity")
    p.add_argument("--target-sensitivity", type=float,
                   help=f"with --threshold-policy sensitivity (default {_D.target_sensitivity:g})")
    p.add_argument("--amp", choices=["auto", "on", "off"],
                   help=f"bf16 autocast (default {_D.amp}: on where it is fast)")
    p.add_argument("--channels-last", choices=["auto", "on", "off"],
                   help="channels-last memory layout (default auto: on CUDA, and on the CPU with bf16)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (default: off)")
    p.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=None,
                   help="bit-repeatable runs on the CPU (slower; default: off)")
    p.add_argument("--num-workers", help="DataLoader worker processes per process: auto (default: 0 on the CPU, up "
                   "to 8 on CUDA) or a number")
    p.add_argument("--max-train-batches", type=int,
                   help=f"cap on training batches per epoch (default {_D.max_train_batches}: none)")
    p.add_argument("--report", action=argparse.BooleanOptionalAction, default=True,
                   help="write report.html (plots, heatmap grid, video) at the end (default: on)")


_FLAG_FIELDS = ("data", "output", "epochs", "batch_size", "image_size", "lr", "weights", "arch", "seed", "device",
                "val_source", "val_fraction", "patient_pattern", "cache_dir", "scheduler", "patience",
                "threshold_policy", "target_sensitivity", "amp", "channels_last", "compile", "deterministic",
                "num_workers", "max_train_batches", "swa_epochs", "swa_lr")


def build_parser() -> argparse.ArgumentParser:
    """The ``cxr`` argument parser with its sub-commands."""
    parser = _Parser(prog="cxr", description="Chest X-ray classification (NORMAL vs PNEUMONIA): train, evaluate, "
                     "predict, merge, explain, report, serve, export, demo. Research software, not a medical device.")
    parser.add_argument("--version", action="version", version=f"cxr {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("train", help="train a model; evaluates its best checkpoint at the end")
    _add_train_flags(p)

    p = sub.add_parser("evaluate", help="metrics and predictions of a model on a dataset")
    p.add_argument("--model", default="default", help="checkpoint, run directory, or default (the bundled model)")
    p.add_argument("--data", required=True,
                   help="dataset root, a split folder with class folders, an .npz, a CSV listing images, or a run's "
                   "split.csv")
    p.add_argument("--output", required=True, help="folder for metrics.json and predictions_<split>.csv")
    p.add_argument("--threshold", type=_probability,
                   help="decision threshold (default: the model's, chosen on validation)")
    p.add_argument("--device", default="auto", help=_DEVICE_HELP)
    p.add_argument("--cache-dir", help=_CACHE_DIR_HELP)
    p.add_argument("--batch-size", type=_count(1), default=64, help=_batch_help(64))
    p.add_argument("--amp", choices=["auto", "on", "off"], default="off",
                   help="bf16 autocast for the predictions (default off: fp32, so that bf16 does not move the "
                   "metrics on machines that have it; auto: bf16 where it is fast, as in training)")
    p.add_argument("--patient-pattern", metavar="REGEX",
                   help="regular expression whose first group in an image's path below its class folder is its "
                   "patient (default: the one the model was trained with; '' for none): for the intervals and the "
                   "count of test images of training patients")
    p.add_argument("--report", action=argparse.BooleanOptionalAction, default=True,
                   help="write OUT/report.html (plots, heatmap grid, video) (default: on)")

    p = sub.add_parser("predict", help="P(PNEUMONIA) for image files or folders")
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="image files, folders (searched recursively), or a .csv worklist (its path column's files)")
    p.add_argument("--model", default="default",
                   help="checkpoint, run directory, default (the bundled model), or an .onnx file from cxr export")
    p.add_argument("--output", help="also write the results to a .csv or .json file")
    p.add_argument("--threshold", type=_probability, help=_THRESHOLD_HELP)
    p.add_argument("--backend", choices=["torch", "onnx"],
                   help="PyTorch, or ONNX Runtime on the CPU (a checkpoint is exported once and kept in the cache) "
                        "(default: onnx for an .onnx model, else torch)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (torch backend)")
    p.add_argument("--amp", choices=["auto", "on", "off"], default="auto", help=_INFERENCE_AMP_HELP)
    p.add_argument("--batch-size", type=_count(1), default=32, help=_batch_help(32))
    p.add_argument("--threads", type=_count(0, MAX_THREADS), default=0, help="CPU threads (0: the library's default)")
    p.add_argument("--shard", metavar="I/N",
                   help="predict only the I-th of N contiguous blocks of the files (0-based; for job arrays); "
                        "with --output, writes OUTPUT's shard file. Under torchrun the rank picks the shard.")
    p.add_argument("--table", action=argparse.BooleanOptionalAction, default=None,
                   help=f"print a table of every result (default: when there are at most {TABLE_MAX}; more, without "
                        "--output, are refused before the work, as they would be shown nowhere)")

    p = sub.add_parser("merge", help="merge the shard files of `cxr predict --shard` into one predictions file")
    p.add_argument("output", metavar="OUTPUT", nargs="+",
                   help="the --output given to the sharded runs (.csv or .json); shard files name it too")
    p.add_argument("--remove-parts", action="store_true", help="delete the shard files after merging")

    p = sub.add_parser("report", help="plots, heatmap grid, fly-through video and report.html for a run")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a training run directory or a cxr evaluate output folder")
    p.add_argument("--output", help="where report.html and report/ go (default RUN_DIR)")
    p.add_argument("--model", help="checkpoint for the heatmaps (default RUN_DIR's best.pt, or the model that "
                   "`cxr evaluate` recorded in metrics.json)")
    p.add_argument("--no-video", dest="video", action="store_false", help="skip the fly-through video")
    p.add_argument("--no-heatmaps", dest="heatmaps", action="store_false", help="skip Grad-CAM overlays")
    p.add_argument("--split", help="whose images the grid and the video show (default test, else val)")
    p.add_argument("--per-group", type=_count(1, MAX_PER_GROUP), default=4,
                   help="grid images per group (confident right, confident wrong, borderline; default 4, at most 50)")
    p.add_argument("--video-select", choices=["sample", "errors", "all"], default="sample",
                   help="which images the video shows: a random sample, whose running tally estimates the accuracy "
                        "(default); the errors; or all")
    p.add_argument("--video-max-images", type=_count(1, MAX_VIDEO_IMAGES), default=None,
                   help=f"images in the video at most (default 60; with --video-select all, {MAX_VIDEO_IMAGES:,})")
    p.add_argument("--seconds-per-image", type=_positive_upto(60), default=1.0,
                   help="how long the video shows each image (default 1, at most 60)")
    p.add_argument("--frame-size", default="640x360", metavar="WxH",
                   help="video frame size, landscape, from 320x180 to 3840x2160 (default 640x360; odd sizes are "
                   "rounded down to even)")
    p.add_argument("--fps", type=_positive_upto(60), default=5.0,
                   help="video frames per second (default 5, at most 60)")
    p.add_argument("--device", default="auto", help=_DEVICE_HELP)
    p.add_argument("--seed", type=_count(0), default=0, help="for the video's random sample (default 0)")

    p = sub.add_parser("explain", help="Grad-CAM heatmap overlays for image files")
    p.add_argument("paths", nargs="+", metavar="IMAGE",
                   help="image files, folders (searched recursively), or a .csv worklist (its path column's files)")
    p.add_argument("--model", default="default", help="checkpoint, run directory, or default (the bundled model)")
    p.add_argument("--output", required=True, help="folder for <name>_gradcam.png and explanations.csv")
    p.add_argument("--target", default="predicted",
                   help="the class whose evidence is shown: predicted (default), PNEUMONIA or NORMAL")
    p.add_argument("--threshold", type=_probability, help=_THRESHOLD_HELP)
    p.add_argument("--device", default="auto", help=_DEVICE_HELP)
    p.add_argument("--batch-size", type=_count(1), default=8, help=_batch_help(8))
    p.add_argument("--amp", choices=["auto", "on", "off"], default="auto",
                   help="bf16 autocast for the probabilities shown (default auto: bf16 where the device is fast at "
                   "it; off: fp32, the probabilities `cxr evaluate` gives by default); the heatmaps never use bf16")

    p = sub.add_parser("serve", help="web service (API and page) for a model")
    p.add_argument("--model", default="default",
                   help="checkpoint, run directory, default (the bundled model), or an .onnx file")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1, this machine only; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=_port, default=8000, help="TCP port (default 8000; 0: any free one)")
    p.add_argument("--backend", choices=["torch", "onnx"], help="default: onnx for an .onnx model, else torch")
    p.add_argument("--device", default="auto", help=_DEVICE_HELP)
    p.add_argument("--amp", choices=["auto", "on", "off"], default="auto", help=_INFERENCE_AMP_HELP)
    p.add_argument("--max-upload-mb", type=_positive_upto(MAX_UPLOAD_MB), default=20.0,
                   help="larger uploads get 413 (default 20, at most 1000)")
    p.add_argument("--max-concurrency", type=_count(1), default=2, help="predictions run at once (default 2)")
    p.add_argument("--max-queue", type=_count(0), default=32, help="requests waiting beyond that get 503 (default 32)")
    p.add_argument("--threads", type=_count(1, MAX_THREADS),
                   help="CPU threads per prediction (default: cores / max-concurrency, at most OMP_NUM_THREADS "
                        "where it is set)")
    p.add_argument("--max-connections", type=_count(1), default=128,
                   help="requests in progress at once, uploads still arriving included; 503 beyond (default 128)")
    p.add_argument("--max-pixels", type=_count(1),
                   help="larger images are refused before decoding (default: the model config's, 100 million)")
    p.add_argument("--upload-timeout", type=_positive, default=30.0,
                   help="seconds an upload may send nothing before it gets 408 and its connection is closed, and "
                        "a request's headers may take, so stalled connections cannot hold them all (default 30)")
    p.add_argument("--allowed-hosts", type=lambda v: [h.strip() for h in v.split(",") if h.strip()],
                   help="comma-separated host names requests may be addressed to (the Host header), e.g. the name a "
                        "proxy forwards, besides localhost, 127.0.0.1 and ::1; * for any (default: those three on "
                        "the loopback address, against DNS rebinding; any elsewhere)")
    p.add_argument("--cors-origins", type=lambda v: [h.strip() for h in v.split(",") if h.strip()],
                   metavar="ORIGINS",
                   help="comma-separated origins whose web pages may call the API from a browser (CORS), e.g. "
                        "https://viewer.hospital.example; * for any (default: none, only the service's own page)")
    p.add_argument("--root-path", default="", metavar="PATH",
                   help="the path a reverse proxy serves the service under, e.g. /cxr (for the API docs and "
                        "redirects; the proxy strips it before passing requests on)")
    p.add_argument("--access-log", action="store_true",
                   help="log a line for every request: client, method, path, status (default: a line for each "
                        "prediction only)")

    p = sub.add_parser("export", help="write a model as ONNX or TorchScript with its preprocessing contract")
    p.add_argument("--model", default="default", help="checkpoint, run directory, or default (the bundled model)")
    p.add_argument("--format", choices=["onnx", "torchscript"], default="onnx", help="default onnx")
    p.add_argument("--output", required=True, help="the file to write, e.g. model.onnx")

    p = sub.add_parser("demo", help="train briefly on the bundled sample, then evaluate and predict (CPU, minutes)")
    p.add_argument("--output", default="runs/demo", help="run directory (default runs/demo)")
    p.add_argument("--epochs", type=_count(1), default=8, help="default 8")
    p.add_argument("--device", default="auto", help=_DEVICE_HELP)
    parser.commands = sub  # main() names a subcommand's unknown flags through its own parser
    return parser


def _cmd_train(args: argparse.Namespace) -> None:
    from cxr.config import load_config
    from cxr.train import train

    overrides = {f: getattr(args, f) for f in _FLAG_FIELDS}
    if args.resume:
        if args.config:
            raise _SameOnEveryRank("--resume uses the run's own config.yaml; drop --config")
        if args.swa_lr is not None:
            # As for a fresh run: --swa-lr without averaging had been saved into config.yaml unused, and a later
            # `--resume --swa-epochs K` then averaged at it instead of the default (--swa-epochs 0 given too).
            averaging = args.swa_epochs
            if averaging is None:
                try:
                    averaging = load_config(Path(args.resume) / "config.yaml").swa_epochs
                except CxrError:
                    averaging = None  # the resume itself says what is wrong with the folder
            if averaging == 0:
                raise _SameOnEveryRank("--swa-lr applies only with --swa-epochs N (this run averages no weights)")
        run_dir = train(resume=args.resume, overrides=overrides)
    else:
        cfg = load_config(args.config, overrides)
        _refuse_flags_without_effect(args, cfg)
        run_dir = train(cfg)
    if args.report:
        _report_after(run_dir, device=args.device or "auto")
    else:
        _no_report(run_dir)


def _refuse_flags_without_effect(args: argparse.Namespace, cfg) -> None:
    """A flag given for a setting the run does not use (it was ignored without a word)."""
    for flag, given, unused, needs in (
            ("--target-sensitivity", args.target_sensitivity, cfg.threshold_policy != "sensitivity",
             "--threshold-policy sensitivity"),
            ("--swa-lr", args.swa_lr, cfg.swa_epochs == 0, "--swa-epochs N"),
            ("--val-fraction", args.val_fraction, cfg.val_source != "carve", "--val-source carve")):
        if given is not None and unused:
            raise _SameOnEveryRank(f"{flag} applies only with {needs}")


def output_lock(folder):
    """:func:`cxr.fileio.output_lock` of an evaluation's or report's folder, against another cxr evaluate or report
    into it at once."""
    from cxr.fileio import output_lock as lock

    return lock(folder, "cxr evaluate or cxr report")


def _report_after(folder, **kwargs) -> None:
    """The report at the end of train / evaluate: a failure there is logged, and loses none of the results."""
    from cxr.distributed import env_info
    from cxr.report import make_report

    if not env_info().main:
        return
    try:
        with output_lock(folder):  # a `cxr report` of the folder meanwhile had mixed its pictures with this one's
            make_report(folder, **kwargs)
    except FolderInUse:  # a `cxr report` watching the run: not a failure of the run (it had exited 2), nor its report
        log.warning("no report made: another cxr report is writing into %s now; when it ends, cxr report %s makes "
                    "one of these results", folder, folder)
    except Exception as e:  # a fault of the report's own (a bug, too) must not turn a finished run into a failure
        cause = str(e) if isinstance(e, CxrError) else f"{type(e).__name__}: {e}"
        log.debug("the report failed", exc_info=True)
        _no_report(folder, failed=True)
        log.warning("the report could not be made (%s); the results are in %s. Retry: cxr report %s", cause, folder,
                    folder)  # make_report logs where it wrote the report


def _no_report(folder, failed: bool = False) -> None:
    """No report this time: an earlier one in ``folder`` would describe results that are no longer there, and a
    failed one's pictures are no report."""
    from cxr.distributed import env_info
    from cxr.report import remove_report

    if not env_info().main:
        return
    try:
        with output_lock(folder):
            removed = remove_report(folder)
    except FolderInUse:  # its own report, which describes these results or earlier ones: said, and left to it
        log.warning("another cxr report is writing into %s now: a report there may describe earlier results; cxr "
                    "report %s makes one of these", folder, folder)
        return
    if removed:
        if failed:  # "the earlier report" had been said of the pictures the failed one had just made
            log.info("removed the report files in %s (those the failed report made, and any earlier report's)", folder)
        else:
            log.info("removed the earlier report in %s, which described earlier results (cxr report %s makes one)",
                     folder, folder)


def _cmd_evaluate(args: argparse.Namespace) -> None:
    from cxr.evaluate import evaluate_model
    from cxr.fileio import check_writable

    check_writable(args.output, folder=True)  # said as such, before the lock makes the folder
    with output_lock(args.output):  # the evaluation and its report (or the earlier report's removal) as one
        metrics = evaluate_model(args.model, args.data, args.output, threshold=args.threshold, device=args.device,
                                 cache_dir=args.cache_dir, batch_size=args.batch_size, amp=args.amp,
                                 patient_pattern=args.patient_pattern)
        _print_metrics(metrics)
        log.info("wrote %s", Path(args.output) / "metrics.json")
        if args.report:
            _report_after(args.output, model=args.model, device=args.device)
        else:
            _no_report(args.output)


def _shown(text: str) -> str:
    """A file name or message for a rich table: brackets are text, not markup; undecodable bytes as escapes."""
    from rich.markup import escape

    from cxr.fileio import display_name

    return escape(display_name(text))


def _print_metrics(metrics: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    from cxr.predict import DISCLAIMER, score_text, threshold_text

    first = next(iter(metrics.values()), None)
    threshold = "-" if first is None else first.get("threshold_shown") or threshold_text(first["threshold"])
    table = Table(title=f"metrics at threshold {threshold}", caption=DISCLAIMER)
    cols = ("n", "accuracy", "recall", "specificity", "precision", "f1", "auroc", "auprc")
    table.add_column("split")
    for c in cols:
        table.add_column("sensitivity" if c == "recall" else c, justify="right")
    for name, m in metrics.items():
        table.add_row(_shown(name), *[("-" if m[c] is None else score_text(m[c]) if isinstance(m[c], float)
                                       else str(m[c])) for c in cols])
    Console(width=max(Console().width, 110)).print(table)  # no truncated headers in a pipe


def _cmd_predict(args: argparse.Namespace) -> None:
    from cxr.distributed import barrier, env_info, init, rank_device, shutdown
    from cxr.fileio import check_free_space, check_not_an_input, check_writable
    from cxr.images import warn_of_views
    from cxr.predict import (
        DISCLAIMER,
        Interrupted,
        collect_files,
        merge_shards,
        parse_shard,
        predict_files,
        predictions_file_size,
        select_shard,
        shard_path,
        write_predictions_file,
        write_shard_manifest,
    )

    if args.output and Path(args.output).suffix.lower() not in (".csv", ".json"):
        raise UsageError(f"--output {args.output}: use a .csv or .json file name")
    info = env_info()
    if info.active and args.shard:
        raise _SameOnEveryRank("--shard and torchrun: under torchrun each rank predicts its own shard; drop --shard")
    if info.active and not args.output:
        raise _SameOnEveryRank("under torchrun, give --output: each rank writes its shard and rank 0 merges them")
    shard = (info.rank, info.world) if info.active else parse_shard(args.shard) if args.shard else None
    if info.active:
        import torch

        init(torch.device("cpu"))  # gloo: only a barrier is needed, whatever device predicts
    try:
        # Listed once: a shard's manifest records the whole list it was cut from, and only the shard's own files are
        # handed on (not the whole list, to be looked at again by every shard).
        files = collect_files(args.paths)
        if not files:
            raise UsageError(f"no image files in {', '.join(map(str, args.paths))}")
        mine = select_shard(files, shard)
        # a study's lateral beside its PA view, scored as if it were one: said, and marked on its row
        views = dict(warn_of_views(mine, "cxr predict"))
        if args.output:
            out = shard_path(args.output, shard) if shard else Path(args.output)
            check_writable(out)  # now, not after the work
            # a worklist CSV given too, through a link or not (a link to it had been overwritten)
            check_not_an_input(args.output, [*args.paths, *map(os.path.realpath, args.paths), *files])
            # and room for the results: one byte had been the check, and a nearly full disk lost a whole job at its
            # end (a shard's own; a merge that does not fit loses nothing, its shards stay)
            check_free_space(out, predictions_file_size(out, mine))
        if not args.output and args.table is None and len(mine) > TABLE_MAX:
            # The work had been done, then shown nowhere (a table of more than 200 is not printed), exit 0.
            raise UsageError(f"{len(mine)} files and no --output: more than {TABLE_MAX} results are not printed, so "
                             "they would be shown nowhere; give --output preds.csv (or --table to print them)")
        try:
            if _backend(args) == "onnx":
                from cxr.onnx_backend import predict_files_onnx  # no torch for an .onnx file

                if args.device not in ("auto", "cpu"):  # as `cxr serve`: not ignored in silence
                    raise UsageError("--backend onnx runs on the CPU; drop --device or use --device cpu")
                if args.amp == "on":
                    raise UsageError("--backend onnx computes in fp32; drop --amp on")
                preds = predict_files_onnx(args.model, mine, threshold=args.threshold, batch_size=args.batch_size,
                                           threads=args.threads, listed=True)
            else:
                if args.threads:
                    import torch

                    torch.set_num_threads(args.threads)
                preds = predict_files(args.model, mine, device=rank_device(args.device), threshold=args.threshold,
                                      batch_size=args.batch_size, amp=args.amp, listed=True)
        except Interrupted as e:
            _keep_partial(e, shard_path(args.output, shard) if args.output and shard else args.output)
            raise
        if views:
            preds = [dataclasses.replace(p, input_note=views[str(p.path)]) if str(p.path) in views else p
                     for p in preds]
        show = args.table if args.table is not None else len(preds) <= TABLE_MAX
        if show and not info.active:
            _print_predictions(preds, DISCLAIMER)
        bad = sum(p.error is not None for p in preds)
        nothing = bad == len(preds) and not shard  # see _refuse_if_nothing_predicted
        n_pos = sum(p.label == "PNEUMONIA" for p in preds)
        where = f"shard {shard[0]}/{shard[1]}: " if shard else ""
        if not nothing:
            log.info("%s%d file(s): %d PNEUMONIA, %d NORMAL, %d unreadable. %s", where, len(preds), n_pos,
                     len(preds) - n_pos - bad, bad, DISCLAIMER)
        if bad and not nothing:
            log.warning("%d of %d file(s) could not be read", bad, len(preds))
        if args.output:
            out = shard_path(args.output, shard) if shard else Path(args.output)
            write_predictions_file(out, preds)
            _drop_partial_done(out, preds, nothing)
            if shard:
                write_shard_manifest(out, files)
            if not nothing:
                log.info("wrote %s", out)
            if info.active:
                barrier()
                if info.main:
                    merged = merge_shards(args.output, remove=True, count=info.world)
                    log.info("merged %d shards into %s (%d files)", info.world, args.output, len(merged))
                    _refuse_if_nothing_predicted(merged, args.output)
            elif shard:
                log.info("when every shard is done: cxr merge %s", args.output)
        if nothing:
            _refuse_if_nothing_predicted(preds, args.output)
    except BaseException:
        shutdown(failed=True)  # not at a barrier the other ranks never reach: torchrun ends them when this one exits
        raise
    shutdown()


def _refuse_if_nothing_predicted(preds: list, output: str | None) -> None:
    """Every file unreadable: one line and exit 2, so that a script does not take it for a result (the errors are
    in ``output``, when given). A shard alone is not judged: it may hold no file, or only bad ones; the merge is."""
    if preds and all(p.error is not None for p in preds):
        listed = f" (each error is in {output})" if output else ""
        raise DataError(f"none of the {len(preds)} file(s) could be read{listed}; the first: {preds[0].error}")


def _print_predictions(preds, caption: str) -> None:
    from rich.console import Console
    from rich.table import Table

    from cxr.predict import prob_text, threshold_decimals

    # Paths below the folder they share, named once in the title, and wrapped rather than cut: cut to the width of a
    # terminal, files in one folder all looked like "/data/chest_xray/test/NO…".
    try:
        common = os.path.commonpath([os.path.dirname(str(p.path)) for p in preds]) if preds else ""
    except ValueError:  # absolute and relative paths, or several Windows drives
        common = ""
    # The threshold is shown, with the decimals that tell the probabilities beside it apart: at three, P 0.114 had
    # read PNEUMONIA on one row and NORMAL on the next (0.1143936 and 0.1143933 about a threshold of 0.11439343).
    thresholds = {p.threshold for p in preds if p.threshold is not None}
    t = thresholds.pop() if len(thresholds) == 1 else None
    decimals = threshold_decimals(t, [p.prob_pneumonia for p in preds if p.prob_pneumonia is not None]) \
        if t is not None else 3
    if t is not None:
        caption = f"threshold {t:.{decimals}f} (PNEUMONIA at or above it). {caption}"
    table = Table(caption=caption, title=f"under {_shown(common)}{os.sep}" if common else None)
    table.add_column("path", overflow="fold")
    table.add_column("P(pneumonia)", justify="right")
    table.add_column("label")
    for p in preds:
        path = _shown(os.path.relpath(p.path, common) if common else str(p.path))
        if p.error:  # why, below the table: in its cell, the longest error had padded every line of a pipe to its width
            table.add_row(path, "-", "[red]unreadable (below)[/red]")
        else:
            table.add_row(path, prob_text(p.prob_pneumonia, t, decimals) if t is not None else
                          prob_text(p.prob_pneumonia), p.label)
    # Into a file or a pipe, a row per line: at rich's 80 columns there, paths were folded mid-name, and grep found
    # none of them. In a terminal, its width.
    console = Console()
    console = console if console.is_terminal else Console(width=100_000)
    console.print(table)
    errors = [p.error for p in preds if p.error]
    if errors:
        console.print(f"unreadable ({len(errors)}):", style="red")
        for error in errors:
            console.print(f"  {_shown(error)}", soft_wrap=True, markup=False, highlight=False)


def _cmd_merge(args: argparse.Namespace) -> None:
    from cxr.predict import merge_shards

    if sys.platform == "win32":  # cmd and PowerShell hand `preds.shard-*` over as it is: expanded here, as predict does
        args.output = [m for p in args.output for m in (sorted(glob.glob(p)) if any(c in p for c in "*?[") else [p])
                       or [p]]
    # The shard files themselves (a shell's glob of preds.shard-*, or one of them) name the output they were made for
    # (a glob's manifests too: preds.shard-00000-of-00002.csv.manifest.json is preds.csv's)
    outputs = {os.path.normpath(re.sub(r"\.shard-\d{5}-of-\d{5}(\.[^./\\]+)(\.manifest\.json)?$", r"\1", name))
               for name in args.output}
    if len(outputs) > 1:
        raise UsageError(f"give the one --output the shards were made with (cxr merge preds.csv), not "
                         f"{len(args.output)} files of {len(outputs)} outputs")
    (output,) = outputs
    if output != args.output[0] or len(args.output) > 1:
        log.info("merging the shards of %s", output)
    merged = merge_shards(output, remove=args.remove_parts)
    log.info("wrote %s (%d files)", output, len(merged))
    _refuse_if_nothing_predicted(merged, output)


def _cmd_report(args: argparse.Namespace) -> None:
    from cxr.report import make_report

    try:
        w, h = (int(v) for v in args.frame_size.lower().split("x"))
    except ValueError:
        raise UsageError(f"--frame-size {args.frame_size!r}: use WIDTHxHEIGHT, e.g. 640x360") from None
    if not Path(args.run_dir).is_dir():  # said before the lock would make the folder
        raise UsageError(f"{args.run_dir}: no such run directory")
    with output_lock(args.output or args.run_dir):
        make_report(args.run_dir, output=args.output, model=args.model, video=args.video, heatmaps=args.heatmaps,
                    grid_split=args.split, grid_per_group=args.per_group, video_split=args.split,
                    video_select=args.video_select, video_max_images=args.video_max_images,
                    seconds_per_image=args.seconds_per_image, frame_size=(w, h), fps=args.fps, device=args.device,
                    seed=args.seed)  # it logs where it wrote


def _cmd_explain(args: argparse.Namespace) -> None:
    from cxr.explain import DISCLAIMER, explain_files  # its disclaimer names the heatmaps too, as the files do

    written = explain_files(args.model, args.paths, args.output, device=args.device, target=args.target,
                            threshold=args.threshold, batch_size=args.batch_size, amp=args.amp)
    log.info("wrote %d heatmap picture(s) and explanations.csv to %s. %s", len(written), args.output, DISCLAIMER)


def _cmd_serve(args: argparse.Namespace) -> None:
    from cxr.serve import serve

    serve(args.model, args.host, args.port, backend=_backend(args), max_upload_mb=args.max_upload_mb,
          max_concurrency=args.max_concurrency, max_queue=args.max_queue, device=args.device, threads=args.threads,
          max_connections=args.max_connections, max_pixels=args.max_pixels, amp=args.amp,
          upload_timeout=args.upload_timeout, allowed_hosts=args.allowed_hosts, root_path=args.root_path,
          access_log=args.access_log, cors_origins=args.cors_origins)


def _cmd_export(args: argparse.Namespace) -> None:
    from cxr.export import export_model

    export_model(args.model, args.format, args.output)


def _cmd_demo(args: argparse.Namespace) -> None:
    from cxr.demo import run_demo

    run_demo(args.output, epochs=args.epochs, device=args.device)


# Inference and reporting: short, latency-bound runs, often on a machine doing something else.
_PASSIVE_WAIT_COMMANDS = frozenset({"predict", "evaluate", "explain", "serve", "export", "report", "merge"})


def _backend(args: argparse.Namespace) -> str:
    """The --backend given, else the one that runs the model file: ONNX Runtime for .onnx, PyTorch otherwise."""
    is_onnx = str(args.model).lower().endswith(".onnx")
    if args.backend == "torch" and is_onnx:
        raise UsageError(f"--model {args.model} --backend torch: an ONNX file runs on ONNX Runtime; drop --backend "
                         "torch (or give the checkpoint or .safetensors file it was exported from)")
    return args.backend or ("onnx" if is_onnx else "torch")


def _refuse_unknown(parser: _Parser, command: str | None, extra: list[str], argv: list[str]) -> None:
    """Unknown arguments, named by the parser they were given to: "cxr evaluate: error: unrecognized arguments: ...
    (see cxr evaluate --help)" after the subcommand, "cxr: ..." before it. A global flag after the subcommand
    (``cxr evaluate ... -q``) is told where it goes."""
    where = argv.index(command) if command in argv else len(argv)
    if command is None or any(argv.index(a) < where for a in extra if a in argv):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    misplaced = [a for a in extra if a in ("-q", "--quiet")]
    hint = f"; {misplaced[0]} goes before the command: cxr {misplaced[0]} {command} ..." if misplaced else ""
    parser.commands.choices[command].error(f"unrecognized arguments: {' '.join(extra)}{hint}")


def _refuse_torchrun(command: str) -> None:
    """Only train and predict share their work among torchrun's processes; any other command ran once per process,
    every one writing the same files at the same time."""
    from cxr.distributed import env_info

    if env_info().world > 1:
        hint = "; for predictions shared among processes, use cxr predict" if command == "evaluate" else ""
        raise _SameOnEveryRank(f"cxr {command} runs in one process: run it without torchrun{hint}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``cxr`` console script. Returns the exit status.

    Called from Python, it leaves the process as it found it: the logging it sets up for the command (a handler on
    the root logger, cxr's level), the standard streams' error handling and ``OMP_WAIT_POLICY`` are put back after
    it. They had stayed: a notebook's later library calls lost their INFO messages, and its own ``basicConfig`` did
    nothing."""
    root, ours = logging.getLogger(), log
    saved = (list(root.handlers), root.level, ours.level, os.environ.get("OMP_WAIT_POLICY"),
             [(stream, getattr(stream, "errors", None)) for stream in (sys.stdout, sys.stderr)])
    try:
        return _main(argv)
    finally:
        handlers, level, our_level, policy, streams = saved
        root.handlers[:] = handlers
        root.setLevel(level)
        ours.setLevel(our_level)
        if policy is None:
            os.environ.pop("OMP_WAIT_POLICY", None)
        else:
            os.environ["OMP_WAIT_POLICY"] = policy
        for stream, errors in streams:
            if errors is not None and getattr(stream, "errors", None) != errors:
                with contextlib.suppress(AttributeError, ValueError):
                    stream.reconfigure(errors=errors)


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    _ARGV[:] = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args, extra = parser.parse_known_args(argv)
    if extra:
        _refuse_unknown(parser, args.command, extra, _ARGV)
    # cxr's own messages at INFO; other libraries' only from WARNING (onnxscript, say, logs a dozen INFO lines per
    # export).
    from cxr.fileio import PrintableFormatter, display_name

    for stream in (sys.stdout, sys.stderr):  # a file name the console's code page (cp1252) lacks: escaped, no crash
        with contextlib.suppress(AttributeError, ValueError):
            stream.reconfigure(errors="backslashreplace")

    handler = logging.StreamHandler(sys.stderr)
    # A file name's ESC codes are shown, not obeyed. The service's lines carry their time and level: a log shipper
    # filtering on ERROR had seen nothing of a failed prediction, and no line said when.
    service = args.command == "serve"
    handler.setFormatter(PrintableFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s" if service
                                            else "%(message)s"))
    logging.basicConfig(level=logging.WARNING, handlers=[handler])
    log.setLevel(logging.WARNING if args.quiet else logging.INFO)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command in _PASSIVE_WAIT_COMMANDS:
        # Before torch loads OpenMP: idle OpenMP threads sleep instead of spinning. With a busy core held by a job in
        # another session, spinning made one-image `cxr predict` 4.4x slower (7.5 s vs 1.8 s); on an idle machine the
        # policy made no difference to it (BENCHMARKS.md, "OpenMP threads on a busy machine"). Training is left at
        # OpenMP's default: there, passive waiting cost up to 22 % on an idle machine. An explicit setting wins.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    stopped_by: list[int] = []
    commands = {"train": _cmd_train, "evaluate": _cmd_evaluate, "predict": _cmd_predict, "merge": _cmd_merge,
                "report": _cmd_report, "explain": _cmd_explain, "serve": _cmd_serve, "export": _cmd_export,
                "demo": _cmd_demo}
    try:
        if getattr(args, "output", None) == "":  # Path("") is the current folder: results written there unasked
            raise _SameOnEveryRank("--output is empty: give a folder or file name")
        if getattr(args, "cache_dir", None) == "":  # the cache (digests.sqlite, packs) in the current folder
            raise _SameOnEveryRank("--cache-dir is empty: give a folder")
        _expand_home(args)
        if args.command not in ("train", "predict"):
            _refuse_torchrun(args.command)
        with _stop_signals_interrupt(args.command != "serve", stopped_by):  # serve stops on them by itself
            commands[args.command](args)
    except CxrError as e:  # messages name files: their control characters shown, not obeyed (display_name)
        # Under torchrun, wrong usage is the same in every process: said once, by rank 0, not 32 times on 32 GPUs.
        # Other errors (a file one node cannot read) may be a process's own, and each says its own.
        if _first_rank() or not isinstance(e, ConfigError):
            # a full disk in training: what is kept and how to go on, as after Ctrl-C (it had said neither)
            more = _how_to_go_on(args) if isinstance(e, WriteError) else ""
            print(display_name(f"cxr {args.command}: error: {e}{more}"), file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        if stopped_by:
            import signal

            name = signal.Signals(stopped_by[0]).name
            print(f"cxr {args.command}: stopped by {name}{_how_to_go_on(args)}", file=sys.stderr)
            return 128 + stopped_by[0]
        print(f"cxr {args.command}: interrupted{_how_to_go_on(args)}", file=sys.stderr)
        return 130
    except MemoryError:
        print(f"cxr {args.command}: error: out of memory (try a smaller --batch-size or --image-size)", file=sys.stderr)
        return 1
    except RuntimeError as e:
        # torch's allocators raise RuntimeError ("DefaultCPUAllocator: can't allocate memory", torch.OutOfMemoryError
        # on CUDA), which had ended in a traceback where MemoryError ends in one line.
        text = str(e).strip().splitlines()[0] if str(e).strip() else ""
        if type(e).__name__ != "OutOfMemoryError" and not any(s in text for s in _OUT_OF_MEMORY):
            raise
        print(display_name(f"cxr {args.command}: error: out of memory ({text[:300]}); try a smaller --batch-size or "
                           "--image-size"), file=sys.stderr)
        return 1
    except OSError as e:  # a file system problem cxr did not foresee: still one line, naming the file
        where = f"{e.filename}: " if e.filename else ""
        print(display_name(f"cxr {args.command}: error: {where}{e.strerror or e}"), file=sys.stderr)
        return 1
    return 0


@contextlib.contextmanager
def _stop_signals_interrupt(enabled: bool, stopped_by: list[int]):
    """SIGTERM (a batch system's time limit, ``scancel``, ``docker stop``) and SIGHUP (a closed terminal or ssh
    session) stop a command as Ctrl-C does: predict keeps its ``.partial.csv``, train names ``--resume``, evaluate
    leaves no report of other results. They had killed it outright, its finished predictions lost and a folder of
    explain pictures mixed with another model's. The signal is recorded in ``stopped_by`` (exit status 128 + its
    number, as a shell reports it). A signal ignored (``nohup``) or handled by a caller of cxr from Python is left as
    it is; so is everything under torchrun, whose agent ends its workers with SIGTERM (a worker waiting in a
    collective would run no handler). Forked workers (data loading, the cache build) keep the signal's own action."""
    import signal
    import threading

    names = [n for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n)]
    if not enabled or threading.current_thread() is not threading.main_thread() or "LOCAL_RANK" in os.environ:
        yield
        return
    main = os.getpid()

    def stop(signum, _frame):
        if os.getpid() != main:  # a forked worker process: the signal's own action
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if not stopped_by:
            stopped_by.append(signum)
        raise KeyboardInterrupt

    previous = {}
    for name in names:
        sig = getattr(signal, name)
        if signal.getsignal(sig) in (signal.SIG_DFL, None):
            previous[sig] = signal.signal(sig, stop)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _drop_partial_done(output: Path, preds, nothing: bool) -> None:
    """Remove an interrupted run's ``<output>.partial.csv`` once this run has predicted every file it lists: left
    behind by the whole job. Kept (and said) otherwise: it is the only copy of those predictions, and any later
    predict to the same name had removed it, one that read nothing or predicted other files too."""
    from cxr.predict import partial_path, read_predictions_file

    part = partial_path(output)
    if not part.is_file():
        return
    try:
        listed = {p.path for p in read_predictions_file(part)}
    except CxrError:
        listed = None
    done = {p.path for p in preds}  # an unreadable file's row is done too: it had kept the part for good
    if not nothing and listed is not None and listed <= done:
        part.unlink(missing_ok=True)
        log.info("removed %s, an interrupted run's part of this job, which this run has done whole", part)
    else:
        log.warning("%s, an interrupted run's predictions, is kept: this run did not predict every file it lists",
                    part)


def _keep_partial(stopped, output: str | os.PathLike | None) -> None:
    """Write the predictions an interrupted ``cxr predict`` had made (a :class:`cxr.predict.Interrupted`) beside its
    output, as ``<name>.partial.csv``: Ctrl-C an hour into a long job had lost them all."""
    from cxr.predict import partial_path, read_predictions_file, write_predictions_file

    if not output or not stopped.predictions:
        return
    out = partial_path(output)
    rows = list(stopped.predictions)
    # An earlier interrupted run's part of the same model and threshold is kept in it: a second Ctrl-C, sooner, had
    # written its fewer rows over the first's (384 finished predictions gone). Another model's part is replaced.
    try:
        earlier = read_predictions_file(out) if out.is_file() else []
    except CxrError:
        earlier = []
    rule = {(p.model_id, p.threshold) for p in rows}
    done = {p.path for p in rows}
    kept = [p for p in earlier if (p.model_id, p.threshold) in rule and p.path not in done]
    rows = kept + rows
    try:
        write_predictions_file(out, rows)
    except (OSError, CxrError) as e:  # a full disk, say: the interruption is what is said
        log.warning("stopped after %d of %d file(s), which could not be written: %s", len(stopped.predictions),
                    stopped.total, e)
    else:
        log.warning("stopped after %d of %d file(s): %s holds their predictions (not %s, which is for a whole run)%s",
                    len(stopped.predictions), stopped.total, out, output,
                    f", and {len(kept)} of an earlier interrupted run's" if kept else "")


def _how_to_go_on(args: argparse.Namespace) -> str:
    """What an interrupted ``cxr train`` left and how to go on with it ("interrupted" alone had said neither)."""
    run = getattr(args, "resume", None) or getattr(args, "output", None)
    if args.command != "train" or not run or not (Path(run) / "config.yaml").is_file():
        return ""
    try:
        summary = json.loads((Path(run) / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        summary = {}
    if getattr(args, "resume", None) and getattr(args, "epochs", None):  # a run being lengthened
        return f"; cxr train --resume {run} --epochs {args.epochs} goes on from its last finished epoch"
    if isinstance(summary, dict) and summary.get("stop_reason") and not summary.get("in_progress"):
        return f"; the run had finished, its results are kept: cxr report {run} makes its report"  # Ctrl-C in it
    if (Path(run) / "last.pt").is_file():
        return f"; its last finished epoch is kept: cxr train --resume {run} goes on from there"
    return f"; no epoch had finished: cxr train --resume {run} starts it again"


_PATH_ARGUMENTS = ("data", "output", "config", "resume", "cache_dir", "model", "weights", "run_dir", "paths")


def _expand_home(args: argparse.Namespace) -> None:
    """``~`` and ``~user`` at the start of a path argument are home folders, as in a config file: a shell leaves them
    as they are after ``=`` (``--output=~/preds.csv``), and ``cxr predict`` had written into a folder named "~"."""

    def home(value: str, name: str) -> str:
        # A file or folder of that very name (~scan.jpeg) is itself; on Windows only ~ and ~\ (its expanduser makes
        # any ~name the home folder's sibling, a file read from the wrong place).
        if not value.startswith("~") or (os.path.lexists(value) and not re.search(r"[\\/]", value)):
            return value  # ~scan.jpeg that is there; never ~/x, which is the home folder's x
        if sys.platform == "win32" and not re.match(r"~($|[\\/])", value):
            return value
        expanded = os.path.expanduser(value)
        if expanded.startswith("~"):
            flag = {"paths": "PATH", "run_dir": "RUN_DIR"}.get(name, f"--{name.replace('_', '-')}")
            raise _SameOnEveryRank(f"{flag} {value}: no such user's home folder here")
        return expanded

    for name in _PATH_ARGUMENTS:
        value = getattr(args, name, None)
        if isinstance(value, str):
            setattr(args, name, home(value, name))
        elif isinstance(value, list):
            setattr(args, name, [home(v, name) if isinstance(v, str) else v for v in value])


# How torch's allocators say they are out of memory (CPU, CUDA), in a RuntimeError.
_OUT_OF_MEMORY = ("can't allocate memory", "out of memory")


if __name__ == "__main__":
    sys.exit(main())
