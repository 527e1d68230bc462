"""The demo fold end to end, timed as a user meets it, for ``bench.py``'s "demo" case.

``cerebrum-jax finetune --config demo --fold 3`` twice in a fresh directory: first with an empty
compilation cache (a first run), then again into a new output directory with the cache the first run
filled (every later run). For each: wall time of the command, time from its start to its first training
step's epoch line and to the first epoch whose validation Dice (mean over the classes but background)
reaches 0.80 and 0.85 (from log.txt's time stamps, 1 s resolution), the epochs run and the test subject's
mean Dice (metrics.json).

    .venv/bin/python experiments/bench_demo.py --out /tmp/demo-bench      # JSON of both runs
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

THRESHOLDS = (0.80, 0.85)
EPOCH_LINE = re.compile(r"^(\d\d:\d\d:\d\d) (warmup|finetune) epoch (\d+): .* val dice ([0-9.na]+)")


def _seconds_after(start: datetime.datetime, stamp: str) -> float:
    """Seconds from ``start`` to the log's HH:MM:SS ``stamp`` (the same day, or the next one)."""
    t = datetime.datetime.combine(start.date(), datetime.time.fromisoformat(stamp))
    if t < start.replace(microsecond=0):
        t += datetime.timedelta(days=1)
    return (t - start.replace(microsecond=0)).total_seconds()


def timeline(log: str, start: datetime.datetime) -> dict:
    """From a run's log.txt: seconds to the first epoch line and to each Dice threshold (None: never)."""
    first, reach = None, {f"{t:.2f}": None for t in THRESHOLDS}
    epochs = 0
    for line in log.splitlines():
        m = EPOCH_LINE.match(line)
        if not m:
            continue
        epochs += 1
        s = _seconds_after(start, m.group(1))
        first = s if first is None else first
        dice = float(m.group(4)) if m.group(4) != "nan" else float("nan")
        for t in THRESHOLDS:
            if reach[f"{t:.2f}"] is None and dice >= t:
                reach[f"{t:.2f}"] = s
    return {"first_epoch_s": first, "val_dice_reached_s": reach, "epochs": epochs}


def run_once(out: Path, cache: Path, extra: list[str]) -> dict:
    env = dict(os.environ, CEREBRUM_JAX_CACHE=str(cache))
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    cmd = [sys.executable, "-m", "cerebrum_jax", "finetune", "--config", "demo", "--fold", "3"]
    cmd += ["--out", str(out), "--no-progress", *extra]
    start = datetime.datetime.now()
    t = time.perf_counter()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t
    if res.returncode != 0:
        return {"failed": (res.stderr.strip().splitlines() or [f"exit {res.returncode}"])[-1][:300]}
    fold = out / "fold-3"
    metrics = json.loads((fold / "metrics.json").read_text())
    return {
        "wall_s": round(wall, 1),
        **timeline((fold / "log.txt").read_text(), start),
        "test_mean_dice": metrics.get("mean_dice"),
        "test_dice": metrics.get("dice"),
    }


def run_all(extra: list[str] | None = None, root: str | None = None) -> dict:
    """The cold (empty compilation cache) and the warm run."""
    with tempfile.TemporaryDirectory(prefix="cerebrum-demo-bench-", dir=root) as tmp:
        tmp = Path(tmp)
        cold = run_once(tmp / "cold", tmp / "cache", extra or [])
        warm = run_once(tmp / "warm", tmp / "cache", extra or [])
    return {"cold": cold, "warm": warm}


def report_lines(r: dict) -> list[str]:
    lines = ["## The demo fold: time to Dice (`make finetune FOLD=3`, the fold itself)", ""]
    lines += [
        "| run | wall s | first epoch done s | val Dice 0.80 at s | val Dice 0.85 at s | epochs "
        "| test mean Dice |"
    ]
    lines += ["|---|---|---|---|---|---|---|"]
    names = {"cold": "first run (empty compilation cache)", "warm": "second run (cache filled)"}
    for key in ("cold", "warm"):
        s = r.get(key, {})
        if "failed" in s:
            lines.append(f"| {names[key]} | failed: `{s['failed']}` | | | | | |")
            continue
        reach = s["val_dice_reached_s"]
        cells = [s["wall_s"], s["first_epoch_s"], reach["0.80"], reach["0.85"], s["epochs"]]
        dice = s["test_mean_dice"]
        cells = ["never" if c is None else c for c in cells] + [f"{dice:.4f}" if dice is not None else "?"]
        lines.append(f"| {names[key]} | " + " | ".join(str(c) for c in cells) + " |")
    lines += [
        "",
        "Seconds from the command's start (log.txt time stamps, 1 s resolution); validation Dice: the mean "
        "over the classes but background on the training subjects' un-augmented volumes; test: sub-003.",
    ]
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", help="where the temporary run directories go (default: the system's)")
    args, extra = p.parse_known_args(argv)
    print(json.dumps(run_all(extra, args.root)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
