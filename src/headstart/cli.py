"""The ``headstart`` command: argument parsing only; every verb calls the library function of
the same name."""

from __future__ import annotations

import argparse
import csv
import functools
import json
import logging
import os
import sys

from headstart.check import NEAR_DISTANCE
from headstart.config import DEFAULT_AUGMENT, Config
from headstart.errors import UsageError
from headstart.imbalance import CLASS_WEIGHT_CHOICES, IMBALANCE_THRESHOLD

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT: what shells report after a Ctrl-C


def _train_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = Config(data="")
    add = parser.add_argument
    add("--out", help="run directory (default: runs/<timestamp>)")
    add(
        "--backbone",
        default=defaults.backbone,
        help="see `headstart backbones`; A+B fuses two (their pooled features concatenated)",
    )
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
    add(
        "--fine-tune-lr",
        type=_rate_or_auto,
        default=defaults.fine_tune_lr,
        help="auto (chosen on validation, with the cached trunk) or a rate, e.g. 1e-5",
    )
    add("--batch-size", type=int, default=defaults.batch_size)
    add(
        "--augment",
        default=DEFAULT_AUGMENT,
        help="auto (chosen on validation), none, or a policy, e.g. flip,rotate=0.1,zoom=0.2",
    )
    add(
        "--views",
        type=int,
        default=defaults.views,
        help="extract mode: cached augmented views per training image",
    )
    add(
        "--cache-dir", help="feature cache folder (default: $HEADSTART_CACHE or ~/.cache/headstart)"
    )
    add(
        "--no-cache",
        dest="cache",
        action="store_false",
        help="keep backbone outputs in memory only, not in the on-disk cache",
    )
    add(
        "--no-trunk-cache",
        dest="cache_trunk",
        action="store_false",
        help="fine-tune the full model on images instead of cached trunk activations",
    )
    add("--head", choices=("gap", "flatten"), default=defaults.head)
    add("--hidden", type=int, default=defaults.hidden, help="hidden Dense width (0: none)")
    add("--dropout", type=float, default=defaults.dropout)
    add(
        "--feature-norm",
        choices=("auto", "none", "l2"),
        default=defaults.feature_norm,
        help="the head's input: auto (chosen on validation), none, or l2 (L2-normalised)",
    )
    add(
        "--split-from",
        metavar="RUN",
        help="reuse a run's exact train/val/test split (or a `check --fix-split` manifest)",
    )
    add(
        "--no-check",
        dest="check",
        action="store_false",
        help="skip the data check (duplicates, leakage, imbalance) at the start",
    )
    add("--val-split", type=float, default=defaults.val_split)
    add("--test-split", type=float, default=defaults.test_split)
    add("--patience", type=int, default=defaults.patience, help="early stopping patience")
    add("--seed", type=int, default=defaults.seed)
    add("--tensorboard", action="store_true", help="write TensorBoard logs to RUN/tensorboard/")
    # small-data honesty (issue 7)
    add(
        "--class-weight",
        choices=CLASS_WEIGHT_CHOICES,
        default=defaults.class_weight,
        help="balanced: weight classes by n/(classes*count); auto: balanced when the largest "
        f"training class has over {IMBALANCE_THRESHOLD}x the images of the smallest",
    )
    add(
        "--calibrate",
        action="store_true",
        help="temperature scaling fitted on validation, saved inside model.keras",
    )
    add(
        "--distributed",
        action="store_true",
        help="data-parallel over processes (JAX backend); see `headstart launch`",
    )
    add("--coordinator", metavar="HOST:PORT", help="--distributed: process 0's address")
    add("--num-processes", type=int, help="--distributed: how many processes in all")
    add("--process-id", type=int, help="--distributed: this process's number, 0 to N-1")


_TTA_HELP = (
    "test-time augmentation: average N views (1 = off; 2 adds a horizontal flip, more add 90%% "
    "crops). A flip is wrong for classes told apart by left and right (text, digits, arrows)"
)


def _config_of(args: argparse.Namespace) -> Config:
    """The Config that the train options of ``train``, ``cv`` and ``tune`` describe."""
    return Config(**{k: v for k, v in vars(args).items() if k in Config.__dataclass_fields__})


