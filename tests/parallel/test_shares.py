"""Subject shares: the epoch order of (subject, view) pairs, and which subjects each process reads."""

from __future__ import annotations

import numpy as np
import pytest

from cerebrum_jax.parallel import shares


@pytest.mark.parametrize("n_train, views, batch", [(3, 2, 4), (4, 30, 1), (1, 1, 1)])
def test_one_share_is_the_shuffled_order_of_every_pair(n_train, views, batch):
    """One share: the order of every run before shares (default_rng([seed, phase, epoch])), cut into
    batches, the last maybe short."""
    got = shares.Shares.single(n_train, n_train).epoch_batches(7, 1, 3, views, batch)
    rng = np.random.default_rng([7, 1, 3])
    order = rng.permutation([(s, v) for s in range(n_train) for v in range(views)])
    assert np.array_equal(np.concatenate(got), order)
    assert [len(c) for c in got[:-1]] == [batch] * (len(got) - 1)
    assert len(got) == shares.Shares.single(n_train, n_train).n_steps(views, batch)


CASES = [  # count, n_train, views, batch
    (2, 3, 2, 4),
    (2, 2, 1, 2),
    (3, 7, 5, 3),
    (4, 4, 3, 8),
]


@pytest.mark.parametrize("count, n_train, views, batch", CASES)
def test_several_shares_fill_their_own_rows_with_every_pair(count, n_train, views, batch):
    """Every batch full; block k of its rows only from share k's subjects (i % count == k); every pair
    of every share at least once per epoch, none twice more than another; another epoch, another order;
    the same arguments, the same order."""
    part = shares.Shares(count, n_train, n_train, tuple(range(count)), tuple(range(count)))
    got = part.epoch_batches(0, 0, 0, views, batch)
    assert len(got) == part.n_steps(views, batch)
    assert all(c.shape == (batch, 2) for c in got)
    for k in range(count):
        block = np.concatenate([c[part.rows(k, batch)] for c in got])
        assert set(block[:, 0] % count) == {k}
        pairs = {(s, v) for s in range(k, n_train, count) for v in range(views)}
        assert {tuple(p) for p in block.tolist()} == pairs
        seen = np.unique(block, axis=0, return_counts=True)[1]  # repeats spread evenly over the pairs
        assert seen.max() - seen.min() <= 1 and len(block) == part.n_steps(views, batch) * batch // count
    again = part.epoch_batches(0, 0, 0, views, batch)
    assert all(np.array_equal(a, b) for a, b in zip(got, again, strict=True))
    other = part.epoch_batches(0, 0, 1, views, batch)
    if views * (n_train // count) > 1:  # more than one order possible
        assert not all(np.array_equal(a, b) for a, b in zip(got, other, strict=True))


LAYOUTS = [  # {process: rows} of a batch of 4, count -> (held, owned) per process
    ({0: slice(0, 2), 1: slice(2, 4)}, 2, [((0,), (0,)), ((1,), (1,))]),  # 2x2 mesh, data across processes
    ({0: slice(0, 4), 1: slice(0, 4)}, 2, [((0, 1), (0, 1)), ((0, 1), ())]),  # 1x4: both hold every row
    (
        {0: slice(0, 2), 1: slice(0, 2), 2: slice(2, 4), 3: slice(2, 4)},
        2,
        [((0,), (0,)), ((0,), ()), ((1,), (1,)), ((1,), ())],
    ),  # fmt: skip
    (
        {0: slice(0, 1), 1: slice(1, 2), 2: slice(2, 3), 3: slice(3, 4)},
        2,
        [((0,), (0,)), ((0,), ()), ((1,), (1,)), ((1,), ())],
    ),  # fmt: skip
    ({0: slice(0, 3), 1: slice(3, 4)}, 4, [((0, 1, 2), (0, 1, 2)), ((3,), (3,))]),
]


@pytest.mark.parametrize("rows, count, want", LAYOUTS)
def test_plan_reads_the_shares_of_the_rows_held_and_owns_each_once(rows, count, want):
    n_train, n_val = 5, 5
    plans = [shares.plan(count, n_train, n_val, 4, rows, p) for p in sorted(rows)]
    assert [(p.held, p.owned) for p in plans] == want
    owned = sorted(k for p in plans for k in p.owned)
    assert owned == list(range(count))  # every share counted (validated) by exactly one process
    assert sorted(j for p in plans for j in p.val_index) == list(range(n_val))
    for p, r in zip(plans, rows.values(), strict=True):  # a process reads what its rows draw from
        assert p.train_index == [i for i in range(n_train) if i % count in p.held]
        assert all((r.start < (k + 1) * 4 // count and k * 4 // count < r.stop) for k in p.held)


def test_process_groups_and_checks():
    assert shares.process_groups({0: slice(0, 2), 1: slice(2, 4)}) == 2
    assert shares.process_groups({0: slice(0, 4), 1: slice(0, 4)}) == 1
    shares.check(2, 2, 4)
    with pytest.raises(ValueError, match="need at least 3 training subjects, the fold has 2"):
        shares.check(3, 2, 3)
    with pytest.raises(ValueError, match="does not split into 2 equal blocks"):
        shares.check(2, 3, 3)
    with pytest.raises(ValueError, match="at least 1"):
        shares.check(0, 3, 3)
    one = shares.plan(1, 3, 1, 2, {0: slice(0, 1), 1: slice(1, 2)}, 1)
    assert one.train_index == [0, 1, 2] and one.val_index == [0]  # one share: everything everywhere
