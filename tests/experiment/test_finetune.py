"""One fold on a tiny synthetic Schneider-layout dataset: ``finetune.train_and_evaluate`` and
``fold.prepare_fold`` called directly, and ``cerebrum-jax finetune`` end to end (argv, exit statuses)."""

import json

import jax
import nibabel as nib
import numpy as np
import pytest

from cerebrum_jax.cli import main
from cerebrum_jax.data import bids
from cerebrum_jax.errors import InputError
from cerebrum_jax.experiment import config, finetune
from cerebrum_jax.experiment.fold import label_map_of, load_fold, prepare_fold
from cerebrum_jax.experiment.rundir import RunDir
from cerebrum_jax.model import checkpoint
from cerebrum_jax.model.network import ModelConfig, init_params
from cerebrum_jax.train import steps as train

SHAPE = (16, 16, 16)


def _subject(root, sid, seed, shape=SHAPE, label_max=3):
    """Nested boxes: WM (1) inside GM (2) inside CSF (3); intensities per class plus noise."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.uint8)
    c = np.array(shape) // 2 + rng.integers(-1, 2, 3)
    zz, yy, xx = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    r = np.sqrt((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2)
    for value, radius in ((3, 6), (2, 4.5), (1, 2.5)):
        labels[r < radius] = min(value, label_max)
    image = (np.array([0, 300, 200, 100], np.float32)[labels] + rng.normal(0, 10, shape)).astype(np.float32)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    base = root / "derivatives" / sid
    (base / "unbiased").mkdir(parents=True)
    (base / "labeled").mkdir(parents=True)
    nib.save(nib.Nifti1Image(image, affine), base / "unbiased" / f"{sid}_uni_unbiased.nii.gz")
    nib.save(nib.Nifti1Image(labels, affine), base / "labeled" / f"{sid}_labels_v01.nii.gz")
    return base


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    for i in range(3):
        _subject(root, f"sub-{i + 1:03d}", i)
    return root


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    cfg = ModelConfig(n_filters=2, n_classes=3)
    path = tmp_path_factory.mktemp("w") / "ckpt"
    checkpoint.save_checkpoint(path, init_params(cfg, jax.random.key(3)), cfg, meta={"description": "tiny"})
    return path


def _args(dataset, weights, out, *extra):
    return [
        "finetune",
        "--config",
        "demo",
        "--data",
        str(dataset),
        "--weights",
        str(weights),
        "--out",
        str(out),
        "--grid",
        "16,16,16",
        "--epochs",
        "1",
        "--augment-views",
        "1",
        "--no-progress",
        *extra,
    ]


@pytest.mark.slow  # a whole fold (or more) through the command line
def test_one_fold_end_to_end(dataset, weights, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative --out, as `make finetune` passes (Orbax needs absolute paths)
    out = tmp_path / "run"
    assert main(_args(dataset, weights, "run", "--fold", "2")) == 0
    fold = out / "fold-2"
    for name in (
        "config.json",
        "log.txt",
        "metrics.jsonl",
        "dseg.tsv",
        "metrics.json",
        "report.md",
        "figures/training_curves.png",
        "figures/segmentation.png",
        "figures/probability.png",
        "checkpoints/best/cerebrum.json",
        "checkpoints/last/loop.json",
        "predictions/sub-002_space-orig_desc-cerebrum_dseg.nii.gz",
        "predictions/sub-002_space-orig_desc-cerebrum_probseg.nii.gz",
    ):
        assert (fold / name).is_file(), name
    metrics = json.loads((fold / "metrics.json").read_text())
    assert metrics["fold"] == 2 and metrics["test_subject"] == "sub-002"
    assert set(metrics["classes"]) == {"background", "white matter", "grey matter", "cerebrospinal fluid"}
    assert metrics["initial_weights"].endswith("ckpt") and metrics["epochs"] == {"warmup": 1, "finetune": 1}
    history = [json.loads(line) for line in (fold / "metrics.jsonl").read_text().splitlines()]
    assert [h["phase"] for h in history] == ["warmup", "finetune"]
    cfg = json.loads((fold / "config.json").read_text())
    assert cfg["test_subject"] == "sub-002" and "sub-002" not in cfg["train_subjects"] + cfg["val_subjects"]
    assert cfg["seed"] == 0 and cfg["config"]["grid"] == [16, 16, 16]
    src = nib.load(dataset / "derivatives/sub-002/unbiased/sub-002_uni_unbiased.nii.gz")
    dseg = nib.load(fold / "predictions/sub-002_space-orig_desc-cerebrum_dseg.nii.gz")
    prob = nib.load(fold / "predictions/sub-002_space-orig_desc-cerebrum_probseg.nii.gz")
    assert dseg.shape == SHAPE and prob.shape == (*SHAPE, 4) and np.allclose(dseg.affine, src.affine)
    np.testing.assert_allclose(prob.get_fdata().sum(-1), 1.0, atol=1e-4)
    best = checkpoint.load_checkpoint(fold / "checkpoints/best")
    assert best.config.n_classes == 4 and best.classes[3] == "cerebrospinal fluid"
    train_mm = [nib.load(dataset / f"derivatives/{s}/unbiased/{s}_uni_unbiased.nii.gz").header.get_zooms()[:3]
                for s in cfg["train_subjects"]]  # fmt: skip
    np.testing.assert_allclose(best.meta["train_voxel_mm"], np.median(train_mm, axis=0), atol=1e-4)
    assert best.normalization == metrics["normalization"] == "zscore"  # auto: the initial checkpoint's
    assert "mean Dice" in capsys.readouterr().out
    # one prediction path: segment with the fold's checkpoint on the raw test image gives its labels
    assert cfg["preprocessing"]["mask"] == "none" and cfg["brain_mask"].startswith("none (auto")
    raw = dataset / "derivatives/sub-002/unbiased/sub-002_uni_unbiased.nii.gz"
    assert main(["segment", str(raw), "--weights", str(fold / "checkpoints/best"), "--out", "seg"]) == 0
    seg = nib.load(tmp_path / "seg" / "sub-002_space-orig_desc-cerebrum_dseg.nii.gz")
    np.testing.assert_array_equal(np.asarray(seg.dataobj), np.asarray(dseg.dataobj))
    np.testing.assert_allclose(seg.affine, dseg.affine)
    report_md = (fold / "report.md").read_text()
    assert "| brain mask (all subjects, the test subject too) | none: unmasked" in report_md
    assert (
        "| input normalisation | zscore (per volume, inside its head foreground (no brain mask)" in report_md
    )
    # the results page (issue 10): report.html, surfaces, the class panel, a BIDS derivative run directory
    sidecar = "predictions/sub-002_space-orig_desc-cerebrum_dseg.json"
    for name in (
        "report.html",
        "figures/class_panel.png",
        "surfaces/surfaces.json",
        "dataset_description.json",
        sidecar,
    ):
        assert (fold / name).is_file(), name
    assert bids.validate_dataset(fold) == []
    surf = json.loads((fold / "surfaces/surfaces.json").read_text())
    assert [r["class"] for r in surf] == ["white matter", "grey matter"]
    assert "## Surfaces" in (fold / "report.md").read_text()
    # a second run into the same directory needs --resume; resuming a finished run only re-evaluates
    assert main(_args(dataset, weights, "run", "--fold", "2")) == 2
    assert main(_args(dataset, weights, "run", "--fold", "2", "--resume")) == 0
    again = [json.loads(line) for line in (fold / "metrics.jsonl").read_text().splitlines()]
    assert again == history


def _assert_same_curve(ours: list[dict], plain: list[dict]) -> None:
    """The epoch records of two runs whose steps differ only in how they sum (streamed or sharded vs the
    plain step), with one training step per epoch. The first epoch's training loss is the loss before
    any update: float rounding only, rel 1e-4. Every loss after an update at rel 1e-3, the scale of one
    Adam step (lr 1e-3 here): the two runs' updates differ by what Adam makes of the gradients' rounding
    (tolerances.adam_update_bound), up to 2 lr for an element whose gradient is within rounding of zero,
    i.e. a whole step of that element, which float rounding does not bound (seen: ~3e-6 on a Xeon)."""
    assert len(ours) == len(plain)
    for n, (a, b) in enumerate(zip(ours, plain, strict=True)):
        assert (a["phase"], a["epoch"]) == (b["phase"], b["epoch"])
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4 if n == 0 else 1e-3), a
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-3), a


@pytest.mark.slow
def test_one_fold_through_the_streamed_step(dataset, weights, tmp_path):
    """--slab-rows 8 on a 16-row grid: two slabs per volume in training and validation, the lean forward
    for the test subject; config.json records it; the losses are the plain step's (to float rounding)."""
    runs = {}
    for slab in ("8", "0"):
        out = tmp_path / f"slab{slab}"
        # batches of both training subjects: one step per epoch, so the first epoch's training loss is
        # the loss before any update (_assert_same_curve)
        args = _args(dataset, weights, out, "--fold", "1", "--slab-rows", slab, "--batch-size", "2")
        assert main(args) == 0
        fold = out / "fold-1"
        assert json.loads((fold / "config.json").read_text())["config"]["slab_rows"] == int(slab)
        assert (fold / "report.md").is_file() and (
            fold / "predictions/sub-001_space-orig_desc-cerebrum_dseg.nii.gz"
        ).is_file()
        runs[slab] = [json.loads(line) for line in (fold / "metrics.jsonl").read_text().splitlines()]
    _assert_same_curve(runs["8"], runs["0"])


