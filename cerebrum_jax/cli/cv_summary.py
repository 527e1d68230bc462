"""``cerebrum-jax cv-summary RUN_DIR``: the cross-validation summary of the folds finished in RUN_DIR.

For folds run as separate jobs (e.g. one SLURM array task per fold, ``finetune --fold K --out RUN_DIR``):
reads every RUN_DIR/fold-K/metrics.json and writes RUN_DIR/cv_summary.json and cv_summary.md, as
``finetune --fold all`` does (``report.cv_summary``: mean ± sd across folds).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cerebrum_jax.cli.options import command
from cerebrum_jax.errors import InputError
from cerebrum_jax.experiment.rundir import RunDir


def add_parser(sub) -> None:
    p = command(
        sub,
        "cv-summary",
        run,
        help="build the cross-validation summary from finished fold directories (RUN_DIR/fold-K)",
        description=(
            "Read RUN_DIR/fold-K/metrics.json of every finished fold and write RUN_DIR/cv_summary.json and "
            "RUN_DIR/cv_summary.md (mean ± sd across folds of Dice, HD95 and VS per class). Fold directories "
            "without metrics.json (still running or failed) are left out and named on stderr."
        ),
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="the --out directory of the folds")
    p.add_argument(
        "--expect",
        type=int,
        metavar="N",
        help="exit with status 2, writing nothing, unless N folds are finished",
    )


fold_number = RunDir.fold_number  # K of a directory named fold-K (None for any other name)


def collect(run_dir: Path) -> tuple[list[dict], list[Path]]:
    """(metrics.json of every finished fold, in fold order; the fold directories without one)."""
    if not run_dir.is_dir():
        raise InputError("is not a directory", run_dir)
    folds = sorted((k, d) for d in run_dir.iterdir() if d.is_dir() and (k := fold_number(d)) is not None)
    results, unfinished = [], []
    for _, d in folds:
        path = RunDir(d).metrics_json
        if not path.is_file():
            unfinished.append(d)
            continue
        try:
            result = json.loads(path.read_text())
        except ValueError as e:
            raise InputError(f"not readable as JSON ({e})", path) from None
        check_fold_metrics(result, path)
        names = list(result["classes"])
        if results and names != list(results[0]["classes"]):
            raise InputError(f"classes {names} differ from fold {results[0]['fold']}'s", path)
        results.append(result)
    return results, unfinished


def _number_or_none(v) -> bool:
    return v is None or (isinstance(v, int | float) and not isinstance(v, bool))


def check_fold_metrics(result, path: Path) -> None:
    """InputError naming ``path`` unless ``result`` has what the summary reads: an integer ``fold``, a
    number (or null) ``mean_dice``, and ``classes`` {name: {"dice", "hd95_mm", "vs": number or null}}."""
    if not isinstance(result, dict):
        raise InputError(f"not a fold's metrics.json (a JSON {type(result).__name__}, not an object)", path)
    missing = [k for k in ("fold", "classes", "mean_dice") if k not in result]
    if missing:
        raise InputError(f"not a fold's metrics.json (no {', '.join(missing)})", path)
    if not isinstance(result["fold"], int) or isinstance(result["fold"], bool):
        raise InputError(f"'fold' must be an integer, got {result['fold']!r}", path)
    if not _number_or_none(result["mean_dice"]):
        raise InputError(f"'mean_dice' must be a number or null, got {result['mean_dice']!r}", path)
    classes = result["classes"]
    if not isinstance(classes, dict) or not classes:
        raise InputError("'classes' must be an object {class name: metrics}", path)
    for name, m in classes.items():
        bad = [
            k
            for k in ("dice", "hd95_mm", "vs")
            if not isinstance(m, dict) or not _number_or_none(m.get(k, ""))
        ]
        if bad:
            raise InputError(f"class {name!r}: {', '.join(bad)} missing or not a number", path)


def run(args: argparse.Namespace) -> int:
    from cerebrum_jax import fsafe
    from cerebrum_jax.report import figures as report

    run_dir = Path(args.run_dir)
    results, unfinished = collect(run_dir)
    if not results:
        raise InputError("no finished fold (no fold-K/metrics.json)", run_dir)
    if args.expect is not None and len(results) != args.expect:
        raise InputError(f"{len(results)} finished fold(s), --expect {args.expect}", run_dir)
    if unfinished:
        names = ", ".join(d.name for d in unfinished)
        print(f"cerebrum-jax cv-summary: left out (no metrics.json, not finished): {names}", file=sys.stderr)
    summary = report.cv_summary(results)
    fsafe.write_text(run_dir / "cv_summary.json", json.dumps(summary, indent=2) + "\n")
    fsafe.write_text(run_dir / "cv_summary.md", report.cv_summary_markdown(summary))
    mean = summary["mean_dice"]["mean"]  # None when every fold's mean Dice is null (n/a)
    shown = "n/a" if mean is None else f"{mean:.4f}"
    print(f"cross-validation over folds {summary['folds']}: mean Dice {shown} -> {run_dir / 'cv_summary.md'}")
    return 0
