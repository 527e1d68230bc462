"""Static views of a class's surfaces, manual | prediction, drawn off-screen with nilearn's surface plotting
(``nilearn.plotting.plot_surf``, matplotlib engine, Agg): three fixed views (PNG) and a turntable (GIF).

nilearn places the mesh, sets the camera (orthographic here, so both panels share one scale) and maps
the values to colours: the reference in one colour, the prediction by its signed distance to the
reference (mm, diverging colour map, blue inside = too thin, red outside = too thick), with a colour
bar. nilearn's matplotlib engine has no lighting, so each face's colour is then scaled by a head light
(``headlight``: the cosine between the smoothed vertex normals and the direction to the camera), which
gives the shape its relief. World axes are RAS+ (x right, y anterior, z superior), as NIfTI's scanner
space.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import NamedTuple

import matplotlib

matplotlib.use("Agg")  # no display: figures go to files only

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap, Normalize  # noqa: E402
from nilearn.plotting import plot_surf  # noqa: E402
from PIL import Image  # noqa: E402

from cerebrum_jax.fsafe import atomic_path  # noqa: E402
from cerebrum_jax.report.figures import save_figure  # noqa: E402

# (elevation, azimuth) in degrees of matplotlib's camera: azimuth 0 looks from +x (the right)
VIEWS = {"left": (0.0, 180.0), "front": (0.0, 90.0), "top": (90.0, -90.0)}
REF_RGB = (0.85, 0.78, 0.62)  # the manual surface: one neutral colour
DIST_CMAP = "RdBu_r"
AMBIENT = 0.3  # share of a face's colour kept where the head light grazes it
ZOOM = 1.6  # matplotlib 3-D axes leave wide margins; this fills a panel with the cube in view


def camera_direction(elev: float, azim: float) -> np.ndarray:
    """Unit vector (3,) from the scene toward matplotlib's camera at (elevation, azimuth) degrees."""
    e, a = np.radians(elev), np.radians(azim)
    return np.array([np.cos(e) * np.cos(a), np.cos(e) * np.sin(a), np.sin(e)])


def vertex_normals(verts, faces) -> np.ndarray:
    """Outward unit normals (V, 3) of a closed surface: the area-weighted mean of its faces' normals."""
    verts = np.asarray(verts, float)
    tri = verts[faces]
    n = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])  # length = twice the face's area
    out = np.zeros_like(verts)
    for k in range(3):
        np.add.at(out, faces[:, k], n)
    if np.einsum("ij,ij->i", tri[:, 0], n).sum() < 0:  # negative enclosed volume: faces wound inward
        out = -out
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


def headlight(normals, faces, direction) -> np.ndarray:
    """Brightness (F,) in [AMBIENT, 1] of each face lit from the camera ``direction`` (3,)."""
    lit = AMBIENT + (1 - AMBIENT) * np.clip(normals @ direction, 0, None)
    return lit[faces].mean(axis=1)


class Panel:
    """One surface drawn by ``plot_surf`` in a 3-D axes, relit and re-aimed per view.

    verts (V, 3) mm, faces (F, 3), normals (V, 3) (``vertex_normals``); values (V,) mapped through
    ``cmap`` by ``norm``; centre (3,) mm and half_width (mm): the cube in view, shared by the panels of
    a figure.
    """

    def __init__(self, ax, verts, faces, normals, values, cmap, norm, centre, half_width, view):
        verts = np.asarray(verts, float)
        plot_surf(
            (verts.copy(), faces), surf_map=values, cmap=cmap, vmin=norm.vmin, vmax=norm.vmax,
            view=view, axes=ax, colorbar=False, avg_method="mean",
        )  # fmt: skip
        self.ax, self.faces = ax, faces
        self.collection = ax.collections[-1]
        # the colours plot_surf gave each face (its vertices' mean, mapped); read back, matplotlib would
        # return them in its last drawing's depth order, not the faces' order
        self.colours = np.asarray(cmap(norm(np.asarray(values, float)[faces].mean(axis=1))))
        self.normals = normals
        # plot_surf draws the mesh about its own mean: the shared cube, in those coordinates
        c = np.asarray(centre) - verts.mean(axis=0)
        ax.set_proj_type("ortho")
        ax.set_box_aspect((1, 1, 1), zoom=ZOOM)
        ax.set_xlim(c[0] - half_width, c[0] + half_width)
        ax.set_ylim(c[1] - half_width, c[1] + half_width)
        ax.set_zlim(c[2] - half_width, c[2] + half_width)
        self.aim(*view)

    def aim(self, elev: float, azim: float) -> None:
        """Turn the camera to (elevation, azimuth) degrees and light the faces from it."""
        self.ax.view_init(elev=elev, azim=azim)
        lit = self.colours.copy()
        lit[:, :3] *= headlight(self.normals, self.faces, camera_direction(elev, azim))[:, None]
        self.collection.set_facecolor(lit)
        self.collection.set_edgecolor(lit)


