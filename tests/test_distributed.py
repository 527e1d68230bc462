"""Multi-process runs on 127.0.0.1: real processes, CPU backend, 2 CPU devices each, gloo collectives.

Every subprocess has a timeout (a hang fails the test). The reference results come from this pytest
process, which has 4 virtual CPU devices (conftest.py).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
from pathlib import Path

import dist_worker
import jax
import numpy as np
import pytest

from cerebrum_jax import distributed
from cerebrum_jax import sharding as S
from cerebrum_jax.errors import InputError

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 400  # seconds for a whole 2-process run on a loaded 2-core machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env() -> dict:
    """This environment for a child process with 2 CPU devices (not conftest's 4) and the repo importable."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="2", PYTHONPATH=f"{REPO}{os.pathsep}{REPO / 'tests'}")
    return env


def start(argvs: list[list[str]], cwd, logs: Path) -> list[subprocess.Popen]:
    """One process per argv, stdout+stderr to logs/p-I.txt."""
    logs.mkdir(parents=True, exist_ok=True)
    procs = []
    for i, argv in enumerate(argvs):
        out = open(logs / f"p-{i}.txt", "w")  # noqa: SIM115 - closed with the process below
        procs.append(subprocess.Popen(argv, cwd=cwd, env=process_env(), stdout=out, stderr=subprocess.STDOUT))
        out.close()
    return procs


def finish(procs: list[subprocess.Popen], timeout: float = TIMEOUT) -> list[int]:
    """Exit statuses; a process still running after ``timeout`` is killed and fails the test."""
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=timeout))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"process {p.args} still running after {timeout} s: a hang")
    return codes


def test_launch_options_checked():
    with pytest.raises(InputError, match="--num-processes, --process-id"):
        distributed.initialize(
            argparse.Namespace(coordinator="127.0.0.1:1", num_processes=None, process_id=None)
        )
    bad = argparse.Namespace(
        coordinator="h:1", num_processes=2, process_id=2, init_timeout=1, heartbeat_timeout=1
    )
    with pytest.raises(InputError, match="0..1"):
        distributed.initialize(bad)
    assert not distributed.is_running() and distributed.is_main() and distributed.log_name() == "log.txt"
    assert distributed.share(list("abcde"), 1, 2) == ["b", "d"]
    assert distributed.share(list("abcde"), 0, 2) == ["a", "c", "e"]


def test_local_bounds_and_from_local_on_one_process():
    mesh = S.make_mesh("1x4")
    vol = S.volume_sharding(mesh)
    x = np.arange(2 * 32 * 2 * 2, dtype=np.float32).reshape(2, 32, 2, 2, 1)[:1]
    assert distributed.local_bounds(x.shape, vol)[1] == slice(0, 32)  # one process holds everything
    g = distributed.from_local(x, vol, x.shape)
    assert g.sharding == vol and np.array_equal(distributed.gather(g), x)
    assert np.array_equal(distributed.gather(distributed.to_global(x, vol)), x)


@pytest.mark.slow
def test_two_processes_equal_one_process_with_four_devices(tmp_path):
    """A sharded forward and training step over a global 1x4 mesh (2 processes x 2 CPU devices), each
    process giving JAX only its own depth slab, equal this process's 4-device run on the whole batch."""
    port, out = free_port(), tmp_path / "result.npz"
    worker = str(REPO / "tests" / "dist_worker.py")
    argvs = [[sys.executable, worker, str(port), str(i), "2", str(out)] for i in range(2)]
    procs = start(argvs, tmp_path, tmp_path / "logs")
    codes = finish(procs)
    logs = [(tmp_path / "logs" / f"p-{i}.txt").read_text() for i in range(2)]
    assert codes == [0, 0], logs
    got = np.load(out)
    assert int(got["devices"]) == 4 and int(got["local_depth"]) == 16  # each process held half the depth

    params, batch, cfg = dist_worker.reference_problem()
    mesh = S.make_mesh("1x4")
    probs = np.asarray(S.sharded_forward(params, cfg, batch["image"], mesh))
    np.testing.assert_allclose(got["probs"], probs, atol=2e-5)
    # process 1's half mattered: without it (zeros there) the probabilities in process 0's half differ
    cut = batch["image"].copy()
    cut[:, 16:] = 0
    alone = np.asarray(S.sharded_forward(params, cfg, cut, mesh))
    assert np.abs(alone[:, :16] - got["probs"][:, :16]).max() > 1e-3
    step, state = dist_worker.train_step_of(cfg, params)
    state = jax.device_put(state, S.state_shardings(state, mesh))
    placed = S.put_batch(batch, mesh)
    new_state, metrics = S.jit_train_step(step, mesh, state, placed)(state, placed, jax.random.key(0))
    assert float(got["loss"]) == pytest.approx(float(metrics["loss"]), rel=1e-5)
    leaves = jax.tree_util.tree_leaves(new_state["params"])
    for i, leaf in enumerate(leaves):
        np.testing.assert_allclose(got[f"p{i}"], np.asarray(leaf), atol=1e-5)
