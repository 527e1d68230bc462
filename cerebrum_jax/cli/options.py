"""Options that several subcommands share, and the one way a subcommand registers itself.

``command`` adds a subcommand's parser and binds its ``run``; ``add_performance_args`` (--mesh, --remat,
--precision) and ``add_distributed_args`` (--distributed, --coordinator, ...) add option groups whose help
texts a subcommand may word for its own meaning (keyword arguments, no argparse internals);
``add_label_pair_args`` adds the PRED/REF pair and --labels of ``evaluate`` and ``surfaces``.
The library underneath never sees argparse: ``performance_options`` hands the parsed values to
``sharding.configure``, and ``distributed.initialize`` reads the launch options by name.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from cerebrum_jax.model.spec import ModelConfig
from cerebrum_jax.parallel import sharding

MESH_HELP = (
    "device mesh, e.g. 1x4 (volumes split along depth over 4 devices); "
    "default: all devices on the spatial axis"
)
REMAT_HELP = "recompute the full-resolution blocks in the backward pass (less memory, more compute)"
PRECISION_HELP = (
    "bf16: bfloat16 convolutions, float32 parameters/optimizer state/softmax/loss "
    "(default: the model config's, float32)"
)


def command(
    sub, name: str, run: Callable, *, raw_description: bool = False, **kwargs
) -> argparse.ArgumentParser:
    """Register subcommand ``name`` (``help``, ``description``, ``epilog``... as ``add_parser`` takes them)
    with ``run(args) -> exit status`` as its ``func``; returns its parser for the options.

    ``raw_description``: keep the description's line breaks (a usage block)."""
    if raw_description:
        kwargs["formatter_class"] = argparse.RawDescriptionHelpFormatter
    parser = sub.add_parser(name, **kwargs)
    parser.set_defaults(func=run)
    return parser


def add_performance_args(
    parser: argparse.ArgumentParser,
    *,
    mesh_help: str = MESH_HELP,
    remat_help: str = REMAT_HELP,
    precision_help: str = PRECISION_HELP,
) -> None:
    """Add the "performance" group --mesh, --remat and --precision to ``parser``, each with its help text
    (a subcommand gives its own where the option means something else there)."""
    g = parser.add_argument_group("performance")
    g.add_argument("--mesh", default=None, metavar="DATAxSPACE", help=mesh_help)
    g.add_argument("--remat", action="store_true", help=remat_help)
    g.add_argument("--precision", choices=sorted(sharding.PRECISIONS), default=None, help=precision_help)


def performance_options(args: argparse.Namespace, config: ModelConfig, devices=None):
    """``sharding.configure`` with the parsed --mesh, --remat and --precision: (model config, mesh).

    Raises ValueError on a bad mesh spec (the subcommand turns it into an InputError)."""
    return sharding.configure(
        config,
        mesh=getattr(args, "mesh", None),
        remat=bool(getattr(args, "remat", False)),
        precision=getattr(args, "precision", None),
        devices=devices,
    )


def host_port(text: str) -> str:
    """argparse type of --coordinator: HOST:PORT (an IPv6 host in brackets) with a port 1..65535,
    refused here rather than by the C++ client's log lines once JAX starts."""
    host, sep, port = text.rpartition(":")
    ok = bool(sep and host and port.isdigit() and 1 <= int(port) <= 65535)
    if ok and host.startswith("["):
        ok = host.endswith("]") and len(host) > 2
    if not ok or any(c.isspace() for c in host) or (":" in host and not host.startswith("[")):
        raise argparse.ArgumentTypeError(f"expected HOST:PORT with a port 1..65535, got {text!r}")
    return text


def add_distributed_args(parser: argparse.ArgumentParser) -> None:
    """Add --distributed, --coordinator, --num-processes, --process-id, --init-timeout and
    --heartbeat-timeout (read by ``distributed.initialize``) to ``parser``."""
    g = parser.add_argument_group("multi-process (several hosts or processes, jax.distributed)")
    g.add_argument(
        "--distributed",
        action="store_true",
        default=None,
        help="join the other processes of this run (every process runs the same command); the cluster "
        "(SLURM, Open MPI, Kubernetes) is detected by JAX unless --coordinator etc. are given",
    )
    g.add_argument(
        "--coordinator",
        type=host_port,
        metavar="HOST:PORT",
        help="address of process 0 (implies --distributed)",
    )
    g.add_argument("--num-processes", type=int, metavar="N", help="number of processes (with --coordinator)")
    g.add_argument("--process-id", type=int, metavar="I", help="this process, 0..N-1 (with --coordinator)")
    g.add_argument(
        "--init-timeout",
        type=int,
        default=300,
        metavar="S",
        help="seconds to wait for every process to join (default 300)",
    )
    g.add_argument(
        "--heartbeat-timeout",
        type=int,
        default=100,
        metavar="S",
        help="seconds without a heartbeat after which a process counts as dead and every process stops "
        "(default 100)",
    )


def add_label_pair_args(parser: argparse.ArgumentParser, labels_help: str) -> None:
    """Add the positional PRED and REF label volumes and --labels DSEG.tsv (``labels_help``)."""
    parser.add_argument("pred", metavar="PRED.nii.gz", help="predicted labels (integer values)")
    parser.add_argument("ref", metavar="REF.nii.gz", help="reference labels on the same grid")
    parser.add_argument("--labels", metavar="DSEG.tsv", help=labels_help)
