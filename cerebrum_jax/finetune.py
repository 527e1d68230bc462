"""One fold of the fine-tuning experiment, end to end: data -> warm-up + fine-tuning -> test predictions,
metrics, report; and ``run_cv`` over all folds.

Run directory of a fold (``workdir``): config.json (resolved config, git commit, seed), log.txt,
metrics.jsonl (one line per epoch), dseg.tsv, checkpoints/best (the model, ``checkpoint`` format),
checkpoints/last (resumable: params, optimizer state, loop position), predictions/ (the test subject's
dseg + probseg NIfTI as ``segment`` writes them), metrics.json, report.md and figures/. The input
normalisation (config key ``normalization``) is in config.json, metrics.json, report.md and
checkpoints/best (with the training subjects' mean/std volumes when voxelwise, for ``segment``).

Every input is checked (``prepare_fold``; for ``run_cv``, every fold) before the run directory is created,
so a failed check leaves nothing behind. checkpoints/best always holds the parameters the test subject
was predicted with (the initial ones when no epoch ran). A non-finite loss stops the run with
``train.NonFiniteLoss``: its message (also in log.txt) says which checkpoints are left.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import jax
import numpy as np

from cerebrum_jax import (
    bids,
    distributed,
    fsafe,
    inputs,
    losses,
    metrics,
    nifti,
    predictor,
    preprocess,
    report,
    results_page,
    runguard,
    sharding,
    streamed,
    train,
)
from cerebrum_jax import data as D
from cerebrum_jax.augment import AugmentConfig
from cerebrum_jax.checkpoint import load_checkpoint, save_checkpoint
from cerebrum_jax.config import REPO, TrainConfig
from cerebrum_jax.errors import InputError
from cerebrum_jax.labels import LabelMap, edit_label_map, get_label_map
from cerebrum_jax.model import ModelConfig
from cerebrum_jax.runguard import check_training_fits, guarded, read_json
from cerebrum_jax.runlog import RunLog, checkpoints_left

DEFAULT_WEIGHTS = ("weights/glasgow", "weights/demo")
MASK_WORDS = {
    "none": "none: unmasked images, each cropped to its own head-foreground box (no labels used)",
    "file": "the brain-mask files of the dataset",
    "labels": "the manual labels > 0 (the original paper's protocol: the test subject's own labels give "
    "its brain boundary, so the scores are optimistic for new subjects)",
}


# ----------------------------------------------------------------------------------------------------------
# Inputs


def find_weights(weights: str | None, log=print) -> Path:
    """The initial checkpoint: ``weights``, else weights/glasgow, else weights/demo (saying so)."""
    if weights is not None:
        return Path(weights)
    for base in (Path.cwd(), REPO):
        if (base / DEFAULT_WEIGHTS[0]).is_dir():
            return base / DEFAULT_WEIGHTS[0]
    for base in (Path.cwd(), REPO):
        if (base / DEFAULT_WEIGHTS[1]).is_dir():
            log(f"no Glasgow weights (weights/glasgow missing): starting from {base / DEFAULT_WEIGHTS[1]}")
            return base / DEFAULT_WEIGHTS[1]
    raise InputError("no initial weights: neither weights/glasgow nor weights/demo exists", "--weights")


def label_map_of(cfg: TrainConfig) -> LabelMap:
    return edit_label_map(get_label_map(cfg.labels), cfg.drop_labels, cfg.merge_labels)


def fold_subjects(cfg: TrainConfig, log=print) -> tuple[Path, list[D.Subject]]:
    """(dataset root, its subjects in sorted order): ``cfg.data`` read with the config's layout, contrast,
    seg_name and mask_name, or the offline demo cohort (built on first use) when data is None."""
    if cfg.data is None:
        from cerebrum_jax.demo import ensure_demo_cohort

        root = distributed.main_first(ensure_demo_cohort, cfg.demo_root)  # built once, by process 0
        log(f"data: the offline demo cohort at {root} (template-derived, not 7T data)")
    else:
        root = Path(cfg.data)
    return root, D.find_subjects(root, cfg.layout, cfg.contrast, cfg.seg_name, cfg.mask_name)


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


def load_fold(cfg: TrainConfig, log=print, normalization: str = "zscore") -> dict:
    """Subjects of fold ``cfg.fold`` read and prepared (all input checks happen here, before training).

    Every subject, the test subject too, is prepared by ``inputs.load_subject`` with one
    ``inputs.Preprocessing`` (mask kind ``resolve_test_mask``, crop to a box + margin, the grid,
    voxel size, ``normalization``), the record the fold's checkpoint keeps for ``segment``.
    Returns dict: root, label_map, train / val / test (lists of ``load_subject`` dicts, each with "x"
    (D, H, W) float32: the image normalised by ``preprocess.normalise_fold``, whose volumes come from the
    train list only), grid, normalization, norm_volumes ({"mean", "std"} or None), preprocessing,
    mask_note (why that mask kind).
    """
    root, subjects = fold_subjects(cfg, log)
    train_s, val_s, test_s = D.split_fold(subjects, cfg.fold, cfg.val_subject)
    label_map = label_map_of(cfg)
    mask, mask_note = resolve_test_mask(cfg.test_mask, subjects)
    pre = inputs.Preprocessing(
        mask=mask, crop="box", margin=cfg.margin, grid=cfg.grid, voxel_mm=cfg.voxel_mm,
        normalization=normalization,
    )  # fmt: skip
    if pre.grid is None:  # the largest box over all subjects, rounded up to multiples of 8
        shapes = [inputs.load_subject(s, label_map, pre)["image"].shape for s in subjects]
        pre = dataclasses.replace(pre, grid=tuple(int(g) for g in np.max(shapes, axis=0)))
    loaded = {s.id: inputs.load_subject(s, label_map, pre) for s in subjects}
    pick = lambda group: [loaded[s.id] for s in group]  # noqa: E731
    volumes = preprocess.normalise_fold(list(loaded.values()), pick(train_s), normalization)
    return {
        "normalization": normalization,
        "norm_volumes": volumes,
        "preprocessing": pre,
        "mask_note": mask_note,
        "root": root,
        "label_map": label_map,
        "grid": pre.grid,
        "train": pick(train_s),
        "val": pick(val_s),
        "test": pick(test_s),
    }


# ----------------------------------------------------------------------------------------------------------
# Test subject: predictions, metrics, figures


def fold_mesh(cfg: TrainConfig, grid) -> jax.sharding.Mesh | None:
    """The device mesh of ``cfg.mesh`` (None: one device, no sharding; distributed: all devices on "space"),
    checked against the batch size and ``grid`` before any training (InputError otherwise)."""
    if cfg.mesh is None and not distributed.is_running():
        return None
    try:
        mesh = sharding.make_mesh(cfg.mesh)
        sharding.check_divisible((cfg.batch_size, *grid), mesh)
    except ValueError as e:
        raise InputError(str(e), "--mesh") from None
    return mesh


def predict_test(net: predictor.Model, subject: dict, mesh=None) -> tuple[np.ndarray, dict]:
    """The test subject predicted from its raw files exactly as ``segment`` predicts a new volume
    (``predictor.ensemble`` of one; its labels are read only when the mask kind is "labels").

    Returns (probabilities (D, H, W, C) on the source grid, {"image", "img", "ref" (class indices from
    the label file), "spacing"} for the evaluation and figures on that same grid).
    """
    source = subject["subject"]
    image, img = nifti.load_nifti(source.image, what="image")
    mask = inputs.read_mask(source.mask, img, net.pre, source.labels)
    if mesh is not None and mesh.shape["data"] != 1:
        mesh = None  # one volume: only a 1xN mesh splits it
    probs = predictor.ensemble([net], image, img.affine, mask, mesh=mesh)
    ref_raw, _ = nifti.load_nifti(source.labels, what="labels")
    ref = subject["label_map"].apply(ref_raw, source.labels)
    spacing = tuple(float(z) for z in img.header.get_zooms()[:3])
    return probs, {"image": image, "img": img, "ref": ref, "spacing": spacing}


def prob_class_index(cfg: TrainConfig, names: tuple[str, ...]) -> int:
    if cfg.prob_class is not None:
        if cfg.prob_class not in names:
            raise InputError(f"prob_class {cfg.prob_class!r} is not a class: {list(names)}", "prob_class")
        return names.index(cfg.prob_class)
    return names.index("vessels") if "vessels" in names else len(names) - 1


# ----------------------------------------------------------------------------------------------------------
# One fold, all folds


def prepare_fold(cfg: TrainConfig, log=print) -> dict:
    """Every input check and load of fold ``cfg.fold``, writing nothing (InputError on bad input).

    Initial weights found and loaded (or, for weights "none", a random init: training from scratch), the
    normalisation resolved (``preprocess.resolve_normalization``), subjects read and prepared
    (``load_fold``), loss and augmentation options, the class whose probability map is drawn, the device
    mesh against the grid, and the new network's parameters. Returns dict: weights_path (None from
    scratch), ckpt (None from scratch), fold (``load_fold``), normalization_note (why that
    normalisation), k_prob, mesh, model_config, params, frozen, seconds.
    """
    t0 = time.perf_counter()
    losses.LossConfig(cfg.loss, cfg.class_weights)  # the cheap checks first
    AugmentConfig.from_dict(dict(cfg.augment), "augment")
    n_classes = label_map_of(cfg).n_classes
    k_prob = prob_class_index(cfg, label_map_of(cfg).names)
    results_page.surface_classes(cfg.surface_classes, label_map_of(cfg).names)
    if cfg.mesh is not None and cfg.slab_rows:
        raise InputError(
            "slab streaming cannot be combined with --mesh (use one or the other)", "--slab-rows"
        )
    if cfg.grid is not None:
        fold_mesh(cfg, cfg.grid)
    dropout = 0.1 if cfg.dropout else 0.0
    if cfg.weights == "none":  # from scratch: random init of the config's width, nothing frozen
        weights_path, ckpt = None, None
        model_config = ModelConfig(n_filters=cfg.n_filters, n_classes=n_classes, dropout_rate=dropout)
        check_training_fits(cfg, cfg.grid, n_classes, cfg.n_filters)
        params, frozen = train.init_from_scratch(model_config, jax.random.key(cfg.seed))
        log(f"training from scratch: random initialisation, n_filters {cfg.n_filters}, no warm-up phase")
        normalization, why = preprocess.resolve_normalization(cfg.normalization, "zscore")
    else:
        weights_path = find_weights(cfg.weights, log)
        ckpt = load_checkpoint(weights_path)
        check_training_fits(cfg, cfg.grid, n_classes, ckpt.config.n_filters)
        model_config = train.finetune_model_config(ckpt, n_classes, dropout)
        params, frozen = train.load_finetune_init(ckpt, n_classes, cfg.last_layer, jax.random.key(cfg.seed))
        normalization, why = preprocess.resolve_normalization(cfg.normalization, ckpt.normalization)
    log(f"input normalisation: {normalization} ({why})")
    fold = load_fold(cfg, log, normalization)
    check_training_fits(cfg, fold["grid"], n_classes, model_config.n_filters)
    log(f"brain mask: {fold['preprocessing'].mask} ({fold['mask_note']})")
    mesh = fold_mesh(cfg, fold["grid"])
    return {
        "weights_path": weights_path,
        "ckpt": ckpt,
        "fold": fold,
        "normalization_note": why,
        "k_prob": k_prob,
        "mesh": mesh,
        "model_config": model_config,
        "params": params,
        "frozen": frozen,
        "seconds": time.perf_counter() - t0,
    }


def initial_weights_text(prepared: dict, cfg: TrainConfig) -> tuple[str, str]:
    """(initial weights, their note) in words, for config.json, metrics.json and the report."""
    if prepared["ckpt"] is None:
        return "none", f"trained from scratch: random initialisation, n_filters {cfg.n_filters}, no warm-up"
    return str(Path(prepared["weights_path"]).absolute()), prepared["ckpt"].meta.get("description", "")


@guarded  # the run directory's lock for the run; --resume checks
def run_fold(
    cfg: TrainConfig,
    workdir,
    *,
    resume: bool = False,
    progress: bool = True,
    prepared: dict | None = None,
    log: RunLog | None = None,
) -> dict:
    """Fine-tune and evaluate fold ``cfg.fold`` in ``workdir``; returns the content of metrics.json.

    All inputs are checked (``prepare_fold``, or ``prepared``: its result for this very config, with the
    ``log`` it wrote to) before ``workdir`` is created. Raises InputError on bad input, and
    ``train.NonFiniteLoss`` (message also in log.txt) when the loss becomes NaN/inf.
    """
    run_dir = Path(workdir)
    runguard.check_run_dir(run_dir, resume)
    t_start = time.perf_counter()
    log = log if log is not None else RunLog(progress)
    if prepared is None:
        prepared = prepare_fold(cfg, log)
    else:
        t_start -= prepared["seconds"]
    ckpt, fold = prepared["ckpt"], prepared["fold"]
    mesh, model_config = prepared["mesh"], prepared["model_config"]
    params, frozen = prepared["params"], prepared["frozen"]
    label_map, names = fold["label_map"], fold["label_map"].names
    test = fold["test"][0]
    if cfg.slab_rows is None:  # automatic: slabs for big grids, the plain step for small ones (and meshes)
        cfg = dataclasses.replace(cfg, slab_rows=0 if mesh else streamed.auto_slab_rows(fold["grid"]))
    # how to compute; the checkpoints store the portable float32 config without remat
    run_config = dataclasses.replace(
        model_config, remat=cfg.remat, compute_dtype=sharding.PRECISIONS[cfg.precision]
    )
    distributed.barrier("run directory checked")  # every process checked it before process 0 writes
    run_dir.mkdir(parents=True, exist_ok=True)
    log.attach(run_dir)
    init_weights, init_note = initial_weights_text(prepared, cfg)
    pre = fold["preprocessing"]
    info = {
        "config": cfg.to_dict(),
        "fold": cfg.fold,
        "seed": cfg.seed,
        "git_commit": bids.git_commit(),
        "data": str(fold["root"]),
        "grid": list(fold["grid"]),
        "train_subjects": [v["id"] for v in fold["train"]],
        "val_subjects": [v["id"] for v in fold["val"]],
        "test_subject": test["id"],
        "normalization": fold["normalization"],
        "normalization_note": prepared["normalization_note"],
        "initial_weights": init_weights,
        "initial_weights_note": init_note,
        "preprocessing": pre.to_dict(),
        "brain_mask": f"{pre.mask} ({fold['mask_note']})",
        "model": dataclasses.asdict(model_config),
        "copied_layers": list(train.copied_layers(cfg.last_layer)) if ckpt is not None else [],
        "labels": label_map.to_source_tsv(),
        "jax": jax.__version__,
        "devices": [str(d) for d in jax.devices()],
        "mesh": dict(mesh.shape) if mesh is not None else None,
    }
    if distributed.is_main():
        fsafe.write_text(run_dir / "config.json", json.dumps(info, indent=2, default=str) + "\n")
        label_map.to_tsv(run_dir / "dseg.tsv")
    if distributed.is_running():
        log(f"distributed run, {distributed.describe()}; process 0 writes the run directory")
    log(
        f"fold {cfg.fold}: test {test['id']}, train {info['train_subjects']}, grid {fold['grid']}, "
        f"{label_map.n_classes} classes, initial weights {init_weights}"
    )
    t_loaded = time.perf_counter()
    unfrozen = jax.tree_util.tree_map(lambda _: False, frozen)
    phases = [  # from scratch nothing is copied, so there is nothing to warm up around
        train.Phase("warmup", cfg.lr_warmup, cfg.epochs_warmup if ckpt is not None else 0, frozen),
        train.Phase("finetune", cfg.lr_finetune, cfg.epochs_finetune, unfrozen),
    ]
    meta = {"description": f"fine-tuned by cerebrum-jax finetune, fold {cfg.fold}", "run": info}

    def save_best(p, record):
        save_checkpoint(
            run_dir / "checkpoints" / "best",
            p,
            model_config,
            classes=list(names),
            normalization=fold["normalization"],
            norm_volumes=fold["norm_volumes"],
            meta={**meta, "preprocessing": pre.to_dict(), "best_epoch": record},
            overwrite=True,
        )

    try:
        params, history = train.fit(
            cfg,
            run_config,
            params,
            phases,
            fold,
            run_dir,
            log=log,
            resume=resume,
            save_best=save_best if distributed.is_main() else None,
            progress=progress,
            mesh=mesh,
        )
    except train.NonFiniteLoss as e:
        message = f"{e}; {checkpoints_left(run_dir, init_weights)}"
        log(message, console=False)
        raise train.NonFiniteLoss(message) from None
    if distributed.is_main() and not (run_dir / "checkpoints" / "best" / "cerebrum.json").is_file():
        # no epoch ran (or none gave a finite val loss): the best is what the test subject is predicted with
        log("no epoch improved on the initial parameters: checkpoints/best holds them")
        save_best(params, None)
    t_trained = time.perf_counter()
    net = predictor.Model(params, run_config, pre, fold["norm_volumes"])
    probs, grids = predict_test(net, test, mesh)
    if not distributed.is_main():  # process 0 writes and evaluates; the others wait for its metrics.json
        return distributed.main_result(run_dir / "metrics.json")
    out = run_dir / "predictions"
    label_map.to_tsv(out / "dseg.tsv")
    prefix = bids.derivative_prefix(test["id"], "orig")  # on the test image's own grid, as segment writes
    sidecar = {
        "sources": [bids.source_uri(test["subject"].image)],
        "checkpoint": str((run_dir / "checkpoints" / "best").absolute()),
        "classes": list(names),
        "normalization": pre.normalization,
        "brain_mask": pre.needs_mask,
        "description": f"CEREBRUM-7T prediction of the test subject of fold {cfg.fold} (cerebrum-jax)",
    }
    dseg_path = predictor.write_segmentation(out, prefix, probs, grids["img"], sidecar=sidecar)
    t_predicted = time.perf_counter()
    grids["pred"] = predictor.labels_from(probs)
    result = metrics.evaluate(grids["pred"], grids["ref"], grids["spacing"], dict(enumerate(names)))
    t_evaluated = time.perf_counter()
    result.update(
        {
            "fold": cfg.fold,
            "test_subject": test["id"],
            "normalization": fold["normalization"],
            "brain_mask": info["brain_mask"],
            "initial_weights": info["initial_weights"],
            "initial_weights_note": init_note,
            "epochs": {p.name: sum(h["phase"] == p.name for h in history) for p in phases},
            "best_val_loss": min((h["val_loss"] for h in history), default=None),
            "timings_s": {
                "load": round(t_loaded - t_start, 2),
                "train": round(t_trained - t_loaded, 2),
                "predict": round(t_predicted - t_trained, 2),
                "evaluate": round(t_evaluated - t_predicted, 2),
                "total": round(time.perf_counter() - t_start, 2),
            },
        }
    )
    fsafe.write_text(run_dir / "metrics.json", json.dumps(result, indent=2) + "\n")
    figures = report.fold_figures(run_dir, history, grids, probs, names, prepared["k_prob"])
    report.write_report(
        run_dir / "report.md",
        result,
        figures,
        {
            "title": f"cerebrum-jax fine-tuning, fold {cfg.fold}",
            "fold": cfg.fold,
            "test subject": test["id"],
            "training subjects": ", ".join(info["train_subjects"]),
            "input normalisation": preprocess.describe_normalization(
                fold["normalization"], info["normalization_note"], info["train_subjects"], fold["grid"]
            ),
            "brain mask (all subjects, the test subject too)": MASK_WORDS[pre.mask],
            "preprocessing": pre.describe(),
            "initial weights": info["initial_weights"],
            "initial weights note": init_note,
            "git commit": info["git_commit"],
            "seed": cfg.seed,
            "epochs": result["epochs"],
            "timings (s)": result["timings_s"],
        },
    )
    results_page.fold_page(run_dir, test, probs, grids, dseg_path, prepared, result, info, figures, cfg, log)
    per_class = ", ".join(f"{n} {report.fmt(m['dice'], 3)}" for n, m in result["classes"].items())
    log(
        f"fold {cfg.fold} ({test['id']}): mean Dice {result['mean_dice']:.4f} ({per_class}), "
        f"{result['timings_s']['total']:.0f} s"
    )
    distributed.barrier("main result")
    return result


def n_subjects(cfg: TrainConfig) -> int:
    return len(fold_subjects(cfg, log=lambda _: None)[1])


def run_cv(cfg: TrainConfig, out, *, resume: bool = False, progress: bool = True) -> dict:
    """Every fold into out/fold-K, then out/cv_summary.json and cv_summary.md (mean ± sd across folds).

    Before the first fold trains, every fold's split (e.g. a --val-subject that is some fold's test
    subject) and run directory are checked, and the first fold's inputs in full (data, weights, options:
    all the same for every fold); InputError otherwise, with nothing written.
    """
    out = Path(out)
    _, subjects = fold_subjects(cfg, log=lambda _: None)
    todo, results = [], {}
    for k in range(1, len(subjects) + 1):
        D.split_fold(subjects, k, cfg.val_subject)
        fold_dir = out / f"fold-{k}"
        if resume and (fold_dir / "metrics.json").is_file():
            results[k] = read_json(fold_dir / "metrics.json", "metrics.json")
        else:
            runguard.check_run_dir(fold_dir, resume)
            todo.append(k)
    first = None  # the first fold to train, prepared (checked) before any fold trains
    if todo:
        log = RunLog(progress)
        first = {"prepared": prepare_fold(dataclasses.replace(cfg, fold=todo[0]), log), "log": log}
    for k in todo:
        kw, first = first or {}, None
        fold_cfg = dataclasses.replace(cfg, fold=k)
        results[k] = run_fold(fold_cfg, out / f"fold-{k}", resume=resume, progress=progress, **kw)
    summary = report.cv_summary([results[k] for k in sorted(results)])
    if distributed.is_main():
        fsafe.write_text(out / "cv_summary.json", json.dumps(summary, indent=2) + "\n")
        fsafe.write_text(out / "cv_summary.md", report.cv_summary_markdown(summary))
        results_page.cv_page(out, summary, [results[k] for k in sorted(results)])
    return summary
