"""One fold of the fine-tuning experiment, end to end: ``train_and_evaluate(config, workdir)`` (the
importable entry the command line calls): inputs (``fold.prepare_fold``) -> warm-up + fine-tuning
(``loop.fit`` with the run directory's hooks, ``runhooks``) -> test predictions, metrics, report; and
``run_cv`` over all folds.

Run directory of a fold (``workdir``; every path in ``rundir.RunDir``): config.json (the run record:
resolved config, git commit, seed), log.txt, metrics.jsonl (one line per epoch), dseg.tsv,
checkpoints/best (the model, ``checkpoint`` format), checkpoints/last (resumable: params, optimizer state,
loop position), predictions/ (the test subject's dseg + probseg NIfTI as ``segment`` writes them),
metrics.json, report.md and figures/. The input normalisation (config key ``normalization``) is in
config.json, metrics.json, report.md and checkpoints/best (with the training subjects' mean/std volumes
when voxelwise, for ``segment``).

Every input is checked (``prepare_fold``; for ``run_cv``, every fold) before the run directory is created,
so a failed check leaves nothing behind. checkpoints/best always holds the parameters the test subject
was predicted with (the initial ones when no epoch ran). A non-finite loss stops the run with
``errors.NonFiniteLoss``: its message (also in log.txt) says which checkpoints are left.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import jax
import numpy as np

from cerebrum_jax import fsafe
from cerebrum_jax.data import bids, inputs, nifti, skeleton
from cerebrum_jax.data import datasets as D
from cerebrum_jax.errors import NonFiniteLoss
from cerebrum_jax.evaluation import metrics
from cerebrum_jax.experiment import results_page, runguard
from cerebrum_jax.experiment.config import TrainConfig
from cerebrum_jax.experiment.fold import PreparedFold, fold_subjects, prepare_fold
from cerebrum_jax.experiment.normalization import describe_normalization
from cerebrum_jax.experiment.rundir import RunDir, RunRecord
from cerebrum_jax.experiment.runguard import guarded, read_json
from cerebrum_jax.experiment.runhooks import RunDirHooks
from cerebrum_jax.experiment.runlog import RunLog, checkpoints_left
from cerebrum_jax.model.checkpoint import save_checkpoint
from cerebrum_jax.parallel import distributed, sharding
from cerebrum_jax.predict import export, predictor
from cerebrum_jax.report import figures as report
from cerebrum_jax.train import losses, streamed
from cerebrum_jax.train import steps as train
from cerebrum_jax.train.loop import LogLines, Phase, Progress, fit

MASK_WORDS = {
    "none": "none: unmasked images, each cropped to its own head-foreground box (no labels used)",
    "file": "the brain-mask files of the dataset",
    "labels": "the manual labels > 0 (the original paper's protocol: the test subject's own labels give "
    "its brain boundary, so the scores are optimistic for new subjects)",
}


def predict_test(
    net: predictor.Model, source: D.Subject, label_map, mesh=None, log=print, tta: str = "none"
) -> tuple[np.ndarray, dict]:
    """The test subject predicted from its raw files exactly as ``segment`` predicts a new volume
    (``predictor.ensemble`` of one; its labels are read only when the mask kind is "labels"), on
    ``mesh`` (a 1xN mesh, or None: this process's first device), averaged over its mirror images along
    ``tta`` (``predictor.mirror_axes`` of its affine); ``log`` hears the line of a grid that cuts the
    head (``inputs.cut_note``).

    Returns (probabilities (D, H, W, C) on the source grid, {"image", "img", "ref" (class indices from
    the label file), "spacing", "tta_axes" (the voxel axes mirrored)} for the evaluation and figures on
    that same grid).
    """
    image, img = nifti.load_nifti(source.image, what="image")
    mask = inputs.read_mask(source.mask, img, net.pre, source.labels)
    warn = lambda text: log(f"{source.image}: warning: {text}")  # noqa: E731
    axes = predictor.mirror_axes(tta, img.affine)
    probs = predictor.ensemble([net], image, img.affine, mask, mesh=mesh, warn=warn, tta_axes=axes)
    ref_raw, _ = nifti.load_nifti(source.labels, what="labels")
    ref = label_map.apply(ref_raw, source.labels)
    spacing = tuple(float(z) for z in img.header.get_zooms()[:3])
    return probs, {"image": image, "img": img, "ref": ref, "spacing": spacing, "tta_axes": axes}


def test_scores(pred, ref, spacing, names) -> dict:
    """``metrics.evaluate`` of the labels ``pred`` against ``ref`` (D, H, W) with voxel ``spacing`` (mm)
    and the class ``names``, plus "centreline": {thin class: ``skeleton.centreline_scores``} for the
    vessel-like classes (how much of their centre line the prediction finds)."""
    result = metrics.evaluate(pred, ref, spacing, dict(enumerate(names)))
    thin = skeleton.vessel_like_classes(names)
    result["centreline"] = {names[k]: skeleton.centreline_scores(pred == k, ref == k) for k in thin}
    return result


def run_record(cfg: TrainConfig, prepared: PreparedFold) -> RunRecord:
    """The facts of this run, once: config.json, metrics.json and the reports are written from them."""
    fold, mesh = prepared.fold, prepared.mesh
    pre = fold.preprocessing
    init_weights, init_note = prepared.initial_weights(cfg.n_filters)
    return RunRecord(
        config=cfg.to_dict(),
        fold=cfg.fold,
        seed=cfg.seed,
        git_commit=bids.git_commit(),
        data=str(fold.root),
        grid=list(fold.grid),
        train_subjects=[s.id for s in fold.split["train"]],
        val_subjects=[s.id for s in fold.split["val"]],
        test_subject=fold.split["test"][0].id,
        normalization=fold.normalization,
        normalization_note=prepared.normalization_note,
        initial_weights=init_weights,
        initial_weights_note=init_note,
        preprocessing=pre.to_dict(),
        brain_mask=f"{pre.mask} ({fold.mask_note})",
        model=dataclasses.asdict(prepared.model_config),
        copied_layers=list(train.copied_layers(cfg.last_layer)) if prepared.ckpt is not None else [],
        labels=fold.label_map.to_source_tsv(),
        jax=jax.__version__,
        devices=[str(d) for d in jax.devices()],
        mesh=dict(mesh.shape) if mesh is not None else None,
        subject_shares=fold.shares.count,
    )


def _best_writer(cfg: TrainConfig, prepared: PreparedFold, record: RunRecord):
    """``save_best(path, params, epoch record)``: checkpoints/best as ``segment`` loads it."""
    fold = prepared.fold
    meta = {
        "description": f"fine-tuned by cerebrum-jax finetune, fold {cfg.fold}",
        "run": record.to_json(),
        # the training volumes' voxel size (median per axis, mm): segment warns on inputs far from it
        "train_voxel_mm": list(fold.train_voxel_mm),
        "tta": cfg.tta,  # how the fold's test subject was predicted: segment does the same by default
    }

    def save_best(path, params, epoch):
        save_checkpoint(
            path,
            params,
            prepared.model_config,
            classes=list(fold.label_map.names),
            normalization=fold.normalization,
            norm_volumes=fold.norm_volumes,
            meta={**meta, "preprocessing": fold.preprocessing.to_dict(), "best_epoch": epoch},
            overwrite=True,
        )

    return save_best


def _train(cfg, run: RunDir, prepared: PreparedFold, record: RunRecord, run_config, log, *, resume, progress):
    """Warm-up (copied layers frozen; none from scratch) and fine-tuning (all layers) through ``loop.fit``
    with the run directory's hooks. Returns (best params, history, phases)."""
    unfrozen = jax.tree_util.tree_map(lambda _: False, prepared.frozen)
    warmup, finetune = cfg.phase("warmup"), cfg.phase("finetune")
    phases = [  # from scratch nothing is copied, so there is nothing to warm up around
        Phase("warmup", warmup.lr, warmup.epochs if prepared.ckpt is not None else 0, prepared.frozen),
        Phase("finetune", finetune.lr, finetune.epochs, unfrozen),
    ]
    save_best = _best_writer(cfg, prepared, record)
    hooks = [
        Progress(progress),
        LogLines(log),
        RunDirHooks(run, save_best if distributed.is_main() else None, resume=resume, log=log),
    ]
    fold = prepared.fold
    try:
        params, history = fit(
            cfg.loop,
            prepared.loss_config,
            prepared.augment_config,
            run_config,
            prepared.params,
            phases,
            [(v.x, v.labels) for v in fold.train],
            [(v.x, v.labels) for v in fold.val],
            hooks=hooks,
            mesh=prepared.mesh,
            shares=fold.shares,
            class_weights=losses.balanced_weights(fold.class_counts),
        )
    except NonFiniteLoss as e:
        message = f"{e}; {checkpoints_left(run, record.initial_weights)}"
        log(message, console=False)
        raise NonFiniteLoss(message) from None
    if distributed.is_main() and not run.has_best():
        # no epoch ran (or none gave a finite val loss): the best is what the test subject is predicted with
        log("no epoch improved on the initial parameters: checkpoints/best holds them")
        save_best(run.best, params, None)
    return params, history, phases


def _start(cfg: TrainConfig, run: RunDir, prepared: PreparedFold, log: RunLog) -> RunRecord:
    """Create the run directory and write what is known before training: config.json, dseg.tsv."""
    distributed.barrier("run directory checked")  # every process checked it before process 0 writes
    run.root.mkdir(parents=True, exist_ok=True)
    log.attach(run.root)
    record = run_record(cfg, prepared)
    label_map = prepared.fold.label_map
    if distributed.is_main() and run.config_json.is_file():  # resumed
        was = read_json(run.config_json, "config.json").get("subject_shares", 1)
        if was != record.subject_shares:  # automatic shares on another layout of processes
            log(
                f"warning: {record.subject_shares} subject share(s) now, {was} before: the remaining epochs "
                f"draw their batches differently (--subject-shares {was} keeps them)"
            )
    if distributed.is_main():
        fsafe.write_text(run.config_json, json.dumps(record.to_json(), indent=2, default=str) + "\n")
        label_map.to_tsv(run.dseg_tsv)
    if distributed.is_running():
        log(f"distributed run, {distributed.describe()}; process 0 writes the run directory")
        log(batch_part(cfg.batch_size, prepared.fold.grid, prepared.mesh))
    log(
        f"fold {cfg.fold}: test {record.test_subject}, train {record.train_subjects}, grid "
        f"{prepared.fold.grid}, {label_map.n_classes} classes, initial weights {record.initial_weights}"
    )
    return record


def batch_part(batch_size: int, grid, mesh) -> str:
    """In words, the part of every (B, D, H, W) training batch that this process augments and hands JAX
    (``distributed.put_batch``): its rows and depth box on ``mesh``."""
    shape = (batch_size, *grid, 1)
    rows = distributed.local_rows(batch_size, mesh)
    depth = distributed.local_bounds(shape, sharding.volume_sharding(mesh))[1]
    return (
        f"batches {shape[:4]}: this process augments rows {rows.start}:{rows.stop} and hands JAX depth "
        f"{depth.start}:{depth.stop} of them"
    )


@guarded  # the run directory's lock for the run; --resume checks
def train_and_evaluate(
    cfg: TrainConfig,
    workdir,
    *,
    resume: bool = False,
    progress: bool = True,
    prepared: PreparedFold | None = None,
    log: RunLog | None = None,
) -> dict:
    """Fine-tune and evaluate fold ``cfg.fold`` in ``workdir``; returns the content of metrics.json.

    All inputs are checked (``prepare_fold``, or ``prepared``: its result for this very config, with the
    ``log`` it wrote to) before ``workdir`` is created. Raises InputError on bad input, and
    ``errors.NonFiniteLoss`` (message also in log.txt) when the loss becomes NaN/inf.
    """
    run = RunDir(Path(workdir))
    runguard.check_run_dir(run.root, resume)
    t = {"start": time.perf_counter()}
    log = log if log is not None else RunLog(progress)
    if prepared is None:
        prepared = prepare_fold(cfg, log)
    else:
        t["start"] -= prepared.seconds
    if cfg.slab_rows is None:  # automatic: slabs for big grids, the plain step for small ones (and meshes)
        auto = 0 if prepared.mesh else streamed.auto_slab_rows(prepared.fold.grid)
        cfg = dataclasses.replace(cfg, slab_rows=auto)
    # how to compute; the checkpoints store the portable float32 config without remat
    run_config = dataclasses.replace(
        prepared.model_config, remat=cfg.remat, compute_dtype=sharding.PRECISIONS[cfg.precision]
    )
    record = _start(cfg, run, prepared, log)
    t["loaded"] = time.perf_counter()
    params, history, phases = _train(
        cfg, run, prepared, record, run_config, log, resume=resume, progress=progress
    )
    t["trained"] = time.perf_counter()
    mesh = prepared.mesh if prepared.mesh is not None and prepared.mesh.shape["data"] == 1 else None
    if distributed.is_main() or mesh is not None:  # a 1xN mesh splits the volume over every process
        net = predictor.Model(params, run_config, prepared.fold.preprocessing, prepared.fold.norm_volumes)
        fold = prepared.fold
        probs, grids = predict_test(net, fold.split["test"][0], fold.label_map, mesh, log, cfg.tta)
    if not distributed.is_main():  # process 0 writes and evaluates; the others wait for its metrics.json
        return distributed.main_result(run.metrics_json)
    result = _evaluate(cfg, run, prepared, record, probs, grids, history, phases, t, log)
    distributed.barrier("main result")
    return result


def _evaluate(cfg, run: RunDir, prepared, record: RunRecord, probs, grids, history, phases, t, log) -> dict:
    """Process 0: the test subject's predictions, metrics.json, report.md, figures and the results page."""
    fold, test = prepared.fold, prepared.fold.test[0]
    names, pre = fold.label_map.names, fold.preprocessing
    fold.label_map.to_tsv(run.predictions / "dseg.tsv")
    prefix = bids.derivative_prefix(test.id, "orig")  # on the test image's own grid, as segment writes
    sidecar = {
        "sources": [bids.source_uri(test.subject.image)],
        "checkpoint": str(run.best.absolute()),
        "classes": list(names),
        "normalization": pre.normalization,
        "brain_mask": pre.needs_mask,
        "tta_axes": grids["tta_axes"],
        "description": f"CEREBRUM-7T prediction of the test subject of fold {cfg.fold} (cerebrum-jax)",
    }
    dseg_path = export.write_segmentation(run.predictions, prefix, probs, grids["img"], sidecar=sidecar)
    t["predicted"] = time.perf_counter()
    grids["pred"] = predictor.labels_from(probs)
    result = test_scores(grids["pred"], grids["ref"], grids["spacing"], names)
    result["tta_axes"] = list(grids["tta_axes"])
    t["evaluated"] = time.perf_counter()
    result.update(
        {
            **record.metrics_fields(),
            "epochs": {p.name: sum(h["phase"] == p.name for h in history) for p in phases},
            "best_val_loss": min((h["val_loss"] for h in history), default=None),
            "timings_s": {
                "load": round(t["loaded"] - t["start"], 2),
                "train": round(t["trained"] - t["loaded"], 2),
                "predict": round(t["predicted"] - t["trained"], 2),
                "evaluate": round(t["evaluated"] - t["predicted"], 2),
                "total": round(time.perf_counter() - t["start"], 2),
            },
        }
    )
    fsafe.write_text(run.metrics_json, json.dumps(result, indent=2) + "\n")
    figures = report.fold_figures(run.root, history, grids, probs, names, prepared.k_prob)
    normalization = describe_normalization(
        record.normalization, record.normalization_note, record.train_subjects, fold.grid, pre.mask
    )
    rows = record.report_rows(normalization, MASK_WORDS[pre.mask], pre.describe())
    rows["test-time mirroring"] = results_page.mirroring_words(cfg.tta, result["tta_axes"])
    rows.update({"epochs": result["epochs"], "timings (s)": result["timings_s"]})
    report.write_report(run.report_md, result, figures, rows)
    info = record.to_json()
    results_page.fold_page(run.root, test, probs, grids, dseg_path, prepared, result, info, figures, cfg, log)
    per_class = ", ".join(f"{n} {report.fmt(m['dice'], 3)}" for n, m in result["classes"].items())
    log(
        f"fold {cfg.fold} ({test.id}): mean Dice {result['mean_dice']:.4f} ({per_class}), "
        f"{result['timings_s']['total']:.0f} s"
    )
    return result


def n_subjects(cfg: TrainConfig) -> int:
    return len(fold_subjects(cfg.data_config, log=lambda _: None)[1])


def run_cv(cfg: TrainConfig, out, *, resume: bool = False, progress: bool = True) -> dict:
    """Every fold into out/fold-K, then out/cv_summary.json and cv_summary.md (mean ± sd across folds).

    Before the first fold trains, every fold's split (e.g. a --val-subject that is some fold's test
    subject) and run directory are checked, and the first fold's inputs in full (data, weights, options:
    all the same for every fold); InputError otherwise, with nothing written.
    """
    out = Path(out)
    _, subjects = fold_subjects(cfg.data_config, log=lambda _: None)
    todo, results = [], {}
    for k in range(1, len(subjects) + 1):
        D.split_fold(subjects, k, cfg.val_subject)
        run = RunDir.fold(out, k)
        if resume and run.metrics_json.is_file():
            results[k] = read_json(run.metrics_json, "metrics.json")
        else:
            runguard.check_run_dir(run.root, resume)
            todo.append(k)
    first = None  # the first fold to train, prepared (checked) before any fold trains
    if todo:
        log = RunLog(progress)
        first = {"prepared": prepare_fold(dataclasses.replace(cfg, fold=todo[0]), log), "log": log}
    for k in todo:
        kw, first = first or {}, None
        fold_cfg = dataclasses.replace(cfg, fold=k)
        results[k] = train_and_evaluate(
            fold_cfg, RunDir.fold(out, k).root, resume=resume, progress=progress, **kw
        )
    summary = report.cv_summary([results[k] for k in sorted(results)])
    if distributed.is_main():
        fsafe.write_text(out / "cv_summary.json", json.dumps(summary, indent=2) + "\n")
        fsafe.write_text(out / "cv_summary.md", report.cv_summary_markdown(summary))
        results_page.cv_page(out, summary, [results[k] for k in sorted(results)])
    return summary
