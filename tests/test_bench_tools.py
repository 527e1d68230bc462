"""The benchmark's own arithmetic (experiments/): the demo's time-to-Dice from a log, the host's peak."""

import datetime
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))

import bench  # noqa: E402
import bench_demo  # noqa: E402

LOG = """23:59:50 fold 3: test sub-003, train ['sub-001'], grid (56, 72, 64), 4 classes
23:59:58 warmup epoch 1: train 3.49 val 2.55 val dice 0.3283 lr 1.00e-03 *
00:00:10 finetune epoch 1: train 1.87 val 1.61 val dice 0.8015 lr 1.00e-03 *
00:00:14 finetune epoch 2: train 1.71 val 1.45 val dice nan lr 1.00e-03
00:00:30 finetune epoch 3: train 1.59 val 1.33 val dice 0.8600 lr 1.00e-03 *
00:00:31 finetune: all epochs run, best val loss 1.33
"""


def test_time_to_dice_from_the_log_across_midnight():
    start = datetime.datetime(2026, 12, 1, 23, 59, 48, 500000)
    t = bench_demo.timeline(LOG, start)
    assert t["epochs"] == 4 and t["first_epoch_s"] == 10.0  # 23:59:48 -> 23:59:58
    assert t["val_dice_reached_s"] == {"0.80": 22.0, "0.85": 42.0}


def test_a_threshold_never_reached_is_none():
    t = bench_demo.timeline(LOG.replace("0.8600", "0.8400"), datetime.datetime(2026, 12, 1, 23, 59, 48))
    assert t["val_dice_reached_s"]["0.85"] is None


def test_host_peak_is_cores_times_clock_times_fma_width():
    peak = bench.host_peak(2)
    # "2 cores x G GHz x 2 FMA units x L float32 lanes x 2 = P GFLOP/s": the product of what it names
    words = peak["text"].split()
    ghz, lanes = float(words[3]), int(words[10])
    assert words[:2] == ["2", "cores"] and lanes in (4, 8, 16)
    assert abs(peak["gflops"] - 2 * ghz * 2 * lanes * 2) <= 0.01 * 2 * lanes * 2 * 2  # the clock's rounding
