"""The few-label checks: every change to the recipe measured, per class, on cohorts the project builds.

    python -m experiments.checks vessels      # thin structures: vessel Dice and centre-line recall
    python -m experiments.checks contrast     # train on one contrast, test on another
    python -m experiments.checks demo         # the offline demo (it must not get worse)
    python -m experiments.checks vessels --seed 1 --out runs/checks-seed1   # the same runs, another seed
    python -m experiments.checks all --write  # all three, tables into BENCHMARKS.md ("Accuracy") and
                                              # experiments/bench_notes.md (its hand-written part)
    python -m experiments.checks vessels --no-run --write --out runs/checks-seed0  # tables of earlier runs

Each check fine-tunes fold 3 of its cohort (``experiments/check_cohorts.py``; 3 mm, 56x72x64, unmasked
heads) once per variant, every variant with the same number of steps (early stopping off), from
weights/demo (these cohorts are the demo template's, the domain that network was pretrained on), and
reports the test subject's Dice per class (and, for vessels, the share of the reference centre line
the prediction covers, ``skeleton.centreline_scores``). Every variant has a twin row, the same training
with the test subject predicted the other way: "+tta" (averaged with its left-right mirror image, what
config key ``tta`` lr does) or "without tta". Variants override the demo config's loss, augmentation and
test-time mirroring (its schedule, views and grid stay): "today" is the fewlabel recipe before issue 20,
"old recipe" that of 2026-12-03, each "+" or named row changes one part, and "recipe" is
``experiments/fewlabel.py`` as it is (``recipe``: its keys read from the file), "recipe +synth"
``experiments/fewlabel_synth.py``. Runs go to ``--out`` (default runs/checks/<check>/<variant>), a
summary to ``<out>/<check>.json``. Runtime: 4-6 min per variant on a 2-core CPU (``--epochs`` scales it).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path

from cerebrum_jax import fsafe, runtime
from cerebrum_jax.experiment.config import load_config
from cerebrum_jax.model.checkpoint import locate_weights

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from experiments import check_cohorts  # noqa: E402

# "today": the fewlabel recipe before issue 20: ce+dice with balanced class weights, the original's
# augmentation ranges in voxels whatever the voxel size, no skeleton recall, no intensity randomisation,
# no mirroring
TODAY = {"loss": "ce+dice", "class_weights": "balanced", "skeleton_classes": [], "augment": {}}
MM = {**TODAY, "augment_voxel_mm": 0.63}  # the original's ranges kept in millimetres
UNWEIGHTED = {**MM, "class_weights": "none"}
OLD_RECIPE = {**UNWEIGHTED, "skeleton_classes": None}  # experiments/fewlabel.py of 2026-12-03
# the keys by which a recipe differs from the demo config (its loss, augmentation and prediction)
RECIPE_KEYS = (
    "loss", "class_weights", "skeleton_classes", "skeleton_weight", "augment", "augment_voxel_mm",
    "augment_mirror", "tta",
)  # fmt: skip


def recipe(name: str, **augment) -> dict:
    """The ``RECIPE_KEYS`` of ``experiments/<name>.py`` (so a row is the recipe as it is now), with
    ``augment`` entries added to its augmentation."""
    cfg = load_config(HERE / f"{name}.py")
    out = {k: getattr(cfg, k) for k in RECIPE_KEYS}
    return {**out, "augment": {**out["augment"], **augment}}


VARIANTS = {
    "vessels": {
        "today": TODAY,
        "+mm augmentation": MM,
        "+mm +unweighted ce": UNWEIGHTED,
        "today +skeleton recall": {**TODAY, "skeleton_classes": None},
        "old recipe (+mm +unweighted +skeleton recall)": OLD_RECIPE,
        "today sqrt-balanced": {**TODAY, "class_weights": "sqrt"},
        "today thin-balanced": {**TODAY, "class_weights": "thin"},
        "today thin-balanced +lr mirroring": {**TODAY, "class_weights": "thin", "augment_mirror": "lr"},
        "today +lr mirroring": {**TODAY, "augment_mirror": "lr"},
        "old recipe +lr mirroring": {**OLD_RECIPE, "augment_mirror": "lr"},
        "today from scratch (24 filters)": {**TODAY, "weights": "none"},
        "recipe (fewlabel)": recipe("fewlabel"),
        "recipe +synth p 0.5 (fewlabel_synth)": recipe("fewlabel_synth"),
    },
    "contrast": {
        "today": TODAY,
        "recipe (fewlabel)": recipe("fewlabel"),
        "recipe +synth p 0.2 (voxel ranges)": recipe("fewlabel", synth=True, p_synth=0.2),
        "recipe +synth p 0.5 (voxel ranges)": recipe("fewlabel", synth=True, p_synth=0.5),
        "old recipe +synth p 0.5": {**OLD_RECIPE, "augment": {"synth": True, "p_synth": 0.5}},
        "recipe +synth p 0.5 (fewlabel_synth)": recipe("fewlabel_synth"),
    },
    "demo": {"demo": {}},
}
MARK = "<!-- checks:{check} -->"


def base_config(check: str, root: Path, epochs: int, seed: int = 0):
    """The demo config on the check's cohort: its grid, views and cosine schedule over ``epochs``
    fine-tuning epochs, early stopping off (equal steps); ``seed``: the run's (augmentation, dropout,
    order; the cohort stays the same)."""
    cfg = load_config("demo").override("checks", seed=seed)
    if check == "demo":
        return cfg
    labels = str(root / "dseg.tsv") if check == "vessels" else "demo"
    return cfg.override(
        "checks",
        data=str(root),
        labels=labels,
        weights=str(locate_weights("weights/demo")),
        epochs_finetune=epochs,
        patience=epochs + 10,
    )


def variant_config(base, overrides: dict):
    """``base`` with a variant's overrides (its "augment" replaces the base's: {} = the original's)."""
    return base.override("checks", **overrides)


