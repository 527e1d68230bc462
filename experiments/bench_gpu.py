"""GPU figures for ``bench.py --cases gpu`` (a GPU machine: ``make install GPU=cuda12`` first).

Each configuration runs in its own subprocess, so that its peak device memory
(``memory_stats()["peak_bytes_in_use"]``) is its own: the whole-volume (256 x 352 x 224, 8 classes,
n_filters 24) training step, plain and streamed (slabs of 8), float32 and bf16, weighted cross-entropy and
Adam, one batch of one volume: compile time, median step time of --repeats steps after one excluded,
peak device memory; the whole-volume forward (float32). Then the demo fold end to end on the GPU
(experiments/bench_demo.py: cold and warm compilation cache).

Goals (issue 19, an H100/H200): whole-volume step <= 0.1 s, streamed step <= 8 GB of device memory,
demo fold <= 60 s.

    .venv/bin/python experiments/bench.py --cases gpu --out BENCHMARKS.md
    .venv/bin/python experiments/bench_gpu.py --config streamed-bf16 --repeats 5   # one configuration
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
WHOLE = (256, 352, 224)
N_CLASSES = 8
SLAB = 8
CONFIGS = ("forward-float32", "plain-float32", "plain-bf16", "streamed-float32", "streamed-bf16")


def measure(config: str, repeats: int) -> dict:
    """One configuration on this process's first device."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from cerebrum_jax.model import network as model
    from cerebrum_jax.train import steps as train
    from cerebrum_jax.train.losses import LossConfig

    kind, precision = config.split("-")
    dev = jax.devices()[0]
    dtype = precision.replace("bf16", "bfloat16")
    cfg = model.ModelConfig(n_filters=24, n_classes=N_CLASSES, compute_dtype=dtype)
    params = model.init_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(1, *WHOLE, 1)).astype(np.float32))
    out = {"device": f"{dev.device_kind} ({dev.platform})"}
    if kind == "forward":
        f = jax.jit(lambda p, v: model.probabilities(p, cfg, v))
        t = time.perf_counter()
        f(params, x).block_until_ready()
        out["first_s"] = time.perf_counter() - t
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            f(params, x).block_until_ready()
            times.append(time.perf_counter() - t)
    else:
        labels = jnp.asarray(rng.integers(0, N_CLASSES, size=(1, *WHOLE)).astype(np.int32))
        batch = {"image": x, "labels": labels, "class_weights": jnp.linspace(0.5, 1.5, N_CLASSES)}
        frozen = jax.tree_util.tree_map(lambda _: False, params)
        tx = train.make_optimizer(frozen, 5e-4)
        slab = SLAB if kind == "streamed" else 0
        step = train.make_train_step(cfg, LossConfig("ce", "balanced"), tx, slab_rows=slab)
        state = train.init_state(params, tx)
        t = time.perf_counter()
        compiled = jax.jit(step, donate_argnums=0).lower(state, batch, jax.random.key(1)).compile()
        out["compile_s"] = time.perf_counter() - t
        state, m = compiled(state, batch, jax.random.key(1))
        jax.block_until_ready(m)
        times = []
        for i in range(repeats):
            t = time.perf_counter()
            state, m = compiled(state, batch, jax.random.key(i))
            jax.block_until_ready(m)
            times.append(time.perf_counter() - t)
        out["loss"] = float(m["loss"])
    stats = dev.memory_stats() or {}
    out["times"] = times
    out["peak_gb"] = stats.get("peak_bytes_in_use", 0) / 1e9 if stats else None
    return out


def run_all(repeats: int) -> dict:
    """Every configuration in its own subprocess, then the demo fold (bench_demo)."""
    import jax

    if jax.default_backend() != "gpu":
        return {"skipped": f"no GPU here (JAX's default backend is {jax.default_backend()!r})"}
    results = {}
    for config in CONFIGS:
        cmd = [sys.executable, __file__, "--config", config, "--repeats", str(repeats)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            lines = [ln for ln in res.stderr.splitlines() if "rror" in ln] or res.stderr.splitlines()
            results[config] = {"failed": (lines or [f"exit status {res.returncode}"])[-1][:300]}
        else:
            results[config] = json.loads(res.stdout.strip().splitlines()[-1])
        print(f"gpu {config}: {results[config]}", flush=True)
    sys.path.insert(0, HERE)
    import bench_demo

    results["demo"] = bench_demo.run_all()
    return results


def report_lines(r: dict | None) -> list[str]:
    lines = ["## GPU figures", ""]
    if not r or "skipped" in r:
        why = (r or {}).get("skipped", "no GPU was lent to the run that wrote this file")
        return lines + [
            f"Not measured: {why}. On a GPU machine: `make install GPU=cuda12` (or cuda13), then",
            "`.venv/bin/python experiments/bench.py --cases gpu --out BENCHMARKS.md` measures, at",
            "256x352x224, 8 classes: the training step plain and streamed (slabs of 8), float32 and bf16,",
            "with its compile time and peak device memory (goals on an H100/H200: step <= 0.1 s, streamed",
            "<= 8 GB), the whole-volume forward, and the demo fold end to end (goal <= 60 s).",
        ]
    device = next((v["device"] for v in r.values() if isinstance(v, dict) and "device" in v), "?")
    lines += [f"Device: {device}.", ""]
    lines += ["| configuration | step s (median) | first / compile s | peak device GB | loss |"]
    lines += ["|---|---|---|---|---|"]
    for config in CONFIGS:
        s = r.get(config, {})
        if "failed" in s:
            lines.append(f"| {config} | failed: `{s['failed']}` | | | |")
        elif "times" in s:
            first = s.get("compile_s", s.get("first_s"))
            peak = f"{s['peak_gb']:.2f}" if s.get("peak_gb") is not None else "?"
            loss = f"{s['loss']:.4f}" if "loss" in s else "-"
            med = statistics.median(s["times"])
            lines.append(f"| {config} | {med:.4f} | {first:.1f} | {peak} | {loss} |")
    if "demo" in r:
        sys.path.insert(0, HERE)
        import bench_demo

        lines += ["", *bench_demo.report_lines(r["demo"])[2:]]  # the table, under this section's heading
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=CONFIGS, help="one configuration, JSON out (default: all + the demo)")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    out = measure(args.config, args.repeats) if args.config else run_all(args.repeats)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
