"""A fine-tuning fold's inputs, every one checked and prepared before anything is written.

``prepare_fold(cfg)`` finds and loads the initial weights (or a random init), resolves the normalisation,
reads and prepares every subject (``load_fold``), checks the options against the label map, the memory
and the device mesh, and returns a ``PreparedFold``; an InputError on any bad input. ``finetune`` then
creates the run directory, trains and evaluates.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path

import jax
import numpy as np

from cerebrum_jax.data import datasets as D
from cerebrum_jax.data import inputs, nifti, skeleton
from cerebrum_jax.data.inputs import PreparedSubject, Preprocessing
from cerebrum_jax.data.labels import LabelMap, edit_label_map, get_label_map
from cerebrum_jax.errors import InputError
from cerebrum_jax.experiment import results_page
from cerebrum_jax.experiment.config import DataConfig, InitConfig, OutputConfig, RuntimeConfig, TrainConfig
from cerebrum_jax.experiment.normalization import normalise_fold, resolve_normalization
from cerebrum_jax.model.checkpoint import (
    DEFAULT_WEIGHTS,
    Checkpoint,
    find_weights,
    load_checkpoint,
    locate_weights,
)
from cerebrum_jax.model.spec import ModelConfig
from cerebrum_jax.parallel import distributed, sharding, shares
from cerebrum_jax.train import losses
from cerebrum_jax.train import steps as train
from cerebrum_jax.train.augment import AugmentConfig
from cerebrum_jax.train.losses import LossConfig
from cerebrum_jax.train.memory import check_training_fits


@dataclasses.dataclass(frozen=True, eq=False)
class FoldData:
    """Subjects of one fold, read and prepared (``load_fold``): root (the dataset), label_map,
    preprocessing (the record every subject was prepared with, the test subject too, and that the fold's
    checkpoint keeps for ``segment``), mask_note (why that mask kind), normalization ("zscore" or
    "voxelwise"), norm_volumes ({"mean", "std"} of the training subjects, or None), split ({"train",
    "val", "test"}: every ``data.Subject`` of the fold, its files), shares (``shares.Shares``: which
    of them this process holds), train_voxel_mm (median voxel size of the training subjects, mm, (3,)),
    train_lr_axes (the voxel axis nearest the world's left-right of each training subject's affine),
    class_counts (voxels of each class in the training labels, (C,)), and train / val / test: the
    ``PreparedSubject``s this process holds (train and val: all of them with one share; test: on process 0
    only), with their network input ``x``."""

    root: Path
    label_map: LabelMap
    preprocessing: Preprocessing
    mask_note: str
    normalization: str
    norm_volumes: dict | None
    split: dict
    shares: shares.Shares
    train_voxel_mm: tuple[float, float, float]
    train_lr_axes: tuple[int, ...]
    class_counts: np.ndarray
    train: tuple[PreparedSubject, ...]
    val: tuple[PreparedSubject, ...]
    test: tuple[PreparedSubject, ...]

    @property
    def grid(self) -> tuple[int, int, int]:
        return self.preprocessing.grid


@dataclasses.dataclass(frozen=True, eq=False)
class PreparedFold:
    """Everything ``prepare_fold`` checked and loaded: weights_path and ckpt (None from scratch), fold
    (``FoldData``), normalization_note (why that normalisation), k_prob (the class whose probability
    map is drawn), mesh (None: one device), model_config (the new network, float32), params / frozen
    (initial parameters, the warm-up's frozen mask), loss_config (``cfg.loss_config`` with its skeleton
    recall classes resolved, ``fold_loss_config``), augment_config (``cfg.augment_config`` for the fold's
    voxels, ``fold_augment_config``), seconds (how long it took)."""

    weights_path: Path | None
    ckpt: Checkpoint | None
    fold: FoldData
    normalization_note: str
    k_prob: int
    mesh: jax.sharding.Mesh | None
    model_config: ModelConfig
    params: dict
    frozen: dict
    loss_config: LossConfig
    augment_config: AugmentConfig
    seconds: float

    def initial_weights(self, n_filters: int) -> tuple[str, str]:
        """(initial weights, their note) in words, for the run record."""
        if self.ckpt is None:
            return "none", f"trained from scratch: random initialisation, n_filters {n_filters}, no warm-up"
        return str(Path(self.weights_path).absolute()), self.ckpt.meta.get("description", "")


def label_map_of(data: DataConfig) -> LabelMap:
    """The fold's label map: ``data.labels`` with its drop / merge edits."""
    return edit_label_map(get_label_map(data.labels), data.drop_labels, data.merge_labels)