def summarise(result: dict) -> dict:
    """A run's metrics.json -> {"dice": {class: Dice}, "mean_dice", "centreline": {class: recall}, "s"}."""
    dice = {n: m["dice"] for n, m in result["classes"].items() if n != "background"}
    cl = {n: c["cl_recall"] for n, c in result.get("centreline", {}).items()}
    return {
        "dice": dice,
        "mean_dice": result["mean_dice"],
        "centreline": cl,
        "s": result["timings_s"]["train"],
    }


def twin_name(name: str, tta: str) -> str:
    """The row of a variant (its config's ``tta``) whose test subject is predicted the other way, as
    ``mirrored_twin`` does: "+tta" (mirrored) or "without tta"."""
    return f"{name} without tta" if tta != "none" else f"{name} +tta"


def mirrored_twin(cfg, workdir: Path, s: float) -> dict:
    """The ``summarise`` of the run in ``workdir`` with its test subject predicted again by its best
    checkpoint the other way (mirrored along left-right when the run's ``tta`` is "none", else not): the
    same training, the other prediction, through ``finetune.predict_test`` as the fold and segment."""
    from cerebrum_jax.data import datasets as D
    from cerebrum_jax.experiment import finetune, fold
    from cerebrum_jax.model.checkpoint import load_checkpoint
    from cerebrum_jax.predict import predictor

    data = cfg.data_config
    _, subjects = fold.fold_subjects(data, log=lambda _: None)
    test = D.split_fold(subjects, data.fold, data.val_subject)[2][0]
    label_map = fold.label_map_of(data)
    net = predictor.Model.of(load_checkpoint(workdir / "checkpoints" / "best"))
    probs, grids = finetune.predict_test(net, test, label_map, tta="lr" if cfg.tta == "none" else "none")
    pred = predictor.labels_from(probs)
    result = finetune.test_scores(pred, grids["ref"], grids["spacing"], label_map.names)
    return summarise({**result, "timings_s": {"train": s}})