@pytest.mark.slow
def test_automatic_slab_rows_is_recorded(dataset, weights, tmp_path):
    """No --slab-rows: a 16^3 grid is small, so the plain step (0) runs and config.json says so."""
    out = tmp_path / "auto"
    assert main(_args(dataset, weights, out, "--fold", "3", "--epochs", "0")) == 0
    assert json.loads((out / "fold-3/config.json").read_text())["config"]["slab_rows"] == 0


@pytest.mark.slow  # a whole fold (or more) through the command line
def test_voxelwise_normalisation_from_the_training_subjects_reaches_segment(
    dataset, weights, tmp_path, capsys
):
    """--set normalization=voxelwise: every subject is normalised with the mean/std volumes of the fold's
    training subjects (on the grid, brain-masked), which checkpoints/best carries and segment applies."""
    out = tmp_path / "run"
    extra = ["--fold", "2", "--set", "normalization=voxelwise", "--set", "epochs_finetune=0"]
    extra += ["--test-mask", "labels"]  # the paper's protocol: every subject masked by its labels
    assert main(_args(dataset, weights, out, *extra)) == 0
    fold = out / "fold-2"
    best = checkpoint.load_checkpoint(fold / "checkpoints" / "best")
    assert best.normalization == "voxelwise" and best.norm_volumes["mean"].shape == SHAPE

    def masked(sid):  # the brain box + margin 4 is the whole 16^3 grid: only the mask applies
        base = dataset / "derivatives" / sid
        image = nib.load(base / "unbiased" / f"{sid}_uni_unbiased.nii.gz")
        labels = nib.load(base / "labeled" / f"{sid}_labels_v01.nii.gz").get_fdata()
        return np.where(labels > 0, image.get_fdata(), 0.0), image.affine

    images = {sid: masked(sid)[0] for sid in ("sub-001", "sub-002", "sub-003")}
    train_images = [images["sub-001"], images["sub-003"]]  # fold 2 tests sub-002
    np.testing.assert_allclose(best.norm_volumes["mean"], np.mean(train_images, axis=0), atol=1e-3)
    assert not np.allclose(best.norm_volumes["mean"], np.mean(list(images.values()), axis=0), atol=1.0)
    std = np.std(train_images, axis=0)
    np.testing.assert_allclose(best.norm_volumes["std"], np.where(std == 0, 1, std), rtol=1e-4, atol=1e-3)
    cfg = json.loads((fold / "config.json").read_text())
    assert cfg["train_subjects"] == ["sub-001", "sub-003"] and cfg["config"]["normalization"] == "voxelwise"
    assert cfg["normalization"] == "voxelwise" and cfg["normalization_note"] == "set in the config"
    assert json.loads((fold / "metrics.json").read_text())["normalization"] == "voxelwise"
    words = "| input normalisation | voxelwise (mean/std volumes of sub-001, sub-003 on the 16x16x16 grid"
    assert words in (fold / "report.md").read_text()
    assert "the manual labels > 0 (the original paper's protocol" in (fold / "report.md").read_text()
    # segment applies the same volumes and, given the mask, reproduces the run's predictions; without a
    # mask it refuses (the model never saw an unmasked head)
    raw = dataset / "derivatives/sub-002/unbiased/sub-002_uni_unbiased.nii.gz"
    labels = dataset / "derivatives/sub-002/labeled/sub-002_labels_v01.nii.gz"
    seg = tmp_path / "seg"
    capsys.readouterr()
    args = ["segment", str(raw), "--weights", str(fold / "checkpoints/best"), "--out", str(seg)]
    assert main(args) == 2 and "brain-masked" in capsys.readouterr().err
    assert main([*args, "--mask", str(labels)]) == 0
    assert "voxelwise normalisation" in capsys.readouterr().out
    ours = nib.load(seg / "sub-002_space-orig_desc-cerebrum_probseg.nii.gz").get_fdata()
    run = nib.load(fold / "predictions/sub-002_space-orig_desc-cerebrum_probseg.nii.gz").get_fdata()
    np.testing.assert_array_equal(ours, run)