def fold_subjects(data: DataConfig, log=print) -> tuple[Path, list[D.Subject]]:
    """(dataset root, its subjects in sorted order): ``data.data`` read with the section's layout, contrast,
    seg_name and mask_name, or the offline demo cohort (built on first use) when data is None."""
    if data.data is None:
        from cerebrum_jax.data.demo import ensure_demo_cohort

        root = distributed.main_first(ensure_demo_cohort, data.demo_root)  # built once, by process 0
        log(f"data: the offline demo cohort at {root} (template-derived, not 7T data)")
    else:
        root = Path(data.data)
    subjects = D.find_subjects(root, data.layout, data.contrast, data.seg_name, data.mask_name)
    D.check_distinct(subjects)  # reads every image file once (sha256), before any fold
    return root, subjects


def resolve_test_mask(requested: str, subjects: list[D.Subject]) -> tuple[str, str]:
    """(kind, why): how a fold masks its subjects (config key ``test_mask``; see ``config.TrainConfig``).

    "auto" is "file" when every subject has a brain-mask file, else "none" (never the labels: a new
    subject has none). "file" without a mask file for some subject is an InputError naming it.
    """
    if requested == "auto":
        if subjects and all(s.mask is not None for s in subjects):
            return "file", "auto: every subject has a brain-mask file"
        return "none", "auto: no brain-mask files; heads cropped to their own foreground box"
    if requested == "file":
        missing = [s.id for s in subjects if s.mask is None]
        if missing:
            raise InputError(
                f"test_mask file, but {', '.join(missing)} have no brain-mask file (BIDS: set mask_name)",
                "test_mask",
            )
    if requested == "labels":
        return "labels", "set in the config: masks from the manual labels, the test subject's too (paper)"
    return requested, "set in the config"


def load_fold(cfg: DataConfig, log=print, normalization: str = "zscore", planner=None) -> FoldData:
    """Subjects of fold ``cfg.fold`` read and prepared (all input checks happen here, before training);
    ``cfg`` is the data section (``TrainConfig.data_config``); ``planner(n_train, n_val)`` gives
    this process's ``shares.Shares`` (None: one share, every subject read here).

    Every subject this process holds, the test subject too, is prepared by ``inputs.load_subject`` with
    one ``inputs.Preprocessing`` (mask kind ``resolve_test_mask``, crop to a box + margin, the grid,
    voxel size, ``normalization``) and given its network input x: the image normalised by
    ``normalise_fold``, whose volumes come from the training subjects only. What needs every
    subject (the automatic grid, the voxelwise volumes, class counts, voxel sizes) is combined across
    processes when they hold different shares.
    """
    root, subjects = fold_subjects(cfg, log)
    train_s, val_s, test_s = D.split_fold(subjects, cfg.fold, cfg.val_subject)
    part = planner(len(train_s), len(val_s)) if planner else shares.Shares.single(len(train_s), len(val_s))
    label_map = label_map_of(cfg)
    mask, mask_note = resolve_test_mask(cfg.test_mask, subjects)
    pre = inputs.Preprocessing(
        mask=mask, crop="box", margin=cfg.margin, grid=cfg.grid, voxel_mm=cfg.voxel_mm,
        normalization=normalization,
    )  # fmt: skip
    mine = [train_s[i] for i in part.train_index] + [val_s[j] for j in part.val_index]
    if part.count > 1:
        log(
            f"subject shares: {part.count} (each fills its own block of every batch's rows); this process "
            f"reads training subjects {[train_s[i].id for i in part.train_index]} and validates "
            f"{[val_s[j].id for j in part.val_index]}"
        )
    mine += test_s if distributed.is_main() else []  # process 0 alone evaluates the test subject
    mine = list({s.id: s for s in mine}.values())
    if pre.grid is None:  # the largest box over all subjects, rounded up to multiples of 8
        at = {s.id: i for i, s in enumerate(subjects)}
        found = _read(mine, label_map, pre)
        shapes = distributed.gather_rows(
            {at[k]: p.image.shape for k, p in found.items()}, len(subjects), (3,)
        )
        pre = dataclasses.replace(pre, grid=tuple(int(g) for g in np.max(shapes, axis=0)))
    loaded = _read(mine, label_map, pre)
    views = {sid: {"image": p.image, "mask": p.mask} for sid, p in loaded.items()}
    owned = {i: loaded[train_s[i].id] for i in part.owned_train}  # counted once across processes
    combine = None if part.count == 1 else _sum_over_processes(pre.grid)
    volumes = normalise_fold(
        list(views.values()), [views[p.id] for p in owned.values()], normalization, combine
    )
    n_classes = label_map.n_classes
    facts = distributed.gather_rows(  # per training subject: voxel size, left-right axis, class counts
        {
            i: [*p.spacing, nifti.lr_axis(p.affine), *losses.class_counts(p.labels, n_classes)]
            for i, p in owned.items()
        },
        len(train_s),
        (4 + n_classes,),
    )
    pick = lambda group: tuple(loaded[s.id].with_input(views[s.id]["x"]) for s in group)  # noqa: E731
    return FoldData(
        root, label_map, pre, mask_note, normalization, volumes,
        split={"train": train_s, "val": val_s, "test": test_s},
        shares=part,
        train_voxel_mm=tuple(round(float(z), 4) for z in np.median(facts[:, :3], axis=0)),
        train_lr_axes=tuple(int(a) for a in facts[:, 3]),
        class_counts=facts[:, 4:].sum(axis=0),
        train=pick(train_s[i] for i in part.train_index),
        val=pick(val_s[j] for j in part.val_index),
        test=pick(s for s in test_s if s.id in loaded),
    )  # fmt: skip


