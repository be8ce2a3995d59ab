"""K-fold cross-validation of heads on cached features, the k folds' heads trained at once.

A head on cached pooled features is cheap to train, but a Keras ``fit`` costs about 0.1 s an
epoch whatever it trains (its data pipeline, callbacks and validation pass): k separate fits
per candidate would multiply a choice's time by k. So every fold's copy of every candidate
head is one branch of a single model (`FoldHeads`) fitted once on all the training and
validation rows: the loss (`FoldMaskedLoss`) trains each copy only on the rows outside its
fold, and after each epoch each copy is scored on its own fold's clean rows. The copies share
nothing but the batches: separate weights, and Adam's update of each weight depends on that
weight's gradients alone. Each copy's batches hold k / (k - 1) times the stage's batch size of
rows, so it sees the stage's batch size of its own rows per step, and as many steps an epoch as
a fit on its (k - 1) / k of the rows would.

Each copy follows the stage's procedure epoch by epoch: early stopping on its fold's loss
(``--patience``), its score at its best epoch (the lowest fold loss, as the checkpoint saves);
the fit ends when every copy has stopped. One difference: ReduceLROnPlateau's cut of the
learning rate (one optimizer for all copies) is left out; it comes within the last epochs
before early stopping, after the best epoch in most fits.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import keras
import numpy as np

from headstart.extract import ViewSampler

# a fit's batches per call of its compiled step (as `Session.trial`'s)
STEPS_PER_CALL = 64


@dataclass
class FoldRecord:
    """One candidate's cross-validation: per fold, its score at its best epoch."""

    accuracy: list[float] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    epochs: list[int] = field(default_factory=list)  # the best epoch, counted from 1


@dataclass
class HeadForm:
    """What a head of `headstart.model.build_head`'s own form is made of: L2-normalised input
    or not, an optional hidden layer's (kernel, bias), the dropout rate and the logits layer's
    (kernel, bias), as the head holds them now (the copies' start)."""

    l2: bool
    hidden: tuple[np.ndarray, np.ndarray] | None
    dropout: float
    logits: tuple[np.ndarray, np.ndarray]


_FORM_LAYERS = {
    "l2_normalize": keras.layers.UnitNormalization,
    "l2_scale": keras.layers.Rescaling,
    "hidden": keras.layers.Dense,
    "dropout": keras.layers.Dropout,
    "logits": keras.layers.Dense,
}


def head_form(head: keras.Model) -> HeadForm | None:
    """``head``'s `HeadForm`, or None if it is not of that form (a custom head)."""
    found = {}
    for layer in head.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        kind = _FORM_LAYERS.get(layer.name)
        if kind is None or type(layer) is not kind:
            return None
        found[layer.name] = layer
    if "logits" not in found or ("l2_normalize" in found) != ("l2_scale" in found):
        return None

    def weights(name):
        kernel, bias = found[name].get_weights()
        return np.array(kernel), np.array(bias)

    return HeadForm(
        l2="l2_normalize" in found,
        hidden=weights("hidden") if "hidden" in found else None,
        dropout=float(found["dropout"].rate) if "dropout" in found else 0.0,
        logits=weights("logits"),
    )


