"""The few-label checks: every change to the recipe measured, per class, on cohorts the project builds.

    python -m experiments.checks vessels      # thin structures: vessel Dice and centre-line recall
    python -m experiments.checks contrast     # train on one contrast, test on another
    python -m experiments.checks demo         # the offline demo (it must not get worse)
    python -m experiments.checks vessels --seed 1 --out runs/checks-seed1   # the same runs, another seed
    python -m experiments.checks all --write  # all three, tables into BENCHMARKS.md ("Accuracy") and
                                              # experiments/bench_notes.md (its hand-written part)

Each check fine-tunes fold 3 of its cohort (``experiments/check_cohorts.py``; 3 mm, 56x72x64, unmasked
heads) once per variant, every variant with the same number of steps (early stopping off), from
weights/demo (these cohorts are the demo template's, the domain that network was pretrained on), and
reports the test subject's Dice per class (and, for vessels, the share of the reference centre line
the prediction covers, ``skeleton.centreline_scores``). Variants override the demo config's loss and
augmentation (its schedule, views and grid stay): "today" is the fewlabel recipe before this change,
each "+" row adds one part to it, "recipe" is ``experiments/fewlabel.py`` now and "recipe +synth"
``experiments/fewlabel_synth.py``. Runs go to ``--out``
(default runs/checks/<check>/<variant>), a summary to ``<out>/<check>.json``. Runtime: 4-6 min per
variant on a 2-core CPU (``--epochs`` scales it).
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

SYNTH = {"synth": True, "p_synth": 0.5}  # experiments/fewlabel_synth.py's randomisation
# today's fewlabel recipe: ce+dice with balanced class weights, the original's augmentation ranges in
# voxels whatever the voxel size, no skeleton recall, no intensity randomisation
TODAY = {"loss": "ce+dice", "class_weights": "balanced", "skeleton_classes": [], "augment": {}}
MM = {**TODAY, "augment_voxel_mm": 0.63}  # the original's ranges kept in millimetres
UNWEIGHTED = {**MM, "class_weights": "none"}
RECIPE = {**UNWEIGHTED, "skeleton_classes": None}  # experiments/fewlabel.py's choices
VARIANTS = {
    "vessels": {
        "today": TODAY,
        "+mm augmentation": MM,
        "+mm +skeleton recall": {**MM, "skeleton_classes": None},
        "+mm +unweighted ce": UNWEIGHTED,
        "+unweighted ce +skeleton recall (voxel ranges)": {
            **TODAY,
            "class_weights": "none",
            "skeleton_classes": None,
        },
        "today +skeleton recall": {**TODAY, "skeleton_classes": None},
        "recipe (+mm +unweighted +skeleton recall)": RECIPE,
        "+mm +sqrt-balanced ce +skeleton recall": {**RECIPE, "class_weights": "sqrt"},
        "+sqrt-balanced ce +skeleton recall (voxel ranges)": {
            **TODAY,
            "class_weights": "sqrt",
            "skeleton_classes": None,
        },
        "recipe +synth p 0.5 (fewlabel_synth)": {**RECIPE, "augment": SYNTH},
    },
    "contrast": {
        "today": TODAY,
        "recipe": RECIPE,
        "recipe +synth p 0.2": {**RECIPE, "augment": {"synth": True, "p_synth": 0.2}},
        "recipe +synth p 0.5 (fewlabel_synth)": {**RECIPE, "augment": SYNTH},
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


def run_check(check: str, out: Path, epochs: int, only=None, seed: int = 0) -> dict:
    """Run every variant of ``check`` (or those in ``only``) -> {variant: summary}, merged with the
    variants an earlier call wrote to the same ``out`` (in ``VARIANTS`` order)."""
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
        results[name] = summarise(
            train_and_evaluate(variant_config(base, overrides), workdir, progress=False)
        )
    summary = out / f"{check}.json"  # earlier variants of this --out are kept: --variants reruns some
    done = json.loads(summary.read_text()) if summary.is_file() else {}
    results = {n: results.get(n, done.get(n)) for n in VARIANTS[check] if n in results or n in done}
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
    args = p.parse_args(argv)
    runtime.configure_xla_flags()  # the kernels every command uses (before XLA starts): what users run
    only = set(args.variants.split(",")) if args.variants else None
    for check in VARIANTS if args.check == "all" else [args.check]:
        results = run_check(check, args.out, args.epochs, only, args.seed)
        text = table(check, results)
        print(text, flush=True)
        if args.write:  # the notes are BENCHMARKS.md's hand-written part: `make bench` keeps them
            for page in (HERE / "bench_notes.md", HERE.parent / "BENCHMARKS.md"):
                write_section(page, check, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
