"""File-system safety: output directories that one run at a time may write (an exclusive lock held for the
run; the checks of a directory's own files: no symbolic links, no temporary leftovers of a killed write),
and atomic writes (``atomic_path``, ``write_text``, ``replace_dir``: a temporary name beside the target,
renamed into place only once complete, so nothing is ever half-written).

The lock is ``fcntl.flock`` on ``DIR/.cerebrum-jax.lock``, a file that names its holder (pid, host,
command, start time). The kernel drops a flock when its process ends, however it ends, so a killed run
never blocks the next one; the lock file itself is removed when the lock is released (a stale one left
by a killed process is taken over).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

from cerebrum_jax.errors import InputError, Terminated

LOCK_NAME = ".cerebrum-jax.lock"


class NoLock:
    """What a process other than process 0 of a distributed run holds: nothing (process 0 holds the
    ``DirLock`` for all of them, since they write into one directory together)."""

    def release(self, remove_created: bool = True) -> None:
        return None


def dir_lock(path: str | os.PathLike, command: str = "cerebrum-jax"):
    """``DirLock`` in process 0 (of a distributed run; in any plain run), ``NoLock`` in the others. A
    distributed run has imported jax (to join it) before it takes a lock; without jax, one process."""
    jax = sys.modules.get("jax")
    return DirLock(path, command) if jax is None or jax.process_index() == 0 else NoLock()


class DirLock:
    """An exclusive lock on directory ``path`` (created, with its missing parents, when it does not exist).

    ``release(remove_created=True)`` also removes the directories the lock created when they hold nothing
    else, so a run refused by a later check leaves nothing behind. Raises InputError naming ``path`` when
    another process holds the lock (saying which: its pid, host, command and start time).
    """

    def __init__(self, path: str | os.PathLike, command: str = "cerebrum-jax"):
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise InputError("is a file, not a directory", self.path)
        self.created = [p for p in (self.path, *self.path.parents) if not p.exists()]
        self.path.mkdir(parents=True, exist_ok=True)
        self.file = self.path / LOCK_NAME
        self.fd = self._acquire(command)

    def _acquire(self, command: str) -> int:
        for _ in range(10):  # the holder may remove the file between our open and flock: open it again
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                self._cleanup_created()
                raise InputError(
                    f"in use by another run ({holder(self.file)}); wait for it to finish, "
                    "or choose another output directory",
                    self.path,
                ) from None
            with contextlib.suppress(FileNotFoundError):
                if os.stat(self.file).st_ino == os.fstat(fd).st_ino:
                    os.ftruncate(fd, 0)
                    os.write(fd, json.dumps(holder_record(command)).encode() + b"\n")
                    return fd
            os.close(fd)
        raise InputError("cannot take the lock file (it keeps being replaced)", self.file)

    def _open(self) -> int:
        """The lock file, opened without following a symbolic link (one planted in its place would have the
        lock record written through it, over a file elsewhere): InputError naming a link."""
        try:
            return os.open(self.file, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            if e.errno != errno.ELOOP:
                raise
            self._cleanup_created()
            raise InputError(
                "is a symbolic link, not followed: a run writes only its own files; remove the link",
                self.file,
            ) from None

    def release(self, remove_created: bool = True) -> None:
        """Remove the lock file and drop the lock (idempotent); then the directories this lock created, if
        they are empty (``remove_created``)."""
        if self.fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.file)  # while still held: a waiting process re-checks the inode
        os.close(self.fd)
        self.fd = None
        if remove_created:
            self._cleanup_created()

    def _cleanup_created(self) -> None:
        for p in self.created:  # deepest first
            with contextlib.suppress(OSError):
                p.rmdir()  # only when empty

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def holder_record(command: str) -> dict:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": command,
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "argv": " ".join(sys.argv[:8])[:300],
    }


def holder(lock_file: Path) -> str:
    """'pid 1234 on HOST, finetune, started ...' from a lock file (or 'pid unknown' while it is written)."""
    try:
        rec = json.loads(Path(lock_file).read_text())
        return f"pid {rec['pid']} on {rec['host']}, {rec['command']}, started {rec['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "pid unknown"


def check_own_files(directory: str | os.PathLike) -> None:
    """InputError naming the first symbolic link inside ``directory`` (not followed): a run writes only its
    own files, never through a link to somewhere else."""
    directory = Path(directory)
    for root, dirs, files in os.walk(directory):
        for name in sorted(dirs + files):
            p = Path(root) / name
            if p.is_symlink():
                raise InputError(
                    f"is a symbolic link (to {os.readlink(p)}); a run directory must hold only its own "
                    "files: remove the link or use another --out",
                    p,
                )


TEMP_PATTERNS = (".last.*", ".best.*", ".*.old-*", ".*.tmp*")


def remove_leftovers(
    directory: str | os.PathLike, patterns=TEMP_PATTERNS, log=None, recursive: bool = True
) -> list[Path]:
    """Remove the temporary files and directories of writes that were killed before their rename (names
    as ``atomic_path``, ``replace_dir`` and the checkpoint savers make them) anywhere under
    ``directory`` (only in it: not ``recursive``); call it only while holding the directory's lock.
    Returns what was removed."""
    removed = []
    for pattern in patterns:
        found = Path(directory).rglob(pattern) if recursive else Path(directory).glob(pattern)
        for p in sorted(found):
            if p.name == LOCK_NAME or not (p.exists() or p.is_symlink()):
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
            removed.append(p)
    if removed and log is not None:
        names = ", ".join(p.name for p in removed)
        log(f"removed {len(removed)} leftover(s) of an interrupted write: {names}")
    return removed


def _held_signals() -> list[int]:
    """The signals ``deferred_interrupt`` holds: SIGINT, and SIGTERM where a Python handler takes it (the
    command line's, raising ``Terminated``); one left to its default or ignored keeps its meaning."""
    held = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        if callable(signal.getsignal(signum)):
            held.append(signum)
    return held


@contextlib.contextmanager
def deferred_interrupt():
    """Hold Ctrl-C (SIGINT) and SIGTERM until the block ends, then raise KeyboardInterrupt (``Terminated``
    for SIGTERM): for Orbax saves and restores, whose background threads, interrupted, left the process
    waiting 300 s at exit and printing tracebacks ("cannot schedule new futures after shutdown", "Event loop
    is closed"), and a temporary directory behind. A no-op outside the main thread (where Python delivers
    signals)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = {signum: signal.getsignal(signum) for signum in _held_signals()}
    for signum in previous:
        signal.signal(signum, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if signal.SIGTERM in received:
        raise Terminated
    if received:
        raise KeyboardInterrupt


def read_text(path: str | os.PathLike, what: str = "text file") -> str:
    """The UTF-8 text of ``path``; InputError naming it when it cannot be read or is not UTF-8."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputError(
            f"{what} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); save as UTF-8",
            path,
        ) from None
    except OSError as e:
        raise InputError(f"cannot read {what} ({e.strerror or type(e).__name__})", path) from None