@pytest.mark.slow  # a whole fold (or more) through the command line
def test_from_scratch(dataset, tmp_path):
    """--weights none: random init with the config's n_filters, no warm-up, said in log and report."""
    out = tmp_path / "run"
    assert main(_args(dataset, "none", out, "--fold", "1", "--set", "n_filters=3")) == 0
    fold = out / "fold-1"
    best = checkpoint.load_checkpoint(fold / "checkpoints/best")
    assert best.config.n_filters == 3 and best.normalization == "zscore"
    history = [json.loads(line) for line in (fold / "metrics.jsonl").read_text().splitlines()]
    assert [h["phase"] for h in history] == ["finetune"]
    metrics = json.loads((fold / "metrics.json").read_text())
    assert metrics["initial_weights"] == "none" and metrics["epochs"]["warmup"] == 0
    assert "training from scratch" in (fold / "log.txt").read_text()
    assert "trained from scratch: random initialisation, n_filters 3" in (fold / "report.md").read_text()


def test_test_subject_is_prepared_without_its_labels(dataset, tmp_path):
    """The default (no mask files: test_mask none) never reads the test subject's labels to prepare it:
    replacing them changes the evaluation only, not the network input."""
    import shutil

    other = tmp_path / "data"
    shutil.copytree(dataset, other)
    lab = other / "derivatives/sub-002/labeled/sub-002_labels_v01.nii.gz"
    img = nib.load(lab)
    nib.save(nib.Nifti1Image(np.roll(np.asarray(img.dataobj), 5, axis=0), img.affine), lab)
    cfgs = [
        config.load_config("demo").override(data=str(d), fold=2, grid=(16, 16, 16)) for d in (dataset, other)
    ]
    a, b = (load_fold(c.data_config, log=lambda _: None) for c in cfgs)
    np.testing.assert_array_equal(a.test[0].x, b.test[0].x)
    assert not np.array_equal(a.test[0].labels, b.test[0].labels)
    paper = [c.override(test_mask="labels") for c in cfgs]  # the paper's protocol does read them
    a, b = (load_fold(c.data_config, log=lambda _: None) for c in paper)
    assert not np.array_equal(a.test[0].x, b.test[0].x)


