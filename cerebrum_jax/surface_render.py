"""Off-screen renderings of a class's surfaces, manual | prediction: three fixed views (PNG) and a turntable
(GIF), with matplotlib (Agg) and pillow only.

A surface (vertices (V, 3) world mm, faces (F, 3)) is drawn by a small painter's-algorithm renderer
(``raster``, pillow): vertices projected orthographically for a camera looking at the surfaces' common
centre, the triangles that face the camera filled far to near, each shaded by the cosine between its
normal and the viewing direction (a head light). The reference is drawn in one colour; the prediction
is coloured by its signed distance to the reference (mm, diverging colour map, blue inside = too thin,
red outside = too thick), with a colour bar. World axes are RAS+ (x right, y anterior, z superior), as
NIfTI's scanner space.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display: figures go to files only

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import Normalize  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from cerebrum_jax.fsafe import atomic_path  # noqa: E402

# (direction from the centre to the camera, screen-up) in RAS+ world axes
VIEWS = {
    "left": ((-1.0, 0.0, 0.0), (0.0, 0.0, 1.0)),
    "front": ((0.0, 1.0, 0.0), (0.0, 0.0, 1.0)),
    "top": ((0.0, 0.0, 1.0), (0.0, 1.0, 0.0)),
}
REF_RGB = np.array([0.85, 0.78, 0.62])  # the manual surface: one neutral colour
DIST_CMAP = "RdBu_r"


def camera(direction, up) -> np.ndarray:
    """Rotation (3, 3) whose rows are screen-right, screen-up and the direction toward the camera."""
    d = np.asarray(direction, float) / np.linalg.norm(direction)
    right = np.cross(-d, np.asarray(up, float))
    right /= np.linalg.norm(right)
    return np.stack([right, np.cross(right, -d), d])


def turntable_direction(angle_deg: float, elevation_deg: float = 15.0) -> np.ndarray:
    """Camera direction circling the superior axis, starting from the left side of the head."""
    a, e = np.radians(angle_deg), np.radians(elevation_deg)
    return np.array([-np.cos(a) * np.cos(e), -np.sin(a) * np.cos(e), np.sin(e)])


def _outward(verts, faces) -> float:
    """+1 when the triangles' normals ((v1 - v0) x (v2 - v0)) point out of the closed surface, else -1."""
    tri = verts[faces]
    volume = np.einsum("ij,ij->i", tri[:, 0], np.cross(tri[:, 1], tri[:, 2])).sum()
    return 1.0 if volume >= 0 else -1.0


def raster(verts, faces, rot, centre, half_width: float, rgb, size: int, supersample: int = 2) -> np.ndarray:
    """One view of a closed surface as an RGB image (size, size, 3) uint8 on white.

    rot: ``camera`` rotation; centre (3,) mm is drawn at the image centre, ``half_width`` mm at its edges;
    rgb: (3,) or per face (F, 3) in [0, 1]. Faces turned away from the camera are skipped, the others
    filled far to near (painter's algorithm) and shaded by a head light; drawn ``supersample`` times larger
    and reduced (anti-aliasing).
    """
    verts = np.asarray(verts, float)
    tri = verts[faces]
    n = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]) * _outward(verts, faces)
    n /= np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-12)
    facing = n @ rot[2]
    keep = np.nonzero(facing > 0)[0]
    p = (verts - centre) @ rot.T
    keep = keep[np.argsort(p[faces[keep], 2].mean(axis=1))]  # far (smaller toward-camera value) first
    base = np.broadcast_to(np.asarray(rgb, float), (len(faces), 3))[keep]
    colours = (np.clip(base * (0.3 + 0.7 * facing[keep, None]), 0, 1) * 255).astype(np.uint8)
    big = size * supersample
    xy = np.stack([(0.5 + p[:, 0] / (2 * half_width)) * big, (0.5 - p[:, 1] / (2 * half_width)) * big], 1)
    img = Image.new("RGB", (big, big), "white")
    draw = ImageDraw.Draw(img)
    for corners, colour in zip(
        xy[faces[keep]].reshape(-1, 6).tolist(), map(tuple, colours.tolist()), strict=True
    ):
        draw.polygon(corners, fill=colour)
    return np.asarray(img.resize((size, size), Image.Resampling.LANCZOS))