def _rate_or_auto(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither auto nor a number") from None


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
        prog="headstart", description="Folder of labelled images -> fine-tuned Keras classifier."
    )
    # its own action: set_defaults on a shared parent action would reach the verbs' copies too
    parser.add_argument("--quiet", action="store_true", help="no progress bars or info lines")
    verbs = parser.add_subparsers(dest="verb", required=True)
    add_verb = functools.partial(verbs.add_parser, parents=[common])

    train = add_verb("train", help="train, evaluate and save a classifier")
    train.add_argument("data", nargs="?", help="DATA/<class>/* or DATA/{train,val,test}/<class>/*")
    _train_arguments(train)
    train.add_argument(
        "--resume",
        metavar="RUN",
        help="continue an interrupted run from its last epoch (its config.json decides the rest)",
    )

    launch = add_verb("launch", help="run `train --distributed` in N local processes")
    launch.add_argument("--nproc", type=int, required=True, help="how many processes")
    launch.add_argument("command", nargs=argparse.REMAINDER, help="-- train DATA [options]")

    evaluate = add_verb("evaluate", help="score a run on a folder of labelled images")
    evaluate.add_argument("run")
    evaluate.add_argument("data")
    evaluate.add_argument("--batch-size", type=int, default=32)
    evaluate.add_argument("--tta", type=int, default=1, metavar="N", help=_TTA_HELP)

    predict = add_verb("predict", help="classify image files, folders or globs")
    predict.add_argument("run")
    predict.add_argument("paths", nargs="+")
    predict.add_argument("--top-k", type=int, default=1)
    predict.add_argument("--format", choices=("table", "csv", "json"), default="table")
    predict.add_argument("--tta", type=int, default=1, metavar="N", help=_TTA_HELP)

    check = add_verb("check", help="check a data folder: counts, bad files, duplicates, leakage")
    check.add_argument("data", help="DATA/<class>/* or DATA/{train,val,test}/<class>/*")
    check.add_argument("--out", help="report file (default: ./check-<DATA name>.json)")
    check.add_argument(
        "--fix-split",
        metavar="PATH",
        help="also write a leakage-free split manifest (JSON file lists; no file is moved)",
    )
    for option in ("val_split", "test_split", "seed"):  # the split train would make
        check.add_argument(
            "--" + option.replace("_", "-"),
            type=int if option == "seed" else float,
            default=getattr(Config(data=""), option),
            help="as for train",
        )
    check.add_argument(
        "--near-distance",
        type=int,
        default=NEAR_DISTANCE,
        metavar="BITS",
        help="perceptual-hash bits (of 256) within which images are near-duplicates",
    )

    add_verb("backbones", help="list the available backbones")

    cache = add_verb("cache", help="list or clear the feature cache")
    cache.add_argument("action", choices=("ls", "clear"))
    cache.add_argument("--cache-dir", help="default: $HEADSTART_CACHE or ~/.cache/headstart")

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
    summary.add_argument("--plot", metavar="PNG", help="also draw the model graph (needs pydot)")

    demo = add_verb("demo", help="train on the bundled Fashion-MNIST sample")
    demo.add_argument("--out")

    explain = add_verb("explain", help="Grad-CAM heatmaps: where the model looked")
    explain.add_argument("run")
    explain.add_argument("paths", nargs="+", metavar="image")
    explain.add_argument("--out", help="folder for the PNGs (default: RUN/explain)")
    explain.add_argument(
        "--class", dest="target", metavar="NAME", help="explain this class, not the predicted one"
    )

    cv = add_verb("cv", help="stratified K-fold cross-validation: accuracy mean ± std")
    cv.add_argument("data", help="DATA/<class>/* or DATA/{train,val,test}/<class>/* (pooled)")
    cv.add_argument("--folds", type=int, default=5, metavar="K")
    _train_arguments(cv)  # every fold trains with these; --out holds fold1..K and cv.json
    cv.add_argument(
        "--fine-tune", action="store_true", help="also fine-tune in every fold (default: head only)"
    )
    cv.set_defaults(fine_tune=False)

    calibrate = add_verb("calibrate", help="temperature-scale a run's confidences on validation")
    calibrate.add_argument("run")
    calibrate.add_argument("--batch-size", type=int, default=32)

    report = add_verb("report", help="draw the run's figures and write RUN/report.html")
    report.add_argument("run")

    compare = add_verb("compare", help="compare runs: table and validation curves")
    compare.add_argument("runs", nargs="+", metavar="run")
    compare.add_argument("--out", help="folder for compare.md and compare.png (./comparison)")

    export = add_verb("export", help="export a run for another runtime, checked against it")
    export.add_argument("run")
    export.add_argument(
        "--format", required=True, choices=("saved_model", "onnx", "litert", "openvino")
    )
    export.add_argument("--quantize", choices=("none", "dynamic", "int8"), default="none")
    export.add_argument("--out", help="export folder (default: RUN/exports/FORMAT[-QUANTIZE])")

    serve = add_verb("serve", help="serve a run over HTTP: JSON API and a web page")
    serve.add_argument("run", help="a run folder or an exported model folder")
    serve.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to accept other machines")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--max-batch", type=int, default=32, help="images per model call")
    serve.add_argument(
        "--max-wait-ms", type=float, default=5.0, help="how long an image waits for others"
    )
    serve.add_argument("--max-upload-mb", type=float, default=20.0, help="request body limit")
    ensemble = add_verb("ensemble", help="average runs' class probabilities into one model")
    ensemble.add_argument("runs", nargs="+", metavar="run", help="runs sharing labels and split")
    ensemble.add_argument("--out", help="the ensemble's run folder (default: runs/<timestamp>)")
    ensemble.add_argument(
        "--weights", help="w1,w2,... (one per run), or fit: chosen on validation (default: mean)"
    )
    ensemble.add_argument("--batch-size", type=int, default=32)

    tune = add_verb("tune", help="search head hyperparameters with KerasTuner on cached features")
    tune.add_argument("data", help="DATA/<class>/* or DATA/{train,val,test}/<class>/*")
    tune.add_argument("--trials", type=int, default=10)
    tune.add_argument("--max-time", type=float, metavar="MIN", help="start no trial after this")
    tune.add_argument(
        "--algorithm", choices=("bayesian", "random", "hyperband"), default="bayesian"
    )
    tune.add_argument(
        "--no-train", dest="train_best", action="store_false", help="don't train the best fully"
    )
    _train_arguments(tune)  # the settings kept fixed (--lr, --dropout, --hidden, --head are tuned)
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
    except KeyboardInterrupt:
        if sys.stdout.isatty():
            print()  # end the progress bar's line
        print(_interrupted(args), file=sys.stderr)
        return EXIT_INTERRUPTED


