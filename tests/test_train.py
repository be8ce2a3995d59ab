"""End to end: folder in, run directory out, through the library and the CLI."""

import csv
import json
import subprocess
import sys

import keras
import numpy as np
import pytest

from headstart import Config, evaluate, predict, train
from headstart.cli import main
from headstart.data import find_images, read_image
from headstart.errors import UsageError
from headstart.model import classifier_of, feature_extractor
from headstart.splits import load_image_folder

pytestmark = pytest.mark.slow  # end-to-end training runs of several seconds each

RUN_FILES = {
    "model.keras",
    "labels.json",
    "config.json",
    "history.csv",
    "metrics.json",
    "summary.txt",
    "skipped.txt",
}


def _scratch_config(data, out, **changes):
    values = dict(
        data=str(data),
        out=str(out),
        backbone="scratch_cnn",
        image_size=32,
        head="flatten",
        epochs=8,
        lr=3e-3,
        batch_size=8,
        augment="none",
        quiet=True,
    )
    return Config(**{**values, **changes})


@pytest.fixture(scope="module")
def scratch_run(tiny_folder, tmp_path_factory):
    return train(_scratch_config(tiny_folder, tmp_path_factory.mktemp("runs") / "scratch"))


@pytest.mark.core
def test_run_directory_holds_everything(scratch_run, tiny_folder):
    run = scratch_run.run_dir
    assert RUN_FILES <= {p.name for p in run.iterdir()}
    assert json.loads((run / "labels.json").read_text()) == ["cat", "dog"]
    config = json.loads((run / "config.json").read_text())
    assert config["image_size"] == 32 and config["weights"] == "none"
    assert config["data"] == str(tiny_folder.resolve())
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["n_test"] == 4 and set(metrics["per_class"]) == {"cat", "dog"}
    assert np.array(metrics["confusion_matrix"]).sum() == 4
    assert "total=" in (run / "summary.txt").read_text()
    assert (run / "skipped.txt").read_text() == ""


@pytest.mark.core
def test_scratch_baseline_learns_the_tiny_folder(scratch_run):
    assert scratch_run.metrics["accuracy"] >= 0.75
    rows = list(csv.DictReader((scratch_run.run_dir / "history.csv").open()))
    # scratch: no fine-tune stage; the default refit trains stage 1 again on train + val (and
    # model.keras is the refit model only if it beats chance on those images: this scratch CNN's
    # BatchNormalization can leave it answering one class, which the checkpoint never keeps)
    assert rows and {row["stage"] for row in rows} == {"head", "refit_head"}
    head = [row for row in rows if row["stage"] == "head"]
    assert float(head[-1]["accuracy"]) > float(head[0]["accuracy"])