def run_check(check: str, out: Path, epochs: int, only=None, seed: int = 0) -> dict:
    """Run every variant of ``check`` (or those in ``only``) -> {variant: summary}, each with its
    ``mirrored_twin`` row (``twin_name``), merged with the variants an earlier call wrote to the same
    ``out`` (in ``VARIANTS`` order)."""
    from cerebrum_jax.experiment.finetune import train_and_evaluate  # imported here: jax

    root = {
        "vessels": lambda: check_cohorts.ensure_vessel_cohort("data/check-vessels"),
        "contrast": lambda: check_cohorts.ensure_contrast_cohort("data/check-contrast"),
        "demo": lambda: None,
    }[check]()
    base = base_config(check, root, epochs, seed)
    results = {}
    for name, overrides in VARIANTS[check].items():
        if only and name not in only:
            continue
        workdir = out / check / name.replace(" ", "_").replace("+", "plus_")
        shutil.rmtree(workdir, ignore_errors=True)
        print(f"== {check}: {name}", flush=True)
        cfg = variant_config(base, overrides)
        results[name] = summarise(train_and_evaluate(cfg, workdir, progress=False))
        results[twin_name(name, cfg.tta)] = mirrored_twin(cfg, workdir, results[name]["s"])
    summary = out / f"{check}.json"  # earlier variants of this --out are kept: --variants reruns some
    done = json.loads(summary.read_text()) if summary.is_file() else {}
    order = [m for n, o in VARIANTS[check].items() for m in (n, twin_name(n, variant_config(base, o).tta))]
    results = {n: results.get(n, done.get(n)) for n in order if n in results or n in done}
    fsafe.write_text(summary, json.dumps(results, indent=2) + "\n")
    return results


def table(check: str, results: dict) -> str:
    """Markdown: one row per variant, Dice per class (and centre-line recall of the thin classes)."""
    first = next(iter(results.values()))
    classes, thin = list(first["dice"]), list(first["centreline"])
    head = ["variant", *classes, "mean", *(f"{c} centre line" for c in thin)]
    f = lambda v: "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"  # noqa: E731
    rows = [f"| {' | '.join(head)} |", f"|{'---|' * len(head)}"]
    for name, r in results.items():
        cells = [
            *(f(r["dice"][c]) for c in classes),
            f(r["mean_dice"]),
            *(f(r["centreline"][c]) for c in thin),
        ]
        rows.append(f"| {name} | {' | '.join(cells)} |")
    return "\n".join(rows)


def write_section(path: Path, check: str, text: str) -> None:
    """Replace the block between two ``MARK`` lines of ``check`` in ``path`` (appended if missing)."""
    mark = MARK.format(check=check)
    page = path.read_text()
    block = f"{mark}\n{text}\n{mark}"
    if page.count(mark) == 2:
        start, end = page.index(mark), page.rindex(mark) + len(mark)
        page = page[:start] + block + page[end:]
    else:
        page = page.rstrip("\n") + "\n\n" + block + "\n"
    fsafe.write_text(path, page)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("check", choices=[*VARIANTS, "all"])
    p.add_argument("--variants", help="comma-separated variant names (default: all of the check's)")
    p.add_argument("--epochs", type=int, default=60, help="fine-tuning epochs of every variant (default 60)")
    p.add_argument("--out", type=Path, default=Path("runs/checks"))
    p.add_argument("--seed", type=int, default=0, help="the runs' seed (default 0: the tables' runs)")
    p.add_argument(
        "--write", action="store_true", help="put the tables into BENCHMARKS.md and bench_notes.md"
    )
    p.add_argument(
        "--no-run",
        action="store_true",
        help="train nothing: the tables from <out>/<check>.json as earlier runs left it",
    )
    args = p.parse_args(argv)
    runtime.configure_xla_flags()  # the kernels every command uses (before XLA starts): what users run
    only = set(args.variants.split(",")) if args.variants else None
    for check in VARIANTS if args.check == "all" else [args.check]:
        if args.no_run:
            summary = args.out / f"{check}.json"
            results = json.loads(summary.read_text()) if summary.is_file() else {}
            if not results:
                print(f"{summary}: no results to show", file=sys.stderr)
                return 2
        else:
            results = run_check(check, args.out, args.epochs, only, args.seed)
        text = table(check, results)
        print(text, flush=True)
        if args.write:  # the notes are BENCHMARKS.md's hand-written part: `make bench` keeps them
            for page in (HERE / "bench_notes.md", HERE.parent / "BENCHMARKS.md"):
                write_section(page, check, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
