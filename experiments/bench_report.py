"""BENCHMARKS.md and its record BENCHMARKS.json from ``bench.py``'s results.

The JSON record keeps every case's raw results with the host and versions they were measured on, so that
``bench.py --update --cases demo`` reruns one case and writes the page again with the others kept, which
it does only when the record's host and versions are this run's (figures of two hosts never share a page).
"""

from __future__ import annotations

import datetime
import json
import os
import statistics

import bench_demo
import bench_gpu
import bench_wholetrain

HERE = os.path.dirname(os.path.abspath(__file__))
CASES = ("fwd", "train", "whole", "augment")  # ours vs peer, float32
BF16_CASES = ("fwd_bf16", "train_bf16")  # ours --precision bf16 vs the peer under torch.autocast (bf16 hosts)
EXTRA = ("wholetrain", "demo", "gpu")  # streamed whole-volume step vs the peer; the demo fold; GPU figures
ORDER = (*CASES[:2], *BF16_CASES, *CASES[2:], *EXTRA)
# what must match for an earlier run's cases to share the page with this run's
SAME_HOST = ("cpu", "cpu_vector_isa", "cpus_visible", "jax", "jaxlib", "torch", "memory allocator", "devices")

GOALS = {
    "fwd": "<= 1.0 (aim 0.8)",
    "train": "<= 0.8",
    "whole": "<= 1.0, ours RSS <= 8 GB",
    "augment": "<= 0.05",
    "fwd_bf16": "(reported)",
    "train_bf16": "(reported)",
}
LIMITS = {"fwd": 1.0, "train": 0.8, "whole": 1.0, "augment": 0.05}
LABELS = {
    "fwd": "forward 64x88x56",
    "train": "train step 64x88x56 (loss, grads, Adam)",
    "whole": "forward 256x352x224",
    "augment": "one augmented view 256x352x224 (peer: original pipeline)",
    "fwd_bf16": "forward 64x88x56, bf16 (peer: torch.autocast)",
    "train_bf16": "train step 64x88x56, bf16 (peer: torch.autocast)",
}


def record_path(path: str) -> str:
    """BENCHMARKS.md -> BENCHMARKS.json (beside it)."""
    return os.path.splitext(path)[0] + ".json"


def load_record(path: str) -> dict:
    """The JSON record beside ``path`` (machine, parity, settings, results, measured); ValueError naming
    it when it is missing or unreadable."""
    rec = record_path(path)
    try:
        with open(rec) as fh:
            return json.load(fh)
    except (OSError, ValueError) as e:
        raise ValueError(f"{rec}: no earlier record ({e})") from None


def merge_previous(path: str, info: dict, results: dict, measured: dict) -> tuple[dict, dict]:
    """This run's ``results`` on top of the record beside ``path``, in the page's order; ValueError when
    there is no record or it was measured on another host or other versions."""
    rec, old = record_path(path), load_record(path)
    differs = [k for k in SAME_HOST if k in info and old.get("machine", {}).get(k) != info[k]]
    if differs:
        raise ValueError(f"{rec}: measured with another {', '.join(differs)}: run every case again")
    merged = {**old.get("results", {}), **results}
    dates = {**old.get("measured", {}), **measured}
    keep = [k for k in ORDER if k in merged]
    return {k: merged[k] for k in keep}, {k: dates[k] for k in keep if k in dates}


def rate(gflop, seconds: float, peak: float) -> str:
    """'GFLOP/s (share of the float32 peak)' of ``gflop`` done in ``seconds``."""
    if not gflop:
        return "-"
    achieved = gflop / seconds
    return f"{achieved:.0f} ({100 * achieved / peak:.0f} %)"


def row(name: str, r: dict, peak: float) -> str:
    a, b = statistics.median(r["ours"]), statistics.median(r["peer"])
    ratio = a / b
    rss = f"{r['ours_rss']:.2f} / {r['peer_rss']:.2f}" if "ours_rss" in r else "-"
    limit = LIMITS.get(name)
    ok = limit is not None and ratio <= limit and (name != "whole" or r["ours_rss"] <= 8.0)
    met = "-" if limit is None else "yes" if ok else "NO"
    gflop = r.get("gflop")
    cells = [LABELS[name], f"{a:.3f}", f"{b:.3f}", f"{ratio:.2f}", f"{gflop:.1f}" if gflop else "-"]
    cells += [rate(gflop, a, peak), rate(gflop, b, peak), rss, str(len(r["ours"])), GOALS[name], met]
    return "| " + " | ".join(cells) + " |"


