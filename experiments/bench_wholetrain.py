"""Whole-volume training step at 256 x 352 x 224 (issue 9), for ``bench.py``'s "wholetrain" case.

Three sides, each in its own subprocess (so each peak RSS is its own), one after the other (never two
big processes at once): ours streamed (``train.make_train_step(..., slab_rows=N)``, the level-1 layers in
depth slabs), ours plain (``slab_rows=0``: compiled only, never run: its compiled temp buffers alone exceed
the machine) and the PyTorch peer (experiments/torch_peer.py). Every side: 8 classes, n_filters 24,
float32, weighted cross-entropy, Adam, batch = one augmented view (made by ``cerebrum_jax.train.augment``
before timing: its time is bench.py's "augment" case). A first step (compilation) is excluded; times are
the median of --wholetrain-repeats further steps. XLA's compiled memory analysis (temp bytes) of the
streamed and plain steps is what a GPU would have to hold besides the inputs and the state.

    .venv/bin/python experiments/bench_wholetrain.py --side streamed --repeats 3   # one side, JSON out
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

from cerebrum_jax import runtime

HERE = os.path.dirname(os.path.abspath(__file__))
WHOLE = (256, 352, 224)
N_CLASSES = 8
SIDES = ("streamed", "plain", "peer")


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _cpu_s() -> float:
    """CPU seconds (user + system) of this process so far: on a shared machine, cpu / threads is what the
    wall time would be with the threads' cores to itself."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _timed_steps(one, repeats: int) -> dict:
    """``one()`` (returns the loss) once (excluded), then ``repeats`` times: wall and CPU seconds each."""
    t, c = time.perf_counter(), _cpu_s()
    out = {"first_loss": one(), "first_s": time.perf_counter() - t, "first_cpu_s": _cpu_s() - c}
    times, cpu = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), _cpu_s()
        out["loss"] = one()
        times.append(time.perf_counter() - t)
        cpu.append(_cpu_s() - c)
    return {**out, "times": times, "cpu_times": cpu, "peak_rss_gb": _peak_rss_gb()}


def _inputs():
    """One augmented view (1, D, H, W, 1) and its labels (1, D, H, W), class weights (C,): numpy."""
    import jax
    import numpy as np

    from cerebrum_jax.train.augment import AugmentConfig, augment

    rng = np.random.default_rng(0)
    img = np.abs(rng.normal(size=(*WHOLE, 1))).astype(np.float32)
    labels = rng.integers(0, N_CLASSES, size=WHOLE).astype(np.int32)
    x, y = augment(jax.random.key(0), jax.numpy.asarray(img), jax.numpy.asarray(labels), AugmentConfig())
    weights = np.linspace(0.5, 1.5, N_CLASSES).astype(np.float32)
    return np.asarray(x)[None], np.asarray(y)[None].astype(np.int32), weights


def _ours(slab: int, repeats: int, run: bool) -> dict:
    import jax
    import jax.numpy as jnp

    from cerebrum_jax.model import network as model
    from cerebrum_jax.train import steps as train
    from cerebrum_jax.train.losses import LossConfig

    cfg = model.ModelConfig(n_filters=24, n_classes=N_CLASSES)
    params = model.init_params(cfg, jax.random.key(0))
    frozen = jax.tree_util.tree_map(lambda _: False, params)
    tx = train.make_optimizer(frozen, 5e-4)
    step = train.make_train_step(cfg, LossConfig("ce", "balanced"), tx, slab_rows=slab)
    x, y, w = _inputs()
    batch = {"image": jnp.asarray(x), "labels": jnp.asarray(y), "class_weights": jnp.asarray(w)}
    box = {"s": train.init_state(params, tx)}
    t = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=0).lower(box["s"], batch, jax.random.key(1)).compile()
    out = {"compile_s": time.perf_counter() - t, "slab_rows": slab}
    mem = compiled.memory_analysis()
    out["temp_bytes"] = int(mem.temp_size_in_bytes) if mem is not None else None
    if not run:
        out["peak_rss_gb"] = _peak_rss_gb()
        return out

    def one():
        box["s"], m = compiled(box["s"], batch, jax.random.key(1))
        return float(m["loss"])

    return {**out, **_timed_steps(one, repeats)}


def _peer(repeats: int, threads: int) -> dict:
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    sys.path.insert(0, HERE)
    import jax
    import torch_peer as T

    from cerebrum_jax.model import network as model

    cfg = model.ModelConfig(n_filters=24, n_classes=N_CLASSES)
    params = jax.tree_util.tree_map(np.asarray, model.init_params(cfg, jax.random.key(0)))
    net = T.TorchCerebrum(params, dropout_rate=cfg.dropout_rate)
    step = T.make_train_step(net)
    x, y, w = _inputs()
    xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 4, 1, 2, 3)))
    yt, wt = torch.from_numpy(y.astype(np.int64)), torch.from_numpy(w)
    return _timed_steps(lambda: step(xt, yt, wt), repeats)