# ---------------------------------------------------------------------------------------------
# Atomic writes: a temporary name beside the target, renamed into place only when complete


def current_umask() -> int:
    """The process's umask, read without changing it where Linux shows it (/proc/self/status)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)  # elsewhere: set and restore (briefly process-wide)
    os.umask(mask)
    return mask


def set_default_mode(path: str | os.PathLike) -> None:
    """Give ``path`` the mode a plain open()/mkdir() would: 0666 (files) or 0777 (dirs) minus the umask.

    For outputs made through tempfile.mkstemp (0600) or mkdtemp (0700) before they are renamed into place.
    """
    base = 0o777 if Path(path).is_dir() else 0o666
    os.chmod(path, base & ~current_umask())


def replace_dir(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Rename the finished temporary directory ``src`` (from tempfile.mkdtemp) to ``dst`` with the umask's
    default mode; an existing ``dst`` is moved aside first and removed after (never half-written).
    """
    src, dst = Path(src), Path(dst)
    set_default_mode(src)  # mkdtemp made it 0700
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name[:TEMP_STEM]}.old-{os.getpid()}")
        os.replace(dst, old)
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


TEMP_STEM = 60  # characters of the final name kept in a temporary one: well within NAME_MAX (255 bytes)


def temp_prefix(path: Path) -> str:
    """'.NAME.' for the temporary name beside ``path``, NAME cut short so that prefix, random part and
    suffixes stay within the file system's name limit whatever the final name's length."""
    return f".{path.name[:TEMP_STEM]}."


