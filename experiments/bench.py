"""Benchmark cerebrum-jax against its PyTorch peer (issue 4); writes BENCHMARKS.md.

    .venv/bin/python experiments/bench.py --out BENCHMARKS.md            # everything (< 15 min, 2 cores)
    .venv/bin/python experiments/bench.py --cases fwd,train --repeats 5  # a subset
    .venv/bin/python experiments/bench.py --cases gpu                    # GPU figures (on a GPU machine)
    .venv/bin/python experiments/bench.py --update --cases demo          # rerun one case, keep the others
    .venv/bin/python experiments/bench.py --render                       # the page again from BENCHMARKS.json

Order: parity check first (max abs probability difference <= 1e-4 with the same weights, else exit 1),
then each case with a warm-up call excluded and the median of --repeats timed calls, ours and the peer
interleaved call by call. Whole-volume forwards run in subprocesses (one per side and round, alternating)
so that each side's peak RSS (getrusage ru_maxrss) is its own. Both sides are pinned to --threads CPUs
(sched_setaffinity, inherited by XLA's and torch's thread pools; torch.set_num_threads too).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # the bench_* modules beside this one
import bench_report  # noqa: E402
from bench_report import BF16_CASES, CASES, EXTRA  # noqa: E402

from cerebrum_jax import runtime  # noqa: E402

SMALL = (64, 88, 56)
WHOLE = (256, 352, 224)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def pin_threads(n: int) -> None:
    """Restrict this process (and the thread pools it creates later) to ``n`` CPUs."""
    cpus = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, cpus[:n])
    os.environ.setdefault("OMP_NUM_THREADS", str(n))


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def interleave(ours, peer, repeats: int) -> tuple[list[float], list[float]]:
    """Warm-up (excluded) then ``repeats`` timed calls of each, alternating ours/peer."""
    ours(), peer()
    a, b = [], []
    for _ in range(repeats):
        a.append(timed(ours))
        b.append(timed(peer))
    return a, b


def setup(threads: int):
    """Import the two sides with ``threads`` threads; returns (jax, np, torch, M, T)."""
    import torch

    torch.set_num_threads(threads)
    import jax
    import numpy as np
    import torch_peer as T

    from cerebrum_jax.model import network as M

    return jax, np, torch, M, T


def net_pair(n_classes: int = 7, precision: str = "float32"):
    jax, np, torch, M, T = setup(ARGS.threads)
    cfg = M.ModelConfig(n_filters=24, n_classes=n_classes, compute_dtype=precision)
    params = M.init_params(cfg, jax.random.PRNGKey(0))
    net = T.TorchCerebrum(jax.tree_util.tree_map(np.asarray, params), dropout_rate=cfg.dropout_rate)
    return cfg, params, net


def volume(shape, seed: int = 0):
    import numpy as np

    return np.random.default_rng(seed).normal(size=(1, *shape, 1)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# cases
# ---------------------------------------------------------------------------------------------


def our_inference_forward(cfg):
    """What ``cerebrum-jax segment`` runs: on a CPU lean.probabilities_lean (depth slabs, 2-D convs)."""
    from cerebrum_jax.predict.segment import forward_fn

    return forward_fn(cfg)


def parity() -> dict:
    """Max abs probability difference to the peer of model.probabilities and of segment's forward."""
    jax, np, torch, M, T = setup(ARGS.threads)
    cfg, params, net = net_pair()
    x = volume(SMALL)
    peer = T.forward_probabilities(net, x)
    model_fwd = np.asarray(jax.jit(lambda p, v: M.probabilities(p, cfg, v))(params, x))
    segment_fwd = np.asarray(our_inference_forward(cfg)(params, x))
    diffs = [float(np.max(np.abs(ours - peer))) for ours in (model_fwd, segment_fwd)]
    return {"max_abs_prob_diff": max(diffs), "model": diffs[0], "segment": diffs[1], "ok": max(diffs) <= 1e-4}


def case_fwd(precision: str = "float32") -> dict:
    jax, np, torch, M, T = setup(ARGS.threads)
    cfg, params, net = net_pair(precision=precision)
    x = volume(SMALL)
    f = jax.jit(lambda p, v: M.probabilities(p, cfg, v))

    def ours():
        return f(params, x).block_until_ready()

    bf16 = precision == "bfloat16"
    a, b = interleave(ours, lambda: T.forward_probabilities(net, x, bf16=bf16), ARGS.repeats)
    return {"ours": a, "peer": b, "gflop": forward_gflop(cfg, SMALL)}