def _interrupted(args: argparse.Namespace) -> str:
    """One line after Ctrl-C: what the run folder holds and what can be done with it.

    Every file in a run is written atomically, so whatever is there is complete: model.keras is
    the best model on validation so far (the checkpoint saves it at each improvement).
    """
    from headstart import runs
    from headstart.training.state import RESUME_FILE

    if args.verb == "cv" and getattr(args, "out", None):
        return (
            f"headstart: interrupted; each fold finished so far is a complete run in {args.out} "
            f"(no cv.json yet): run cv again with a new --out"
        )
    run = getattr(args, "out", None) if args.verb in ("train", "demo") else None
    kept = [
        name
        for name in (
            runs.MODEL_FILE,
            runs.CONFIG_FILE,
            runs.LABELS_FILE,
            runs.HISTORY_FILE,
            runs.SKIPPED_FILE,
        )
        if run and os.path.isfile(os.path.join(run, name))
    ]
    again = (
        "run train again with a new --out"
        if getattr(args, "out_given", False)
        else "run train again"
    )
    if run and os.path.isfile(os.path.join(run, RESUME_FILE)):
        again = f"continue with `headstart train --resume {run}`"
    if runs.MODEL_FILE in kept:
        return (
            f"headstart: interrupted; {run} keeps {', '.join(kept)}: model.keras is the best "
            f"model on validation so far, ready for `headstart predict {run}` and `headstart "
            f"evaluate {run} DATA` (no test metrics yet); to train it fully, {again}"
        )
    if kept:
        what = "to go on" if "--resume" in again else "to start again"
        return (
            f"headstart: interrupted before the first epoch ended; {run} keeps "
            f"{', '.join(kept)} but no model: {what}, {again}"
        )
    return "headstart: interrupted before anything was saved"