@pytest.mark.slow  # a whole fold (or more) through the command line
def test_same_seed_same_result(dataset, weights, tmp_path):
    runs = []
    for name in ("a", "b"):
        assert main(_args(dataset, weights, tmp_path / name, "--fold", "1", "--epochs-finetune", "0")) == 0
        lines = (tmp_path / name / "fold-1" / "metrics.jsonl").read_text().splitlines()
        history = [{k: v for k, v in json.loads(x).items() if k != "seconds"} for x in lines]
        params = checkpoint.load_checkpoint(tmp_path / name / "fold-1" / "checkpoints" / "best").params
        runs.append((history, jax.tree_util.tree_leaves(params)))
    assert runs[0][0] == runs[1][0]
    assert all(np.array_equal(x, y) for x, y in zip(runs[0][1], runs[1][1], strict=True))


@pytest.mark.slow  # a whole fold (or more) through the command line
def test_sharded_fold_equals_single_device(tmp_path):
    """--mesh 1x4 (4 virtual CPU devices, conftest) splits every volume along depth: same training curve
    and test metrics as one device, within float tolerance; --remat and --precision bf16 run and are
    recorded, and the saved checkpoint keeps the portable float32 config."""
    root = tmp_path / "data"
    for i in range(2):
        _subject(root, f"sub-{i + 1:03d}", i, shape=(32, 16, 16))
    cfg = ModelConfig(n_filters=2, n_classes=3)
    weights = tmp_path / "w"
    checkpoint.save_checkpoint(weights, init_params(cfg, jax.random.key(3)), cfg)
    base = ["--fold", "2", "--grid", "32,16,16", "--set", "dropout=false", "--set", "epochs_warmup=0"]
    runs = {}
    for name, extra in (
        ("one", []),
        ("mesh", ["--mesh", "1x4"]),
        ("bf16", ["--mesh", "1x4", "--remat", "--precision", "bf16"]),
    ):
        assert main(_args(root, weights, tmp_path / name, *base, *extra)) == 0
        fold = tmp_path / name / "fold-2"
        lines = (fold / "metrics.jsonl").read_text().splitlines()
        runs[name] = [json.loads(x) for x in lines], json.loads((fold / "config.json").read_text())
    (one, _), (mesh, mesh_cfg), (bf16, bf16_cfg) = runs["one"], runs["mesh"], runs["bf16"]
    _assert_same_curve(mesh, one)  # one training subject, one view: one step per epoch
    assert mesh_cfg["mesh"] == {"data": 1, "space": 4} and runs["one"][1]["mesh"] is None
    assert bf16_cfg["config"]["remat"] is True and bf16_cfg["config"]["precision"] == "bf16"
    assert all(np.isfinite(h["val_loss"]) for h in bf16)
    best = checkpoint.load_checkpoint(tmp_path / "bf16" / "fold-2" / "checkpoints" / "best")
    assert best.config.compute_dtype == "float32" and best.config.remat is False


