"""The inputs around the images (issue 21, "The other inputs" and "Everywhere"): dataset descriptions,
fold metrics, configs that run code, label tables, duplicated subjects, headers without a voxel size,
option values; each one line and exit status 2 through the real command line, nothing written. And the
reports: no class name or subject id reaches HTML unescaped."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from failure_kit import (  # noqa: F401  (files: a fixture)
    ENV,
    REPO_ROOT,
    files,
    finetune_args,
    one_error_line,
    tree,
)
from html_kit import Page, viewer_of

from cerebrum_jax.cli import main, one_line
from cerebrum_jax.evaluation import surfaces
from cerebrum_jax.report import html_report, surface_report


def _dataset_with_description(f, t: Path, content) -> Path:
    """A copy of the tiny dataset whose dataset_description.json holds ``content`` (JSON)."""
    root = t / "ds"
    shutil.copytree(f["data"], root)
    (root / "dataset_description.json").write_text(json.dumps(content))
    return root


def _image_in_dataset(f, t: Path, content) -> Path:
    """The tiny image inside a folder whose dataset_description.json holds ``content``."""
    (t / "raw").mkdir()
    (t / "raw" / "dataset_description.json").write_text(json.dumps(content))
    return Path(shutil.copy(f["img"], t / "raw" / "in.nii.gz"))


def _fold_metrics(t: Path, **changes) -> Path:
    """RUN/fold-1/metrics.json of a finished fold, with ``changes`` (None: remove the key)."""
    result = {
        "fold": 1,
        "test_subject": "sub-001",
        "mean_dice": 0.8,
        "classes": {"wm": {"dice": 0.8, "hd95_mm": 1.0, "vs": 0.9}},
    }
    result = {k: v for k, v in {**result, **changes}.items() if v is not None}
    (t / "run" / "fold-1").mkdir(parents=True)
    (t / "run" / "fold-1" / "metrics.json").write_text(json.dumps(result))
    return t / "run"


def _experiment(t: Path, body: str) -> Path:
    (t / "exp.py").write_text(body)
    return t / "exp.py"


def _label_table(t: Path, text: str, encoding: str = "utf-8") -> Path:
    (t / "l.tsv").write_bytes(text.encode(encoding))
    return t / "l.tsv"


def _unplaced(t: Path) -> Path:
    """A NIfTI whose pixdims are 0 and which has neither qform nor sform: no voxel size at all."""
    img = nib.Nifti1Image(np.ones((8, 8, 8), np.float32), None)
    img.header["pixdim"][1:4] = 0
    img.header["qform_code"] = img.header["sform_code"] = 0
    nib.save(img, t / "u.nii")
    return t / "u.nii"


def _patched_header(f, t: Path, offset: int, value: int) -> Path:
    """The tiny image as .nii with the int16 header field at byte ``offset`` set to ``value``."""
    nib.save(nib.load(f["img"]), t / "x.nii")
    raw = bytearray((t / "x.nii").read_bytes())
    raw[offset : offset + 2] = value.to_bytes(2, "little")
    (t / "x.nii").write_bytes(bytes(raw))
    return t / "x.nii"


def _newline_name(f, t: Path) -> Path:
    return Path(shutil.copy(f["img"], t / "two\nlines.nii.gz"))


def _duplicate(f, t: Path, how: str) -> Path:
    """The tiny dataset plus sub-004, whose image and labels are the test subject's (sub-001 in fold 1)."""
    root = t / "dup"
    shutil.copytree(f["data"], root)
    src, dst = root / "derivatives" / "sub-001", root / "derivatives" / "sub-004"
    for sub, name in (("unbiased", "uni_unbiased"), ("labeled", "labels_v01")):
        (dst / sub).mkdir(parents=True)
        a, b = src / sub / f"sub-001_{name}.nii.gz", dst / sub / f"sub-004_{name}.nii.gz"
        if how == "symlink":
            b.symlink_to(a)
        else:
            shutil.copy(a, b)
    return root


def _input_named_as_output(f, t: Path) -> Path:
    """An input in --out named as segment's output of it (sub-01: its dseg)."""
    (t / "out").mkdir()
    return Path(shutil.copy(f["img"], t / "out" / "sub-01_space-orig_desc-cerebrum_dseg.nii.gz"))


