"""The ``summary`` verb: the model headstart would build, layer by layer, with its parameter
counts at a given stage (the tables of SPEC.md's seeds are reproduced with it)."""

from __future__ import annotations

from headstart.backbones import build_backbone, get_backbone, resolve_weights
from headstart.errors import UsageError
from headstart.figures import model_graph
from headstart.freeze import resolve_unfreeze, unfreeze_top
from headstart.model import build_model, summary_text


def summary(
    backbone: str,
    *,
    image_size: int | None = None,
    head: str = "gap",
    hidden: int = 0,
    dropout: float = 0.2,
    classes: int = 2,
    unfreeze: str | None = None,
    bn: str = "frozen",
    weights: str = "none",
    plot: str | None = None,
) -> str:
    """The model headstart would build, with the trainable state of a given stage.

    ``unfreeze`` "none" (the default) is stage 1 with the base frozen, a number or "all" is
    stage 2; from-scratch backbones are always fully trainable.
    ``head="none"`` summarises the backbone alone. Weights default to none: counts don't
    depend on them. ``plot``: also draw the model graph to that PNG (``keras.utils.plot_model``).
    """
    spec = get_backbone(backbone)
    if spec.parts:
        raise UsageError(
            f"summary shows one backbone: run it for each of {backbone} (a fusion run's "
            "summary.txt shows the fused model)"
        )
    if classes < 2:
        raise UsageError("--classes must be at least 2")
    if head not in ("gap", "flatten", "none"):
        raise UsageError("--head must be gap, flatten or none")
    base = build_backbone(spec, image_size or spec.default_size, resolve_weights(spec, weights))
    if spec.pretrained:  # a from-scratch base always trains end to end, BatchNorm included
        unfreeze_top(base, resolve_unfreeze(unfreeze or "none", spec, base), bn, spec)
    model = base
    if head != "none":
        model = build_model(spec, base, classes, head=head, hidden=hidden, dropout=dropout)
    text = summary_text(model)
    if plot:  # the graph needs pydot + Graphviz; without them, one line says how to get them
        text += (model_graph(model, plot) or f"model graph written to {plot}") + "\n"
    return text