@pytest.mark.slow  # a whole fold (or more) through the command line
def test_cv_all_folds_summary(weights, tmp_path):
    root = tmp_path / "data"
    for i in range(2):
        _subject(root, f"sub-{i + 1:03d}", i + 5)
    out = tmp_path / "cv"
    args = _args(root, weights, out, "--fold", "all", "--set", "epochs_finetune=0", "--augment-views", "0")
    assert main(args) == 0
    summary = json.loads((out / "cv_summary.json").read_text())
    assert summary["folds"] == [1, 2]
    dice = [json.loads((out / f"fold-{k}/metrics.json").read_text())["mean_dice"] for k in (1, 2)]
    assert summary["mean_dice"]["mean"] == pytest.approx(np.mean(dice))
    assert summary["mean_dice"]["sd"] == pytest.approx(np.std(dice, ddof=1))
    assert "mean Dice" in (out / "cv_summary.md").read_text()
    html = (out / "cv_summary.html").read_text()  # per-class boxplots across folds, embedded
    assert html.count('<img src="data:image/png;base64,') == 1 and "Mean ± sd across folds" in html


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--set", "no_such_key=1"], "no_such_key"),
        (["--fold", "9"], "out of range"),
        (["--fold", "x"], "--fold"),
        (["--grid", "15,16,16"], "multiples of 8"),
        (["--labels", "schneider-reduced", "--drop-label", "9"], "cannot drop"),
        (["--val-subject", "sub-009"], "sub-009"),
        (["--config", "no-such-experiment"], "no such experiment"),
        (["--mesh", "3x1"], "needs 3 devices"),
        (["--mesh", "1x4"], "not divisible by the mesh"),  # depth 16 / 8 = 2 slabs for 4 devices
        (["--mesh", "four"], "DATAxSPACE"),
        (["--set", "precision=fp8"], "precision: must be one of"),
        (["--set", "normalization=global"], "normalization: must be one of"),
        (["--set", "patience=abc"], "patience: must be an integer, got 'abc'"),
        (["--set", "grid=5"], "grid: must be a list of 3 integers"),
        (["--set", "last_layer=abc"], "last_layer: must be an integer"),
        (["--set", "seed=1.5"], "seed: must be an integer, got 1.5"),
        (["--set", 'lr_warmup="x"'], "lr_warmup: must be a finite number, got 'x'"),
        (["--set", "loss=focal"], "unknown loss 'focal'"),
        (["--set", 'augment={"p_bias": 2}'], "p_bias must be in [0, 1]"),
        (["--set", "prob_class=nope"], "prob_class 'nope' is not a class"),
        (["--set", 'surface_classes=["vessels"]'], "surface_classes: unknown class 'vessels'"),
        (["--weights", "no-such-weights"], "checkpoint directory does not exist"),
        (["--slab-rows", "6"], "slab_rows: must be 0 or a positive multiple of 4, got 6"),
        (["--slab-rows", "8", "--mesh", "1x4"], "--slab-rows: slab streaming cannot be combined with --mesh"),
        (["--layout", "bids"], "found 0 subject(s)"),
        (["--subject-shares", "0"], "subject_shares: must be at least 1, got 0"),
        (["--subject-shares", "3", "--batch-size", "3"], "3 shares need at least 3 training subjects"),
        (["--subject-shares", "2", "--batch-size", "3"], "batch size 3 does not split into 2 equal blocks"),
        # --fold all checks every fold before the first trains: sub-002 is fold 2's test subject
        (["--fold", "all", "--val-subject", "sub-002"], "sub-002 is the test subject of fold 2"),
    ],
)
def test_bad_input_exits_2_before_training(dataset, weights, tmp_path, capsys, extra, message):
    out = tmp_path / "bad"
    assert main(_args(dataset, weights, out, *extra)) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists()  # nothing written: a corrected re-run into the same --out needs no --resume


