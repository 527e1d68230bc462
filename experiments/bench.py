"""Benchmark cerebrum-jax against its PyTorch peer (issue 4); writes BENCHMARKS.md.

    .venv/bin/python experiments/bench.py --out BENCHMARKS.md            # everything (< 15 min, 2 cores)
    .venv/bin/python experiments/bench.py --cases fwd,train --repeats 5  # a subset
    .venv/bin/python experiments/bench.py --cases gpu                    # GPU figures (on a GPU machine)

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

from cerebrum_jax import runtime

HERE = os.path.dirname(os.path.abspath(__file__))
SMALL = (64, 88, 56)
WHOLE = (256, 352, 224)
CASES = ("fwd", "train", "whole", "augment")  # ours vs peer; "wholetrain" (ours only) and "gpu" besides
NOTES = """## What was tried for speed (2-core CPU, forward 64x88x56 unless said)

Measured while five other engineers shared the 2 cores, so single numbers are noisy (+-50 %); ratios
interleaved in one process are more reliable than absolute times.

| change | result | kept |
|---|---|---|
| strided (kernel == stride) convs as space-to-depth + one matmul (model.py, before this issue) | 7.2 s -> ~0.4 s forward | yes |
| `dec_lvl1_block1_conv` alone (24->24, 3x3x3): XLA conv vs PyTorch | XLA 0.23 s, torch 0.12 s | - |
| 3x3x3 conv as im2col over (h, w) taps (9x channels) + 3 matmuls along D | 0.64 s vs 0.23 s XLA conv | no |
| im2col over w taps (3x channels) + 9 matmuls | 0.53 s | no |
| 27 per-tap matmuls, shift-add | 0.88 s | no |
| full im2col (27x channels) + one matmul (also 27x memory) | 0.90 s | no |
| `--xla_cpu_use_onednn=true` | no change beyond noise | no |
| `--xla_cpu_use_xnnpack=true` | slower (0.73 s vs 0.38 s) | no |
| `--xla_cpu_experimental_onednn_custom_call=true` | 0.35 s vs 0.36 s (noise) | no |
| `--xla_cpu_experimental_ynn_fusion_type=individual_convolution` (YNNPACK convs; A/B, quiet) | 0.335/0.359 s vs 0.368/0.348 s default | no |
| `--xla_cpu_experimental_onednn_fusion_type=individual_convolution` (A/B, quiet) | 0.355/0.351 s vs 0.368/0.348 s default | no |
| kernel gradient of 3x3x3 convs as 9 matmuls (custom_vjp in model.py) instead of XLA's conv-backprop-filter | dk 1.03 s vs 1.74 s XLA (loaded machine; torch fwd+bwd 0.76 s) | yes |
| whole-volume convs in D-slabs of <= 2^26 input elements (model.py) | XLA:CPU aborted (std::bad_alloc) on one 256x352x224x24 conv; slabs run | yes |
| `--xla_cpu_enable_fast_math=true` | no change | no |
| bf16 head kept float32 (`main_output` 1x1x1 conv) under `--precision bf16` | float32 softmax/loss | yes |
| remat of the level-1 blocks (jax.checkpoint, nothing_saveable) | same compiled footprint on CPU: XLA:CPU merges the recomputation back (CSE) | yes (for GPU) |
| whole volume slab by slab (`lean.probabilities_lean`, segment's CPU forward): level-1 layers per 16-row depth slab with halos in `lax.fori_loop`s writing into preallocated outputs, levels 2-3 whole | 256x352x224 peak RSS 11.1 -> 2.5-2.9 GB; with 3-D convs still 58 s vs 61 s (loaded machine, load ~4) | yes |
| 3x3x3 convs as three 2-D convs over (H, W), one per D tap with the D rows as the batch, summed (`model.conv3d_depth_taps`) | XLA:CPU 2.5-3x faster per conv (dec_lvl1 16-row slab 2.94 -> 1.02 s); forward 64x88x56 0.73 -> 0.19 s, 256x352x224 61 -> 11.7 s (peer 16.5 s under the same load); loaded machine | yes: in the lean inference path and (35a9382) in `model.apply`'s 'same' convs on XLA:CPU, training included: forward 64x88x56 0.117 s vs peer 0.219 s, train step 0.658 s vs peer 0.621 s (quiet machine, interleaved, median of 5) |
| kernel gradient of the 3x3x3 convs, `dec_lvl1_block1_conv` at 64x88x56 (quiet): 9 matmuls with 3 w-taps side by side (kept) / 27 dot_generals on slices / voxel axis split in 4 / per-D-tap 9 taps in one matmul / vjp of the 2-D convs | 0.312 / 0.555 / 0.628 / 0.458 / 0.510 s (input gradient 0.098 s, forward 0.095 s): the kernel gradient is the largest part of the train step | first kept |
| kernel gradient in the streamed step: the 3 D taps as a Python loop chained by `lax.optimization_barrier` (static slices) instead of a `lax.map` with dynamic slices | streamed step at 64x88x56 4.65 -> 4.20 CPU-s (-10 %), but compiled temporaries at 256x352x224 3.73 -> 4.88 GiB (the barrier does not keep XLA:CPU from scheduling the copies early) | no |

## Goals not met on the CPU, and why (from the run above)

The run above (stop 10, `make bench` from a clean clone at 860e498, 40 min) had a 2-vCPU AMD EPYC VM
without AVX-512 (`cpu_vector_isa`). Its forward and train-step cases ran alone; the whole-volume forward,
the augmentation and our streamed whole-volume step shared the 2 cores with short checks (roughly 10-15
min of one core in all), so their wall times may be somewhat inflated, CPU seconds much less. Both sides
were 2-3.5x slower than in the previous `make bench` run (forward 64x88x56 ours 0.126 -> 0.430 s, peer 0.241 -> 0.489 s), ours more than the peer;
that run did not record the vector extensions (the machine section does now), so the host change is the
likely but unproven cause.

- forward at 64x88x56 is met since the 3x3x3 convs run as three 2-D convolutions on XLA:CPU
  (`model.conv3d_depth_taps`; XLA:CPU's 3-D convolution took about 2x oneDNN's time in PyTorch, and no
  XLA flag of jaxlib 0.10.2 (oneDNN, XNNPACK, YNNPACK fusion types) nor an im2col matmul closed that gap).
- train step at 64x88x56: not met. The median of three interleaved runs is 1.40 (ours 2.04 s, peer
  1.46 s); earlier single runs gave 1.05-1.95. What is left is the kernel gradient of the 3x3x3
  convolutions (9 matmuls over all voxels, about 3x the forward conv's time for dec_lvl1): none of the
  variants measured above was faster; a blocked direct kernel (as oneDNN's) is what remains.
- whole-volume forward: met in the previous run (0.89: 7.55 s vs 8.45 s), not in this one (1.13: 25.9 s vs
  22.9 s) on the host without AVX-512. Ours is segment's CPU forward, `lean.probabilities_lean`: the
  full-resolution layers (enc_lvl1 + down, then enc_lvl1 again + up + skip + dec_lvl1 + head + softmax)
  run per 16-row depth slab with halos, so no (256, 352, 224, 24) tensor is ever whole, and with 2-D
  convolutions. Before it (model.probabilities with D-slab 3-D convs): 30.4 s, 10.7 GB in the run of 85f13d2.
- The augmentation goal (<= 0.05 of the original pipeline's time) was met in the previous run (0.045) and
  missed narrowly in this one (0.063: 2.07 s vs 32.7 s). The original pipeline runs its scipy
  implementation of the elastic deformation: the pinned elasticdeform 0.5.1 wheel is built against NumPy
  1.x and raises AttributeError on import under NumPy 2, which `experiments/original_augment.py` catches,
  so every case runs from a clean clone (this run).
"""  # noqa: E501

MEMORY_NOTES = """## Memory of a training step (the estimate `finetune` checks a grid against)

`cerebrum_jax/memory.py` refuses, before loading data, a grid whose training step cannot fit (issue 8).
Its CPU figure comes from XLA:CPU's own accounting of the compiled step
(`jax.jit(train.make_train_step(...), donate_argnums=0).lower(...).compile().memory_analysis()`:
arguments + outputs + temporaries; float32, batch 1, n_filters 24, 8 classes, no remat; 2-core CPU
shared with 3 other agents, which changes nothing in these byte counts):

| grid | bytes per voxel |
|---|---|
| 32x32x32 | 5,472 |
| 64x32x32 | 4,919 |
| 64x64x32 | 4,659 |
| 256x352x224 (remat; the RESOURCE_EXHAUSTED above) | 4,657 |

The estimate, 150 B x n_filters + 40 B x n_classes per voxel (3,920 B for this model, 84 % of the
measured), stays on the low side so that only steps that cannot fit are refused: 79 GB for the
whole-volume step, 526 GB for 512x512x512, 1 GB for the demo's 56x72x64 with 4 classes. On a GPU the
figure is a lower bound (16 B x n_filters + 12 B x n_classes, 9.7 GB for the whole-volume step), to be
replaced by a measurement when a GPU is lent. The streamed step (below) is checked with 240 B per voxel
of the grid (the low side of the 267 B of the whole full-size fold's peak RSS, 5.02 GiB at 256x352x224),
whatever the filters and classes: 4.8 GB for the whole volume, 32 GB (refused on this 24 GB machine)
for 512x512x512.
"""  # noqa: E501

WHOLE_NOTES = """## Whole-volume training: the full-size fold and where the memory went (measured by hand)

The full-size fold, from a generated cohort (`python -m cerebrum_jax.fullsize data/fullsize`: 4 pseudo-
subjects at 0.63 mm, all 7 Schneider labels; 2.9 min wall) at commit 35b43080:

    cerebrum-jax finetune --config schneider19 --data data/fullsize --grid 256,352,224 --epochs 1 \\
        --augment-views 1 --fold 3 --out runs/fullsize

ran end to end on the 2-core CPU: warm-up (3 streamed steps, slabs of 8), its validation, fine-tuning
(3 steps), validation, the test subject's prediction (lean forward), metrics (HD95 on 20 M voxels),
surfaces, report.md and report.html. **Peak RSS 5.02 GiB (5.39 GB)** (`/usr/bin/time -v`, the whole fold; goal
<= 12 GB: met). Wall time 29.6 min, 2,024 CPU-s (114 % of one core: it shared the 2 cores with the test
suite and another engineer's work); steps took 135-250 s of wall each under that load, augmentation
and data included. Its Dice (mean 0.04) means nothing: one epoch of 3 views from the demo's 4-class
weights, on pseudo-data.

One epoch of the original recipe (3 training volumes x 30 views = 90 streamed steps, plus 3 validation
passes) therefore costs on this CPU about 90 x the streamed step of the table above plus 90 augmented
views (under 1 s each): well over an hour per epoch, so 110 + 110 epochs are a GPU job. On a GPU: not
measured (no device was lent to this task); the streamed step's compiled temporaries (3.7 GB, below)
are what a GPU has to hold besides parameters, Adam state and one volume.

What the streamed step's memory was, and what changed it (XLA:CPU's compiled memory analysis of
`train.make_train_step(..., slab_rows=8)` at 256x352x224, 8 classes, float32; buffer assignment read
from `XLA_FLAGS=--xla_dump_to`):

| change | compiled temp | where it was |
|---|---|---|
| before (end of the previous stop) | 5.01 GB (6.67 GB peak RSS) | 9 im2col copies of the kernel gradient live at once (9 x 182 MB), threefry's uint32 temporaries of a whole dropout slab (~10 x 76 MB) |
| kernel gradient one D tap at a time (`model._kernel_grad(..., low_memory=True)`, a `lax.map` over the 3 D taps) | 4.02 GB | 3 copies live; ~10 % slower kernel gradient, so only the streamed step uses it |
| dropout bits one row at a time (`streamed._dropout_rows`, bit for bit the same mask) | 3.73 GB | |
| slabs of 16 / 4 rows instead of 8 | 4.71 / 3.24 GB | about 2.75 GB does not scale with the slab: the input and labels padded (2 x 82 MB), the levels 2-3 activations kept for their backward pass (62 MB each at level 2) |

The automatic `slab_rows` is now 8 (was 16). And the step's time: XLA:CPU emitted the transposed 2-D
convolutions of `jax.vjp` (the input gradient of the 3x3x3 convs) inside a `lax.map` body as a naive loop
(`outer_dimension_partitions`), ~10x the forward conv's time; written out as a forward convolution of
the flipped kernel (`streamed._input_grad`), the streamed gradient at 64x88x56 went from 10.5 to 2.75
CPU-s (the plain step's: 2.55 CPU-s; loaded machine). Equality with the plain step is tested as before
(`tests/test_streamed.py`).

Where the streamed step's time goes (profiled by hand, commit 161bb79, `jax.profiler` perfetto trace of
one compiled step, summed per XLA op kind; 128x176x112, slabs of 8, 8 classes, float32; loaded machine,
so shares, not seconds, are the result):

| op kind | share of op time | what it is |
|---|---|---|
| `ynn_fusion` (XNNPACK/YNNPACK convolutions) | 51 % | forward convs, the recomputed level-1 forward, input gradients |
| `concatenate_bitcast_fusion` | 15 % | the im2col copies of the kernel gradient (`model._kernel_grad`), ~0.4 GB/s |
| `dot_general` | 9 % | the kernel gradient's matmuls (K = voxels, 216 x 24 outputs) |
| `copy`, `add_*`, `broadcast_*` fusions | 19 % | slab slicing, gradient accumulation over slabs, dropout rows |

The step's CPU time scales about linearly from 128x176x112 (45 CPU-s) to 256x352x224 (340 CPU-s), and
the plain step's at 64x88x56 (3.4 CPU-s) scaled by the voxel count would be ~220 CPU-s at full size:
the streamed step costs ~1.6x the plain one (halo rows of 8-row slabs: +25 % on dec_lvl1, the 3x3x3
layer that dominates; the level-1 forward recomputed in the backward pass), and the plain step's backward
is itself slower per voxel than the peer's. The kernel gradient (a quarter of the step) is the first
thing to rewrite; the goal of <= 5x our forward needs the backward convolutions at the forward's speed.

In the `make bench` run of stop 10 (the table above), the streamed step took 206.6 s of wall and
340.5 CPU-s (1.65 cores busy), the peer 94.8 s and 175.6 CPU-s (1.85 cores): ours costs 1.9x the peer's
CPU seconds and 2.2x its wall time. The CPU seconds are those of the earlier, loaded measurement (340.5),
so the step's cost did not move with the host change that slowed the forward.
"""  # noqa: E501


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

    sys.path.insert(0, HERE)
    import torch_peer as T

    from cerebrum_jax import model as M

    return jax, np, torch, M, T


def net_pair(n_classes: int = 7):
    jax, np, torch, M, T = setup(ARGS.threads)
    cfg = M.ModelConfig(n_filters=24, n_classes=n_classes)
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
    from cerebrum_jax.segment import forward_fn

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


def case_fwd() -> dict:
    jax, np, torch, M, T = setup(ARGS.threads)
    cfg, params, net = net_pair()
    x = volume(SMALL)
    f = jax.jit(lambda p, v: M.probabilities(p, cfg, v))

    def ours():
        return f(params, x).block_until_ready()

    a, b = interleave(ours, lambda: T.forward_probabilities(net, x), ARGS.repeats)
    return {"ours": a, "peer": b}


def our_train_step(cfg, tx):
    """The project's step (cerebrum_jax.train) when present, else an equivalent local one."""
    import jax
    import jax.numpy as jnp
    import optax

    from cerebrum_jax import model as M

    try:
        from cerebrum_jax import train as TR

        return TR.make_train_step(cfg, TR.LossConfig(), tx), "cerebrum_jax.train.make_train_step"
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


def case_train() -> dict:
    jax, np, torch, M, T = setup(ARGS.threads)
    import optax

    cfg, params, net = net_pair()
    tx = optax.adam(5e-4)
    step, which = our_train_step(cfg, tx)
    jstep = jax.jit(step, donate_argnums=(0,))
    x, labels, batch = train_inputs(SMALL, cfg.n_classes)
    box = {"state": {"params": params, "opt_state": tx.init(params), "step": jax.numpy.zeros((), "int32")}}
    key = jax.random.PRNGKey(0)

    def ours():
        box["state"], metrics = jstep(box["state"], batch, jax.random.fold_in(key, int(box["state"]["step"])))
        jax.block_until_ready(metrics)

    peer_step = T.make_train_step(net)
    xt = torch.from_numpy(x.transpose(0, 4, 1, 2, 3).copy())
    lt = torch.from_numpy(labels.astype(np.int64))
    wt = torch.from_numpy(np.asarray(batch["class_weights"]).copy())
    a, b = interleave(ours, lambda: peer_step(xt, lt, wt), ARGS.repeats)
    return {"ours": a, "peer": b, "ours_step": which}


def case_train_runs() -> dict:
    """``case_train`` --train-runs times (each interleaved ours / peer); ours and peer: the runs' medians,
    so the row shows the median of the runs' medians."""
    runs = [case_train() for _ in range(max(1, ARGS.train_runs))]
    return {
        "ours": [statistics.median(r["ours"]) for r in runs],
        "peer": [statistics.median(r["peer"]) for r in runs],
        "ours_step": runs[0]["ours_step"],
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
    return out


def case_wholetrain() -> dict:
    """The whole-volume training step: ours streamed, ours plain (compiled only), the peer; each side in
    its own subprocess, one at a time (experiments/bench_wholetrain.py)."""
    sys.path.insert(0, HERE)
    import bench_wholetrain

    return bench_wholetrain.run_all(ARGS.wholetrain_repeats, ARGS.slab_rows, ARGS.threads)


def case_augment() -> dict:
    """One augmented whole-volume view: cerebrum_jax.augment vs the original scipy/elasticdeform pipeline."""
    jax, np, torch, M, T = setup(ARGS.threads)
    from original_augment import original_augment

    from cerebrum_jax.augment import AugmentConfig, augment

    img = np.abs(volume(WHOLE)[0])
    labels = np.random.default_rng(1).integers(0, 8, size=WHOLE).astype(np.int32)
    cfg, key, rng = AugmentConfig(), jax.random.PRNGKey(0), np.random.default_rng(0)
    ji, jl = jax.numpy.asarray(img), jax.numpy.asarray(labels)
    box = {"i": 0}

    def ours():
        box["i"] += 1
        jax.block_until_ready(augment(jax.random.fold_in(key, box["i"]), ji, jl, cfg))

    a, b = interleave(ours, lambda: original_augment(rng, img[..., 0], labels), ARGS.aug_repeats)
    return {"ours": a, "peer": b}


def case_gpu() -> dict:
    """Ours only, on the default (GPU) device at 256x352x224: forward, remat train step with 8 classes,
    augmentation per view; device peak bytes from memory_stats."""
    import dataclasses

    import jax
    import optax

    from cerebrum_jax import model as M
    from cerebrum_jax.augment import AugmentConfig, augment

    dev = jax.devices()[0]
    cfg = M.ModelConfig(n_filters=24, n_classes=8)
    params = M.init_params(cfg, jax.random.PRNGKey(0))
    x, labels, batch = train_inputs(WHOLE, cfg.n_classes)
    f = jax.jit(lambda p, v: M.probabilities(p, cfg, v))
    out = {"device": str(dev)}
    f(params, batch["image"]).block_until_ready()
    img = batch["image"]
    out["forward"] = [timed(lambda: f(params, img).block_until_ready()) for _ in range(ARGS.repeats)]
    for remat in (False, True):
        c = dataclasses.replace(cfg, remat=remat)
        tx = optax.adam(5e-4)
        step, _ = our_train_step(c, tx)
        jstep = jax.jit(step, donate_argnums=(0,))
        box = {"s": {"params": params, "opt_state": tx.init(params), "step": jax.numpy.zeros((), "int32")}}

        def run(box=box, jstep=jstep):
            box["s"], m = jstep(box["s"], batch, jax.random.PRNGKey(1))
            jax.block_until_ready(m)

        run()
        out[f"train_remat={remat}"] = [timed(run) for _ in range(ARGS.repeats)]
    img = jax.numpy.abs(batch["image"][0])
    acfg = AugmentConfig()
    jax.block_until_ready(augment(jax.random.PRNGKey(0), img, batch["labels"][0], acfg))
    out["augment"] = [
        timed(
            lambda i=i: jax.block_until_ready(augment(jax.random.PRNGKey(i), img, batch["labels"][0], acfg))
        )
        for i in range(ARGS.repeats)
    ]
    stats = dev.memory_stats() or {}
    out["peak_bytes"] = stats.get("peak_bytes_in_use")
    return out


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------


def vector_isa() -> str:
    """The CPU's vector extensions that XLA and oneDNN choose kernels by (from /proc/cpuinfo): the same
    model name can come with or without AVX-512 on a cloud VM, and the times differ several-fold."""
    try:
        with open("/proc/cpuinfo") as fh:
            flags = next((line.split(":", 1)[1].split() for line in fh if line.startswith("flags")), [])
    except OSError:
        return "?"
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16")
    found = [f for f in wanted if f in flags]
    return " ".join(found) + ("" if "avx512f" in found else " (no AVX-512)")


def machine() -> dict:
    import jax
    import jaxlib
    import numpy as np
    import torch

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
        "torch": torch.__version__,
        "numpy": np.__version__,
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", "(none)"),
        "memory allocator": runtime.active_allocator(),
    }


GOALS = {
    "fwd": "<= 1.0 (aim 0.8)",
    "train": "<= 1.0 (aim 0.8)",
    "whole": "<= 1.0, ours RSS <= 8 GB",
    "augment": "<= 0.05",
}
LABELS = {
    "fwd": "forward 64x88x56",
    "train": "train step 64x88x56 (loss, grads, Adam)",
    "whole": "forward 256x352x224",
    "augment": "one augmented view 256x352x224 (peer: original pipeline)",
}


def row(name: str, r: dict) -> str:
    a, b = statistics.median(r["ours"]), statistics.median(r["peer"])
    ratio = a / b
    rss = f"{r['ours_rss']:.2f} / {r['peer_rss']:.2f}" if "ours_rss" in r else "-"
    limit = 0.05 if name == "augment" else 1.0
    met = ratio <= limit and (name != "whole" or r["ours_rss"] <= 8.0)
    cells = [LABELS[name], f"{a:.3f}", f"{b:.3f}", f"{ratio:.2f}", rss, str(len(r["ours"])), GOALS[name]]
    return "| " + " | ".join([*cells, "yes" if met else "NO"]) + " |"


def write_report(path: str, info: dict, par: dict, results: dict) -> None:
    lines = ["# Benchmarks: cerebrum-jax vs the PyTorch peer", ""]
    lines += ["Written by `make bench` (`experiments/bench.py`). Seconds, medians; ratio = ours / peer.", ""]
    lines += ["## Machine and settings", ""]
    lines += [f"- {k}: {v}" for k, v in info.items()]
    lines += [
        f"- threads per side: {ARGS.threads} (CPU affinity + torch.set_num_threads); repeats: {ARGS.repeats} "
        f"(augment {ARGS.aug_repeats}); warm-up call excluded; ours and peer interleaved",
        "- network: n_filters 24, 7 classes, random glorot weights shared by both sides; float32",
        f"- parity (64x88x56 probabilities): max abs diff {par['model']:.2e} (model.probabilities), "
        f"{par['segment']:.2e} (segment's forward, lean.probabilities_lean on a CPU); limit 1e-4",
        "- ours: forward and train step call model.probabilities / model.apply; the whole volume runs "
        "segment's forward (on a CPU lean.probabilities_lean: depth slabs of 16, 2-D convolutions)",
        "",
        "## CPU results",
        "",
        "| case | ours (s) | peer (s) | ours/peer | peak RSS GiB ours / peer | runs | goal | met |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [row(name, r) for name, r in results.items() if name in CASES]
    if "train" in results:
        lines += ["", f"Our training step: {results['train']['ours_step']}."]
    lines += ["", "Raw times (s):", ""]
    for name, r in results.items():
        if name in CASES:
            ours, peer = ([round(t, 3) for t in r[side]] for side in ("ours", "peer"))
            lines.append(f"- {name}: ours {ours}, peer {peer}")
    if "wholetrain" in results:
        import bench_wholetrain

        whole = statistics.median(results["whole"]["ours"]) if "whole" in results else None
        lines += ["", *bench_wholetrain.report_lines(results["wholetrain"], whole)]
    lines += ["", "## GPU figures", ""]
    if "gpu" in results:
        g = results["gpu"]
        lines += [f"Device: {g['device']}; peak device memory {g['peak_bytes'] / 2**30:.2f} GiB.", ""]
        lines += [f"- {k}: median {statistics.median(v):.4f} s" for k, v in g.items() if isinstance(v, list)]
    else:
        lines += [
            "Unmeasured in this run: no GPU was lent to this task. On a GPU machine run",
            "`.venv/bin/python experiments/bench.py --cases gpu --out BENCHMARKS.md` to measure, at",
            "256x352x224 with 8 classes: forward time (goal <= 1 s), train step with and without remat",
            "(goal <= 0.25 s on an H100), peak device memory (goal <= 24 GB) and augmentation per view",
            "(goal <= 50 ms).",
        ]
    lines += ["", NOTES, MEMORY_NOTES, WHOLE_NOTES]
    with open(path + ".tmp", "w") as fh:
        fh.write("\n".join(lines) + "\n")
    os.replace(path + ".tmp", path)


def main(argv=None) -> int:
    global ARGS
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="BENCHMARKS.md")
    default = ",".join((*CASES, "wholetrain"))
    p.add_argument("--cases", default=default, help=f"comma list of {default}, gpu")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--aug-repeats", type=int, default=5)
    p.add_argument("--whole-rounds", type=int, default=2, help="alternating subprocess rounds per side")
    p.add_argument("--wholetrain-repeats", type=int, default=3, help="timed whole-volume training steps")
    p.add_argument("--slab-rows", type=int, default=8, help="slab depth of the streamed whole-volume step")
    p.add_argument("--train-runs", type=int, default=3, help="interleaved runs of the train case (median)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--worker", choices=("ours", "peer"), help=argparse.SUPPRESS)
    ARGS = p.parse_args(argv)
    # what the cerebrum-jax command runs with (cerebrum_jax.runtime): jemalloc preloaded when installed (a
    # restart of this script; the peer in this process gets it too), XLA:CPU's kernel libraries
    runtime.restart_with_jemalloc([sys.executable, os.path.abspath(__file__), *(argv or sys.argv[1:])])
    runtime.configure_xla_flags()
    pin_threads(ARGS.threads)
    if ARGS.worker:
        print(json.dumps(whole_worker(ARGS.worker, ARGS.repeats)))
        return 0
    cases = [c for c in ARGS.cases.split(",") if c]
    unknown = set(cases) - set(CASES) - {"gpu", "wholetrain"}
    if unknown:
        p.error(f"unknown case(s) {sorted(unknown)}")
    par = parity()
    print(f"parity: max abs prob diff {par['model']:.2e} (model), {par['segment']:.2e} (segment)", flush=True)
    if not par["ok"]:
        print("parity check failed (> 1e-4): not timing anything", file=sys.stderr)
        return 1
    results = {}
    runners = dict(fwd=case_fwd, train=case_train_runs, whole=case_whole, augment=case_augment, gpu=case_gpu)
    runners["wholetrain"] = case_wholetrain
    for name in cases:
        t = time.perf_counter()
        results[name] = runners[name]()
        print(f"{name}: done in {time.perf_counter() - t:.0f} s", flush=True)
        if name in CASES:
            print(row(name, results[name]), flush=True)
    write_report(ARGS.out, machine(), par, results)
    print(f"wrote {ARGS.out}")
    return 0


ARGS = argparse.Namespace(
    threads=2, repeats=5, aug_repeats=5, whole_rounds=2, wholetrain_repeats=3, slab_rows=8, train_runs=3
)

if __name__ == "__main__":
    sys.exit(main())