def _run(args: argparse.Namespace) -> int:
    if args.verb == "train" and args.resume:
        from headstart.training import resume

        _check_resume_arguments(args)
        args.out = args.resume
        cluster = {key: getattr(args, key) for key in CLUSTER_OPTIONS}
        _print_result(resume(args.resume, **cluster))
    elif args.verb == "train":
        from headstart.training import train

        if not args.data:
            raise UsageError("train needs DATA (a folder of class folders), or --resume RUN")
        _resolve_out(args)
        result = train(_config_of(args))
        _print_result(result)
    elif args.verb == "demo":
        from headstart.training.demo import demo

        _resolve_out(args)
        _print_result(demo(args.out, quiet=args.quiet))
    elif args.verb == "launch":
        from headstart.distributed.launch import launch

        return launch(args.nproc, args.command)
    elif args.verb == "evaluate":
        from headstart.evaluation import evaluate, format_metrics, format_tta, format_uncertainty

        metrics = evaluate(args.run, args.data, batch_size=args.batch_size, tta=args.tta)
        print(format_metrics(metrics))
        for line in (format_uncertainty(metrics), format_tta(metrics)):
            if line:
                print(line)
    elif args.verb == "predict":
        from headstart.deploy.predict import iter_predictions

        predictions = iter_predictions(args.run, args.paths, top_k=args.top_k, tta=args.tta)
        total, unreadable = _print_predictions(predictions, args.format)
        if unreadable:
            print(
                f"headstart: {unreadable} of {total} images could not be read "
                f"(the reasons are in the output)",
                file=sys.stderr,
            )
    elif args.verb == "backbones":
        from headstart.backbones import list_backbones

        _print_backbones(list_backbones())
    elif args.verb == "cache":
        from headstart.training import cache

        if args.action == "clear":
            print(f"freed {cache.clear(args.cache_dir) / 1e6:.1f} MB")
        else:
            _print_cache_entries(cache.list_entries(args.cache_dir))
    elif args.verb == "summary":
        from headstart.summaries import summary

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
                plot=args.plot,
            ),
            end="",
        )
    elif args.verb == "explain":
        from headstart.explain import explain

        for path in explain(args.run, args.paths, out=args.out, target=args.target):
            print(path)
    elif args.verb == "cv":
        from headstart.cv import cross_validate, format_cv

        if args.test_split != Config(data="").test_split:
            raise UsageError("cv: --test-split does not apply, each fold tests 1/K of the images")
        _resolve_out(args)
        summary = cross_validate(_config_of(args), folds=args.folds)
        print(format_cv(summary))
        print(f"written: {summary['out']}/cv.json")
    elif args.verb == "calibrate":
        from headstart.calibrate import calibrate, format_calibration

        print(format_calibration(calibrate(args.run, batch_size=args.batch_size)))
    elif args.verb == "report":
        from headstart.report import report

        print(report(args.run))
    elif args.verb == "check":
        from headstart.check import check, format_summary

        report = check(
            args.data,
            val_split=args.val_split,
            test_split=args.test_split,
            seed=args.seed,
            out=args.out,
            fix_split=args.fix_split,
            near_distance=args.near_distance,
        )
        if hasattr(sys.stdout, "reconfigure"):  # file names need not be valid UTF-8
            sys.stdout.reconfigure(errors="backslashreplace")
        print(format_summary(report))
        written = [report["out"]] + ([args.fix_split] if args.fix_split else [])
        print(f"written: {', '.join(written)}")
    elif args.verb == "compare":
        from headstart.compare import compare

        result = compare(args.runs, out=args.out)
        print(result.table)
        for line in result.noise:
            print(line)
        print(f"written: {result.markdown_path}, {result.figure_path}")
    elif args.verb == "export":
        return _export(args)
    elif args.verb == "ensemble":
        from headstart.ensemble import ensemble

        result = ensemble(args.runs, args.out, weights=args.weights, batch_size=args.batch_size)
        print("weights: " + ", ".join(f"{w:.3f}" for w in result.weights))
        _print_result(result)
    elif args.verb == "tune":
        from headstart.tune import tune

        result = tune(
            _config_of(args),
            trials=args.trials,
            max_time=args.max_time,
            algorithm=args.algorithm,
            train_best=args.train_best,
        )
        print(f"{len(result.rows)} trials: {result.out / 'trials.csv'}")
        print(f"best: {result.command}")
        if result.run is not None:
            _print_result(result.run)
    elif args.verb == "serve":
        from headstart.deploy.serve import serve

        serve(
            args.run,
            host=args.host,
            port=args.port,
            max_batch=args.max_batch,
            max_wait_ms=args.max_wait_ms,
            max_upload_mb=args.max_upload_mb,
        )
    return 0