def worker(side: str, repeats: int, slab: int, threads: int) -> dict:
    if side == "peer":
        return _peer(repeats, threads)
    return _ours(slab if side == "streamed" else 0, repeats, run=side == "streamed")


def run_all(repeats: int, slab: int, threads: int) -> dict:
    """Each side in a subprocess, one at a time; a side that fails is recorded with its last error line."""
    results = {}
    for side in SIDES:
        cmd = [sys.executable, __file__, "--side", side, "--repeats", str(repeats), "--slab-rows", str(slab)]
        cmd += ["--threads", str(threads)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            lines = [ln for ln in res.stderr.splitlines() if "rror" in ln] or res.stderr.splitlines()
            how = (
                f"killed by signal {-res.returncode}"
                if res.returncode < 0
                else f"exit status {res.returncode}"
            )
            if res.returncode == -9:
                how += " (out of memory?)"
            results[side] = {"failed": f"{how}: " + (lines or [""])[-1][:300]}
        else:
            results[side] = json.loads(res.stdout.strip().splitlines()[-1])
        print(f"wholetrain {side}: {results[side]}", flush=True)
    return results


def report_lines(r: dict, peak: float | None = None) -> list[str]:
    """The BENCHMARKS.md section of ``run_all``'s results (``peak``: the host's float32 GFLOP/s)."""

    def gb(b):
        return f"{b / 2**30:.2f}" if b is not None else "?"

    gflop = r.get("gflop")
    lines = ["## Whole-volume training step on the CPU (256x352x224, 8 classes, float32, Adam)", ""]
    lines += [
        "| side | step s (median) | CPU s / step (median) | runs | first step s | peak RSS GiB "
        "| XLA temp GiB | GFLOP/s (% peak) | loss |"
    ]
    lines += ["|---|---|---|---|---|---|---|---|---|"]
    for side in SIDES:
        s = r.get(side, {})
        name = {"streamed": f"ours streamed (slab_rows {s.get('slab_rows', '?')})", "plain": "ours plain"}
        name = name.get(side, "PyTorch peer (plain step)")
        if "failed" in s:
            lines.append(f"| {name} | failed: `{s['failed']}` | | | | | | | |")
        elif "times" in s:
            med = statistics.median(s["times"])
            achieved = f"{gflop / med:.0f} ({100 * gflop / med / peak:.0f} %)" if gflop and peak else "-"
            lines.append(
                f"| {name} | {med:.1f} | {statistics.median(s['cpu_times']):.1f} | {len(s['times'])} | "
                f"{s['first_s']:.1f} | {s['peak_rss_gb']:.2f} | "
                f"{gb(s.get('temp_bytes'))} | {achieved} | {s['loss']:.4f} |"
            )
        elif s:
            lines.append(
                f"| {name} | not run (compiled only: temp buffers {gb(s.get('temp_bytes'))} GiB) "
                f"| | | | {s['peak_rss_gb']:.2f} (compiling) | {gb(s.get('temp_bytes'))} | | |"
            )
    if gflop:
        lines += ["", f"GFLOP per step: {gflop:.0f} (XLA's cost analysis of the plain step; the streamed "]
        lines[-1] += "one does more: its level-1 forward again in the backward pass, and halo rows)."
    ours, peer = r.get("streamed", {}), r.get("peer", {})
    if "times" in ours and "times" in peer:
        a, b = statistics.median(ours["times"]), statistics.median(peer["times"])
        rss = ours["peak_rss_gb"] * 2**30 / 1e9  # GiB (ru_maxrss) -> GB, the goal's unit
        lines += ["", f"Goals (2-core CPU): streamed peak RSS {ours['peak_rss_gb']:.2f} GiB ({rss:.2f} GB) "]
        lines[-1] += f"vs <= 6 GB ({'met' if rss <= 6 else 'NOT met'}); time {a:.1f} s = {a / b:.2f}x the "
        lines[-1] += f"peer's plain step ({b:.1f} s) vs <= 0.8x ({'met' if a <= 0.8 * b else 'NOT met'})."
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--side", choices=SIDES, help="run one side and print its JSON (default: all)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--slab-rows", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    runtime.restart_with_jemalloc([sys.executable, os.path.abspath(__file__), *(argv or sys.argv[1:])])
    runtime.configure_xla_flags()
    cpus = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, cpus[: args.threads])
    if args.side:
        print(json.dumps(worker(args.side, args.repeats, args.slab_rows, args.threads)))
    else:
        print("\n".join(report_lines(run_all(args.repeats, args.slab_rows, args.threads))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
