"""The benchmark's own arithmetic (experiments/): the demo's time-to-Dice from a log, the host's peak, the
record that ``bench.py --update`` adds a case to."""

import datetime
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))

import bench  # noqa: E402
import bench_demo  # noqa: E402
import bench_report  # noqa: E402
import pytest  # noqa: E402

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


HOST = {"cpu": "Xeon", "cpu_vector_isa": "avx2 fma avx512f", "cpus_visible": 2, "jax": "0.10.2"}
SETTINGS = {"threads": 2, "repeats": 3, "aug_repeats": 3, "peak": 333.0, "bf16": False}
PARITY = {"model": 1e-7, "segment": 1e-7}


def _fwd(t):
    return {"ours": [t, t], "peer": [0.2, 0.2], "gflop": 14.9}


def test_update_replaces_the_rerun_case_and_keeps_the_others(tmp_path):
    out = str(tmp_path / "BENCHMARKS.md")
    first = {"fwd": _fwd(0.1), "augment": {"ours": [0.5], "peer": [17.0]}}
    bench_report.write_report(
        out, HOST, PARITY, first, SETTINGS, {"fwd": "2026-11-30", "augment": "2026-11-30"}
    )
    results, measured = bench_report.merge_previous(out, HOST, {"fwd": _fwd(0.3)}, {"fwd": "2026-12-02"})
    assert list(results) == ["fwd", "augment"] and results["fwd"]["ours"] == [0.3, 0.3]
    assert measured == {"fwd": "2026-12-02", "augment": "2026-11-30"}
    bench_report.write_report(out, HOST, PARITY, results, SETTINGS, measured)
    page = Path(out).read_text()
    assert "| forward 64x88x56 | 0.300 | 0.200 | 1.50 |" in page  # the rerun case's row, the goal not met
    assert "augment 2026-11-30" in page and "fwd 2026-12-02" in page  # the page says which run is whose
    assert json.loads(Path(out).with_suffix(".json").read_text())["results"]["augment"]["peer"] == [17.0]
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"cpu_vector_isa": "avx2 fma (no AVX-512)"}, "another cpu_vector_isa"),
        ({"jax": "0.11.0"}, "another jax"),
    ],
)
def test_update_refuses_a_record_of_another_host_or_version(tmp_path, change, message):
    out = str(tmp_path / "BENCHMARKS.md")
    bench_report.write_report(out, HOST, PARITY, {"fwd": _fwd(0.1)}, SETTINGS, {"fwd": "2026-11-30"})
    with pytest.raises(ValueError, match=message):
        bench_report.merge_previous(out, {**HOST, **change}, {}, {})


def test_update_without_a_record_says_so(tmp_path):
    with pytest.raises(ValueError, match="no earlier record"):
        bench_report.merge_previous(str(tmp_path / "BENCHMARKS.md"), HOST, {}, {})


def test_render_writes_the_page_again_from_the_record(tmp_path):
    out = tmp_path / "BENCHMARKS.md"
    bench_report.write_report(str(out), HOST, PARITY, {"fwd": _fwd(0.1)}, SETTINGS, {"fwd": "2026-11-30"})
    first = out.read_text()
    out.write_text("edited by hand")
    assert bench.main(["--render", "--out", str(out)]) == 0
    assert out.read_text() == first  # nothing measured: the same page from the same record
