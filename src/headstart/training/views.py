"""Cached features (workflow 2): the frozen backbone's outputs over a run's images, computed
once per run, and once ever with the feature cache.

A *view* is one pass over a split: view 0 of the clean images, views 1..K of the training
images each through a fresh draw of an augmentation policy (seeded by the run's seed and the
view's number, so a rerun, a resumed run and every process of a distributed run draw the same).
A *kind* is what the pass keeps: ``"pooled"``, the head's input features, or ``"trunk"``, the
activations where fine-tuning starts (`headstart.extract.split_at_cut`), from which the pooled
features are then derived by the still-frozen top block, so the backbone runs once for both
stages.

The refit (`headstart.training.refit`) trains on ``TRAIN_VAL``, the training and validation
splits one after the other: each view's rows are those of both splits joined (`JoinedRows`),
so nothing already extracted is extracted again; only the validation images' augmented views
are new.

`FeatureViews` is the one place this wiring lives: the recipe, `headstart tune` and the
benchmarks all extract through it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time

import keras
import numpy as np

from headstart.augment import build_augmenter
from headstart.backbones import Backbone
from headstart.config import Config
from headstart.data import ImageFolder, Split
from headstart.distributed.cluster import barrier, current
from headstart.extract import TrunkSplit, ViewSampler, extract_batches, run_in_batches
from headstart.model import FEATURES_NAME, feature_extractor, per_part, pooled_name
from headstart.runtime import KERAS, FrozenRunner, RuntimeFallback, resolve_runtime
from headstart.training.cache import EntrySpec, FeatureCache
from headstart.training.phases import PhaseClock

TRAIN_VAL = "train+val"  # the refit's training data: the training split, then validation
TRAINING_SPLITS = ("train", TRAIN_VAL)  # shuffled, and seen through augmented views too


def split_of(folder: ImageFolder, split: str) -> Split:
    """A split of ``folder`` by name; `TRAIN_VAL`: the training images, then validation's."""
    if split != TRAIN_VAL:
        return getattr(folder, split)
    train, val = folder.train, folder.val
    return Split(train.paths + val.paths, train.labels + val.labels, train.n_labels)


class JoinedRows:
    """Several splits' rows one after the other, indexable by image like each part (an array
    or the feature cache's rows): nothing is copied until a batch is read."""

    def __init__(self, parts: list):
        self.parts = list(parts)
        self.starts = np.cumsum([0, *(len(part) for part in self.parts)])
        self.shape = (int(self.starts[-1]), *self.parts[0].shape[1:])

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, indices) -> np.ndarray:
        indices = np.atleast_1d(np.asarray(indices, dtype=np.int64))
        out = np.empty((len(indices), *self.shape[1:]), dtype=np.float32)
        part_of = np.searchsorted(self.starts, indices, side="right") - 1
        for part in np.unique(part_of):
            mask = part_of == part
            out[mask] = self.parts[part][indices[mask] - self.starts[part]]
        return out


def weights_id(
    config: Config, backbone: Backbone, cache: FeatureCache | None, weights: str | None = None
) -> str:
    """What a cache key needs to know about the weights (``config.weights`` unless given: one
    backbone's of a fusion): random ones depend on the seed, a file on its content, and so do
    pretrained ones kept in files that can change (a keras-hub preset's,
    ``Backbone.weights_files``): "imagenet:<content hash>"."""
    weights = config.weights if weights is None else weights
    if weights == "none":
        return f"none:{config.seed}"
    if cache is None:
        return weights
    if weights == "imagenet":
        if backbone.weights_files is None:
            return weights
        hashes = cache.content_hashes(backbone.weights_files())
        return "imagenet:" + hashlib.sha1("+".join(hashes).encode()).hexdigest()
    return "file:" + cache.content_hashes([weights])[0]


