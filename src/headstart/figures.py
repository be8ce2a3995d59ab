"""PNG figures of a run, drawn with matplotlib's Agg canvas (no screen, no pyplot state).

Every function takes plain data (arrays, lists, dicts read from the run directory), draws one
figure and writes it to ``path``; none of them trains or loads a model. Long class names are
shortened and figure sizes grow with the number of classes, so labels never overlap.
"""

from __future__ import annotations

import importlib.util
import io
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from headstart import files

DPI = 100
_NAME_LIMIT = 18  # characters of a class name shown in image titles and on axes
_STAGE_COLOURS = {"head": "#e8f0fb", "fine_tune": "#fdf1e3", "refit": "#e9f5ea"}
REFIT_STAGES = ("refit_head", "refit_fine_tune")  # history.csv's stages of the refit


def short(name: str, limit: int = _NAME_LIMIT) -> str:
    """A class name cut to ``limit`` characters with an ellipsis, for titles and tick labels."""
    return name if len(name) <= limit else name[: limit - 1] + "…"


def _save(fig: Figure, path: str | Path) -> Path:
    """Every figure has its layout before it is saved (``layout="constrained"``, or an image
    grid's fixed one), so it is drawn once, not measured by a first draw for
    ``bbox_inches="tight"`` (10% of a report)."""
    path = Path(path)
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=DPI, format="png")
    files.write_bytes_atomic(path, buffer.getvalue())  # a killed run never leaves half a PNG
    return path


_TITLE_LINE = 0.22  # inches: one line of an image's title at size 9 (and its padding)
_SUPTITLE = 0.4  # inches: the figure's title, one line at size 12
_GAP = 0.08  # inches between two cells, and at the figure's edges
_CHARACTER = 0.6 / 72  # inches per character per point of font size (DejaVu Sans, rounded up)
_LINE = 1.25 / 72  # inches per line of a title per point of font size