@pytest.mark.slow
def test_rerun_after_failed_check_and_best_checkpoint_without_epochs(dataset, weights, tmp_path, capsys):
    """A failed check leaves no run directory, so the corrected command runs into the same --out; with
    --epochs 0 checkpoints/best still holds the parameters the test subject was predicted with."""
    out = tmp_path / "run"
    assert main(_args(dataset, weights, out, "--fold", "1", "--set", "prob_class=nope")) == 2
    assert not out.exists()
    capsys.readouterr()
    assert (
        main(_args(dataset, weights, out, "--fold", "1", "--epochs", "0", "--set", "prob_class=grey matter"))
        == 0
    )
    fold = out / "fold-1"
    metrics = json.loads((fold / "metrics.json").read_text())
    assert metrics["epochs"] == {"warmup": 0, "finetune": 0} and metrics["best_val_loss"] is None
    best = checkpoint.load_checkpoint(fold / "checkpoints" / "best")
    initial = checkpoint.load_checkpoint(weights)
    assert best.meta["best_epoch"] is None and best.config.n_classes == 4
    for name in train.copied_layers(3):  # the copied layers, unchanged; the head is new
        np.testing.assert_array_equal(best.params[name]["kernel"], initial.params[name]["kernel"])
    log = (fold / "log.txt").read_text()
    assert "fold 1: test sub-001" in log and "checkpoints/best holds them" in log


@pytest.mark.slow
def test_nan_loss_before_any_checkpoint(dataset, weights, tmp_path, capsys):
    out = tmp_path / "nan"
    extra = ["--fold", "3", "--loss", "ce", "--last-layer", "14"]
    extra += ["--set", "lr_warmup=1e30", "--set", "lr_finetune=1e30"]
    assert main(_args(dataset, weights, out, *extra)) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "non-finite training loss (nan) in warmup epoch 1" in err
    assert f"no checkpoint was written yet; the initial weights are unchanged at {weights.absolute()}" in err
    fold = out / "fold-3"
    assert err.split(": ", 1)[1] in (fold / "log.txt").read_text()
    assert not (fold / "checkpoints").exists()


@pytest.mark.slow  # a whole fold (or more) through the command line
def test_nan_loss_keeps_the_last_good_checkpoints(dataset, weights, tmp_path, capsys):
    out = tmp_path / "nan"
    extra = ["--fold", "3", "--loss", "ce", "--last-layer", "14", "--set", "lr_finetune=1e30"]
    assert main(_args(dataset, weights, out, *extra)) == 1
    err = capsys.readouterr().err.strip()
    fold = out / "fold-3"
    assert "non-finite training loss (nan) in finetune epoch 1" in err
    assert f"{fold / 'checkpoints' / 'best'} (warmup epoch 1)" in err
    assert f"{fold / 'checkpoints' / 'last'} (after warmup epoch 1)" in err
    assert err.split(": ", 1)[1] in (fold / "log.txt").read_text()
    # checkpoints/last is still the good warm-up epoch's (the finetune phase saved nothing)
    loop = json.loads((fold / "checkpoints" / "last" / "loop.json").read_text())
    assert loop["phase"] == 1 and [h["phase"] for h in loop["history"]] == ["warmup"]
    assert len((fold / "metrics.jsonl").read_text().splitlines()) == 1
    best = checkpoint.load_checkpoint(fold / "checkpoints" / "best")
    assert best.meta["best_epoch"]["phase"] == "warmup"
    assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(best.params))


