"""The ``cerebrum-jax`` command: a thin argparse front over the library's functions.

Each subcommand lives in its own module of this package and defines ``add_parser(subparsers)``,
which registers the subcommand and sets ``func`` (a callable taking the parsed args and returning
an exit status). Bad input raises ``InputError``; ``main`` prints it as one line and exits 2, and so
it does for an ``OSError`` (a path that cannot be read or written), naming the path.

Ctrl-C (SIGINT) ends a command with "interrupted", exit 130; SIGTERM (what SLURM, Kubernetes and ``kill``
send) with "terminated", exit 143: ``main`` turns SIGTERM into ``Terminated`` (a KeyboardInterrupt), so a
checkpoint save in progress is finished or dropped alike (``fsafe.deferred_interrupt``). The console script
(``entry``) then leaves with ``os._exit``: Python's finalisation, tearing down while XLA's compile threads
still run, was reported to die of SIGSEGV after "interrupted" (issue 21: 8 of 9 trials of a Ctrl-C during
the first compile), and it waited for those threads to finish first.
"""

from __future__ import annotations

import _thread
import argparse
import contextlib
import importlib
import os
import signal
import sys
import threading

from cerebrum_jax import fsafe, runtime, shipped
from cerebrum_jax.errors import InputError, Terminated, one_line

