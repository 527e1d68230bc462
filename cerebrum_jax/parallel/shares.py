"""Subject shares: which training and validation subjects each process of a run reads, and the epoch
order of (subject, view) pairs that lets a process read only those.

One share (the default on one machine): an epoch is one shuffled list of every (subject, view) pair cut
into batches of B; any subject may land in any batch row, so every process holds every subject.

S shares (``subject_shares``; by default, in a distributed run, one per group of processes along the
mesh's "data" axis): the training subjects are dealt round robin into S shares (subject i, in sorted
order, into share i % S), and the B rows of every batch into S blocks of B/S rows; block k of every batch
is filled only from share k, with its own shuffled order of that share's (subject, view) pairs, repeated
(reshuffled) where a share has fewer pairs than the largest. Every epoch has ceil(max pairs / (B/S))
full batches. A process reads the shares whose row blocks its devices hold (``plan``): with the "data"
axis across processes, each process group reads only its own subjects. The validation subjects are
dealt the same way and each is validated by one process, the first that holds its share, on its own
devices (``loop``); the metrics are gathered. The normalisation statistics, class weights, voxel sizes
and the automatic grid, which need every subject, are combined from the processes' parts
(``distributed.gather_rows``, ``distributed.sum_over_processes``).

Randomness: share k's order of epoch e of phase p is ``numpy.random.default_rng([seed, p, e, k])``; the
one-share order is ``default_rng([seed, p, e])``, as before shares existed. A view's augmentation key
depends on its subject and view only, so the same seed and number of shares give the same run on any
number of processes.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Shares:
    """count (S), n_train / n_val (the fold's training and validation subjects), held (the shares whose
    batch rows this process's devices hold: it reads their training subjects) and owned (the shares this
    process is the first holder of: it validates their validation subjects and counts their training
    subjects once in what is combined across processes). One share: every process holds and owns it."""

    count: int
    n_train: int
    n_val: int
    held: tuple[int, ...]
    owned: tuple[int, ...]

    @classmethod
    def single(cls, n_train: int, n_val: int) -> Shares:
        return cls(1, n_train, n_val, (0,), (0,))

    @property
    def train_index(self) -> list[int]:
        """The training subjects (indices in sorted order) this process reads."""
        return [i for i in range(self.n_train) if i % self.count in self.held]

    @property
    def owned_train(self) -> list[int]:
        """The training subjects this process counts in what is combined across processes."""
        return [i for i in range(self.n_train) if i % self.count in self.owned]

    @property
    def val_index(self) -> list[int]:
        """The validation subjects this process reads and validates (every one with one share)."""
        if self.count == 1:
            return list(range(self.n_val))
        return [j for j in range(self.n_val) if j % self.count in self.owned]

    def rows(self, k: int, batch_size: int) -> slice:
        """The rows of every batch that share ``k`` fills."""
        per = batch_size // self.count
        return slice(k * per, (k + 1) * per)

    def n_steps(self, views: int, batch_size: int) -> int:
        """Training steps per epoch of ``views`` views per subject."""
        if self.count == 1:
            return -(-self.n_train * views // batch_size)
        largest = -(-self.n_train // self.count) * views
        return -(-largest // (batch_size // self.count))

    def epoch_batches(self, seed: int, phase: int, epoch: int, views: int, batch_size: int) -> list:
        """The batches of one epoch: (b, 2) int arrays of (subject, view) pairs, b = ``batch_size`` (one
        share: the last batch may be shorter)."""
        if self.count == 1:
            rng = np.random.default_rng([seed, phase, epoch])
            order = rng.permutation([(s, v) for s in range(self.n_train) for v in range(views)])
            return [order[b : b + batch_size] for b in range(0, len(order), batch_size)]
        per, n = batch_size // self.count, self.n_steps(views, batch_size)
        blocks = []
        for k in range(self.count):
            rng = np.random.default_rng([seed, phase, epoch, k])
            pairs = [(s, v) for s in range(k, self.n_train, self.count) for v in range(views)]
            repeats = -(-n * per // len(pairs))
            blocks.append(np.concatenate([rng.permutation(pairs) for _ in range(repeats)])[: n * per])
        return [np.concatenate([blk[b * per : (b + 1) * per] for blk in blocks]) for b in range(n)]


def check(count: int, n_train: int, batch_size: int) -> None:
    """ValueError unless ``count`` shares work: at least one training subject each, and batches whose
    rows split into ``count`` equal blocks."""
    if count < 1:
        raise ValueError(f"must be at least 1, got {count}")
    if count > n_train:
        raise ValueError(f"{count} shares need at least {count} training subjects, the fold has {n_train}")
    if batch_size % count:
        raise ValueError(f"the batch size {batch_size} does not split into {count} equal blocks of rows")


def process_groups(rows: dict[int, slice]) -> int:
    """The number of distinct batch-row blocks among processes (``distributed.rows_by_process``): the
    default number of shares, one per group of processes along the mesh's "data" axis."""
    return len({(r.start, r.stop) for r in rows.values()})


def plan(count: int, n_train: int, n_val: int, batch_size: int, rows: dict[int, slice], me: int) -> Shares:
    """This process's ``Shares`` of ``count`` shares, from every process's batch rows ``rows``
    ({process: slice}, ``distributed.rows_by_process``) and this process's index ``me``."""
    if count == 1:
        return Shares.single(n_train, n_val)
    per = batch_size // count

    def holds(p, k):
        return rows[p].start < (k + 1) * per and k * per < rows[p].stop

    held = tuple(k for k in range(count) if holds(me, k))
    owned = tuple(k for k in held if min(p for p in rows if holds(p, k)) == me)
    return Shares(count, n_train, n_val, held, owned)
