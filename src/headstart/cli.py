"""The ``headstart`` command: argument parsing only; every verb calls the library function of
the same name."""

from __future__ import annotations

import argparse
import csv
import functools
import json
import logging
import sys

from headstart.config import DEFAULT_AUGMENT, Config
from headstart.errors import UsageError

EXIT_USAGE = 2


def _train_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = Config(data="")
    add = parser.add_argument
    add("--out", help="run directory (default: runs/<timestamp>)")
    add("--backbone", default=defaults.backbone, help="see `headstart backbones`")
    add("--weights", default=defaults.weights, help="imagenet, none, or a weights file path")
    add("--image-size", type=int, help="input size in pixels (default: the backbone's)")
    add(
        "--mode",
        choices=("extract", "frozen"),
        default=defaults.mode,
        help="stage 1: extract = cache backbone features (fast), frozen = backbone in the loop",
    )
    add("--epochs", type=int, default=defaults.epochs, help="stage 1 (head) epochs")
    add("--fine-tune-epochs", type=int, default=defaults.fine_tune_epochs)
    add("--no-fine-tune", dest="fine_tune", action="store_false", help="skip stage 2")
    add(
        "--unfreeze",
        default=defaults.unfreeze,
        help="top backbone layers to fine-tune: N, all, or default (the top block)",
    )
    add(
        "--bn",
        choices=("frozen", "inference"),
        default=defaults.bn,
        help="BatchNormalization when fine-tuning: frozen, or gamma/beta train (inference)",
    )
    add("--lr", type=float, default=defaults.lr)
    add("--fine-tune-lr", type=float, default=defaults.fine_tune_lr)
    add("--batch-size", type=int, default=defaults.batch_size)
    add("--augment", default=DEFAULT_AUGMENT, help="e.g. flip,rotate=0.1,zoom=0.2 or none")
    add("--head", choices=("gap", "flatten"), default=defaults.head)
    add("--hidden", type=int, default=defaults.hidden, help="hidden Dense width (0: none)")
    add("--dropout", type=float, default=defaults.dropout)
    add("--val-split", type=float, default=defaults.val_split)
    add("--test-split", type=float, default=defaults.test_split)
    add("--patience", type=int, default=defaults.patience, help="early stopping patience")
    add("--seed", type=int, default=defaults.seed)


def build_parser() -> argparse.ArgumentParser:
    # --quiet works before or after the verb (`headstart --quiet train`, `headstart train --quiet`)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--quiet",
        action="store_true",
        default=argparse.SUPPRESS,
        help="no progress bars or info lines",
    )
    parser = argparse.ArgumentParser(
        prog="headstart",
        description="Folder of labelled images -> fine-tuned Keras classifier.",
        parents=[common],
    )
    parser.set_defaults(quiet=False)
    verbs = parser.add_subparsers(dest="verb", required=True)
    add_verb = functools.partial(verbs.add_parser, parents=[common])

    train = add_verb("train", help="train, evaluate and save a classifier")
    train.add_argument("data", help="DATA/<class>/* or DATA/{train,val,test}/<class>/*")
    _train_arguments(train)

    evaluate = add_verb("evaluate", help="score a run on a folder of labelled images")
    evaluate.add_argument("run")
    evaluate.add_argument("data")
    evaluate.add_argument("--batch-size", type=int, default=32)

    predict = add_verb("predict", help="classify image files, folders or globs")
    predict.add_argument("run")
    predict.add_argument("paths", nargs="+")
    predict.add_argument("--top-k", type=int, default=1)
    predict.add_argument("--format", choices=("table", "csv", "json"), default="table")

    add_verb("backbones", help="list the available backbones")

    summary = add_verb("summary", help="print a model summary and parameter counts")
    summary.add_argument("--backbone", default=Config(data="").backbone)
    summary.add_argument("--image-size", type=int)
    summary.add_argument("--head", choices=("gap", "flatten", "none"), default="gap")
    summary.add_argument("--hidden", type=int, default=0)
    summary.add_argument("--dropout", type=float, default=0.2)
    summary.add_argument("--classes", type=int, default=2)
    summary.add_argument("--unfreeze", help="N, all or none (default: none; all for scratch)")
    summary.add_argument("--bn", choices=("frozen", "inference"), default="frozen")
    summary.add_argument("--weights", default="none")

    demo = add_verb("demo", help="train on the bundled Fashion-MNIST sample")
    demo.add_argument("--out")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO, format="headstart: %(message)s"
    )
    try:
        return _run(args)
    except UsageError as error:
        print(f"headstart: error: {error}", file=sys.stderr)
        return EXIT_USAGE