def settings_lines(info: dict, par: dict, settings: dict, measured: dict) -> list[str]:
    lines = ["## Machine and settings", ""]
    lines += [f"- {k}: {v}" for k, v in info.items()]
    if len(set(measured.values())) > 1:
        lines.append(
            "- measured (cases of earlier runs on this host kept by --update): "
            + ", ".join(f"{k} {v}" for k, v in measured.items())
        )
    lines += [
        f"- threads per side: {settings['threads']} (CPU affinity + torch.set_num_threads); repeats: "
        f"{settings['repeats']} (augment {settings['aug_repeats']}); warm-up call excluded; ours and peer "
        "interleaved in one process (the same memory allocator for both)",
        "- network: n_filters 24, 7 classes, random glorot weights shared by both sides; dropout as the "
        "original's on both sides; loss: weighted cross-entropy; float32 unless the row says bf16",
        f"- parity (64x88x56 probabilities): max abs diff {par['model']:.2e} (model.probabilities), "
        f"{par['segment']:.2e} (segment's forward, lean.probabilities_lean on a CPU); limit 1e-4",
        "- ours: forward and train step call model.probabilities / model.apply; the whole volume runs "
        "segment's forward (on a CPU lean.probabilities_lean: depth slabs of 16, 2-D convolutions)",
        "- GFLOP: XLA's cost analysis of our plain program (the same network's work for both sides); "
        "GFLOP/s = GFLOP / median time, and its share of the float32 peak above",
    ]
    return lines


def cpu_lines(results: dict, settings: dict) -> list[str]:
    peak = settings["peak"]
    lines = [
        "## CPU results",
        "",
        "| case | ours (s) | peer (s) | ours/peer | GFLOP | ours GFLOP/s (% peak) | peer GFLOP/s (% peak) "
        "| peak RSS GiB ours / peer | runs | goal | met |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [row(name, r, peak) for name, r in results.items() if name in CASES + BF16_CASES]
    if "train" in results:
        lines += ["", f"Our training step: {results['train']['ours_step']}."]
    if "augment" in results:  # the original pipeline's elastic deformation: elasticdeform's C code, or not
        elastic = results["augment"].get("peer_elastic", "not recorded")
        lines += ["", f"The peer's augmentation (the original pipeline) deformed with: {elastic}."]
    if not settings["bf16"]:
        lines += ["", "bf16 rows: not measured (this host has neither AVX512-BF16 nor AMX-BF16)."]
    lines += ["", "Raw times (s):", ""]
    for name, r in results.items():
        if name in CASES + BF16_CASES:
            ours, peer = ([round(t, 3) for t in r[side]] for side in ("ours", "peer"))
            lines.append(f"- {name}: ours {ours}, peer {peer}")
    return lines


def write_report(path: str, info: dict, par: dict, results: dict, settings: dict, measured: dict) -> None:
    """BENCHMARKS.md (``path``) and its JSON record, each written to a temporary name and renamed.

    ``settings``: threads, repeats, aug_repeats, peak (float32 GFLOP/s of the cores used), bf16 (bool);
    ``measured``: each case's date."""
    lines = ["# Benchmarks: cerebrum-jax vs the PyTorch peer", ""]
    lines += ["Written by `make bench` (`experiments/bench.py`). Seconds, medians; ratio = ours / peer.", ""]
    lines += [*settings_lines(info, par, settings, measured), "", *cpu_lines(results, settings)]
    if "wholetrain" in results:
        lines += ["", *bench_wholetrain.report_lines(results["wholetrain"], settings["peak"])]
    if "demo" in results:
        lines += ["", *bench_demo.report_lines(results["demo"])]
    lines += ["", *bench_gpu.report_lines(results.get("gpu"))]
    with open(os.path.join(HERE, "bench_notes.md")) as fh:  # the hand-written notes under the results
        lines += ["", fh.read()]
    record = {"machine": info, "parity": par, "settings": settings, "results": results, "measured": measured}
    for target, text in ((record_path(path), json.dumps(record, indent=1)), (path, "\n".join(lines) + "\n")):
        with open(target + ".tmp", "w") as fh:
            fh.write(text)
        os.replace(target + ".tmp", target)


def today() -> str:
    return datetime.date.today().isoformat()