def forward_gflop(cfg, shape) -> float:
    """GFLOP of one forward pass (B = 1) from XLA's cost analysis of the lowered program (not compiled)."""
    import jax
    import jax.numpy as jnp

    from cerebrum_jax.model import network as M

    params = jax.eval_shape(lambda: M.init_params(cfg, jax.random.PRNGKey(0)))
    x = jax.ShapeDtypeStruct((1, *shape, 1), jnp.float32)
    return jax.jit(lambda p, v: M.probabilities(p, cfg, v)).lower(params, x).cost_analysis()["flops"] / 1e9


def train_gflop(cfg, shape) -> float:
    """GFLOP of one plain training step (B = 1: forward, backward, Adam), XLA's cost analysis, lowered."""
    import jax
    import optax

    from cerebrum_jax.model import network as M

    tx = optax.adam(5e-4)
    step, _ = our_train_step(cfg, tx)
    params = jax.eval_shape(lambda: M.init_params(cfg, jax.random.PRNGKey(0)))
    state = jax.eval_shape(lambda p: {"params": p, "opt_state": tx.init(p), "step": 0}, params)
    _, _, batch = train_inputs((8, 8, 8), cfg.n_classes)
    batch = {
        "image": jax.ShapeDtypeStruct((1, *shape, 1), "float32"),
        "labels": jax.ShapeDtypeStruct((1, *shape), "int32"),
        "class_weights": jax.ShapeDtypeStruct(batch["class_weights"].shape, "float32"),
    }
    key = jax.ShapeDtypeStruct((2,), "uint32")
    return jax.jit(step).lower(state, batch, key).cost_analysis()["flops"] / 1e9


def our_train_step(cfg, tx):
    """The project's step (cerebrum_jax.train.steps) when present, else an equivalent local one."""
    import jax
    import jax.numpy as jnp
    import optax

    from cerebrum_jax.model import network as M

    try:
        from cerebrum_jax.train import steps as TR

        loss = TR.LossConfig("ce", "balanced")  # the peer's loss: weighted cross-entropy
        which = "cerebrum_jax.train.steps.make_train_step (weighted cross-entropy)"
        return TR.make_train_step(cfg, loss, tx), which
    except (ImportError, AttributeError, TypeError):
        pass

    def step(state, batch, key):
        def loss_fn(p):
            logits = M.apply(p, cfg, batch["image"], train=True, key=key)
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
            w = batch["class_weights"][batch["labels"]]
            return jnp.sum(ce * w) / jnp.sum(w)

        loss, grads = jax.value_and_grad(loss_fn)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        new = {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state}
        return {**new, "step": state["step"] + 1}, {"loss": loss}

    return step, "local weighted cross-entropy + Adam"


def train_inputs(shape, n_classes: int):
    import jax.numpy as jnp
    import numpy as np

    x = volume(shape)
    labels = np.random.default_rng(1).integers(0, n_classes, size=(1, *shape)).astype(np.int32)
    weights = np.linspace(0.5, 1.5, n_classes).astype(np.float32)
    batch = {"image": jnp.asarray(x), "labels": jnp.asarray(labels), "class_weights": jnp.asarray(weights)}
    return x, labels, batch


def case_train(precision: str = "float32") -> dict:
    jax, np, torch, M, T = setup(ARGS.threads)
    import optax

    cfg, params, net = net_pair(precision=precision)
    tx = optax.adam(5e-4)
    step, which = our_train_step(cfg, tx)
    jstep = jax.jit(step, donate_argnums=(0,))
    x, labels, batch = train_inputs(SMALL, cfg.n_classes)
    box = {"state": {"params": params, "opt_state": tx.init(params), "step": jax.numpy.zeros((), "int32")}}
    key = jax.random.PRNGKey(0)

    def ours():
        box["state"], metrics = jstep(box["state"], batch, jax.random.fold_in(key, int(box["state"]["step"])))
        jax.block_until_ready(metrics)

    peer_step = T.make_train_step(net, bf16=precision == "bfloat16")
    xt = torch.from_numpy(x.transpose(0, 4, 1, 2, 3).copy())
    lt = torch.from_numpy(labels.astype(np.int64))
    wt = torch.from_numpy(np.asarray(batch["class_weights"]).copy())
    a, b = interleave(ours, lambda: peer_step(xt, lt, wt), ARGS.repeats)
    return {"ours": a, "peer": b, "ours_step": which, "gflop": train_gflop(cfg, SMALL)}


