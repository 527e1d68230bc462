"""The exception types the command line turns into a one-line message: InputError (bad input, exit
status 2) and NonFiniteLoss (a run that diverged, exit status 1), and ``one_line``, how such a message is
printed. No imports: every module may use them."""


class InputError(Exception):
    """Bad input from the user: a missing or corrupt file, a wrong shape, an unknown option.

    The message is one line and names the file (or option) and the problem, e.g.
    ``"scan.nii.gz: contains 12 NaN voxels"``.
    """

    def __init__(self, message: str, path=None):
        super().__init__(f"{path}: {message}" if path is not None else message)


class NonFiniteLoss(RuntimeError):
    """A NaN/inf training or validation loss: the run stops before saving anything of that epoch, so
    checkpoints/last and checkpoints/best stay as the last good epoch left them (or were never written).
    ``finetune.train_and_evaluate`` adds to the message which of them exist. Defined here, beside
    InputError, so that the command line catches it without importing the training stack (jax, optax,
    orbax)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (what SLURM, Kubernetes and ``kill`` send to end a job), raised in the main thread by the
    command line's handler. A KeyboardInterrupt, so that everything that finishes or drops a save at Ctrl-C
    (``fsafe.deferred_interrupt``) does the same here; the command line says "terminated", exit 143."""


def one_line(text: str) -> str:
    """``text`` with its control characters escaped: a file name holding a newline or a terminal escape
    stays on the tool's one line and cannot rewrite the terminal."""
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in str(text))


def first_line(e: BaseException) -> str:
    """The first non-empty line of an exception's message (XLA's and nibabel's run over many lines), at
    most 400 characters; the type's name when the message is empty."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return (lines[0] if lines else type(e).__name__)[:400]