def temp_dir(path: str | os.PathLike) -> Path:
    """A new temporary directory beside ``path`` (for a directory written whole, then ``replace_dir``)."""
    path = Path(path)
    try:
        return Path(tempfile.mkdtemp(prefix=temp_prefix(path), suffix=".tmp", dir=path.parent))
    except OSError as e:  # name the user's path, not the temporary one
        raise OSError(e.errno, e.strerror or str(e), str(path)) from None


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside ``path``; rename it to ``path`` only if the block succeeds.

    The temporary name keeps the final suffixes (``.nii.gz``) so writers that look at the
    extension behave the same. The result gets the umask's default permissions (not mkstemp's 0600).
    An OSError of the write (a full disk) names ``path``, not the temporary name, which is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "is a directory, not replaced by a file", str(path))
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    try:
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), suffix=f".tmp{suffix[:12]}", dir=path.parent)
    except OSError as e:  # e.g. a folder that takes no new files (/proc): name the user's path
        raise OSError(e.errno, e.strerror or str(e), str(path)) from None
    os.close(fd)
    try:
        yield Path(tmp)
        set_default_mode(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.filename in (None, tmp) and e.errno is not None:
            raise OSError(e.errno, e.strerror or str(e), str(path)) from None
        raise


def write_text(path, text: str) -> Path:
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)
    return Path(path)


def remove_tree(path: Path, tries: int = 50, quiet: int = 3) -> None:
    """Remove the directory ``path`` (a failed save's temporary one), however many tries it takes: a
    writer thread of a failed Orbax save may still be creating files in it while it is removed (one try
    left it behind on a loaded machine), or create it again just after (seen under a parallel test run).
    Done when it has stayed absent for ``quiet`` checks 0.1 s apart; gives up after ``tries`` checks."""
    shutil.rmtree(path, ignore_errors=True)
    absent = 0
    for _ in range(tries):
        time.sleep(0.1)
        if os.path.lexists(path):  # back (or never quite gone): again
            shutil.rmtree(path, ignore_errors=True)
            absent = 0
        else:
            absent += 1
            if absent >= quiet:
                return


def is_no_space(e: BaseException) -> bool:
    """Whether ``e`` (or what caused it) is a full disk: ENOSPC/EDQUOT, or TensorStore's (Orbax's)
    RESOURCE_EXHAUSTED / "No space left on device" in the text of another exception type."""
    seen = 0
    while e is not None and seen < 10:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(e)
        if "No space left on device" in text or "RESOURCE_EXHAUSTED" in text or "Disk quota exceeded" in text:
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


def no_space(directory: str | os.PathLike, what: str) -> InputError:
    """The one-line error of a write into ``directory`` that ran out of space (nothing was replaced)."""
    return InputError(
        f"no space left on device while writing {what}; nothing was replaced (the previous one, if any, is "
        "kept): free space or choose another output directory",
        directory,
    )


SPACE_MARGIN = 128 << 10  # bytes beyond the arrays that a checkpoint save needs (Orbax's metadata: ~80 KiB)


def check_space(directory: str | os.PathLike, nbytes: int, what: str) -> None:
    """``no_space`` before a write of about ``nbytes`` into ``directory`` when the file system has less
    free: refused in one line before Orbax starts (a save that runs out midway logs pages of tracebacks from
    its writer threads, and still fails)."""
    try:
        st = os.statvfs(directory)
    except OSError:
        return  # the write itself will say what is wrong
    if st.f_blocks == 0:
        return  # no block storage at all (/proc, /sys): the write itself will say what is wrong
    if st.f_bavail * st.f_frsize < nbytes + SPACE_MARGIN:
        raise no_space(directory, f"{what} (about {(nbytes + SPACE_MARGIN) >> 10} KiB needed)")