def case_train_runs(precision: str = "float32") -> dict:
    """``case_train`` --train-runs times (each interleaved ours / peer); ours and peer: the runs' medians,
    so the row shows the median of the runs' medians."""
    runs = [case_train(precision) for _ in range(max(1, ARGS.train_runs))]
    return {
        "ours": [statistics.median(r["ours"]) for r in runs],
        "peer": [statistics.median(r["peer"]) for r in runs],
        "ours_step": runs[0]["ours_step"],
        "gflop": runs[0]["gflop"],
        "raw": runs,
    }


def whole_worker(side: str, runs: int) -> dict:
    """Subprocess body: warm-up + ``runs`` whole-volume forwards of one side; times and peak RSS."""
    jax, np, torch, M, T = setup(ARGS.threads)
    cfg, params, net = net_pair()
    x = volume(WHOLE)
    if side == "ours":
        f = our_inference_forward(cfg)

        def fn():
            return f(params, x).block_until_ready()
    else:

        def fn():
            return T.forward_probabilities(net, x)

    fn()
    times = [timed(fn) for _ in range(runs)]
    return {"times": times, "peak_rss_gb": peak_rss_gb()}


def case_whole() -> dict:
    """Alternating subprocesses per side; --whole-rounds rounds of ceil(repeats / rounds) runs each."""
    rounds = max(1, ARGS.whole_rounds)
    runs = -(-ARGS.repeats // rounds)
    out = {"ours": [], "peer": [], "ours_rss": 0.0, "peer_rss": 0.0}
    for _ in range(rounds):
        for side in ("ours", "peer"):
            cmd = [sys.executable, __file__, "--worker", side, "--repeats", str(runs)]
            cmd += ["--threads", str(ARGS.threads)]
            res = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if res.returncode != 0:
                raise RuntimeError(f"whole-volume worker {side} failed:\n{res.stderr[-3000:]}")
            r = json.loads(res.stdout.strip().splitlines()[-1])
            out[side] += r["times"]
            out[f"{side}_rss"] = max(out[f"{side}_rss"], r["peak_rss_gb"])
    from cerebrum_jax.model import network as M

    out["gflop"] = forward_gflop(M.ModelConfig(n_filters=24, n_classes=7), WHOLE)
    return out


def case_wholetrain() -> dict:
    """The whole-volume training step: ours streamed, ours plain (compiled only), the peer; each side in
    its own subprocess, one at a time (experiments/bench_wholetrain.py)."""
    import bench_wholetrain

    from cerebrum_jax.model import network as M

    out = bench_wholetrain.run_all(ARGS.wholetrain_repeats, ARGS.slab_rows, ARGS.threads)
    out["gflop"] = train_gflop(M.ModelConfig(n_filters=24, n_classes=bench_wholetrain.N_CLASSES), WHOLE)
    return out


def case_augment() -> dict:
    """One augmented whole-volume view: train.augment vs the original scipy/elasticdeform pipeline."""
    jax, np, torch, M, T = setup(ARGS.threads)
    from original_augment import ELASTIC, original_augment

    from cerebrum_jax.train.augment import AugmentConfig, augment

    img = np.abs(volume(WHOLE)[0])
    labels = np.random.default_rng(1).integers(0, 8, size=WHOLE).astype(np.int32)
    cfg, key, rng = AugmentConfig(), jax.random.PRNGKey(0), np.random.default_rng(0)
    ji, jl = jax.numpy.asarray(img), jax.numpy.asarray(labels)
    box = {"i": 0}

    def ours():
        box["i"] += 1
        jax.block_until_ready(augment(jax.random.fold_in(key, box["i"]), ji, jl, cfg))

    a, b = interleave(ours, lambda: original_augment(rng, img[..., 0], labels), ARGS.aug_repeats)
    return {"ours": a, "peer": b, "peer_elastic": ELASTIC}


def case_gpu() -> dict:
    """GPU figures (experiments/bench_gpu.py): whole-volume steps plain and streamed, float32 and bf16, each
    in its own process (its own peak device memory), and the demo fold on the GPU."""
    import bench_gpu

    return bench_gpu.run_all(ARGS.repeats)


def case_demo() -> dict:
    """The demo fold, cold and warm compilation cache (experiments/bench_demo.py)."""
    import bench_demo

    return bench_demo.run_all()


def vector_isa() -> str:
    """The CPU's vector extensions that XLA and oneDNN choose kernels by (from /proc/cpuinfo): the same
    model name can come with or without AVX-512 on a cloud VM, and the times differ several-fold."""
    flags = cpu_flags()
    if not flags:
        return "?"
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16")
    found = [f for f in wanted if f in flags]
    return " ".join(found) + ("" if "avx512f" in found else " (no AVX-512)")


def cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo") as fh:
            return next((line.split(":", 1)[1].split() for line in fh if line.startswith("flags")), [])
    except OSError:
        return []


def has_bf16() -> bool:
    """The host runs bfloat16 natively (AVX512-BF16 or AMX-BF16): the bf16 rows are measured there."""
    return bool({"avx512_bf16", "amx_bf16"} & set(cpu_flags()))


def host_peak(threads: int) -> dict:
    """The float32 peak of the cores used: cores x clock x 2 FMA units x vector lanes x 2 FLOP (an FMA).

    The clock is /proc/cpuinfo's "cpu MHz" (the nominal one on a VM); 16 lanes with AVX-512, 8 with AVX2;
    2 FMA units per core (Xeon Gold/Platinum, EPYC Zen 2-4) is an assumption, written beside the figure."""
    mhz = 0.0
    try:
        with open("/proc/cpuinfo") as fh:
            mhz = next((float(line.split(":")[1]) for line in fh if line.startswith("cpu MHz")), 0.0)
    except (OSError, ValueError):
        pass
    flags = set(cpu_flags())
    lanes = 16 if "avx512f" in flags else 8 if "avx2" in flags else 4
    gflops = threads * mhz / 1e3 * 2 * lanes * 2
    text = f"{threads} cores x {mhz / 1e3:.2f} GHz x 2 FMA units x {lanes} float32 lanes x 2"
    text += f" = {gflops:.0f} GFLOP/s"
    return {"gflops": gflops, "text": text}


def machine(devices: bool = True) -> dict:
    """The host and versions; ``devices=False`` leaves JAX's backends unstarted (a GPU client started in
    this process would hold most of the memory of the GPU that bench_gpu's processes measure)."""
    import jax
    import jaxlib
    import numpy as np

    try:
        import torch

        torch_version = torch.__version__
    except ImportError:  # a GPU machine running --cases gpu only needs no peer
        torch_version = "not installed"

    model = platform.processor()
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        names = [
            line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")
        ]
        model = names[0] if names else model
    except OSError:
        pass
    return {
        "cpu": model,
        "cpu_vector_isa": vector_isa(),
        "cpus_visible": os.cpu_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "torch": torch_version,
        "numpy": np.__version__,
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", "(none)"),
        "memory allocator": runtime.active_allocator(),
        "float32 peak (assumed 2 FMA units per core)": host_peak(ARGS.threads)["text"],
        **({"devices": ", ".join(str(d) for d in jax.devices())} if devices else {}),
    }


def main(argv=None) -> int:
    global ARGS
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="BENCHMARKS.md")
    p.add_argument(
        "--update",
        action="store_true",
        help="keep the other cases of the record beside --out (BENCHMARKS.json), measured on this host "
        "with these versions; rerun only --cases",
    )
    default = ",".join((*CASES, "wholetrain", "demo"))
    p.add_argument(
        "--cases",
        default=default,
        help=f"comma list of {', '.join(CASES + BF16_CASES + EXTRA)} (default "
        f"{default}, plus {', '.join(BF16_CASES)} on a bf16 host; 'gpu' on a GPU machine)",
    )
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--aug-repeats", type=int, default=5)
    p.add_argument("--whole-rounds", type=int, default=2, help="alternating subprocess rounds per side")
    p.add_argument("--wholetrain-repeats", type=int, default=3, help="timed whole-volume training steps")
    p.add_argument("--slab-rows", type=int, default=8, help="slab depth of the streamed whole-volume step")
    p.add_argument("--train-runs", type=int, default=3, help="interleaved runs of the train case (median)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--worker", choices=("ours", "peer"), help=argparse.SUPPRESS)
    p.add_argument(
        "--render",
        action="store_true",
        help="measure nothing: write --out again from its JSON record (after editing bench_notes.md)",
    )
    ARGS = p.parse_args(argv)
    if ARGS.render:
        try:
            rec = bench_report.load_record(ARGS.out)
        except ValueError as e:
            p.error(str(e))
        keys = ("machine", "parity", "results", "settings", "measured")
        bench_report.write_report(ARGS.out, *(rec[k] for k in keys))
        print(f"wrote {ARGS.out}")
        return 0
    # what the cerebrum-jax command runs with (cerebrum_jax.runtime): jemalloc preloaded when installed (a
    # restart of this script; the peer in this process gets it too), XLA:CPU's kernel libraries
    runtime.restart_with_jemalloc([sys.executable, os.path.abspath(__file__), *(argv or sys.argv[1:])])
    runtime.configure_xla_flags()
    cases = [c for c in ARGS.cases.split(",") if c]
    if cases != ["gpu"]:  # the GPU figures use the whole host's CPUs for what is not on the GPU
        pin_threads(ARGS.threads)
    if ARGS.worker:
        print(json.dumps(whole_worker(ARGS.worker, ARGS.repeats)))
        return 0
    if ARGS.cases == default and has_bf16():
        cases[2:2] = list(BF16_CASES)
    unknown = set(cases) - set(CASES + BF16_CASES + EXTRA)
    if unknown:
        p.error(f"unknown case(s) {sorted(unknown)}")
    results = {}
    if cases != ["gpu"]:
        par = parity()
        print(f"parity: max abs prob diff {par['model']:.2e} (model), {par['segment']:.2e} (segment)")
        if not par["ok"]:
            print("parity check failed (> 1e-4): not timing anything", file=sys.stderr)
            return 1
    else:
        par = {"model": float("nan"), "segment": float("nan")}
    runners = dict(fwd=case_fwd, train=case_train_runs, whole=case_whole, augment=case_augment, gpu=case_gpu)
    runners.update(wholetrain=case_wholetrain, demo=case_demo)
    runners.update(fwd_bf16=lambda: case_fwd("bfloat16"), train_bf16=lambda: case_train_runs("bfloat16"))
    if ARGS.update:  # before hours of measuring: is there a record of this host to add to?
        try:
            bench_report.merge_previous(ARGS.out, machine(devices=False), {}, {})
        except ValueError as e:
            p.error(str(e))
    settings = dict(threads=ARGS.threads, repeats=ARGS.repeats, aug_repeats=ARGS.aug_repeats)
    settings.update(peak=host_peak(ARGS.threads)["gflops"], bf16=has_bf16())
    # the cases that run in their own processes first: this process's allocator keeps what the in-process
    # cases freed (jemalloc, told never to give pages back), and the peer's whole-volume step needs 19 GiB
    # of the 24 (after the in-process cases it was killed)
    alone = [c for c in cases if c in EXTRA]
    for name in alone + [c for c in cases if c not in alone]:
        t = time.perf_counter()
        results[name] = runners[name]()
        print(f"{name}: done in {time.perf_counter() - t:.0f} s", flush=True)
        if name in CASES + BF16_CASES:
            print(bench_report.row(name, results[name], settings["peak"]), flush=True)
    info, measured = machine(), {name: bench_report.today() for name in results}
    if ARGS.update:
        results, measured = bench_report.merge_previous(ARGS.out, info, results, measured)
    bench_report.write_report(ARGS.out, info, par, results, settings, measured)
    print(f"wrote {ARGS.out}")
    return 0


ARGS = argparse.Namespace(
    threads=2, repeats=5, aug_repeats=5, whole_rounds=2, wholetrain_repeats=3, slab_rows=8, train_runs=3
)

if __name__ == "__main__":
    sys.exit(main())