def _export(args: argparse.Namespace) -> int:
    """Exit 1 when the artifact does not answer like model.keras (nothing is kept then)."""
    from headstart.deploy.export import ExportCheckFailed, export

    try:
        result = export(args.run, args.format, quantize=args.quantize, out=args.out)
    except ExportCheckFailed as error:
        print(f"headstart: error: {error}", file=sys.stderr)
        return 1
    check = result.record["check"]
    print(
        f"{result.path}: {result.record['size_bytes'] / 1e6:.1f} MB, "
        f"{result.record['runtime']['name']} {result.record['runtime']['version']}; "
        f"on {check['source']}: top-1 agreement {check['top1_agreement']:.2%}, "
        f"max probability difference {check['max_abs_prob_diff']:.1e}"
    )
    return 0


# --resume: these describe the new launch (where this process stands), not the run's settings
CLUSTER_OPTIONS = ("coordinator", "num_processes", "process_id")


def _check_resume_arguments(args: argparse.Namespace) -> None:
    """--resume takes every setting from the run's config.json: refuse others, rather than
    silently ignoring them. The cluster options are the new launch's (`headstart launch`
    adds them and --distributed), so they are taken, for a run that was --distributed."""
    defaults = vars(build_parser().parse_args(["train", "--resume", args.resume]))
    launch = ("distributed", *CLUSTER_OPTIONS)
    given = [
        "--" + key.replace("_", "-")
        for key, value in vars(args).items()
        if key not in ("quiet", "data", *launch) and value != defaults.get(key)
    ]
    if args.data:
        given.insert(0, "DATA")
    if given:
        raise UsageError(
            f"--resume {args.resume} continues the run with the settings in its config.json: "
            f"drop {', '.join(given)}"
        )
    config = os.path.join(args.resume, "config.json")
    launched = [f"--{key.replace('_', '-')}" for key in launch if getattr(args, key)]
    if launched and os.path.isfile(config) and not Config.load(config).distributed:
        raise UsageError(
            f"--resume {args.resume}: the run was not --distributed: drop {', '.join(launched)} "
            f"(or `headstart launch`) and resume it in one process"
        )


def _resolve_out(args: argparse.Namespace) -> None:
    """Decide the run folder here, so that a Ctrl-C message can name it."""
    from headstart import runs

    args.out_given = bool(args.out)
    if not args.out:
        args.out = str(runs.default_run_dir())


def _print_result(result) -> None:
    from headstart.evaluation import format_metrics, format_uncertainty

    if result.metrics.get("n_test"):
        print(format_metrics(result.metrics))
        if format_uncertainty(result.metrics):
            print(format_uncertainty(result.metrics))
    config = getattr(result, "config", None)  # an ensemble's result has none
    if config is not None and config.distributed and not result.metrics:
        print(f"process {result.config.process_id} done (process 0 writes the run)")
        return
    if result.metrics.get("calibration"):
        from headstart.calibrate import format_calibration

        print(format_calibration(result.metrics))
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


def _print_predictions(predictions, output_format: str) -> tuple[int, int]:
    """Print predictions as they come (table, csv: a folder of any size streams); json collects
    them into one document. Returns (images, unreadable images)."""
    if hasattr(sys.stdout, "reconfigure"):  # file names need not be valid UTF-8
        sys.stdout.reconfigure(errors="backslashreplace")
    writer = csv.writer(sys.stdout)
    if output_format == "csv":
        writer.writerow(["path", "rank", "label", "probability", "error"])
    rows, total, unreadable = [], 0, 0
    for p in predictions:
        total += 1
        unreadable += p.error is not None
        row = {
            "path": p.path,
            "error": p.error or "",
            "top": [{"label": label, "probability": round(prob, 6)} for label, prob in p.top],
        }
        if output_format == "json":
            rows.append(row)
        elif output_format == "csv":
            for rank, item in enumerate(row["top"], 1):
                writer.writerow([row["path"], rank, item["label"], item["probability"], ""])
            if row["error"]:
                writer.writerow([row["path"], "", "", "", row["error"]])
        else:
            text = "  ".join(f"{i['label']} {i['probability']:.3f}" for i in row["top"])
            print(f"{row['path']}\t{text or 'skipped: ' + row['error']}")
    if output_format == "json":
        print(json.dumps(rows, indent=2, ensure_ascii=False))
    return total, unreadable


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


def _print_cache_entries(entries: list[dict]) -> None:
    if not entries:
        print("feature cache is empty")
    for entry in entries:
        print(
            f"{entry['key']}  {entry['backbone']:<20} {entry['image_size']:>4}px  "
            f"{entry['output']:<28} {entry['view'][:30]:<30} {entry['images']:>7} images  "
            f"{entry['bytes'] / 1e6:8.1f} MB  {entry['last_used']}"
        )


if __name__ == "__main__":
    sys.exit(main())