class FoldHeads(keras.layers.Layer):
    """``folds`` copies of each head form, side by side: features (batch, dim) in, logits
    (batch, copies, units) out, copy ``i * folds + f`` being form i's copy for fold f. The
    copies' weights are stacked (one einsum per layer and form): one small graph to trace
    and run, however many copies."""

    def __init__(self, forms: list[HeadForm], folds: int, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.forms, self.folds = forms, folds
        self.layers_of = []
        for i, form in enumerate(forms):
            hidden = None
            if form.hidden is not None:
                hidden = self._stacked(f"hidden{i}", form.hidden)
            logits = self._stacked(f"logits{i}", form.logits)
            dropout = keras.layers.Dropout(form.dropout, seed=seed + i) if form.dropout else None
            self.layers_of.append((hidden, dropout, logits))

    def _stacked(self, name: str, weights: tuple[np.ndarray, np.ndarray]):
        kernel, bias = weights
        stacked = []
        for part, value in (("kernel", kernel), ("bias", bias)):
            tiled = np.repeat(value[None], self.folds, axis=0).astype("float32")
            stacked.append(
                self.add_weight(
                    shape=tiled.shape,
                    initializer=keras.initializers.Constant(tiled),
                    name=f"{name}_{part}",
                )
            )
        return stacked

    def call(self, inputs, training=None):
        ops, outputs = keras.ops, []
        for form, (hidden, dropout, logits) in zip(self.forms, self.layers_of, strict=True):
            x = inputs
            if form.l2:  # UnitNormalization then Rescaling(sqrt(dim)), as build_head's
                x = ops.normalize(x, axis=-1, order=2, epsilon=1e-12)
                x = x * float(np.sqrt(inputs.shape[-1]))
            if hidden is not None:
                x = ops.relu(ops.einsum("bd,kdh->bkh", x, hidden[0]) + hidden[1])
                if dropout is not None:
                    x = dropout(x, training=training)
                outputs.append(ops.einsum("bkh,khu->bku", x, logits[0]) + logits[1])
                continue
            if dropout is not None:  # on the features: one draw for the form's copies
                x = dropout(x, training=training)
            outputs.append(ops.einsum("bd,kdu->bku", x, logits[0]) + logits[1])
        return ops.concatenate(outputs, axis=1)


class FoldMaskedLoss(keras.losses.Loss):
    """The mean loss of every copy on the rows outside its fold. ``y_true``: the targets
    (a class index, or one 0/1 column per label) with the row's fold as the last column;
    ``folds``: each copy's fold; ``weights``: each class's weight (--class-weight), or None."""

    def __init__(self, folds: np.ndarray, kind: str, weights: np.ndarray | None = None):
        super().__init__(name="fold_masked_loss")
        self.folds = np.asarray(folds, dtype="float32")
        self.kind, self.weights = kind, weights

    def call(self, y_true, y_pred):
        ops = keras.ops
        y_true = ops.cast(y_true, "float32")
        labels, fold = y_true[:, :-1], y_true[:, -1]
        trains = ops.cast(ops.not_equal(fold[:, None], self.folds[None, :]), "float32")
        if self.weights is not None:  # single-label: each row weighed by its class
            row_weights = ops.take(self.weights, ops.cast(labels[:, 0], "int32"))
            trains = trains * row_weights[:, None]
        losses = _losses(labels, y_pred, self.kind)
        return ops.sum(losses * trains) / ops.maximum(ops.sum(trains), 1.0)


def _losses(labels, logits, kind: str):
    """Each row's loss for each copy, (batch, copies): cross-entropy from logits."""
    ops = keras.ops
    if kind == "sparse":
        targets = ops.cast(labels[:, 0], "int32")
        targets = ops.broadcast_to(targets[:, None], ops.shape(logits)[:2])
        return ops.sparse_categorical_crossentropy(targets, logits, from_logits=True)
    targets = ops.broadcast_to(labels[:, None, :], ops.shape(logits))
    return ops.mean(ops.binary_crossentropy(targets, logits, from_logits=True), axis=-1)


def loss_kind(units: int, multi_label: bool) -> str:
    """How a head's logits are scored (as `headstart.model.compile_for`): "sparse"
    (softmax over 3 or more classes), "binary" (one logit: 2 classes, or one per label)."""
    return "binary" if multi_label or units == 1 else "sparse"


def scores_per_row(logits: np.ndarray, targets: np.ndarray, kind: str):
    """Each row's (loss, accuracy) under each copy: arrays (rows, copies). ``logits``:
    (rows, copies, units); ``targets``: class indices, or a 0/1 matrix (rows x labels)."""
    logits = np.asarray(logits, dtype=np.float64)
    if kind == "sparse":
        shifted = logits - logits.max(axis=-1, keepdims=True)
        log_p = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
        rows = np.arange(len(targets))
        loss = -log_p[rows, :, targets]
        right = (logits.argmax(axis=-1) == targets[:, None]).astype(np.float64)
        return loss, right
    targets = np.asarray(targets, dtype=np.float64).reshape(len(logits), 1, -1)
    loss = np.logaddexp(0.0, logits) - targets * logits  # binary cross-entropy from logits
    right = (logits > 0) == (targets > 0.5)
    return loss.mean(axis=-1), right.mean(axis=-1)


class _FoldScoring(keras.callbacks.Callback):
    """After each epoch: every copy scored on its fold's clean rows; its early stopping and
    best epoch kept as the stage's would be (`headstart.training.callbacks`); the fit stops
    once every copy has stopped."""

    def __init__(self, heads, clean, targets, row_folds, copy_folds, kind, patience):
        super().__init__()
        self.heads, self.clean, self.targets = heads, clean, targets
        self.masks = [row_folds == fold for fold in copy_folds]
        self.kind, self.patience = kind, patience
        n = len(copy_folds)
        self.best = np.full(n, np.inf)
        self.best_epoch = np.full(n, -1)
        self.best_accuracy = np.zeros(n)
        self.wait = np.zeros(n, dtype=np.int64)
        self.stopped = np.zeros(n, dtype=bool)

    def on_epoch_end(self, epoch, logs=None):
        logits = keras.ops.convert_to_numpy(self.heads(self.clean, training=False))
        loss, right = scores_per_row(logits, self.targets, self.kind)
        for copy, mask in enumerate(self.masks):
            if self.stopped[copy]:
                continue
            fold_loss = float(loss[mask, copy].mean())
            if fold_loss < self.best[copy]:
                self.best[copy], self.best_epoch[copy], self.wait[copy] = fold_loss, epoch, 0
                self.best_accuracy[copy] = float(right[mask, copy].mean())
            else:
                self.wait[copy] += 1
                self.stopped[copy] = self.wait[copy] >= self.patience and epoch > 0
        if self.stopped.all():
            self.model.stop_training = True


def cross_validate_heads(
    heads: dict[str, keras.Model],
    views: list,
    targets: np.ndarray,
    row_folds: np.ndarray,
    *,
    epochs: int,
    learning_rate: float,
    batch_size: int,
    patience: int,
    seed: int,
    multi_label: bool = False,
    class_weight: dict[int, float] | None = None,
    cache: dict | None = None,
) -> dict[str, FoldRecord]:
    """Each candidate head (untouched: copies train) cross-validated over ``row_folds``
    (each row's fold, 0..k-1) on ``views`` of the rows (view 0: the clean one, which scores
    them), all in one fit; its `FoldRecord`.

    ``cache``: a dict kept between calls (a run's): a fit of the same heads from the same
    start on other views of the same rows (another augmentation policy) reuses the model
    compiled before, put back in its first state (tracing its step again costs about as much
    as a few epochs)."""
    names = list(heads)
    forms = [head_form(heads[name]) for name in names]
    if any(form is None for form in forms):
        raise ValueError("cross_validate_heads takes heads of build_head's form (head_form)")
    folds = int(row_folds.max()) + 1
    units = int(heads[names[0]].output.shape[-1])
    kind = loss_kind(units, multi_label)
    weights = None
    if class_weight and not multi_label:
        weights = np.array([class_weight[i] for i in sorted(class_weight)], dtype="float32")
    targets = np.asarray(targets)
    columns = targets.reshape(len(targets), -1).astype("float32")
    labels = np.concatenate([columns, row_folds.reshape(-1, 1).astype("float32")], axis=1)
    rows_per_step = math.ceil(batch_size * folds / max(1, folds - 1))
    sampler = ViewSampler(views, labels, rows_per_step, shuffle=True, seed=seed)
    tensorflow = keras.backend.backend() == "tensorflow"
    key = _key(forms, row_folds, kind, weights, learning_rate, seed, len(sampler))
    if cache is not None and key in cache:
        model, start = cache[key]
        for variable, value in zip(model.variables, start, strict=True):
            variable.assign(value)
        for variable in model.optimizer.variables:  # as a new compile's Adam
            variable.assign(np.zeros(variable.shape, variable.dtype))
        model.optimizer.learning_rate = learning_rate  # (zeroed with the rest)
    else:
        inputs = keras.Input(tuple(heads[names[0]].input.shape[1:]))
        model = keras.Model(inputs, FoldHeads(forms, folds, seed)(inputs))
        copy_folds = [fold for _ in names for fold in range(folds)]
        model.compile(
            optimizer=keras.optimizers.Adam(learning_rate),
            loss=FoldMaskedLoss(copy_folds, kind, weights),
            steps_per_execution=min(len(sampler), STEPS_PER_CALL) if tensorflow else 1,
        )
        model.optimizer.build(model.trainable_variables)  # not in the trace (`compile_for`)
        if cache is not None:
            cache[key] = (model, [np.array(v.numpy()) for v in model.variables])
    copy_folds = np.array([fold for _ in names for fold in range(folds)])
    clean = np.asarray(views[0][np.arange(len(targets))], dtype="float32")
    scoring = _FoldScoring(model, clean, targets, row_folds, copy_folds, kind, patience)
    draws = keras.callbacks.LambdaCallback(on_epoch_begin=lambda epoch, _: sampler.set_epoch(epoch))
    model.fit(
        sampler.as_dataset() if tensorflow else sampler,
        epochs=epochs,
        callbacks=[draws, scoring],
        verbose=0,
        shuffle=False,
    )
    records = {}
    for index, name in enumerate(names):
        record = FoldRecord()
        for copy in range(index * folds, (index + 1) * folds):
            record.accuracy.append(float(scoring.best_accuracy[copy]))
            record.loss.append(float(scoring.best[copy]))
            record.epochs.append(int(scoring.best_epoch[copy]) + 1)
        records[name] = record
    return records


def _key(forms, row_folds, kind, weights, learning_rate, seed, steps) -> str:
    """What makes two fits' models interchangeable: the heads' forms and start, the folds,
    the loss, the rate, the seed and the steps an epoch."""
    digest = hashlib.sha1(repr((kind, learning_rate, seed, steps)).encode())
    for form in forms:
        digest.update(repr((form.l2, form.dropout)).encode())
        for array in (*(form.hidden or ()), *form.logits):
            digest.update(np.ascontiguousarray(array).tobytes())
    digest.update(np.ascontiguousarray(row_folds).tobytes())
    if weights is not None:
        digest.update(weights.tobytes())
    return digest.hexdigest()