def _seg(f, t, *extra):
    return ["segment", "--weights", str(f["ck"]), "--out", str(t / "out"), *extra]


CASES = {  # name: (argv from (files, tmp_path), the one line holds this)
    "finetune dataset_description.json an array": (
        lambda f, t: [*finetune_args(f, t / "o"), "--data", str(_dataset_with_description(f, t, [1]))],
        "dataset_description.json: must be a JSON object, not a list",
    ),
    "segment dataset_description.json a string": (
        lambda f, t: _seg(f, t, "--", str(_image_in_dataset(f, t, "x"))),
        "dataset_description.json: must be a JSON object, not a str",
    ),
    "cv-summary metrics without dice": (
        lambda f, t: ["cv-summary", str(_fold_metrics(t, classes={"wm": {"hd95_mm": 1.0, "vs": 0.9}}))],
        "metrics.json: class 'wm': dice missing or not a number",
    ),
    "cv-summary classes a list": (
        lambda f, t: ["cv-summary", str(_fold_metrics(t, classes=["wm"]))],
        "metrics.json: 'classes' must be an object",
    ),
    "cv-summary mean_dice a string": (
        lambda f, t: ["cv-summary", str(_fold_metrics(t, mean_dice="0.8"))],
        "metrics.json: 'mean_dice' must be a number or null, got '0.8'",
    ),
    "cv-summary fold missing": (
        lambda f, t: ["cv-summary", str(_fold_metrics(t, fold=None))],
        "metrics.json: not a fold's metrics.json (no fold)",
    ),
    "config get_config raises": (
        lambda f, t: ["finetune", "--config", str(_experiment(t, "def get_config():\n    1 / 0\n"))],
        "exp.py: cannot load experiment (ZeroDivisionError: division by zero)",
    ),
    "config sys.exit on import": (
        lambda f, t: ["finetune", "--config", str(_experiment(t, "import sys\nsys.exit(5)\n"))],
        "exp.py: the experiment called sys.exit(5) while loading",
    ),
    "label table: one source value under two classes": (
        lambda f, t: [
            *finetune_args(f, t / "o"),
            "--labels",
            str(_label_table(t, "index\tname\tsource\n0\tbg\t0\n1\ta\t1,2\n2\tb\t2,3\n")),
        ],
        "l.tsv: source value 2 is listed under two classes ('a' and 'b')",
    ),
    "label table: a name starting with a quote": (
        lambda f, t: [
            *finetune_args(f, t / "o"),
            "--labels",
            str(_label_table(t, 'index\tname\n0\tbg\n1\t"a\n2\tb\n3\tc\n1\tdup\n')),
        ],
        "l.tsv: line 6: class index 1 appears twice",  # the quote swallowed no rows: line 6 is still read
    ),
    "label table: a repeated class name": (
        lambda f, t: [
            *finetune_args(f, t / "o"),
            "--labels",
            str(_label_table(t, "index\tname\n0\tbg\n1\twm\n2\twm\n3\tcsf\n")),
        ],
        "l.tsv: line 4: empty or repeated class name 'wm'",
    ),
    "training subject is the test subject (symlinks)": (
        lambda f, t: [*finetune_args(f, t / "o"), "--data", str(_duplicate(f, t, "symlink"))],
        "image of subject sub-004 is the same file (by content) as the image of subject sub-001",
    ),
    "training subject is the test subject (a copy)": (
        lambda f, t: [*finetune_args(f, t / "o"), "--data", str(_duplicate(f, t, "copy"))],
        "image of subject sub-004 is the same file (by content) as the image of subject sub-001",
    ),
    "image without any voxel size": (
        lambda f, t: _seg(f, t, "--", str(_unplaced(t))),
        "u.nii: image voxel sizes (pixdim) are 0 and there is no qform/sform",
    ),
    "unknown NIfTI datatype: only the tool's line": (
        lambda f, t: _seg(f, t, "--", str(_patched_header(f, t, 70, 999))),  # datatype
        "x.nii: not a readable NIfTI file (HeaderDataError: data code 999 not recognized)",
    ),
    "NIfTI dim[0] = 9: only the tool's line": (
        lambda f, t: _seg(f, t, "--", str(_patched_header(f, t, 40, 9))),  # dim[0]: nibabel tries swapped
        "x.nii: not a readable NIfTI file (HeaderDataError",
    ),
    "evaluate --json into a folder that takes no files": (
        lambda f, t: ["evaluate", str(f["lab"]), str(f["lab"]), "--json", "/proc/x.json"],
        "error: /proc/x.json: No such file or directory",  # the user's path, not the temporary one
    ),
    "convert into a folder that takes no directories": (
        lambda f, t: ["convert", str(f["h5"]), "/proc/x"],
        "error: /proc/x: No such file or directory",
    ),
    "convert --to-keras into a folder that takes no files": (
        lambda f, t: ["convert", "--to-keras", str(f["ck"]), "/proc/x.h5"],
        "error: /proc/x.h5: No such file or directory",
    ),
    "segment's output name is its input": (
        lambda f, t: _seg(f, t, "--", str(_input_named_as_output(f, t))),
        "sub-01_space-orig_desc-cerebrum_dseg.nii.gz: is one of the inputs: segment would overwrite it",
    ),
    "a file name holding a newline": (
        lambda f, t: ["evaluate", str(_newline_name(f, t)), str(f["lab"])],
        "two\\nlines.nii.gz: prediction",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_one_line_exit_2(files, tmp_path, capfd, case):
    make_argv, message = CASES[case]
    argv = make_argv(files, tmp_path)
    before = tree(tmp_path)
    capfd.readouterr()
    one_error_line(capfd, main(argv), message)  # capfd: nibabel's own log lines would reach fd 2
    assert tree(tmp_path) == before  # nothing written


USAGE_CASES = {  # argparse refusals: exit 2, one line, before any work
    "segment --tta-axes 5": (["segment", "--tta", "--tta-axes", "5"], "mirror axes must be none, lr, all or"),
    "segment --tta-axes abc": (["segment", "--tta", "--tta-axes", "abc"], "not 'abc'"),
    "segment --tta --no-tta": (["segment", "--tta", "--no-tta"], "--no-tta: not allowed with argument --tta"),
    "bids --tta --no-tta": (
        ["bids", "b", "o", "participant", "--no-tta", "--tta"],
        "not allowed with argument",
    ),
    "finetune --coordinator without a port": (["finetune", "--coordinator", "host"], "expected HOST:PORT"),
    "finetune --coordinator port 0": (["finetune", "--coordinator", "h:0"], "with a port 1..65535"),
    "segment --coordinator with a space": (["segment", "--coordinator", "a b:1"], "got 'a b:1'"),
}


@pytest.mark.parametrize("case", list(USAGE_CASES))
def test_bad_option_value_is_a_usage_line(tmp_path, capsys, case):
    argv, message = USAGE_CASES[case]
    with pytest.raises(SystemExit) as e:
        main([*argv, "--out", str(tmp_path / "out")])
    one_error_line(capsys, e.value.code, message)
    assert not (tmp_path / "out").exists()


def test_config_names_are_not_looked_up_in_the_working_directory(files, tmp_path, capsys, monkeypatch):
    """``--config NAME`` runs only the package's experiments/NAME.py: a folder's own experiments/ never
    runs (a config is code), and its refusal says how to run that file on purpose."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "experiments").mkdir()
    marker = tmp_path / "executed"
    (tmp_path / "experiments" / "mine.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    code = main(["finetune", "--config", "mine", "--out", str(tmp_path / "o")])
    err = one_error_line(capsys, code, "mine: no such experiment in")
    assert "to run ./experiments/mine.py, give its path" in err and not marker.exists()
    code = main(["finetune", "--config", "../experiments/demo", "--out", str(tmp_path / "o")])
    one_error_line(capsys, code, "no such experiment")  # a name is one name, not a path


def test_label_table_with_a_byte_order_mark_is_read(tmp_path):
    from cerebrum_jax.data.labels import LabelMap

    path = _label_table(tmp_path, "index\tname\n0\tbackground\n1\twhite matter\n", "utf-8-sig")
    assert path.read_bytes()[:3] == b"\xef\xbb\xbf"
    assert LabelMap.from_tsv(path).names == ("background", "white matter")


@pytest.mark.parametrize(
    "classes,tags",
    [
        ({1: "white matter", 2: "white-matter"}, {1: "whiteMatter1", 2: "whiteMatter2"}),
        ({1: "White matter", 7: "white matter"}, {1: "whiteMatter1", 7: "whiteMatter7"}),
        ({1: "white matter", 2: "grey matter"}, {1: "whiteMatter", 2: "greyMatter"}),
        ({3: "<script>", 4: "../x"}, {3: "script", 4: "x"}),
    ],
)
def test_surface_file_names_never_collide_or_leave_the_folder(classes, tags):
    assert surfaces.class_tags(classes) == tags


def test_surfaces_of_two_classes_with_one_desc_tag_write_two_files(files, tmp_path, capsys):
    """``surfaces`` with a label table naming classes 1 and 2 'white matter' and 'white-matter': both
    GIfTI pairs are written, none over the other."""
    (tmp_path / "l.tsv").write_text("index\tname\n0\tbg\n1\twhite matter\n2\twhite-matter\n3\tcsf\n")
    out = tmp_path / "s"
    argv = ["surfaces", str(files["lab"]), str(files["lab"]), "--labels", str(tmp_path / "l.tsv")]
    assert main([*argv, "--classes", "white matter,white-matter", "--out", str(out), "--no-render"]) == 0
    names = sorted(p.name for p in out.glob("*.surf.gii"))
    assert (
        len(names) == 4
        and any("whiteMatter1_" in n for n in names)
        and any("whiteMatter2_" in n for n in names)
    )


def test_one_line_escapes_control_characters():
    assert one_line("a\nb\rc\td\x1b[31m é") == "a\\nb\\rc\\td\\x1b[31m é"


def test_a_distributed_runs_exit_line_is_escaped_too():
    """``distributed.exit_now`` (a failing process of a multi-process run) prints its own line: a file name
    with a newline or a terminal escape stays on it."""
    code = (
        "from cerebrum_jax.parallel.distributed import exit_now; from cerebrum_jax.errors import InputError; "
        "exit_now('segment', InputError('not a NIfTI file', 'a\\nb\\x1b[31m.nii'))"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV)
    assert p.returncode == 2 and len(p.stderr.splitlines()) == 1, p.stderr
    assert p.stderr.strip() == (
        "cerebrum-jax segment: error: process 0 of 1: a\\nb\\x1b[31m.nii: not a NIfTI file"
    ), p.stderr


def test_a_defect_is_one_line_with_the_traceback_in_a_file(tmp_path, capsys, monkeypatch):
    """An exception that is not bad input (a defect of ours) ends with one line, exit status 1, naming the
    file that holds the traceback; fault injected through the real subcommand's function."""
    from cerebrum_jax.cli import cv_summary

    def broken(args):
        raise KeyError("an internal key")

    import tempfile

    monkeypatch.setattr(cv_summary, "run", broken)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the traceback goes
    code = main(["cv-summary", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "internal error: KeyError: 'an internal key'" in err
    saved = list(tmp_path.glob("cerebrum-jax-traceback-*.txt"))
    assert (
        len(saved) == 1 and "Traceback" in saved[0].read_text() and "an internal key" in saved[0].read_text()
    )


# ----------------------------------------------------------------------------------------------------------
# Reports: what a user names (classes, subjects) reaches HTML escaped, in every page the project writes

HOSTILE = ["<script>alert(1)</script>", '"><img src=x onerror=alert(2)>', "' onmouseover='alert(3)"]


def _check_page(path: Path) -> str:
    """Parse ``path``: no script element but the 3-D viewer's own (``html_kit.viewer_of``), no
    event-handler attribute, no image from anywhere but a data URI; every hostile name appears in the
    page's text (escaped, not dropped)."""
    page = Path(path).read_text()
    parser = Page(page)
    viewer_of(parser)
    assert not [(t, a) for t, attrs in parser.tags for a in attrs if a.lower().startswith("on")]
    assert all(a.get("src", "").startswith("data:") for t, a in parser.tags if t == "img")
    for name in HOSTILE:
        assert html_escape(name) in page
    return page


def html_escape(text: str) -> str:
    import html

    return html.escape(text)


def _png(path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(1, 1))
    fig.savefig(path)
    plt.close(fig)
    return path


def _metrics(names):
    return {
        "mean_dice": 0.5,
        "classes": {n: {"label": i, "dice": 0.5, "hd95_mm": 1.0, "vs": 0.9} for i, n in enumerate(names)},
    }


def test_fold_and_cv_pages_escape_class_names_and_subject_ids(tmp_path):
    fig = _png(tmp_path / "f.png")
    meta = {"title": HOSTILE[0], "test_subject": HOSTILE[1], "data": HOSTILE[2]}
    fold = html_report.write_fold_html(tmp_path / "fold.html", meta, _metrics(HOSTILE), {HOSTILE[1]: fig})
    _check_page(fold)
    results = [{"fold": 1, "test_subject": HOSTILE[1], **_metrics(HOSTILE)}]
    from cerebrum_jax.report import figures as report

    summary = report.cv_summary(results)
    _check_page(html_report.write_cv_html(tmp_path / "cv.html", summary, results, fig))


def test_surfaces_page_escapes_class_names(files, tmp_path):
    data = np.asarray(nib.load(files["lab"]).dataobj)
    classes = dict(enumerate(HOSTILE, start=1))
    records = surface_report.write_class_surfaces(
        tmp_path, "sub-x", data, data, nib.load(files["lab"]).affine, classes, frames=2
    )
    assert all(os.sep not in n and ".." not in n for r in records for n in r["files"].values())
    page = _check_page(html_report.write_surfaces_html(tmp_path / "s.html", records, tmp_path, HOSTILE[0]))
    assert len(viewer_of(Page(page))["classes"]) == sum("viewer" in r["files"] for r in records) > 0


def test_cv_summary_of_folds_without_a_mean_dice_says_n_a(tmp_path, capsys):
    """Every fold's mean Dice null (n/a): a summary that says n/a, exit 0, not a crash after writing."""
    run = _fold_metrics(tmp_path, mean_dice=None)
    data = json.loads((run / "fold-1" / "metrics.json").read_text())
    (run / "fold-1" / "metrics.json").write_text(json.dumps({**data, "mean_dice": None}))
    assert main(["cv-summary", str(run)]) == 0
    assert "mean Dice n/a" in capsys.readouterr().out
    assert json.loads((run / "cv_summary.json").read_text())["mean_dice"]["mean"] is None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_coordinator_is_one_line(files):
    """Before the fix a process other than 0 whose --coordinator nobody listened on was aborted by JAX
    after --init-timeout (SIGABRT, exit 134, a C++ stack trace); now: one line naming the address, exit 2."""
    address = f"127.0.0.1:{_free_port()}"
    argv = ["segment", "--coordinator", address, "--num-processes", "2", "--process-id", "1"]
    argv += ["--init-timeout", "1", "--out", str(files["root"] / "never"), str(files["img"])]
    p = subprocess.run([sys.executable, "-m", "cerebrum_jax", *argv], capture_output=True, text=True, env=ENV)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert f"{address}: cannot reach the coordinator (process 0) within 1 s" in p.stderr, p.stderr
    assert not (files["root"] / "never").exists()


def test_the_coordinator_is_waited_for_until_it_listens():
    """Process 0 may start after the others: the wait returns once the address accepts connections."""
    from cerebrum_jax.parallel.distributed import wait_for_coordinator

    port = _free_port()
    server = socket.socket()

    def listen_later():
        time.sleep(1.0)
        server.bind(("127.0.0.1", port))
        server.listen()

    thread = threading.Thread(target=listen_later)
    thread.start()
    try:
        start = time.monotonic()
        wait_for_coordinator(f"127.0.0.1:{port}", timeout_s=30, interval_s=0.1)
        assert time.monotonic() - start >= 0.9
    finally:
        thread.join()
        server.close()
