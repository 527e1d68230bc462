"""One process of the 2-process tests in test_distributed.py (run as a script, not collected by pytest).

usage: dist_worker.py PORT PROCESS_ID NUM_PROCESSES PROBLEM.pkl OUT_DIR
       dist_worker.py 0 0 1 PROBLEM.pkl OUT_DIR     (the reference: one process with 4 devices)

Joins the others through ``distributed.initialize`` on 127.0.0.1:PORT (2 CPU devices per process from
JAX_NUM_CPU_DEVICES) and reads the problem the test wrote (``reference_problem``: parameters, batch;
no initialisation here). On the global 1x4 mesh it hands JAX only this process's depth slab of the batch
(``distributed.put_batch``): the other slabs reach the devices only from the other process. Runs a
sharded forward and a sharded training step (new parameters and Adam's first moment, 0.1 x the
gradients). On a 2x2 mesh ("data" across the processes) it puts only
its batch row and gathers the whole batch back. Each process writes OUT_DIR/result-I.npz: what it
handed JAX, and (process 0) the results; the reference run writes OUT_DIR/reference.npz.
"""

import argparse
import pickle
import sys

import numpy as np

CLASSES = 3
LR = 1e-2  # Adam's learning rate in the training step


def reference_problem():
    """(params, batch {"image" (2, 32, 8, 8, 1), "labels" (2, 32, 8, 8), "class_weights" (3,)},
    model config): a tiny network and a batch whose rows and depth slabs all differ."""

    from cerebrum_jax.model import network as M

    cfg = M.ModelConfig(n_filters=2, n_classes=CLASSES, dropout_rate=0.0)
    params = tiny_params(cfg, 0)
    rng = np.random.default_rng(1)
    image = rng.normal(size=(2, 32, 8, 8, 1)).astype(np.float32)
    image += np.linspace(-2, 2, 32, dtype=np.float32)[None, :, None, None, None]
    labels = rng.integers(0, CLASSES, (2, 32, 8, 8)).astype(np.int32)
    weights = np.linspace(0.5, 1.5, CLASSES, dtype=np.float32)
    return params, {"image": image, "labels": labels, "class_weights": weights}, cfg


def tiny_params(cfg, seed: int) -> dict:
    """Parameters of ``cfg`` as numpy: kernels normal with glorot variance, biases small. No XLA compile
    (``model.init_params`` compiles a truncated normal per kernel shape: seconds of CPU each)."""
    import jax

    from cerebrum_jax.model import network as M

    shapes = jax.eval_shape(lambda: M.init_params(cfg, jax.random.key(0)))
    rng = np.random.default_rng(seed)

    def draw(leaf):
        fan = np.prod(leaf.shape[:-2]) * (leaf.shape[-2] + leaf.shape[-1]) if len(leaf.shape) > 1 else 0
        scale = np.sqrt(2.0 / fan) if fan else 0.05
        return (scale * rng.normal(size=leaf.shape)).astype(leaf.dtype)

    return jax.tree_util.tree_map(draw, shapes)


def train_step_of(cfg, params):
    """(pure train.make_train_step with ce+dice and Adam, its initial state)."""
    from cerebrum_jax.train import losses
    from cerebrum_jax.train import steps as train

    frozen = {k: {p: False for p in v} for k, v in params.items()}
    tx = train.make_optimizer(frozen, LR)
    step = train.make_train_step(cfg, losses.LossConfig("ce+dice", "balanced"), tx)
    return step, train.init_state(params, tx)


def rows_2x2(batch: dict) -> dict:
    """On a 2x2 mesh ("data" over the 2 processes): this process's batch row put alone; (local row
    range, local image shape handed to JAX, the whole image gathered back)."""
    import jax

    from cerebrum_jax.parallel import distributed
    from cerebrum_jax.parallel import sharding as S

    mesh = S.make_mesh("2x2", jax.devices())
    rows = distributed.local_rows(2, mesh)
    local = {k: (v[rows] if k != "class_weights" else v) for k, v in batch.items()}
    part = distributed.local_part(local["image"], S.volume_sharding(mesh), batch["image"].shape)
    glob = distributed.put_batch(local, mesh, 2)
    return {
        "rows_2x2": np.int32([rows.start, rows.stop]),
        "part_2x2": np.int32(part.shape),
        "image_2x2": distributed.gather(glob["image"]),
    }


def main(port: int, pid: int, n: int, problem: str, out: str) -> None:
    from cerebrum_jax.parallel import distributed

    if n > 1:  # NUM_PROCESSES 1: the single-process reference (4 devices), no jax.distributed
        launch = argparse.Namespace(
            coordinator=f"127.0.0.1:{port}",
            num_processes=n,
            process_id=pid,
            init_timeout=60,
            heartbeat_timeout=20,
        )
        distributed.initialize(launch)
    import jax
    from tolerances import adam_mu

    from cerebrum_jax.parallel import sharding as S
    from cerebrum_jax.predict import predictor

    with open(problem, "rb") as f:
        params, batch, cfg = pickle.load(f)
    result = rows_2x2(batch)
    mesh = S.make_mesh("1x4")
    one = {k: (v[:1] if k != "class_weights" else v) for k, v in batch.items()}  # batch 1 on 1x4
    part = distributed.local_part(one["image"], S.volume_sharding(mesh), one["image"].shape)
    glob = distributed.put_batch(one, mesh, 1)
    probs = distributed.gather(predictor.forward(params, cfg, glob["image"], mesh))
    step, state = train_step_of(cfg, params)
    state = jax.device_put(state, S.state_shardings(state, mesh))
    new_state, metrics = S.jit_train_step(step, mesh, state, glob)(state, glob, jax.random.key(0))
    leaves = [distributed.gather(x) for x in jax.tree_util.tree_leaves(new_state["params"])]
    mu = [distributed.gather(x) for x in jax.tree_util.tree_leaves(adam_mu(new_state["opt_state"]))]
    assert len(mu) == len(leaves)  # every leaf trained: Adam's first moment has the params' structure
    if n == 1:  # process 1's half of the depth zeroed: what process 0's half would be without it
        cut = one["image"].copy()
        cut[:, 16:] = 0
        result["alone"] = np.asarray(predictor.forward(params, cfg, cut, mesh))
    if distributed.is_main():
        result.update(probs=probs, loss=np.asarray(metrics["loss"]), devices=np.int32(jax.device_count()))
        result.update({f"p{i}": leaf for i, leaf in enumerate(leaves)})
        result.update({f"mu{i}": leaf for i, leaf in enumerate(mu)})
    name = f"result-{pid}.npz" if n > 1 else "reference.npz"
    np.savez(f"{out}/{name}", part_1x4=np.int32(part.shape), **result)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
