"""One process of the 2-process tests in test_distributed.py (run as a script, not collected by pytest).

usage: dist_worker.py PORT PROCESS_ID NUM_PROCESSES OUT.npz

Joins the others through ``distributed.initialize`` on 127.0.0.1:PORT (2 CPU devices per process from
JAX_NUM_CPU_DEVICES), builds the global 1x4 mesh and hands JAX only this process's depth slab of the
batch (``distributed.from_local``): the other slabs reach the devices only from the other process. Runs a
sharded forward and a sharded training step; process 0 writes the results to OUT.npz.
"""

import argparse
import sys

import numpy as np

CLASSES = 3


def reference_problem():
    """(params, batch {"image" (1, 32, 8, 8, 1), "labels" (1, 32, 8, 8), "class_weights" (3,)},
    model config): a tiny network and a batch whose depth slabs all differ."""
    import jax

    from cerebrum_jax import model as M

    cfg = M.ModelConfig(n_filters=2, n_classes=CLASSES, dropout_rate=0.0)
    params = M.init_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(1)
    image = rng.normal(size=(1, 32, 8, 8, 1)).astype(np.float32)
    image += np.linspace(-2, 2, 32, dtype=np.float32)[None, :, None, None, None]
    labels = rng.integers(0, CLASSES, (1, 32, 8, 8)).astype(np.int32)
    weights = np.linspace(0.5, 1.5, CLASSES, dtype=np.float32)
    return params, {"image": image, "labels": labels, "class_weights": weights}, cfg


def train_step_of(cfg, params):
    """(pure train.make_train_step with ce+dice and Adam, its initial state)."""
    from cerebrum_jax import losses, train

    frozen = {k: {p: False for p in v} for k, v in params.items()}
    tx = train.make_optimizer(frozen, 1e-2)
    step = train.make_train_step(cfg, losses.LossConfig("ce+dice", "balanced"), tx)
    return step, train.init_state(params, tx)


def main(port: int, pid: int, n: int, out: str) -> None:
    from cerebrum_jax import distributed

    launch = argparse.Namespace(
        coordinator=f"127.0.0.1:{port}",
        num_processes=n,
        process_id=pid,
        init_timeout=60,
        heartbeat_timeout=20,
    )
    distributed.initialize(launch)
    import jax

    from cerebrum_jax import sharding as S

    mesh = S.make_mesh("1x4")
    params, batch, cfg = reference_problem()
    vol = S.volume_sharding(mesh)
    glob = {}
    for name in ("image", "labels"):
        box = distributed.local_bounds(batch[name].shape, vol)
        glob[name] = distributed.from_local(batch[name][box], vol, batch[name].shape)
    glob["class_weights"] = distributed.to_global(batch["class_weights"], S.replicated(mesh))
    probs = distributed.gather(S.sharded_forward(params, cfg, glob["image"], mesh))
    step, state = train_step_of(cfg, params)
    state = jax.device_put(state, S.state_shardings(state, mesh))
    jitted = S.jit_train_step(step, mesh, state, glob)
    new_state, metrics = jitted(state, glob, jax.random.key(0))
    leaves = [distributed.gather(x) for x in jax.tree_util.tree_leaves(new_state["params"])]
    if distributed.is_main():
        np.savez(
            out,
            probs=probs,
            loss=np.asarray(metrics["loss"]),
            devices=np.int32(jax.device_count()),
            local_depth=np.int32(box[1].stop - box[1].start),
            **{f"p{i}": leaf for i, leaf in enumerate(leaves)},
        )


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
