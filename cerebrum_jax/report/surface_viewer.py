"""The interactive 3-D viewer of report.html: a class's surfaces, manual | prediction side by side in one
plotly figure (WebGL), the prediction coloured by its signed distance to the manual surface (mm); drag to
rotate, scroll to zoom, both panels turning together; the class chosen from a list.

It works offline from the one file: plotly.js (the gl3d bundle nilearn ships for its ``view_surf``,
MIT-licensed) and the meshes are embedded in the page. The meshes are the report's drawing meshes
(``surfaces.RENDER_FACES``), stored per class as ``<stem>_viewer.json`` (``viewer_data``), the arrays
base64-encoded little-endian as nilearn's ``view_surf`` does (``mesh_to_plotly``).
"""

from __future__ import annotations

import html
import json
from importlib import resources

import matplotlib

matplotlib.use("Agg")  # no display: only colour maps are used here

import numpy as np  # noqa: E402
from matplotlib import colormaps  # noqa: E402
from nilearn.plotting.js_plotting_utils import encode, mesh_to_plotly  # noqa: E402

from cerebrum_jax.report import surface_views  # noqa: E402

# nilearn's copy of plotly.js (gl3d partial bundle); a private path, pinned with nilearn and tested
PLOTLY_JS = ("nilearn", "_assets/js/plotly-gl3d-latest.min.js")
REF_COLOUR = "rgb({},{},{})".format(*(round(255 * c) for c in surface_views.REF_RGB))

VIEWER_JS = """
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("cj-viewer-data").textContent);
  var div = document.getElementById("cj-viewer");
  var choice = document.getElementById("cj-viewer-class");
  function decode(b64, Type) {
    var s = atob(b64), bytes = new Uint8Array(s.length);
    for (var i = 0; i < s.length; i++) bytes[i] = s.charCodeAt(i);
    return new Type(bytes.buffer);
  }
  function mesh(m, scene, extra) {
    var trace = {
      type: "mesh3d", scene: scene, flatshading: false, hoverinfo: "skip",
      x: decode(m._x, Float32Array), y: decode(m._y, Float32Array), z: decode(m._z, Float32Array),
      i: decode(m._i, Int32Array), j: decode(m._j, Int32Array), k: decode(m._k, Int32Array),
      lighting: {ambient: 0.4, diffuse: 0.8, specular: 0.1, roughness: 0.6, fresnel: 0.1},
      lightposition: {x: 0, y: 0, z: 1e5}
    };
    for (var key in extra) trace[key] = extra[key];
    return trace;
  }
  function axis(c, h) {
    return {range: [c - h, c + h], visible: false};
  }
  function scene(c, h, x0, x1, camera) {
    return {
      domain: {x: [x0, x1], y: [0, 1]}, aspectmode: "cube", camera: camera,
      xaxis: axis(c[0], h), yaxis: axis(c[1], h), zaxis: axis(c[2], h)
    };
  }
  var camera = {eye: {x: -1.3, y: 0, z: 0.25}, up: {x: 0, y: 0, z: 1}};  // from the left, a little above
  function draw(index) {
    var cls = data.classes[index];
    var traces = [
      mesh(cls.ref, "scene", {color: data.ref_colour}),
      mesh(cls.pred, "scene2", {
        intensity: decode(cls.pred.distance, Float32Array), colorscale: data.colorscale,
        cmin: -cls.limit, cmax: cls.limit,
        colorbar: {title: {text: "signed distance to manual (mm)", side: "right"}, len: 0.7, thickness: 14}
      })
    ];
    var layout = {
      scene: scene(cls.centre, cls.half, 0, 0.46, camera),
      scene2: scene(cls.centre, cls.half, 0.46, 0.92, camera),
      margin: {l: 0, r: 0, t: 28, b: 0}, showlegend: false,
      annotations: [
        {text: "manual (reference)", x: 0.23, y: 1.0, xref: "paper", yref: "paper", showarrow: false},
        {text: "prediction", x: 0.69, y: 1.0, xref: "paper", yref: "paper", showarrow: false}
      ]
    };
    return Plotly.react(div, traces, layout, {responsive: true, displaylogo: false}).then(function () {
      div.dataset.drawn = String(index);  // which class is on screen (the browser test reads it)
    });
  }
  var syncing = false;
  function link() {
    div.on("plotly_relayout", function (event) {
      if (syncing) return;
      var moved = event["scene.camera"] ? "scene" : (event["scene2.camera"] ? "scene2" : null);
      if (!moved) return;
      camera = event[moved + ".camera"];
      var update = {};
      update[(moved === "scene" ? "scene2" : "scene") + ".camera"] = camera;
      syncing = true;
      Plotly.relayout(div, update).then(function () { syncing = false; }, function () { syncing = false; });
    });
  }
  choice.addEventListener("change", function () { draw(Number(choice.value)); });
  draw(0).then(link);
})();
"""


def plotly_js() -> str:
    """The text of the plotly.js bundle the viewer embeds."""
    return resources.files(PLOTLY_JS[0]).joinpath(PLOTLY_JS[1]).read_text(encoding="utf-8")


def viewer_data(got: dict) -> dict:
    """The viewer's record of one class (JSON-able): the manual and predicted drawing meshes (base64
    float32 x, y, z in mm; int32 i, j, k), the prediction's signed distance per vertex (base64 float32,
    mm), the cube in view (centre (3,) mm, half width mm) and the colour limit (mm, symmetric).

    got: ``surfaces.compare_class``'s result for a class with both surfaces present."""
    centre, half, norm = surface_views.scene_box(got)
    view = got["view"]
    ref, pred = (mesh_to_plotly(tuple(view[k])) for k in ("ref", "pred"))
    pred["distance"] = encode(np.asarray(view["distance"], "<f4"))
    return {
        "ref": ref, "pred": pred, "centre": [float(c) for c in centre], "half": half,
        "limit": float(norm.vmax),
    }  # fmt: skip


def colorscale(name: str = surface_views.DIST_CMAP, steps: int = 11) -> list:
    """A matplotlib colour map as a plotly colour scale [[t, 'rgb(r,g,b)'], ...], t in [0, 1]."""
    cmap = colormaps[name]
    return [
        [float(t), "rgb({},{},{})".format(*(round(255 * c) for c in cmap(t)[:3]))]
        for t in np.linspace(0, 1, steps)
    ]


def script_json(value) -> str:
    """JSON that cannot end or open an HTML element inside a <script> (``<``, ``>``, ``&`` escaped)."""
    text = json.dumps(value, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def viewer_html(classes: list[tuple[str, dict]]) -> str:
    """The viewer section: a class list (names HTML-escaped), the plot, the data and the two scripts.

    classes: (class name, ``viewer_data`` record) of each class with both surfaces; at least one."""
    options = "".join(
        f'<option value="{k}">{html.escape(name)}</option>' for k, (name, _) in enumerate(classes)
    )
    data = {"classes": [rec for _, rec in classes], "colorscale": colorscale(), "ref_colour": REF_COLOUR}
    return (
        "<h3>3-D viewer</h3><p>Drag to rotate, scroll to zoom, double-click to reset; both panels turn "
        "together. The prediction is coloured by its signed distance to the manual surface.</p>"
        f'<p><label>class <select id="cj-viewer-class">{options}</select></label></p>'
        '<div id="cj-viewer" style="width:100%;height:440px"></div>'
        f'<script type="application/json" id="cj-viewer-data">{script_json(data)}</script>'
        f"<script>{plotly_js()}</script><script>{VIEWER_JS}</script>"
    )