def _scene(got: dict):
    """(centre (3,), half width (mm), colour norm, per-face prediction colours (F, 3)) of a comparison."""
    got = got["view"]
    both = np.concatenate([got["ref"][0], got["pred"][0]]).astype(float)
    centre = (both.min(0) + both.max(0)) / 2
    half = float(np.linalg.norm(both - centre, axis=1).max()) * 1.04
    lim = max(float(np.percentile(np.abs(got["distance"]), 98)), 1.0)
    norm = Normalize(-lim, lim)
    face_dist = got["distance"][got["pred"][1]].mean(axis=1)
    rgb = plt.get_cmap(DIST_CMAP)(norm(face_dist))[:, :3]
    return centre, half, norm, rgb


def _pair(got, rot, scene, size) -> tuple[np.ndarray, np.ndarray]:
    """(manual, prediction) images (size, size, 3) uint8 for the camera ``rot``."""
    centre, half, _, pred_rgb = scene
    got = got["view"]
    return (
        raster(*got["ref"], rot, centre, half, REF_RGB, size),
        raster(*got["pred"], rot, centre, half, pred_rgb, size),
    )


def render_views(path, got: dict, name: str, size: int = 240) -> Path:
    """PNG: manual | prediction from the left, the front and the top, with the distance colour bar.

    got: ``surfaces.compare_class``'s result for one class with both surfaces present; size: pixels per
    panel side.
    """
    scene = _scene(got)
    fig, axes = plt.subplots(3, 2, figsize=(2 * size / 80, 3 * size / 80 + 1.3), dpi=80)
    for row, (view, (direction, up)) in enumerate(VIEWS.items()):
        for ax, image in zip(axes[row], _pair(got, camera(direction, up), scene, size), strict=True):
            ax.imshow(image)
            ax.set_axis_off()
        axes[row, 0].text(4, 4, view, fontsize=9, va="top")
    axes[0, 0].set_title("manual (reference)", fontsize=10)
    axes[0, 1].set_title("prediction", fontsize=10)
    s = got["stats"]
    fig.suptitle(
        f"{name}: distance to manual, mean {s['mean']:+.2f} mm, 95th pct |d| {s['p95_abs']:.2f} mm",
        fontsize=9,
    )
    fig.subplots_adjust(left=0.01, right=0.99, top=0.93, bottom=0.1, wspace=0.02, hspace=0.02)
    cax = fig.add_axes((0.15, 0.05, 0.7, 0.015))
    sm = plt.cm.ScalarMappable(norm=scene[2], cmap=DIST_CMAP)
    fig.colorbar(sm, cax=cax, orientation="horizontal", label="signed distance to manual (mm)")
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=80)
    finally:
        plt.close(fig)
    return Path(path)


def render_turntable(path, got: dict, name: str, frames: int = 12, size: int = 160) -> Path:
    """GIF: manual | prediction turning once around the superior axis in ``frames`` frames (looping),
    ``size`` pixels per panel side, with a title strip."""
    scene = _scene(got)
    images = []
    for i in range(frames):
        rot = camera(turntable_direction(360.0 * i / frames), (0.0, 0.0, 1.0))
        left, right = _pair(got, rot, scene, size)
        frame = Image.new("RGB", (2 * size, size + 16), "white")
        frame.paste(Image.fromarray(left), (0, 16))
        frame.paste(Image.fromarray(right), (size, 16))
        draw = ImageDraw.Draw(frame)
        draw.text((4, 2), f"{name}: manual", fill=(0, 0, 0))
        draw.text((size + 4, 2), "prediction", fill=(0, 0, 0))
        images.append(frame.quantize(colors=128, method=Image.Quantize.FASTOCTREE))
    with atomic_path(path) as tmp:
        images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], duration=250, loop=0)
    return Path(path)