def scene_box(got: dict):
    """(centre (3,), half width (mm), distance norm) of a comparison's view meshes."""
    view = got["view"]
    both = np.concatenate([view["ref"][0], view["pred"][0]]).astype(float)
    centre = (both.min(0) + both.max(0)) / 2
    half = float(np.linalg.norm(both - centre, axis=1).max()) * 1.02
    lim = max(float(np.percentile(np.abs(view["distance"]), 98)), 1.0)
    return centre, half, Normalize(-lim, lim)


class _Scene(NamedTuple):
    """What every panel of one comparison's figure shares, computed once: ``scene_box``'s cube and
    distance norm, and each surface's vertex normals {"ref", "pred"}."""

    centre: np.ndarray
    half: float
    norm: Normalize
    normals: dict


def _scene(got: dict) -> _Scene:
    normals = {k: vertex_normals(*got["view"][k]) for k in ("ref", "pred")}
    return _Scene(*scene_box(got), normals)


def _panels(axes, got: dict, view, scene: _Scene) -> tuple[Panel, Panel]:
    """(manual, prediction) panels of a comparison in the two 3-D ``axes``."""
    v, box = got["view"], (scene.centre, scene.half, view)
    ref, nref, npred = np.zeros(len(v["ref"][0])), scene.normals["ref"], scene.normals["pred"]
    return (
        Panel(axes[0], *v["ref"], nref, ref, ListedColormap([REF_RGB]), Normalize(-1, 1), *box),
        Panel(axes[1], *v["pred"], npred, v["distance"], plt.get_cmap(DIST_CMAP), scene.norm, *box),
    )


def _colour_bar(fig, scene: _Scene, rect) -> None:
    sm = plt.cm.ScalarMappable(norm=scene.norm, cmap=DIST_CMAP)
    fig.colorbar(sm, cax=fig.add_axes(rect), orientation="horizontal", label="signed distance to manual (mm)")


def render_views(path, got: dict, name: str, size: int = 240) -> Path:
    """PNG: manual | prediction from the left, the front and the top, with the distance colour bar.

    got: ``surfaces.compare_class``'s result for one class with both surfaces present; size: pixels per
    panel side.
    """
    dpi = 80
    fig, scene = plt.figure(figsize=(2 * size / dpi, 3 * size / dpi + 1.3), dpi=dpi), _scene(got)
    for row, view in enumerate(VIEWS.values()):
        axes = [fig.add_subplot(3, 2, 2 * row + k + 1, projection="3d") for k in range(2)]
        _panels(axes, got, view, scene)
    for row, label in enumerate(VIEWS):
        fig.text(0.02, 0.92 - row * 0.275, label, fontsize=9, va="top")
    fig.text(0.25, 0.95, "manual (reference)", fontsize=10, ha="center")
    fig.text(0.75, 0.95, "prediction", fontsize=10, ha="center")
    s = got["stats"]
    fig.suptitle(
        f"{name}: distance to manual, mean {s['mean']:+.2f} mm, 95th pct |d| {s['p95_abs']:.2f} mm",
        fontsize=9,
    )
    fig.subplots_adjust(left=0.0, right=1.0, top=0.94, bottom=0.1, wspace=0.0, hspace=0.0)
    _colour_bar(fig, scene, (0.15, 0.05, 0.7, 0.015))
    return save_figure(fig, path, dpi=dpi, tight=False)


def render_turntable(path, got: dict, name: str, frames: int = 12, size: int = 160) -> Path:
    """GIF: manual | prediction turning once around the superior axis in ``frames`` frames (looping),
    ``size`` pixels per panel side, seen from 15 degrees above, starting from the left."""
    dpi = 80
    fig = plt.figure(figsize=(2 * size / dpi, size / dpi + 0.25), dpi=dpi)
    axes = [fig.add_axes((k / 2, 0.0, 0.5, size / (size + 20)), projection="3d") for k in range(2)]
    panels = _panels(axes, got, (15.0, 180.0), _scene(got))
    fig.text(0.01, 0.99, f"{name}: manual", fontsize=8, va="top")
    fig.text(0.51, 0.99, "prediction", fontsize=8, va="top")
    images = []
    for i in range(frames):
        for panel in panels:
            panel.aim(15.0, 180.0 + 360.0 * i / frames)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=dpi)
        rgb = Image.open(buf).convert("RGB")
        images.append(rgb.quantize(colors=128, method=Image.Quantize.FASTOCTREE))
    plt.close(fig)
    with atomic_path(path) as tmp:
        images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], duration=250, loop=0)
    return Path(path)