def _run(args: argparse.Namespace) -> int:
    if args.verb == "train":
        from headstart.train import train

        options = {k: v for k, v in vars(args).items() if k not in ("verb",)}
        result = train(Config(**options))
        _print_result(result)
    elif args.verb == "demo":
        from headstart.demo import demo

        _print_result(demo(args.out, quiet=args.quiet))
    elif args.verb == "evaluate":
        from headstart.evaluate import evaluate, format_metrics

        print(format_metrics(evaluate(args.run, args.data, batch_size=args.batch_size)))
    elif args.verb == "predict":
        from headstart.predict import predict

        _print_predictions(predict(args.run, args.paths, top_k=args.top_k), args.format)
    elif args.verb == "backbones":
        from headstart.backbones import list_backbones

        _print_backbones(list_backbones())
    elif args.verb == "summary":
        from headstart.model import summary

        print(
            summary(
                args.backbone,
                image_size=args.image_size,
                head=args.head,
                hidden=args.hidden,
                dropout=args.dropout,
                classes=args.classes,
                unfreeze=args.unfreeze,
                bn=args.bn,
                weights=args.weights,
            ),
            end="",
        )
    return 0


def _print_result(result) -> None:
    from headstart.evaluate import format_metrics

    if result.metrics.get("n_test"):
        print(format_metrics(result.metrics))
    saved = result.metrics.get("saved_from", {})
    if saved.get("stage"):
        print(
            f"model.keras: best validation loss {saved['val_loss']:.4f} "
            f"({saved['stage']} stage, epoch {saved['epoch']})"
        )
    print(f"run saved to {result.run_dir}")
    if "accuracy" in result.metrics:
        print(
            f"test accuracy {result.metrics['accuracy']:.4f} on {result.metrics['n_test']} images"
        )


def _print_predictions(predictions, output_format: str) -> None:
    rows = [
        {
            "path": p.path,
            "error": p.error or "",
            "top": [{"label": label, "probability": round(prob, 6)} for label, prob in p.top],
        }
        for p in predictions
    ]
    if output_format == "json":
        print(json.dumps(rows, indent=2, ensure_ascii=False))
    elif output_format == "csv":
        writer = csv.writer(sys.stdout)
        writer.writerow(["path", "rank", "label", "probability", "error"])
        for row in rows:
            for rank, item in enumerate(row["top"], 1):
                writer.writerow([row["path"], rank, item["label"], item["probability"], ""])
            if row["error"]:
                writer.writerow([row["path"], "", "", "", row["error"]])
    else:
        for row in rows:
            text = "  ".join(f"{i['label']} {i['probability']:.3f}" for i in row["top"])
            print(f"{row['path']}\t{text or 'skipped: ' + row['error']}")


def _print_backbones(rows: list[dict]) -> None:
    header = ("name", "parameters", "image size", "offline weights", "description")
    table = [header] + [
        (
            r["name"],
            f"{r['parameters']:,}",
            str(r["image_size"]),
            r["offline_weights"],
            r["description"],
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header) - 1)]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row[:-1], widths, strict=True)), row[-1])


if __name__ == "__main__":
    sys.exit(main())
