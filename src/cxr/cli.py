"""The ``cxr`` command: parses flags and calls library functions; nothing here that a script could not do itself."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from cxr import __version__
from cxr.errors import CxrError, UsageError

log = logging.getLogger("cxr")


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line on stderr (``cxr train: error: ...``), exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", help="dataset root (train/val/test with NORMAL/PNEUMONIA), or a MedMNIST-style .npz")
    p.add_argument("--output", help="run directory (default runs/cxr)")
    p.add_argument("--config", help="YAML file of config fields; flags override it")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last checkpoint")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--image-size", type=int, help="square side in pixels (default 224)")
    p.add_argument("--lr", type=float, help="peak learning rate (Adam)")
    p.add_argument("--weights", help="imagenet | none | PATH to a local state dict (default none)")
    p.add_argument("--arch", help="densenet121 (default), densenet169, resnet18, ...")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="auto | cpu | cuda (default auto)")
    p.add_argument("--val-source", choices=["carve", "folder"],
                   help="carve a patient-disjoint val split from train (default) or use the dataset's val folder")
    p.add_argument("--val-fraction", type=float, help="share of train patients carved out for validation (0.15)")
    p.add_argument("--cache-dir", help="where decoded images are cached (default $CXR_CACHE_DIR or ~/.cache/cxr)")
    p.add_argument("--scheduler", choices=["cosine", "plateau", "none"])
    p.add_argument("--patience", type=int, help="early-stopping patience in epochs (0: off)")
    p.add_argument("--threshold-policy", choices=["youden", "sensitivity"])
    p.add_argument("--target-sensitivity", type=float, help="with --threshold-policy sensitivity (default 0.97)")
    p.add_argument("--amp", choices=["auto", "on", "off"], help="bf16 autocast (auto: on where it is fast)")
    p.add_argument("--channels-last", choices=["auto", "on", "off"])
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile the model")
    p.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=None,
                   help="bit-repeatable runs on the CPU (slower)")
    p.add_argument("--num-workers", type=int, help="DataLoader worker processes (default 0)")
    p.add_argument("--max-train-batches", type=int, help="cap on training batches per epoch (0: none)")


_FLAG_FIELDS = ("data", "output", "epochs", "batch_size", "image_size", "lr", "weights", "arch", "seed", "device",
                "val_source", "val_fraction", "cache_dir", "scheduler", "patience", "threshold_policy",
                "target_sensitivity", "amp", "channels_last", "compile", "deterministic", "num_workers",
                "max_train_batches")


def build_parser() -> argparse.ArgumentParser:
    """The ``cxr`` argument parser with its sub-commands."""
    parser = _Parser(prog="cxr", description="Chest X-ray classification (NORMAL vs PNEUMONIA): train, evaluate, "
                     "predict. Research software, not a medical device.")
    parser.add_argument("--version", action="version", version=f"cxr {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("train", help="train a model; evaluates its best checkpoint at the end")
    _add_train_flags(p)

    p = sub.add_parser("evaluate", help="metrics and predictions of a model on a dataset")
    p.add_argument("--model", default="default", help="checkpoint, run directory, or default (the bundled model)")
    p.add_argument("--data", required=True, help="dataset root, a split folder with class folders, or an .npz")
    p.add_argument("--output", required=True, help="folder for metrics.json and predictions_<split>.csv")
    p.add_argument("--threshold", type=float, help="decision threshold (default: the model's, chosen on validation)")
    p.add_argument("--device", default="auto")
    p.add_argument("--cache-dir")
    p.add_argument("--batch-size", type=int, default=64)

    p = sub.add_parser("predict", help="P(PNEUMONIA) for image files or folders")
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders (searched recursively)")
    p.add_argument("--model", default="default", help="checkpoint, run directory, or default (the bundled model)")
    p.add_argument("--output", help="also write the results to a .csv or .json file")
    p.add_argument("--threshold", type=float)
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=32)

    p = sub.add_parser("demo", help="train briefly on the bundled sample, then evaluate and predict (CPU, minutes)")
    p.add_argument("--output", default="runs/demo", help="run directory (default runs/demo)")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--device", default="auto")
    return parser


def _cmd_train(args: argparse.Namespace) -> None:
    from cxr.config import load_config
    from cxr.train import train

    overrides = {f: getattr(args, f) for f in _FLAG_FIELDS}
    if args.resume:
        if args.config:
            raise UsageError("--resume uses the run's own config.yaml; drop --config")
        train(resume=args.resume, overrides=overrides)
    else:
        train(load_config(args.config, overrides))


def _cmd_evaluate(args: argparse.Namespace) -> None:
    from cxr.evaluate import evaluate_model

    metrics = evaluate_model(args.model, args.data, args.output, threshold=args.threshold, device=args.device,
                             cache_dir=args.cache_dir, batch_size=args.batch_size)
    _print_metrics(metrics)
    log.info("wrote %s", Path(args.output) / "metrics.json")


def _print_metrics(metrics: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    threshold = next(iter(metrics.values()))["threshold"] if metrics else float("nan")
    table = Table(title=f"metrics at threshold {threshold:.3f}")
    cols = ("n", "accuracy", "recall", "specificity", "precision", "f1", "auroc", "auprc")
    table.add_column("split")
    for c in cols:
        table.add_column("sensitivity" if c == "recall" else c, justify="right")
    for name, m in metrics.items():
        table.add_row(name, *[("-" if m[c] is None else f"{m[c]:.3f}" if isinstance(m[c], float) else str(m[c]))
                              for c in cols])
    Console().print(table)


def _cmd_predict(args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    from cxr.predict import DISCLAIMER, predict_files, write_predictions_file

    if args.output and Path(args.output).suffix.lower() not in (".csv", ".json"):
        raise UsageError(f"--output {args.output}: use a .csv or .json file name")
    preds = predict_files(args.model, args.paths, device=args.device, threshold=args.threshold,
                          batch_size=args.batch_size)
    table = Table(caption=DISCLAIMER)
    for col, justify in (("path", "left"), ("P(pneumonia)", "right"), ("label", "left")):
        table.add_column(col, justify=justify)
    for p in preds:
        if p.error:
            table.add_row(p.path, "-", f"[red]unreadable: {p.error}[/red]")
        else:
            table.add_row(p.path, f"{p.prob_pneumonia:.3f}", p.label)
    Console().print(table)
    bad = sum(p.error is not None for p in preds)
    if bad:
        log.warning("%d of %d file(s) could not be read", bad, len(preds))
    if args.output:
        write_predictions_file(args.output, preds)
        log.info("wrote %s", args.output)


def _cmd_demo(args: argparse.Namespace) -> None:
    from cxr.demo import run_demo

    run_demo(args.output, epochs=args.epochs, device=args.device)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``cxr`` console script. Returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s",
                        stream=sys.stderr)
    if args.command is None:
        parser.print_help()
        return 2
    commands = {"train": _cmd_train, "evaluate": _cmd_evaluate, "predict": _cmd_predict, "demo": _cmd_demo}
    try:
        commands[args.command](args)
    except CxrError as e:
        print(f"cxr {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"cxr {args.command}: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print(f"cxr {args.command}: error: out of memory (try a smaller --batch-size or --image-size)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
