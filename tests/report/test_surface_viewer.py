"""The interactive 3-D viewer of report.html: its data round trip, the embedded plotly.js, escaping, and
(where a Chromium is installed) the page run in a real headless browser."""

import json
import re
import shutil
import subprocess

import numpy as np
import pytest
from html_kit import Page, viewer_of
from nilearn.plotting.js_plotting_utils import decode

from cerebrum_jax.evaluation import surfaces
from cerebrum_jax.report import html_report, surface_report, surface_viewer


def _pair(shape=(24, 24, 24)):
    g = np.indices(shape).astype(float)
    r = np.sqrt(((g - 11.5) ** 2).sum(0))
    ref = (r < 8).astype(np.uint8)
    return ref, np.roll(ref, 2, axis=0)  # shifted by 2 mm: distances of both signs


def test_plotly_bundle_ships_with_nilearn():
    js = surface_viewer.plotly_js()
    assert js.lstrip().startswith("/**\n* plotly.js") and len(js) > 500_000
    assert "</script" not in js.lower()  # embeddable inline as it is


def test_viewer_data_decodes_to_the_drawing_meshes():
    ref, pred = _pair()
    affine = np.diag([1.0, 1.5, 0.8, 1.0])
    got = surfaces.compare_class(ref, pred, 1, affine)
    rec = json.loads(json.dumps(surface_viewer.viewer_data(got)))  # JSON-able as it is written
    for key in ("ref", "pred"):
        verts, faces = got["view"][key]
        xyz = np.stack([decode(rec[key][f"_{a}"], "<f4") for a in "xyz"], 1)
        ijk = np.stack([decode(rec[key][f"_{a}"], "<i4") for a in "ijk"], 1)
        np.testing.assert_array_equal(xyz, verts)
        np.testing.assert_array_equal(ijk, faces)
        assert np.all(np.abs(xyz - rec["centre"]) <= rec["half"])  # the cube in view holds the surface
    np.testing.assert_array_equal(decode(rec["pred"]["distance"], "<f4"), got["view"]["distance"])
    assert rec["limit"] >= 1.0 and rec["limit"] >= np.percentile(np.abs(got["view"]["distance"]), 97)


@pytest.mark.parametrize(
    "value",
    ["</script><script>alert(1)</script>", "<!-- x", "a & b > c", {"k": "</SCRIPT >"}],
)
def test_script_json_cannot_leave_its_element(value):
    text = surface_viewer.script_json(value)
    assert "<" not in text and ">" not in text and "&" not in text
    assert json.loads(text) == value


def test_colorscale_is_the_distance_colour_map():
    scale = surface_viewer.colorscale()
    assert scale[0][0] == 0.0 and scale[-1][0] == 1.0 and len(scale) == 11
    assert all(re.fullmatch(r"rgb\(\d{1,3},\d{1,3},\d{1,3}\)", c) for _, c in scale)  # plotly colours
    r0, _, b0 = map(int, scale[0][1][4:-1].split(","))
    r1, _, b1 = map(int, scale[-1][1][4:-1].split(","))
    assert b0 > r0 and r1 > b1  # RdBu_r: blue (inside, too thin) to red (outside, too thick)


def _page(tmp_path, names):
    ref, pred = _pair()
    both_ref = ref + 2 * np.roll(ref, 6, axis=1) * (ref == 0)
    both_pred = pred + 2 * np.roll(pred, 6, axis=1) * (pred == 0)
    labels = {1: names[0], 2: names[1]}
    recs = surface_report.write_class_surfaces(
        tmp_path, "sub-1", both_ref, both_pred, np.eye(4), labels, frames=2
    )
    return html_report.write_surfaces_html(tmp_path / "report.html", recs, tmp_path, "surfaces"), recs


def test_viewer_page_embeds_everything_and_escapes_names(tmp_path):
    hostile = "</script><script>alert(1)</script>"
    path, recs = _page(tmp_path, [hostile, "grey matter"])
    text = path.read_text()
    page = Page(text)
    data = viewer_of(page)  # exactly the data, plotly.js and the viewer script; none from a URL
    assert len(data["classes"]) == 2 and {"viewer", "png", "gif"} <= set(recs[0]["files"])
    options = [a for t, a in page.tags if t == "option"]
    assert [o["value"] for o in options] == ["0", "1"]
    assert '<option value="0">&lt;/script&gt;&lt;script&gt;alert(1)&lt;/script&gt;</option>' in text
    assert "alert(1)" not in page.scripts[0][1]  # names stay out of the data
    ids = {a.get("id") for _, a in page.tags}
    assert {"cj-viewer", "cj-viewer-class", "cj-viewer-data"} <= ids  # what VIEWER_JS looks up
    for key in ("cj-viewer", "cj-viewer-class", "cj-viewer-data"):
        assert f'"{key}"' in surface_viewer.VIEWER_JS


def _chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


NO_BROWSER = "no Chromium on PATH (apt-get install chromium) to run the page in"


# Run in the browser after the page's own scripts: turn the left panel's camera as a drag would, then pick
# the second class; write what the viewer did into attributes that --dump-dom shows.
USER = """<script>
(function () {
  var div = document.getElementById("cj-viewer"), choice = document.getElementById("cj-viewer-class");
  function when(test, then) {
    var t = setInterval(function () { if (test()) { clearInterval(t); then(); } }, 50);
  }
  function eye(scene) { return div._fullLayout[scene].camera.eye; }
  when(function () { return div.dataset.drawn === "0"; }, function () { setTimeout(function () {
    Plotly.relayout(div, {"scene.camera": {eye: {x: 0, y: 2, z: 0}, up: {x: 0, y: 0, z: 1}}});
    when(function () { return Math.abs(eye("scene2").y - 2) < 1e-6; }, function () {
      div.dataset.linked = "yes";
      choice.value = "1";
      choice.dispatchEvent(new Event("change"));
      when(function () { return div.dataset.drawn === "1"; }, function () {
        div.dataset.kept = String(eye("scene").y) + "," + String(eye("scene2").y);
      });
    });
  }, 200); });
})();
</script>"""


@pytest.mark.slow
@pytest.mark.skipif(_chromium() is None, reason=NO_BROWSER)
def test_viewer_draws_both_surfaces_in_a_headless_browser(tmp_path):
    """The page run by a real browser (software WebGL): plotly builds both scenes; turning one panel turns
    the other; another class is drawn from the same side; no script error reaches the console."""
    path, _ = _page(tmp_path, ["white matter", "grey matter"])
    path.write_text(path.read_text().replace("</body>", USER + "</body>"))
    out = subprocess.run(
        [
            _chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--use-angle=swiftshader",
            "--enable-unsafe-swiftshader", "--virtual-time-budget=20000", "--enable-logging=stderr",
            "--dump-dom", path.as_uri(),
        ],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    dom = out.stdout
    assert 'data-linked="yes"' in dom and 'data-drawn="1"' in dom, out.stderr[-2000:]
    assert 'data-kept="2,2"' in dom  # the camera kept across the class change
    assert 'id="scene"' in dom and 'id="scene2"' in dom and dom.count("<canvas") >= 2  # two WebGL scenes
    assert "Uncaught" not in out.stderr, out.stderr[-2000:]