def _grid(
    n: int,
    columns: int,
    title: str,
    *,
    cell: float = 1.9,
    title_lines: int = 1,
    title_size: float = 12,
):
    """A figure titled ``title`` with ``n`` image cells in rows of ``columns``; unused cells
    are hidden.

    Its layout is fixed, not constrained: every cell is ``cell`` inches square with room above
    for its title, so nothing needs measuring (constrained layout measured each cell's title
    and ticks: 40% of the time a grid took to save). The figure is at least as wide as its
    title, the cells centred: one wrong image under a long title is not cut off."""
    columns = max(1, min(columns, n))
    rows = max(1, -(-n // columns))
    cell_title = _TITLE_LINE * title_lines
    lines = title.splitlines() or [""]
    cells_width = columns * cell + (columns - 1) * _GAP
    title_width = max(len(line) for line in lines) * title_size * _CHARACTER
    width = max(cells_width, title_width) + 2 * _GAP
    top = _SUPTITLE + (len(lines) - 1) * title_size * _LINE
    height = rows * (cell + cell_title + _GAP) + top
    margin = (width - cells_width) / 2
    fig = Figure(figsize=(width, height))
    fig.subplots_adjust(
        left=margin / width,
        right=1 - margin / width,
        bottom=_GAP / height,
        top=1 - (top + cell_title) / height,
        wspace=_GAP / cell,
        hspace=(cell_title + _GAP) / cell,
    )
    fig.suptitle(title, fontsize=title_size)
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for ax in axes:
        ax.axis("off")
    return fig, axes[:n]


def _show(ax, image: np.ndarray, title: str, *, colour: str = "black", size: float = 9) -> None:
    image = np.asarray(image)
    if image.dtype != np.uint8:
        image = np.clip(image, 0, 255).astype(np.uint8)
    ax.imshow(image, interpolation="nearest" if image.shape[0] < 64 else "antialiased")
    ax.set_title(title, fontsize=size, color=colour)


def samples(
    images: Sequence[np.ndarray], labels: Sequence[str], path: str | Path, *, columns: int = 3
) -> Path:
    """A grid of training images titled with their class names (the seeds' first 9 images)."""
    fig, axes = _grid(len(images), columns, "Training images")
    for ax, image, label in zip(axes, images, labels, strict=True):
        _show(ax, image, short(label))
    return _save(fig, path)


def augmentations(
    original: np.ndarray, augmented: Sequence[np.ndarray], spec: str, path: str | Path
) -> Path:
    """One image and its augmented versions, as training saw them (``--augment`` spec)."""
    title = f"--augment {spec}" if augmented else f"--augment {spec}: images are used as they are"
    fig, axes = _grid(1 + len(augmented), 5, title)
    _show(axes[0], original, "original", colour="#1a4f9c")
    for i, (ax, image) in enumerate(zip(axes[1:], augmented, strict=True), 1):
        _show(ax, image, f"augmented {i}")
    return _save(fig, path)


def curves(history: Sequence[dict], path: str | Path, *, saved_epoch: int | None = None) -> Path:
    """Train/validation accuracy and loss over both stages; fine-tuning's start is marked.

    ``history`` holds history.csv rows (``stage``, ``accuracy``, ``val_accuracy``, ``loss``,
    ``val_loss``), in order; ``saved_epoch`` (1-based, over both stages) marks the model kept.
    A run refit on train + validation (stages `REFIT_STAGES`, training curves only) has its
    refit shaded: its validation curves are the choosing phase's, and ``saved_epoch`` marks the
    epoch chosen on validation.
    """
    epochs = np.arange(1, len(history) + 1)
    stages = [row.get("stage", "head") for row in history]
    refit = [stage in REFIT_STAGES for stage in stages]
    end = refit.index(True) if any(refit) else len(history)  # the choosing phase's epochs
    lines = [("", "train", "C0", 0, end), ("val_", "validation", "C1", 0, end)]
    if end < len(history):  # the refit: a new model, trained on train + validation
        lines[1] = ("val_", "validation (choosing phase)", "C1", 0, end)
        lines.append(("", "train (refit on train + validation)", "C2", end, len(history)))
    fig = Figure(figsize=(11, 4), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, metric in zip(axes, ("accuracy", "loss"), strict=True):
        for prefix, label, colour, first, stop in lines:
            values = [_number(row.get(prefix + metric)) for row in history[first:stop]]
            ax.plot(
                epochs[first:stop], values, "-", marker="o", markersize=3, label=label, color=colour
            )
        _shade_stages(ax, stages)
        if saved_epoch:
            value = _number(history[saved_epoch - 1].get(f"val_{metric}"))
            ax.plot([saved_epoch], [value], "*", color="crimson", markersize=13, zorder=5)
            label = "chosen on validation" if end < len(history) else "saved model"
            ax.plot([], [], "*", color="crimson", markersize=10, label=label)
        ax.set_xlabel("epoch")
        ax.set_title(metric)
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend(fontsize=8, loc="best")
    fig.suptitle("Training curves", fontsize=12)
    return _save(fig, path)


def _shade_stages(ax, stages: Sequence[str]) -> None:
    """Tint fine-tuning's and the refit's epochs, with a dashed line where each starts."""
    refit = [i for i, stage in enumerate(stages) if stage in REFIT_STAGES]
    end = refit[0] if refit else len(stages)  # the choosing phase: the epochs before
    spans = []
    if "fine_tune" in stages[:end]:
        spans.append(("fine-tuning", "fine_tune", "darkorange", stages.index("fine_tune"), end))
    if refit:
        spans.append(("refit on train + validation", "refit", "green", end, len(stages)))
    if "refit_fine_tune" in stages:  # the refit's fine-tuning: a dotted line where it starts
        ax.axvline(stages.index("refit_fine_tune") + 0.5, color="darkorange", linestyle=":")
    for text, stage, colour, first, stop in spans:  # epochs first+1 .. stop (1-based)
        ax.axvspan(first + 0.5, stop + 0.5, color=_STAGE_COLOURS[stage], zorder=0)
        ax.axvline(first + 0.5, color=colour, linestyle="--", linewidth=1.2)
        ax.text(
            first + 0.7,
            0.98,
            text,
            transform=ax.get_xaxis_transform(),
            va="top",
            fontsize=8,
            color=colour,
        )


def _number(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def confusion(matrix: Sequence[Sequence[int]], class_names: Sequence[str], path) -> Path:
    """The confusion matrix normalised per true class (rows sum to 1), counts in the cells."""
    counts = np.asarray(matrix, dtype=np.float64)
    n = len(class_names)
    totals = counts.sum(axis=1, keepdims=True)
    normalised = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
    side = min(22.0, max(5.0, 0.55 * n + 2.5))
    fig = Figure(figsize=(side + 1.2, side), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    names = [short(name) for name in class_names]
    ax.set_xticks(range(n), names, rotation=45 if n > 2 else 0, ha="right" if n > 2 else "center")
    ax.set_yticks(range(n), names)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if n <= 30:  # beyond that the cells are too small for text
        fontsize = 9 if n <= 12 else 7
        for i in range(n):
            for j in range(n):
                if counts[i, j]:
                    colour = "white" if normalised[i, j] > 0.5 else "black"
                    text = f"{normalised[i, j]:.2f}\n({int(counts[i, j])})"
                    ax.text(j, i, text, ha="center", va="center", fontsize=fontsize, color=colour)
    accuracy = np.trace(counts) / max(1.0, counts.sum())
    ax.set_title(f"Confusion matrix on the test set (accuracy {accuracy:.3f})", fontsize=11)
    return _save(fig, path)


def per_class(metrics: dict, path: str | Path) -> Path:
    """Precision, recall and F1 per class as horizontal bars (long names stay readable)."""
    names = list(metrics["class_names"])
    rows = metrics["per_class"]
    n = len(names)
    fig = Figure(figsize=(8, max(2.5, 0.45 * n + 1.3)), layout="constrained")
    ax = fig.subplots()
    y = np.arange(n)
    height = 0.26
    colours = {"precision": "#4c72b0", "recall": "#dd8452", "f1": "#55a868"}
    for offset, key in zip((-height, 0, height), ("precision", "recall", "f1"), strict=True):
        values = [rows[name][key] for name in names]
        ax.barh(y + offset, values, height, label=key if key != "f1" else "F1", color=colours[key])
    ax.set_yticks(y, [f"{short(name, 24)} (n={rows[name]['support']})" for name in names])
    ax.invert_yaxis()
    ax.set_xlim(0, 1.04)
    ax.set_xticks(np.linspace(0, 1, 6))
    ax.set_xlabel("score on the test set")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=3, fontsize=9, frameon=False)
    ax.set_title(f"Per-class scores (macro-F1 {metrics['macro_f1']:.3f})", fontsize=11, pad=24)
    return _save(fig, path)


def reliability(calibration: dict, path: str | Path) -> Path:
    """Reliability diagram: accuracy per confidence bin against the diagonal of perfect
    calibration (bars below it: over-confident), with the images per bin underneath.

    ``calibration`` is `headstart.evaluation.calibration` output (metrics.json "reliability").
    """
    bins = int(calibration["bins"])
    count = np.asarray(calibration["count"], dtype=np.float64)
    accuracy = np.asarray(calibration["accuracy"], dtype=np.float64)
    confidence = np.asarray(calibration["confidence"], dtype=np.float64)
    edges = np.linspace(0, 1, bins + 1)
    centres, width = (edges[:-1] + edges[1:]) / 2, 1 / bins
    used = count > 0
    fig = Figure(figsize=(5.5, 6), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    top.plot([0, 1], [0, 1], "--", color="#888888", lw=1, label="perfect calibration")
    top.bar(centres[used], accuracy[used], width * 0.95, color="#4c72b0", label="accuracy")
    top.bar(  # hatched from accuracy to mean confidence: above the bar = over-confident
        centres[used],
        np.abs(confidence[used] - accuracy[used]),
        width * 0.95,
        bottom=np.minimum(confidence[used], accuracy[used]),
        facecolor="none",
        edgecolor="#c44e52",
        hatch="///",
        linewidth=0.8,
        label="gap to mean confidence",
    )
    top.set_ylim(0, 1.02)
    top.set_ylabel("accuracy in the bin")
    top.legend(loc="upper left", fontsize=9, frameon=False)
    top.set_title(
        f"Reliability on the test set (ECE {calibration['ece']:.3f}, {bins} bins)", fontsize=11
    )
    bottom.bar(centres, count, width * 0.95, color="#999999")
    bottom.set_xlim(0, 1)
    bottom.set_xlabel("confidence of the predicted class")
    bottom.set_ylabel("images")
    return _save(fig, path)


def errors(
    images: Sequence[np.ndarray],
    true: Sequence[str],
    predicted: Sequence[str],
    probabilities: Sequence[float],
    path: str | Path,
    *,
    n_test: int,
) -> Path:
    """The most confidently wrong test images, with true label, prediction and probability."""
    if not images:
        fig = Figure(figsize=(6, 1.4))
        fig.text(
            0.5,
            0.5,
            f"No wrong predictions on the {n_test} test images.",
            ha="center",
            va="center",
            fontsize=13,
        )
        return _save(fig, path)
    title = (
        f"Most confidently wrong test images ({len(images)} shown of the errors "
        f"among {n_test} test images)"
    )
    fig, axes = _grid(len(images), 4, title, cell=2.2, title_lines=2, title_size=11)
    for ax, image, t, p, prob in zip(axes, images, true, predicted, probabilities, strict=True):
        _show(ax, image, f"true: {short(t)}\npredicted: {short(p)} ({prob:.2f})", size=8.5)
    return _save(fig, path)


def overlay(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Blend a [0, 1] heatmap (any size; resized bilinearly) over an RGB uint8 image; an empty
    heatmap (no region raised the score) leaves the image as it is."""
    import matplotlib
    from PIL import Image

    if not np.max(heatmap) > 0:
        return np.asarray(image, dtype=np.uint8)

    height, width = image.shape[:2]
    resized = Image.fromarray(np.asarray(heatmap, dtype=np.float32)).resize(
        (width, height), Image.BILINEAR
    )
    colours = matplotlib.colormaps["jet"](np.clip(np.asarray(resized), 0, 1))[..., :3] * 255
    blended = (1 - alpha) * np.asarray(image, dtype=np.float64) + alpha * colours
    return np.clip(blended, 0, 255).astype(np.uint8)


def gradcam_pair(image: np.ndarray, heatmap: np.ndarray, title: str, path) -> Path:
    """One image beside its Grad-CAM overlay, for ``headstart explain``."""
    fig = Figure(figsize=(6.4, 3.6), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax in axes:
        ax.axis("off")
    _show(axes[0], image, "image")
    empty = not np.max(heatmap) > 0
    _show(axes[1], overlay(image, heatmap), "Grad-CAM: empty" if empty else "Grad-CAM")
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def gradcam_grid(
    images: Sequence[np.ndarray], heatmaps: Sequence[np.ndarray], titles: Sequence[str], path
) -> Path:
    """Grad-CAM overlays for several test images (the report's correct and wrong examples)."""
    title = "Grad-CAM: where the model looked (red = most important)"
    if any(not np.max(heatmap) > 0 for heatmap in heatmaps):
        title += "\nno overlay: no region raised that class's score"
    fig, axes = _grid(len(images), 4, title, cell=2.2, title_lines=2, title_size=11)
    for ax, image, heatmap, cell_title in zip(axes, images, heatmaps, titles, strict=True):
        wrong = cell_title.startswith("wrong")
        _show(
            ax,
            overlay(image, heatmap),
            cell_title,
            colour="crimson" if wrong else "darkgreen",
            size=8,
        )
    return _save(fig, path)


def compare_curves(runs: Sequence[dict], path: str | Path) -> Path:
    """Validation accuracy and loss of several runs overlaid; a dot marks fine-tuning's start.

    ``runs`` items: ``{"name", "history"}`` with history.csv rows (a refit's rows, which have
    no validation, are left out: the curves are the choosing phase's).
    """
    fig = Figure(figsize=(11, 4.4), layout="constrained")
    axes = fig.subplots(1, 2)
    colours = [f"C{i}" for i in range(10)]
    for index, run in enumerate(runs):
        history = [row for row in run["history"] if row.get("stage") not in REFIT_STAGES]
        epochs = np.arange(1, len(history) + 1)
        stages = [row.get("stage", "head") for row in history]
        colour = colours[index % len(colours)]
        for ax, key in zip(axes, ("val_accuracy", "val_loss"), strict=True):
            values = [_number(row.get(key)) for row in history]
            ax.plot(epochs, values, "-", color=colour, linewidth=1.6, label=run["name"])
            if "fine_tune" in stages:
                start = stages.index("fine_tune")
                ax.plot(epochs[start:], values[start:], "-", color=colour, linewidth=3.2)
                ax.plot(
                    [epochs[start]], [values[start]], "o", color=colour, markersize=7, mfc="white"
                )
    axes[1].set_yscale("log")  # early scratch epochs can be 10x the rest
    plain = FuncFormatter(lambda value, _: f"{value:g}")
    axes[1].yaxis.set_major_formatter(plain)
    axes[1].yaxis.set_minor_formatter(plain)
    for ax, title in zip(axes, ("validation accuracy", "validation loss (log scale)"), strict=True):
        ax.set_title(title)
        ax.set_xlabel("epoch (thick line, open dot: fine-tuning)")
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(4, len(labels)), fontsize=9)
    return _save(fig, path)


GRAPH_HINT = "model graph not drawn: pip install pydot and apt-get install graphviz"


def graph_tools_available() -> bool:
    """``keras.utils.plot_model`` needs the pydot package and Graphviz's ``dot`` program."""
    return importlib.util.find_spec("pydot") is not None and shutil.which("dot") is not None


def model_graph(model, path: str | Path) -> str | None:
    """Draw ``model`` with ``keras.utils.plot_model``; None if done, else the one-line hint."""
    if not graph_tools_available():
        return GRAPH_HINT
    import keras

    keras.utils.plot_model(
        model,
        to_file=str(path),
        show_shapes=True,
        show_layer_names=True,
        show_trainable=True,
        dpi=72,
    )
    return None