def _read(subjects, label_map, pre) -> dict:
    """{id: ``inputs.load_subject``} of ``subjects``; every process agrees (``distributed.agree``): a bad
    file in one process's share stops every process with exit status 2, not just that one."""
    loaded = {}
    distributed.agree(lambda: loaded.update({s.id: inputs.load_subject(s, label_map, pre) for s in subjects}))
    return loaded


def _sum_over_processes(grid):
    """``voxelwise_stats``'s ``combine``: this process's (sum, squares, count) summed over processes
    (a process that counts no training subject contributes zeros of the ``grid`` shape)."""

    def combine(total, squares, count):
        zeros = np.zeros(grid)
        total, squares = (zeros if total is None else total), (zeros if squares is None else squares)
        count = int(distributed.sum_over_processes(np.array([count]))[0])
        return distributed.sum_over_processes(total), distributed.sum_over_processes(squares), count

    return combine


def fold_mesh(runtime: RuntimeConfig, batch_size: int, grid) -> jax.sharding.Mesh | None:
    """The device mesh of ``runtime.mesh`` (None: one device, no sharding; distributed: all devices on
    "space"), checked against ``batch_size`` and ``grid`` (None: not yet known) before any training
    (InputError otherwise)."""
    if runtime.mesh is None and not distributed.is_running():
        return None
    try:
        mesh = sharding.make_mesh(runtime.mesh)
        if grid is not None:  # an automatic grid: checked again once it is known
            sharding.check_divisible((batch_size, *grid), mesh)
    except ValueError as e:
        raise InputError(str(e), "--mesh") from None
    return mesh


def check_last_batch(views: int, batch_size: int, data: int) -> None:
    """InputError unless the last batch of an epoch (``views`` per epoch in batches of ``batch_size``;
    it may be short) splits evenly over a mesh's ``data`` axis, as every batch must."""
    if views % batch_size % data:
        raise InputError(
            f"the last batch of each epoch has {views % batch_size} of {views} views, not divisible by "
            f"the mesh's data axis ({data}): change --batch-size or --augment-views",
            "--batch-size",
        )


def prob_class_index(cfg: OutputConfig, names: tuple[str, ...]) -> int:
    """The index of the class whose probability map the report draws (``cfg.prob_class`` or the default)."""
    if cfg.prob_class is not None:
        if cfg.prob_class not in names:
            raise InputError(f"prob_class {cfg.prob_class!r} is not a class: {list(names)}", "prob_class")
        return names.index(cfg.prob_class)
    return names.index("vessels") if "vessels" in names else len(names) - 1


def start_weights(cfg: InitConfig, demo: bool, log) -> str | None:
    """The weights a fold starts from: ``cfg.weights`` when given; else weights/glasgow where it exists;
    else, for the demo cohort (``demo``: no dataset given, the cohort the demo builds), weights/demo;
    else "none" (from scratch at ``cfg.n_filters``), said to ``log``. weights/demo is a 12-filter network
    pretrained on 3 template classes: on real anatomy it did worse than a random start on every class
    (docs/data.md, "Which weights a fold starts from"), so it is never the silent start of another dataset."""
    if cfg.weights is not None or demo:
        return cfg.weights
    glasgow = locate_weights(DEFAULT_WEIGHTS[0])
    if glasgow is not None:
        return str(glasgow)
    log(
        f"no Glasgow weights ({DEFAULT_WEIGHTS[0]} missing: 'make weights'): training from scratch at "
        f"n_filters {cfg.n_filters}, not from weights/demo (the demo cohort's toy network, worse than a "
        "random start on real anatomy; --weights weights/demo to use it anyway)"
    )
    return "none"


