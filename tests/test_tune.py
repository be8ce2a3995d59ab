"""`headstart tune`: trials on cached features (the backbone runs once), a row per trial, the
best as a reproducible `headstart train` command, then trained as a normal run."""

import csv
import json
import shlex

import pytest

from headstart import Config
from headstart.cli import build_parser, main
from headstart.errors import UsageError
from headstart.tune import tune

pytestmark = pytest.mark.slow  # end-to-end training runs of several seconds each

FIXED = dict(
    backbone="tiny_test",  # tests/conftest.py registers it: a tiny pretrained-style backbone
    weights="none",
    image_size=32,
    epochs=3,
    batch_size=8,
    augment="none",
    check=False,
    quiet=True,
)


def test_trials_share_one_backbone_pass(tiny_folder, tmp_path, monkeypatch):
    """Three trials, two head types: every training and validation image goes through the
    backbone exactly once, and no test image at all."""
    import headstart.training.views as extract  # where every backbone pass starts
    from headstart.splits import folder_for

    seen = []
    real = extract.extract_batches

    def counting(extractor, paths, *args, **kwargs):
        seen.extend(paths)
        yield from real(extractor, paths, *args, **kwargs)

    monkeypatch.setattr(extract, "extract_batches", counting)
    config = Config(data=str(tiny_folder), out=str(tmp_path / "tune"), **FIXED)
    result = tune(config, trials=3, algorithm="random", train_best=False)
    folder = folder_for(config)
    assert sorted(seen) == sorted(folder.train.paths + folder.val.paths)

    with (result.out / "trials.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 3 == len(result.rows)
    for row in rows:
        assert row["head"] in ("gap", "flatten")
        assert 1e-4 <= float(row["lr"]) <= 1e-2 and 0 <= float(row["dropout"]) <= 0.5
        assert 0 <= float(row["val_accuracy"]) <= 1 and float(row["val_loss"]) > 0
    best_row = max(rows, key=lambda r: float(r["val_accuracy"]))
    assert float(best_row["val_accuracy"]) == max(r["val_accuracy"] for r in result.rows)
    assert result.run is None and not (result.out / "best").exists()

    # the printed command is train's own command line for the best values
    args = build_parser().parse_args(shlex.split(result.command)[1:])
    assert args.verb == "train" and args.data == str(tiny_folder.resolve())
    assert args.head == result.best["head"] and args.hidden == result.best["hidden"]
    assert args.lr == pytest.approx(result.best["lr"], rel=5e-3)
    assert args.dropout == pytest.approx(result.best["dropout"], abs=1e-9)
    assert (args.backbone, args.weights, args.image_size) == ("tiny_test", "none", 32)
    assert (args.augment, args.check, args.out) == ("none", False, str(result.out / "best"))
    record = json.loads((result.out / "tune.json").read_text())
    assert record["command"] == result.command and record["trials"] == 3


def test_cli_tune_trains_the_best(tiny_folder, tmp_path, capsys):
    out = tmp_path / "tune"
    argv = ["tune", str(tiny_folder), "--trials", "2", "--out", str(out), "--quiet"]
    argv += ["--backbone", "tiny_test", "--weights", "none", "--image-size", "32"]
    argv += ["--epochs", "2", "--batch-size", "8"]
    argv += ["--fine-tune-epochs", "0", "--augment", "none", "--no-check"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "2 trials" in printed and "best: headstart train" in printed
    config = json.loads((out / "best" / "config.json").read_text())
    best = json.loads((out / "tune.json").read_text())["best"]
    assert {k: config[k] for k in ("head", "hidden")} == {k: best[k] for k in ("head", "hidden")}
    assert (out / "best" / "metrics.json").is_file()


def test_max_time_stops_starting_trials(tiny_folder, tmp_path):
    config = Config(data=str(tiny_folder), out=str(tmp_path / "t"), **FIXED)
    result = tune(config, trials=5, max_time=1e-9, algorithm="random", train_best=False)
    assert len(result.rows) == 1  # one trial always runs, so that there is a best


def test_tune_refuses_bad_options(tiny_folder, tmp_path):
    config = Config(data=str(tiny_folder), out=str(tmp_path / "t"), **FIXED)
    with pytest.raises(UsageError, match="--algorithm"):
        tune(config, algorithm="grid")
    with pytest.raises(UsageError, match="from scratch"):
        tune(Config(data=str(tiny_folder), backbone="scratch_cnn"), trials=1)