@pytest.mark.core
def test_saved_model_loads_with_plain_keras_and_takes_raw_pixels(scratch_run, tiny_folder):
    """No headstart import, no custom objects: the file is plain Keras."""
    image = sorted((tiny_folder / "dog").iterdir())[0]
    code = (
        "import sys, keras, numpy as np; from PIL import Image\n"
        "m = keras.saving.load_model(sys.argv[1])\n"
        "x = np.asarray(Image.open(sys.argv[2]).convert('RGB').resize((32, 32), Image.BILINEAR))\n"
        "print(float(m.predict(x[None].astype('float32'), verbose=0)[0, 0]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(scratch_run.run_dir / "model.keras"), str(image)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    model = keras.saving.load_model(scratch_run.run_dir / "model.keras")
    ours = model.predict(read_image(str(image), (32, 32))[None].astype("float32"), verbose=0)
    assert float(out.strip().splitlines()[-1]) == pytest.approx(float(ours[0, 0]), abs=1e-5)


@pytest.mark.core
def test_predict_and_evaluate(scratch_run, tiny_folder):
    folder = load_image_folder(str(tiny_folder))
    results = predict(scratch_run.run_dir, [str(tiny_folder / "cat")], top_k=2)
    assert len(results) == 20 and all(len(r.top) == 2 for r in results)
    assert all(abs(sum(p for _, p in r.top) - 1) < 1e-5 for r in results)
    metrics = evaluate(scratch_run.run_dir, str(tiny_folder))
    assert metrics["n_test"] == len(folder.test)  # the run's own data: its test split only
    assert metrics["accuracy"] == scratch_run.metrics["accuracy"]
    assert (scratch_run.run_dir / "evaluation.json").is_file()


def test_same_command_twice_gives_the_same_split_and_result(scratch_run, tiny_folder, tmp_path):
    again = train(_scratch_config(tiny_folder, tmp_path / "again"))
    assert again.metrics["confusion_matrix"] == scratch_run.metrics["confusion_matrix"]
    assert again.metrics["loss"] == pytest.approx(scratch_run.metrics["loss"], abs=1e-4)


def test_data_folder_is_never_written(image_folder_factory, tmp_path):
    data = image_folder_factory(tmp_path / "data", odd_files=True)

    def tree():
        return {
            str(p.relative_to(data)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(data.rglob("*"))
        }

    before = tree()
    result = train(_scratch_config(data, tmp_path / "run", epochs=1))
    assert tree() == before
    skipped = (result.run_dir / "skipped.txt").read_text().splitlines()
    assert len(skipped) == len(image_folder_factory.ODD_BAD)
    assert result.metrics["skipped"] == len(skipped)


def test_usage_errors_are_one_line_and_exit_2(tmp_path, image_folder_factory, capsys):
    one_class = image_folder_factory(tmp_path / "one", classes=("cat",))
    cases = [
        ["train", str(tmp_path / "missing")],
        ["train", str(one_class)],
        ["train", str(one_class.parent), "--backbone", "nope"],
        ["train", str(one_class), "--backbone", "xception", "--image-size", "32"],
        ["train", str(one_class), "--augment", "wobble=3"],
        ["predict", str(tmp_path), "x.jpg"],
    ]
    for argv in cases:
        assert main(["--quiet", *argv]) == 2, argv
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == len(cases)
    assert all(line.startswith("headstart: error: ") for line in errors)


def test_out_folder_that_is_not_empty_is_refused(scratch_run, tiny_folder):
    with pytest.raises(UsageError, match="already exists"):
        train(_scratch_config(tiny_folder, scratch_run.run_dir))


@pytest.mark.integration
@pytest.mark.parametrize("mode", ["extract", "frozen"])
def test_transfer_recipe_with_real_offline_weights(tiny_folder, tmp_path, mode):
    """The default backbone, both stage-1 workflows, then fine-tuning: one full model."""
    config = Config(
        data=str(tiny_folder),
        out=str(tmp_path / mode),
        image_size=32,  # Lite0's smallest input: the recipe, not the pixels, is tested here
        epochs=3,
        fine_tune_epochs=1,
        fine_tune_lr=1e-4,  # a fixed rate: "auto" skips stage 2 when it cannot beat stage 1
        batch_size=8,
        mode=mode,
        report=False,  # the real weights' report: test_report's transfer run
        quiet=True,
    )
    result = train(config)
    assert result.metrics["accuracy"] == 1.0
    assert result.config.weights == "imagenet" and int(result.config.unfreeze) > 0
    stages = [row["stage"] for row in csv.DictReader((result.run_dir / "history.csv").open())]
    choosing = [stage for stage in stages if not stage.startswith("refit")]
    assert choosing[0] == "head" and choosing[-1] == "fine_tune"
    # stage 1 already has every validation image right: fine-tuning ran, and is not kept (nor
    # refit: the default refit trains stage 1 again on train + validation)
    assert result.metrics["fine_tune_kept"] is False
    chosen = result.metrics.get("validation_choosing_phase") or result.metrics["saved_from"]
    assert chosen["stage"] == "head" and "refit_fine_tune" not in stages
    model = keras.saving.load_model(result.run_dir / "model.keras")
    images = np.stack([read_image(p, (32, 32)) for p in find_images([str(tiny_folder)])[:8]])
    images = images.astype("float32")
    # the saved model is exactly preprocessing + backbone + head (no augmentation inside)
    np.testing.assert_allclose(
        model.predict(images, verbose=0),
        classifier_of(model)(feature_extractor(model)(images)),
        rtol=1e-5,
        atol=1e-5,
    )


def test_cli_train_then_predict(tiny_folder, tmp_path, capsys):
    """The default recipe through the command line (on the tiny pretrained-style backbone:
    the real weights' run is `test_transfer_recipe_with_real_offline_weights`), then predict."""
    run = tmp_path / "cli"
    command = ["--quiet", "train", str(tiny_folder), "--out", str(run), "--image-size", "32"]
    command += ["--backbone", "tiny_test", "--weights", "none", "--batch-size", "8"]
    assert main([*command, "--epochs", "5", "--fine-tune-epochs", "1"]) == 0
    assert "test accuracy" in capsys.readouterr().out
    dogs = sorted(str(p) for p in (tiny_folder / "dog").iterdir())[:3]
    assert main(["predict", str(run), *dogs, "--format", "json", "--top-k", "2"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [row["top"][0]["label"] for row in rows] == ["dog"] * 3
    assert main(["predict", str(run), str(tiny_folder / "cat" / "*"), "--format", "csv"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "path,rank,label,probability,error" and len(lines) == 21


def test_evaluate_on_new_images_of_one_class(scratch_run, image_folder_factory, tmp_path):
    """New photos of a single known class are a fine evaluation set; unknown classes are not."""
    dogs = image_folder_factory(tmp_path / "dogs", classes=("cat", "dog"), per_class=6)
    for path in (dogs / "cat").iterdir():
        path.unlink()
    (dogs / "cat").rmdir()
    metrics = evaluate(scratch_run.run_dir, str(dogs))
    assert metrics["n_test"] == 6 and metrics["per_class"]["dog"]["support"] == 6
    wolves = image_folder_factory(tmp_path / "wolves", classes=("dog", "wolf"), per_class=3)
    with pytest.raises(UsageError, match="wolf"):
        evaluate(scratch_run.run_dir, str(wolves))


def test_split_from_reuses_a_runs_exact_split_and_train_checks_the_data(tiny_run, tmp_path):
    config = Config(
        data=str(json.loads((tiny_run / "config.json").read_text())["data"]),
        out=str(tmp_path / "same_split"),
        backbone="scratch_cnn",
        image_size=32,
        head="flatten",
        epochs=1,
        batch_size=8,
        augment="none",
        seed=5,  # another seed would split differently; the manifest wins
        split_from=str(tiny_run),
        quiet=True,
    )
    run = train(config).run_dir
    assert json.loads((run / "split.json").read_text()) == json.loads(
        (tiny_run / "split.json").read_text()
    )
    check = json.loads((run / "check.json").read_text())
    assert check["counts"]["total"] == {"cat": 20, "dog": 20}
    assert check["counts"]["test"] == {"cat": 2, "dog": 2}