def fold_loss_config(loss: LossConfig, skeleton_classes, names) -> LossConfig:
    """``loss`` with its skeleton recall classes resolved against the label map's class ``names``:
    ``skeleton_classes`` None = the vessel-like classes (``skeleton.vessel_like_classes``), a list of
    class names = those (InputError naming an unknown one or the background), () = none; its
    thin_classes (what class_weights "thin" weighs) are the vessel-like classes."""
    if skeleton_classes is None:
        indices = skeleton.vessel_like_classes(names)
    else:
        unknown = [c for c in skeleton_classes if c not in names[1:]]
        if unknown:
            raise InputError(
                f"{unknown} not a foreground class of the label map: {list(names[1:])}", "skeleton_classes"
            )
        indices = tuple(names.index(c) for c in skeleton_classes)
    thin = skeleton.vessel_like_classes(names)
    return dataclasses.replace(loss, skeleton_classes=indices, thin_classes=thin)


def fold_augment_config(augment: AugmentConfig, reference_mm: float | None, voxel_mm) -> AugmentConfig:
    """``augment`` for the fold's voxels: with ``reference_mm`` (the voxel size, mm, its voxel ranges were
    set for: the original's 0.63 mm) the shifts (per axis), the elastic sigmas and the Gaussian blend's
    weight are scaled by reference_mm / ``voxel_mm`` (3,) (the training subjects' median), so that they
    stay the same millimetres and the same noise per tissue; the weight is never raised. None: as given."""
    if reference_mm is None:
        return augment
    ratio = float(reference_mm) / np.asarray(voxel_mm, float)
    mean = float(np.mean(ratio))
    return dataclasses.replace(
        augment,
        max_shift_vox=tuple(float(v * r) for v, r in zip(augment.max_shift_vox, ratio, strict=True)),
        elastic_sigmas=tuple(float(v * mean) for v in augment.elastic_sigmas),
        gaussian_weight=float(augment.gaussian_weight * min(mean, 1.0)),
    )


def fold_mirroring(augment: AugmentConfig, mirror: str, lr_axes) -> AugmentConfig:
    """``augment`` with the ``flip_axes`` of config key ``augment_mirror``: "none" as it is, "all" the
    three voxel axes, "lr" the training subjects' left-right axis (``lr_axes``, one per subject); an
    InputError when those differ (volumes stored in different orientations)."""
    if mirror == "none":
        return augment
    if mirror == "all":
        return dataclasses.replace(augment, flip_axes=(0, 1, 2))
    if len(set(lr_axes)) != 1:
        raise InputError(
            f"the training images' left-right axes differ (voxel axes {sorted(set(lr_axes))}): "
            "use augment_mirror all or none, or store them in one orientation",
            "augment_mirror",
        )
    return dataclasses.replace(augment, flip_axes=(int(lr_axes[0]),))


def _initial_network(cfg: InitConfig, n_classes: int, seed: int, log):
    """(weights_path, ckpt, model_config, params, frozen, normalization, why): the initial checkpoint's
    network with ``n_classes`` outputs (or, for weights "none", a random init: from scratch)."""
    key = jax.random.key(seed)
    if cfg.weights == "none":  # from scratch: random init of the config's width, nothing frozen
        model_config = ModelConfig(
            n_filters=cfg.n_filters, n_classes=n_classes, dropout_rate=cfg.dropout_rate
        )
        params, frozen = train.init_from_scratch(model_config, key)
        log(f"training from scratch: random initialisation, n_filters {cfg.n_filters}, no warm-up phase")
        normalization, why = resolve_normalization(cfg.normalization, "zscore")
        return None, None, model_config, params, frozen, normalization, why
    weights_path = find_weights(cfg.weights, log)
    ckpt = load_checkpoint(weights_path, warn=log)  # an undigested one: its warning in the run's log
    model_config = train.finetune_model_config(ckpt, n_classes, cfg.dropout_rate)
    params, frozen = train.load_finetune_init(ckpt, n_classes, cfg.last_layer, key)
    normalization, why = resolve_normalization(cfg.normalization, ckpt.normalization)
    return weights_path, ckpt, model_config, params, frozen, normalization, why