@pytest.mark.slow
def test_bids_layout_label_and_mask_names_from_the_command_line(weights, tmp_path, capsys):
    root = tmp_path / "bids"
    for i in range(2):
        base = _subject(tmp_path / "src", f"sub-{i + 1:03d}", i)
        sid = base.name
        (root / sid / "anat").mkdir(parents=True)
        (root / sid / "seg").mkdir(parents=True)
        image = nib.load(base / "unbiased" / f"{sid}_uni_unbiased.nii.gz")
        labels = nib.load(base / "labeled" / f"{sid}_labels_v01.nii.gz")
        nib.save(image, root / sid / "anat" / f"{sid}_T1w.nii.gz")
        nib.save(labels, root / sid / "seg" / f"{sid}_aseg.nii.gz")
        mask = (np.asarray(labels.dataobj) > 0).astype(np.uint8)
        nib.save(nib.Nifti1Image(mask, labels.affine), root / sid / "seg" / f"{sid}_brainmask.nii.gz")
    out = tmp_path / "run"
    base_args = ["--fold", "2", "--layout", "bids", "--epochs", "0", "--augment-views", "0"]
    assert main(_args(root, weights, out, *base_args)) == 2  # no *_dseg.nii.gz: seg_name is needed
    assert "dseg label file of sub-001" in capsys.readouterr().err and not out.exists()
    names = ["--set", "seg_name=aseg", "--set", "mask_name=brainmask"]
    assert main(_args(root, weights, out, *base_args, *names)) == 0
    cfg = json.loads((out / "fold-2" / "config.json").read_text())
    assert cfg["config"]["seg_name"] == "aseg" and cfg["config"]["mask_name"] == "brainmask"
    assert cfg["data"] == str(root) and cfg["test_subject"] == "sub-002"
    assert (out / "fold-2" / "predictions" / "sub-002_space-orig_desc-cerebrum_dseg.nii.gz").is_file()
    assert cfg["preprocessing"]["mask"] == "file"  # auto: every subject has a mask file
    raw = root / "sub-002" / "anat" / "sub-002_T1w.nii.gz"
    ck = out / "fold-2" / "checkpoints" / "best"
    args = ["segment", str(raw), "--weights", str(ck), "--out", str(tmp_path / "seg")]
    assert main(args) == 2 and "give --mask" in capsys.readouterr().err
    assert main([*args, "--mask", str(root / "sub-002" / "seg" / "sub-002_brainmask.nii.gz")]) == 0
    run = nib.load(
        out / "fold-2" / "predictions" / "sub-002_space-orig_desc-cerebrum_dseg.nii.gz"
    ).get_fdata()
    np.testing.assert_array_equal(
        nib.load(tmp_path / "seg" / "sub-002_space-orig_desc-cerebrum_dseg.nii.gz").get_fdata(), run
    )


def test_labels_outside_the_map_exit_2(tmp_path, weights, capsys):
    root = tmp_path / "data"
    for i in range(2):
        _subject(root, f"sub-{i + 1:03d}", i)
    labels = root / "derivatives/sub-001/labeled/sub-001_labels_v01.nii.gz"
    img = nib.load(labels)
    data = np.asarray(img.dataobj).copy()
    data[8, 8, 8] = 9
    nib.save(nib.Nifti1Image(data, img.affine), labels)
    assert main(_args(root, weights, tmp_path / "o", "--fold", "2")) == 2
    assert "label values 9" in capsys.readouterr().err


@pytest.mark.parametrize("good", [{"epochs_warmup": 2}, {"augment": {"p_bias": 0.0}}, {"grid": [8, 8, 8]}])
def test_json_config_round_trip(tmp_path, good):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(good))
    cfg = config.load_config(path)
    for key, value in good.items():
        assert getattr(cfg, key) == (tuple(value) if isinstance(value, list) else value)
    path.write_text(json.dumps({**good, "epochz": 1}))
    with pytest.raises(InputError, match="epochz"):
        config.load_config(path)


@pytest.mark.parametrize("name", ["demo", "schneider19", "fewlabel", "fewlabel_synth"])
def test_shipped_experiments_load(name):
    cfg = config.load_config(name)
    assert cfg.grid is not None and all(g % 8 == 0 for g in cfg.grid)
    n = label_map_of(cfg.data_config).n_classes
    assert n == {"demo": 4, "schneider19": 8, "fewlabel": 8, "fewlabel_synth": 8}[name]
    reduced = label_map_of(cfg.override(labels="schneider-reduced").data_config).n_classes
    assert reduced == 7


def _tiny_config(dataset, weights, **values):
    return config.load_config("demo").override(
        data=str(dataset),
        weights=str(weights),
        grid=(16, 16, 16),
        epochs_warmup=1,
        epochs_finetune=1,
        augment_views=1,
        **values,
    )


