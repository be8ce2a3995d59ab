"""`headstart summary` reproduces every parameter-count row of SPEC.md's table."""

import keras
import pytest

from headstart.cli import main

TABLE = [
    # VGG16 include_top=False at 224, all 26 weight tensors trainable
    ("--backbone vgg16 --image-size 224 --head none --unfreeze all", (14714688, 14714688, 0)),
    # seed 001: frozen VGG16 + Flatten + Dense(1024) + Dense(1)
    (
        "--backbone vgg16 --image-size 224 --head flatten --hidden 1024 --dropout 0 --classes 2 "
        "--unfreeze none --weights none",
        (40406849, 25692161, 14714688),
    ),
    # seed 001, fine-tuning: VGG16 layers[:-4] frozen
    (
        "--backbone vgg16 --image-size 224 --head flatten --hidden 1024 --dropout 0 --classes 2 "
        "--unfreeze 4",
        (40406849, 32771585, 7635264),
    ),
    # seed 003: frozen VGG16 + Flatten + Dropout(0.5) + Dense(1)
    (
        "--backbone vgg16 --image-size 224 --head flatten --dropout 0.5 --classes 2",
        (14739777, 25089, 14714688),
    ),
    # seed 000: Xception 150x150 frozen + GAP + Dropout(0.2) + Dense(1)
    (
        "--backbone xception --image-size 150 --head gap --dropout 0.2 --classes 2",
        (20863529, 2049, 20861480),
    ),
    # same, base unfrozen: BN moving statistics stay non-trainable
    (
        "--backbone xception --image-size 150 --head gap --dropout 0.2 --classes 2 --unfreeze all "
        "--bn inference",
        (20863529, 20809001, 54528),
    ),
    # seed 003 scratch CNN at 224x224
    (
        "--backbone scratch_cnn --image-size 224 --head flatten --dropout 0.5 --classes 2",
        (180173, 179975, 198),
    ),
    # seed 004 separable convnet, 64x64x3, 10 classes
    (
        "--backbone separable_cnn --image-size 64 --head gap --hidden 32 --dropout 0 --classes 10",
        (38949, 38949, 0),
    ),
]


@pytest.mark.parametrize("arguments, expected", TABLE, ids=[row[0] for row in TABLE])
def test_summary_reproduces_the_parameter_table(capsys, arguments, expected):
    assert main(["summary", *arguments.split()]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    counts = dict(item.split("=") for item in last.split())
    assert (
        int(counts["total"]),
        int(counts["trainable"]),
        int(counts["non_trainable"]),
    ) == expected


def test_vgg16_has_26_trainable_weight_tensors():
    base = keras.applications.VGG16(include_top=False, weights=None, input_shape=(224, 224, 3))
    assert len(base.trainable_weights) == 26


def test_small_layer_facts_of_seed_000():
    dense = keras.layers.Dense(3)
    dense.build((None, 4))
    assert (len(dense.weights), len(dense.trainable_weights), len(dense.non_trainable_weights)) == (
        2,
        2,
        0,
    )
    norm = keras.layers.BatchNormalization()
    norm.build((None, 4))
    assert (len(norm.weights), len(norm.trainable_weights), len(norm.non_trainable_weights)) == (
        4,
        2,
        2,
    )


def test_bad_summary_arguments_exit_2(capsys):
    assert main(["summary", "--backbone", "nope"]) == 2
    assert main(["summary", "--backbone", "vgg16", "--unfreeze", "lots"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 2 and all(line.startswith("headstart: error: ") for line in errors)
