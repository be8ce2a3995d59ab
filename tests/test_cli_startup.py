"""The command answers at once: importing it and parsing --help or --version load no Keras,
TensorFlow, JAX or matplotlib; every verb has its handler; verbs that change a run redraw its
report. (How long --help takes is measured, not asserted here.)"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from headstart._version import __version__
from headstart.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("keras", "tensorflow", "jax", "matplotlib", "scipy", "keras_tuner")
VERBS = (
    "train launch evaluate predict check backbones cache summary demo explain cv calibrate "
    "report compare export serve ensemble tune"
).split()


def _python(*args: str) -> subprocess.CompletedProcess:
    """A fresh interpreter on this checkout's sources: nothing this test process loaded counts."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env=env, timeout=120, cwd=ROOT
    )


def test_importing_the_cli_and_parsing_help_load_no_heavy_dependency():
    code = (
        "import json, sys\n"
        "import headstart.cli\n"
        "loaded = {'import': [m for m in HEAVY if m in sys.modules]}\n"
        "for argv in (['--help'], ['train', '--help'], ['--version']):\n"
        "    try:\n"
        "        headstart.cli.main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "loaded['parse'] = [m for m in HEAVY if m in sys.modules]\n"
        "print(json.dumps(loaded), file=sys.stderr)\n"
    ).replace("HEAVY", repr(HEAVY))
    done = _python("-c", code)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stderr.strip().splitlines()[-1]) == {"import": [], "parse": []}


def test_the_cache_verb_loads_the_feature_cache_not_the_training_recipe(tmp_path):
    """`headstart cache ls` needs the cache module only: a submodule of headstart.training does
    not pull in the recipe (and Keras) through the package."""
    code = (
        "import sys\n"
        "from headstart.cli import main\n"
        f"main(['cache', 'ls', '--cache-dir', {str(tmp_path)!r}])\n"
        "print([m for m in HEAVY if m in sys.modules], file=sys.stderr)\n"
    ).replace("HEAVY", repr(HEAVY))
    done = _python("-c", code)
    assert done.returncode == 0, done.stderr
    assert "feature cache is empty" in done.stdout
    assert done.stderr.strip().splitlines()[-1] == "[]"


def test_help_exits_0_and_lists_every_verb():
    done = _python("-m", "headstart", "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: headstart")
    listed = done.stdout.split("{", 1)[1].split("}", 1)[0].split(",")
    assert listed == list(VERBS)


def test_version_prints_the_package_version():
    done = _python("-m", "headstart", "--version")
    assert (done.returncode, done.stdout, done.stderr) == (0, f"headstart {__version__}\n", "")


def test_every_verb_has_its_own_handler():
    parser = build_parser()
    verbs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert list(verbs.choices) == list(VERBS)
    handlers = [verbs.choices[verb].get_default("handler") for verb in VERBS]
    assert all(callable(handler) for handler in handlers)
    assert len(set(handlers)) == len(VERBS)


@pytest.fixture
def drawn(monkeypatch):
    """The runs `report` is called on, in order (nothing is drawn)."""
    import headstart.report

    calls = []
    monkeypatch.setattr(headstart.report, "report", lambda run, **options: calls.append(run))
    return calls


def test_calibrate_redraws_the_report_then_prints(monkeypatch, drawn, capsys):
    import headstart.calibrate

    record = {
        "temperature": 1.5,
        "n_val": 10,
        "val_ece_before": 0.2,
        "val_ece_after": 0.1,
        "val_nll_before": 0.9,
        "val_nll_after": 0.8,
    }

    def calibrate(run, *, batch_size):
        assert drawn == []  # the report follows the calibrated run, not the other way
        return {"calibration": record}

    monkeypatch.setattr(headstart.calibrate, "calibrate", calibrate)
    assert main(["calibrate", "RUN"]) == 0
    assert drawn == ["RUN"]
    assert capsys.readouterr().out.startswith("temperature scaling: T = 1.500")


def test_ensemble_redraws_the_ensembles_report(monkeypatch, drawn, capsys, tmp_path):
    import headstart.ensemble

    result = headstart.ensemble.EnsembleResult(tmp_path / "ens", {}, [0.25, 0.75])
    monkeypatch.setattr(headstart.ensemble, "ensemble", lambda *args, **options: result)
    assert main(["ensemble", "a", "b", "--out", str(tmp_path / "ens")]) == 0
    assert drawn == [tmp_path / "ens"]
    assert capsys.readouterr().out == f"weights: 0.250, 0.750\nrun saved to {tmp_path / 'ens'}\n"


def test_a_report_that_cannot_be_drawn_is_a_warning(monkeypatch, caplog, capsys):
    import headstart.calibrate
    import headstart.report

    def broken(run, **options):
        raise RuntimeError("no fonts today")

    monkeypatch.setattr(headstart.report, "report", broken)
    monkeypatch.setattr(headstart.calibrate, "calibrate", lambda run, *, batch_size: {})
    assert main(["calibrate", "RUN"]) == 0
    assert "report not written (the run itself is complete): no fonts today" in caplog.text
    assert capsys.readouterr().out == "\n"  # format_calibration of an uncalibrated run: ''


def test_every_out_option_has_its_short_form_and_every_verb_takes_verbose():
    """``-o`` is ``--out`` wherever a verb writes somewhere; ``-v/--verbose`` before or after
    the verb turns on debug lines (fastai/Ultralytics/pip users type these)."""
    parser = build_parser()
    verbs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for verb, subparser in verbs.choices.items():
        options = {o for action in subparser._actions for o in action.option_strings}
        if "--out" in options:
            out = next(a for a in subparser._actions if "--out" in a.option_strings)
            assert "-o" in out.option_strings, verb
        assert {"-v", "--verbose"} <= options, verb
    args = parser.parse_args(["train", "DATA", "-o", "runs/x", "-v"])
    assert (args.out, args.verbose) == ("runs/x", True)
    assert parser.parse_args(["-v", "cache", "ls"]).verbose
    assert not parser.parse_args(["cache", "ls"]).verbose


def test_verbose_sets_debug_logging_and_the_default_info():
    """Through `main` in a fresh interpreter (the logging set-up happens once per process):
    ``-v`` turns on headstart's debug lines, not another library's (Pillow logs two debug lines
    per image it reads), and another library's lines carry its own name."""
    code = (
        "import logging, sys, headstart.cli as cli\n"
        "cli.main(sys.argv[1:] + ['cache', 'ls'])\n"
        "for name in ('headstart.data', 'PIL.PngImagePlugin', 'tensorflow'):\n"
        "    logging.getLogger(name).debug('debug line')\n"
        "    logging.getLogger(name).warning('warning line')\n"
        "levels = (logging.getLogger(), logging.getLogger('headstart.data'))\n"
        "print(*(logging.getLevelName(g.getEffectiveLevel()) for g in levels), file=sys.stderr)\n"
    )
    runs = {
        flag: _python("-c", code, *flag.split()).stderr.splitlines()
        for flag in ("", "-v", "--quiet")
    }
    levels = {flag: lines[-1] for flag, lines in runs.items()}
    assert levels == {"": "INFO INFO", "-v": "INFO DEBUG", "--quiet": "WARNING WARNING"}
    lines = runs["-v"]
    assert "headstart: debug line" in lines and "PIL: debug line" not in lines
    assert {"headstart: warning line", "PIL: warning line", "tensorflow: warning line"} <= set(
        lines
    )
    assert "headstart: debug line" not in runs[""]