class FeatureViews:
    """The backbone outputs of a run's images, by kind, split, policy and view.

    ``model`` is the run's full model (`headstart.model.build_from_config`): its frozen parts
    make the views. ``cache`` is the on-disk feature cache (None: in memory only). Set
    ``trunk`` to cut the backbone where fine-tuning starts; `use_model` after the model is
    rebuilt with the same backbone weights (the rows stay valid). ``clock`` times the
    extractions ("extraction clean", "extraction augmented"); ``passes`` records each
    backbone pass: its view, seconds, and how many images it computed (0: all were cached).
    """

    def __init__(
        self,
        config: Config,
        backbone: Backbone,
        folder: ImageFolder,
        model: keras.Model,
        *,
        cache: FeatureCache | None,
        clock: PhaseClock | None = None,
    ):
        self.config, self.backbone, self.folder = config, backbone, folder
        self.model = model
        self.cache = cache
        self.clock = clock or PhaseClock()
        self.passes: list[dict] = []
        self.trunk: TrunkSplit | None = None
        # a fusion's cache keys are its backbones' own (see `_extract`)
        self.weights_id = None if backbone.parts else weights_id(config, backbone, cache)
        self._memo: dict[tuple, object] = {}  # (kind, split, policy, view) -> rows
        self._frozen_parts: dict[str, keras.Model] = {}
        # --distributed: every process must key (and wait on) the same entries, so Keras
        self.runtime = KERAS if config.distributed else resolve_runtime(config.runtime)
        self._runners: dict[str, FrozenRunner] = {}  # by kind, like the frozen parts
        self._used: dict[str, str] = {}  # `runtimes`

    def use_model(self, model: keras.Model) -> None:
        """Extract through ``model`` from now on (same backbone weights: cached rows stay).
        The trunk's part and runner stay: it lies below the fine-tuning cut, so its weights
        never change (the refit's new model need not convert and check it again)."""
        self.model = model
        self._frozen_parts = {k: v for k, v in self._frozen_parts.items() if k == "trunk"}
        self._runners = {k: v for k, v in self._runners.items() if k == "trunk"}

    def runtimes(self) -> dict[str, str]:
        """Whose rows each frozen part gave so far (kind -> "keras" or "openvino:f32")."""
        return dict(self._used)

    def views(self, kind: str, split: str, policy: str, n_views: int) -> list:
        """View 0 of a split's clean images, then (training splits only: `TRAINING_SPLITS`)
        ``n_views`` views augmented by ``policy``."""
        if split not in TRAINING_SPLITS:
            policy, n_views = "", 0
        return [self.rows(kind, split, policy, view) for view in range(1 + n_views)]

    def rows(self, kind: str, split: str, policy: str = "", view: int = 0):
        """One view's rows (indexable by image: an array, or the cache's rows)."""
        key = (kind, split, policy if view else "", view)
        if key in self._memo:
            return self._memo[key]
        if split == TRAIN_VAL:  # each split's rows, extracted (or cached) on their own
            parts = [self.rows(kind, part, policy, view) for part in ("train", "val")]
            self._memo[key] = JoinedRows(parts)
            return self._memo[key]
        with self.clock.phase("extraction augmented" if view else "extraction clean"):
            if kind == "pooled" and self.trunk is not None:
                trunk = self.rows("trunk", split, policy, view)
                self._memo[key] = run_in_batches(self._frozen_part("pooled_from_trunk"), trunk)
            else:
                self._memo[key] = self._extract(kind, split, policy, view)
        return self._memo[key]

    def sampler(self, views: list, split: str) -> ViewSampler:
        """What ``fit`` trains on: one view per image per epoch, shuffled for training."""
        labels = split_of(self.folder, split).targets()
        training = split in TRAINING_SPLITS
        return ViewSampler(
            views, labels, self.config.batch_size, shuffle=training, seed=self.config.seed
        )

    def keep_policy(self, policy: str) -> None:
        """Forget the rows of every augmentation policy but ``policy`` (the others were
        candidates, no longer needed)."""
        self._memo = {key: rows for key, rows in self._memo.items() if key[2] in ("", policy)}

    def _frozen_part(self, kind: str) -> keras.Model:
        """The frozen model that makes a kind of view, built once (every view and every
        candidate policy goes through the same one): "trunk" (images to activations at the
        cut), "pooled" (images to pooled features), "pooled_from_trunk", or a fusion
        backbone's `pooled_name` (images to that backbone's pooled features)."""
        if kind not in self._frozen_parts:
            if kind == "trunk":
                part = self.trunk.trunk
            elif kind == "pooled":
                part = feature_extractor(self.model)
            elif self.backbone.parts:  # one backbone of a fusion, by its `pooled_name`
                part = keras.Model(self.model.input, self.model.get_layer(kind).output)
            else:
                top = self.trunk.top
                pooled = self.model.get_layer(FEATURES_NAME)(self.trunk.top_block(top.input))
                part = keras.Model(top.input, pooled)
            self._frozen_parts[kind] = part
        return self._frozen_parts[kind]

    def _extract(self, kind: str, split: str, policy: str, view: int):
        """Run the frozen part over a split's files (through one augmentation of ``policy``
        unless view 0), from and into the feature cache when it is on.

        A fusion's pooled features are each backbone's, cached under that backbone's own key
        (shared with its single-backbone runs) and concatenated.
        """
        if kind == "trunk":
            output = f"trunk:{self.trunk.cut_layer}"
        else:
            output = f"pooled:{self.config.head}"
        if not self.backbone.parts:
            return self._rows(kind, self.backbone, self.weights_id, output, split, policy, view)
        weights = per_part(self.config.weights, self.backbone)
        rows = [
            self._rows(
                pooled_name(part),
                part,
                weights_id(self.config, part, self.cache, part_weights),
                output,
                split,
                policy,
                view,
            )
            for part, part_weights in zip(self.backbone.parts, weights, strict=True)
        ]
        return np.concatenate([np.asarray(r[np.arange(len(r))]) for r in rows], axis=1)

    def _rows(self, kind, backbone, weights, output, split, policy, view):
        """One frozen part's outputs over a split, through the feature cache when it is on.

        The part runs on the run's runtime (`headstart.runtime`); if that falls back to Keras
        mid-pass, the pass is made again on Keras, under Keras' own cache key."""
        paths = list(getattr(self.folder, split).paths)
        clean = EntrySpec(
            backbone.name, weights, self.config.image_size, backbone.preprocessing, output, "clean"
        )
        runner = self._runner(kind, clean)
        computed = [0]

        def compute(missing, only=None):  # each pass draws from the view's seed afresh
            augmenter = build_augmenter(policy, self.config.seed + 1000 * view) if view else None
            for batch in extract_batches(
                runner,
                missing,
                self.config.image_size,
                batch_size=self.config.batch_size,
                augmenter=augmenter,
                verbose=not self.config.quiet,
                only=only,
            ):
                computed[0] += len(batch)
                yield batch

        def read():
            if self.cache is None:  # every row computed here (--distributed: in every process)
                return np.concatenate(list(compute(paths)))
            spec = dataclasses.replace(
                clean,
                view="clean" if view == 0 else f"{policy}#{self.config.seed}#{view}",
                runtime=runner.key,
            )
            if self.config.distributed:
                self._fill_my_part(spec, paths, compute)
            return self.cache.rows(spec, paths, compute)

        started = time.monotonic()
        try:
            rows = read()
        except RuntimeFallback:  # the runner now runs Keras: computed again, keyed as Keras'
            computed[0] = 0
            rows = read()
        self._used[kind] = runner.key
        self.passes.append(
            {
                "backbone": backbone.name,
                "output": output,
                "split": split,
                "view": f"{policy}#{view}" if view else "clean",
                "images": len(paths),
                "computed": computed[0],  # 0: every row came from the feature cache
                "runtime": runner.key,
                "seconds": round(time.monotonic() - started, 2),
            }
        )
        return rows

    def _runner(self, kind: str, clean: EntrySpec) -> FrozenRunner:
        """The frozen part of ``kind`` on the run's runtime, built (and checked) once; its
        OpenVINO IR kept in the feature cache (named by ``clean`` without its view)."""
        if kind not in self._runners:
            self._runners[kind] = FrozenRunner(
                self._frozen_part(kind),
                self.runtime,
                ir_dir=self.cache.ir_dir(clean) if self.cache is not None else None,
                batch_size=self.config.batch_size,
                what=f"{clean.backbone} {clean.output}",
            )
        return self._runners[kind]

    def _fill_my_part(self, spec: EntrySpec, paths: list[str], compute) -> None:
        """``--distributed``: this process extracts its part of the images into the cache,
        then waits for the others; the full read that follows is all cache hits.

        Where the processes share no cache (machines without a shared file system), each
        then fills the parts it does not find, the very batches of a single process's pass
        (an augmented view's draws included), so every process trains on the same rows; it
        costs each machine the whole extraction instead of its part."""
        cluster = current(True)
        block = self.config.batch_size  # the batches a single process would extract
        self.cache.fill_part(spec, paths, compute, cluster.process_id, cluster.num_processes, block)
        barrier(f"headstart cache {spec.key()}")
        self.cache.fill_part(spec, paths, compute, 0, 1, block)  # a shared cache: nothing