SUBCOMMANDS = ("convert", "segment", "evaluate", "finetune", "surfaces", "cv_summary", "bids_app")


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line (and exit status 2), without the usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def version_line() -> str:
    """'cerebrum-jax VERSION (jax V, memory allocator A)': what a bug report needs first."""
    try:
        import jax

        jax_version = jax.__version__
    except Exception as e:  # a bug report is written even when jax itself cannot be imported
        jax_version = f"not importable: {type(e).__name__}"
    allocator = runtime.active_allocator()
    return f"cerebrum-jax {shipped.version()} (jax {jax_version}, memory allocator {allocator})"


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="cerebrum-jax",
        description=(
            "Whole-volume segmentation of 7T T1-weighted MRI with CEREBRUM-7T, in JAX: convert the "
            "published Keras weights, segment NIfTI volumes, fine-tune on a few labelled volumes and "
            "evaluate segmentations. (Benchmarks against PyTorch run with 'make bench'.)"
        ),
        epilog="Run 'cerebrum-jax COMMAND --help' for the options of each command.",
    )
    parser.add_argument("--version", action="version", version=version_line())
    parser.add_argument(
        "--compile-cache",
        metavar="DIR|off",
        default=None,
        help="where compiled XLA programs are kept between runs, so that a second run of the same config "
        "starts in seconds (default: $CEREBRUM_JAX_CACHE, else ~/.cache/cerebrum-jax/xla; 'off': "
        "compile every time)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=ArgumentParser)
    for name in SUBCOMMANDS:
        importlib.import_module(f"cerebrum_jax.cli.{name}").add_parser(sub)
    return parser


def os_error_line(e: OSError) -> str:
    """'PATH: strerror' (or 'SRC -> DST: strerror') of an OSError, on one line."""
    reason = e.strerror or str(e) or type(e).__name__
    reason = " ".join(str(reason).split())
    if e.filename is None:
        return reason
    where = os.fsdecode(e.filename)
    if e.filename2 is not None:
        where += f" -> {os.fsdecode(e.filename2)}"
    return f"{where}: {reason}"


INTERRUPTED, TERMINATED = 130, 143  # 128 + SIGINT, 128 + SIGTERM: what a shell reports for them


def _terminate(signum, frame):
    raise Terminated


@contextlib.contextmanager
def sigterm_raises():
    """SIGTERM raises ``Terminated`` in the main thread for the block (then the previous handler again);
    elsewhere (a thread, where no handler can be set), or where SIGTERM is ignored, nothing changes."""
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
    ):
        yield
        return
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def swallowed_interrupts_redelivered():
    """An interrupt that Python swallowed (a Ctrl-C or SIGTERM raised inside a garbage-collection callback
    or a ``__del__``, such as XLA's, is printed as "Exception ignored" and lost: the run went on) is sent
    again, from a thread, so that the main thread receives it where it runs next. Other unraisable
    exceptions go to the previous hook."""
    previous = sys.unraisablehook

    def hook(unraisable):
        if not isinstance(unraisable.exc_value, KeyboardInterrupt):
            return previous(unraisable)
        signum = signal.SIGTERM if isinstance(unraisable.exc_value, Terminated) else signal.SIGINT
        # os.kill in this thread would run the handler at once, inside the callback, and be lost again;
        # threading.Thread.start waits for the thread, and a signal landing in that wait was lost too
        # (seen in Ctrl-C during jax's import). A bare thread and no wait: the hook returns at once.
        _thread.start_new_thread(os.kill, (os.getpid(), signum))

    sys.unraisablehook = hook
    try:
        yield
    finally:
        if sys.unraisablehook is hook:  # a hook set on top of it (quiet_orbax's) stays, for late reports
            sys.unraisablehook = previous


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv``, run the command; the exit status. Everything from the first import of jax on
    (the subcommands' modules) runs under the handlers, so a Ctrl-C at any moment ends with one line
    (during the imports, at their end)."""
    command = None
    try:
        with sigterm_raises(), swallowed_interrupts_redelivered():
            # The imports (jax, numpy, scipy: seconds) hold a signal until they end: one raised in the
            # middle of a C extension's initialisation crashed it (SIGSEGV) or left jax half imported.
            with fsafe.deferred_interrupt():
                runtime.configure_xla_flags()  # before XLA starts
                parser = build_parser()
            args = parser.parse_args(argv)
            if not getattr(args, "func", None):
                parser.print_help()
                return 2
            command = args.command
            runtime.enable_compilation_cache(runtime.resolve_cache_option(args.compile_cache))
            return int(args.func(args) or 0)
    except Terminated:  # before KeyboardInterrupt, its base class
        say(command, "terminated")
        return TERMINATED
    except InputError as e:
        say(command, f"error: {e}")
        return 2
    except OSError as e:  # a file the command could not read or write: name it, no traceback
        say(command, f"error: {os_error_line(e)}")
        return 2
    except KeyboardInterrupt:
        say(command, "interrupted")
        return INTERRUPTED
    except Exception as e:  # a defect of ours, not of the input: one line, the traceback kept in a file
        cause = interrupt_behind(e)
        if cause is not None:
            say(command, "terminated" if isinstance(cause, Terminated) else "interrupted")
            return TERMINATED if isinstance(cause, Terminated) else INTERRUPTED
        say(command, f"internal error: {type(e).__name__}: {e} ({bug_report(e)})")
        return 1


def interrupt_behind(e: BaseException) -> KeyboardInterrupt | None:
    """The Ctrl-C or SIGTERM an exception was raised for, if any: a signal that lands while a C extension
    initialises (numpy's, jaxlib's) comes out as an ImportError whose cause or context is the
    KeyboardInterrupt."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, KeyboardInterrupt):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def say(command: str | None, text: str) -> None:
    """The tool's one stderr line: 'cerebrum-jax COMMAND: TEXT' ('cerebrum-jax: TEXT' before the command
    line is parsed)."""
    prefix = f"cerebrum-jax {command}" if command else "cerebrum-jax"
    print(one_line(f"{prefix}: {text}"), file=sys.stderr, flush=True)


def bug_report(e: Exception) -> str:
    """Write the traceback of ``e`` to a file in the temporary directory; the words that name it."""
    import tempfile
    import traceback

    try:
        fd, path = tempfile.mkstemp(prefix="cerebrum-jax-traceback-", suffix=".txt")
        with os.fdopen(fd, "w") as f:
            f.write(version_line() + "\n" + " ".join(sys.argv) + "\n\n")
            f.write("".join(traceback.format_exception(e)))
    except OSError:
        return "a defect of cerebrum-jax; please report it with the command"
    return f"a defect of cerebrum-jax; please report it with the traceback in {path}"


def entry() -> int:
    """The ``cerebrum-jax`` console script (and ``python -m cerebrum_jax``): ``main`` in a process with
    jemalloc preloaded when it is installed (``runtime.restart_with_jemalloc`` replaces the process with
    ``execve``, same pid, so signals reach the restarted one directly).

    After an interrupt the process leaves at once with ``os._exit``: the run's files are consistent by then
    (saves finished or dropped), and a normal exit's finalisation raced XLA's compile threads (SIGSEGV)."""
    runtime.restart_with_jemalloc([sys.executable, "-m", "cerebrum_jax", *sys.argv[1:]])
    code = main()
    if code in (INTERRUPTED, TERMINATED):
        with contextlib.suppress(OSError, ValueError):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(entry())