@pytest.mark.slow
def test_train_and_evaluate_called_directly(dataset, weights, tmp_path):
    """The importable entry (no argv): a TrainConfig and a work directory in, metrics.json's content out;
    the run record's facts agree across config.json, metrics.json and checkpoints/best."""
    cfg = _tiny_config(dataset, weights, fold=3)
    result = finetune.train_and_evaluate(cfg, tmp_path / "run", progress=False)
    run = RunDir(tmp_path / "run")
    assert json.loads(run.metrics_json.read_text()) == result
    info = json.loads(run.config_json.read_text())
    for key in ("fold", "test_subject", "normalization", "brain_mask", "initial_weights"):
        assert result[key] == info[key], key
    assert result["test_subject"] == "sub-003" and result["epochs"] == {"warmup": 1, "finetune": 1}
    assert checkpoint.load_checkpoint(run.best).meta["run"] == info
    assert run.has_last() and (run.predictions / "dseg.tsv").is_file()
    with pytest.raises(InputError, match="not empty"):  # a second run needs resume=True
        finetune.train_and_evaluate(cfg, run.root, progress=False)


@pytest.mark.slow
def test_prepared_fold_is_typed_and_writes_nothing(dataset, weights, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    prepared = prepare_fold(_tiny_config(dataset, weights, fold=1), log=lambda _: None)
    assert [s.id for s in prepared.fold.test] == ["sub-001"]
    assert [s.id for s in prepared.fold.train] == ["sub-002", "sub-003"]
    subject = prepared.fold.train[0]
    assert subject.x.shape == subject.labels.shape == prepared.fold.grid == SHAPE
    assert prepared.model_config.dropout_rate == ModelConfig.dropout_rate  # dropout: true
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow  # a whole fold (or more) through the command line
def test_mirroring_in_training_and_at_test_reaches_segment(dataset, weights, tmp_path, capsys):
    """augment_mirror lr: the views mirrored along the training images' left-right voxel axis (0 here);
    tta lr: the test subject predicted as the mean of it and its mirror image, recorded in the
    checkpoint, so that segment predicts the same way by default and not with --no-tta."""
    out = tmp_path / "run"
    extra = ["--fold", "2", "--set", "augment_mirror=lr", "--set", "tta=lr", "--set", "epochs_finetune=0"]
    assert main(_args(dataset, weights, out, *extra)) == 0
    fold = out / "fold-2"
    assert "augmentation: mirrored along voxel axes (0,), each with p 0.5" in (fold / "log.txt").read_text()
    assert checkpoint.load_checkpoint(fold / "checkpoints/best").meta["tta"] == "lr"
    assert json.loads((fold / "config.json").read_text())["config"]["tta"] == "lr"
    words = "the mean of the volume and its mirror images along voxel axes (0,)"
    assert f"| test-time mirroring | {words}" in (fold / "report.md").read_text()
    assert words in (fold / "report.html").read_text()  # the results page's run table too
    assert json.loads((fold / "metrics.json").read_text())["tta_axes"] == [0]
    raw = dataset / "derivatives/sub-002/unbiased/sub-002_uni_unbiased.nii.gz"
    name = "sub-002_space-orig_desc-cerebrum_probseg.nii.gz"
    run = nib.load(fold / "predictions" / name).get_fdata()
    assert json.loads((fold / "predictions" / name.replace(".nii.gz", ".json")).read_text())[
        "TestTimeMirrorAxes"
    ] == [0]
    got = {}
    for how, flags in {"default": [], "--tta": ["--tta"], "--no-tta": ["--no-tta"]}.items():
        capsys.readouterr()
        seg = tmp_path / how
        assert (
            main(
                ["segment", str(raw), "--weights", str(fold / "checkpoints/best"), "--out", str(seg), *flags]
            )
            == 0
        )
        said = capsys.readouterr().out
        assert ("mirrored along axes (0,)" in said) == (how != "--no-tta"), said
        got[how] = nib.load(seg / name).get_fdata()
        sidecar = json.loads((seg / name.replace(".nii.gz", ".json")).read_text())
        assert sidecar["TestTimeMirrorAxes"] == ([] if how == "--no-tta" else [0])
    np.testing.assert_array_equal(got["default"], run)  # what the fold measured is what segment gives
    np.testing.assert_allclose(got["--tta"], run, atol=1e-6)
    assert not np.allclose(got["--no-tta"], run, atol=1e-4)  # the mirrored pass counts