def plan_shares(count: int | None, batch_size: int, mesh, log, n_train: int, n_val: int) -> shares.Shares:
    """This process's subject shares (``shares``): ``count`` of them (config key ``subject_shares``;
    None: one per group of processes along the mesh's "data" axis, or one where the fold's training
    subjects or the batch do not divide among them). InputError for a ``count`` that cannot work."""
    rows = distributed.rows_by_process(batch_size, mesh)
    auto = count is None
    count = shares.process_groups(rows) if auto else count
    try:
        shares.check(count, n_train, batch_size)
    except ValueError as e:
        if not auto:
            raise InputError(str(e), "subject_shares") from None
        log(f"subject shares: 1, not one per process group ({e}): every process reads every subject")
        count = 1
    return shares.plan(count, n_train, n_val, batch_size, rows, distributed.process_index())


def prepare_fold(cfg: TrainConfig, log=print) -> PreparedFold:
    """Every input check and load of fold ``cfg.fold``, writing nothing (InputError on bad input).

    Each step gets only its section of ``cfg`` (data, init, runtime, output; ``config``). The cheap checks
    first (the loss and augmentation sections were checked when ``cfg`` was built): the
    label map, the class whose probability map is drawn, the surface classes, slab streaming against a
    mesh; then the initial network, the normalisation (``resolve_normalization``), the
    subjects (``load_fold``), the memory and the device mesh against the grid.
    """
    t0 = time.perf_counter()
    data, runtime, output, batch = cfg.data_config, cfg.runtime_config, cfg.output_config, cfg.batch_size
    label_map = label_map_of(data)
    k_prob = prob_class_index(output, label_map.names)
    results_page.surface_classes(output.surface_classes, label_map.names)
    if runtime.mesh is not None and runtime.slab_rows:
        raise InputError(
            "slab streaming cannot be combined with --mesh (use one or the other)", "--slab-rows"
        )
    mesh = fold_mesh(runtime, batch, data.grid)
    init = dataclasses.replace(
        cfg.init_config, weights=start_weights(cfg.init_config, data.data is None, log)
    )
    loss = fold_loss_config(cfg.loss_config, cfg.skeleton_classes, label_map.names)
    if loss.uses_skeleton:
        names = ", ".join(label_map.names[k] for k in loss.skeleton_classes)
        log(f"loss: + skeleton recall of {names} (weight {loss.skeleton_weight})")
    if loss.class_weights == "thin":
        thin = ", ".join(label_map.names[k] for k in loss.thin_classes) or "no class (none is vessel-like)"
        log(f"cross-entropy weights: balanced for {thin}, 1 for the others")
    weights_path, ckpt, model_config, params, frozen, normalization, why = _initial_network(
        init, label_map.n_classes, cfg.seed, log
    )
    check_training_fits(runtime, batch, data.grid, label_map.n_classes, model_config.n_filters)
    log(f"input normalisation: {normalization} ({why})")
    plan = functools.partial(plan_shares, data.subject_shares, batch, mesh, log)
    fold = load_fold(data, log, normalization, plan)
    check_training_fits(runtime, batch, fold.grid, label_map.n_classes, model_config.n_filters)
    log(f"brain mask: {fold.preprocessing.mask} ({fold.mask_note})")
    mesh = fold_mesh(runtime, batch, fold.grid)
    augment = fold_augment_config(cfg.augment_config, cfg.augment_voxel_mm, fold.train_voxel_mm)
    if augment != cfg.augment_config:
        log(
            f"augmentation scaled from {cfg.augment_voxel_mm} mm voxels to the fold's "
            f"{'x'.join(f'{v:.2f}' for v in fold.train_voxel_mm)} mm: shifts {augment.max_shift_vox} voxels, "
            f"elastic sigmas {augment.elastic_sigmas}, Gaussian blend {augment.gaussian_weight:.3f}"
        )
    augment = fold_mirroring(augment, cfg.augment_mirror, fold.train_lr_axes)
    if augment.flip_axes:
        log(f"augmentation: mirrored along voxel axes {augment.flip_axes}, each with p {augment.p_flip}")
    if mesh is not None and fold.shares.count == 1:
        check_last_batch(len(fold.train) * cfg.loop.views_per_volume, batch, mesh.shape["data"])
    return PreparedFold(
        weights_path,
        ckpt,
        fold,
        why,
        k_prob,
        mesh,
        model_config,
        params,
        frozen,
        loss,
        augment,
        time.perf_counter() - t0,
    )
