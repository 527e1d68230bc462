"""Static views of the surfaces (nilearn's plot_surf, relit): each view shows the side it names, the
prediction's colours sit where its distances are, the turntable turns."""

import numpy as np
import pytest
from PIL import Image

from cerebrum_jax.evaluation import surfaces
from cerebrum_jax.report import surface_views


@pytest.fixture(scope="module")
def shifted():
    """A ball (radius 9 mm) and its copy moved 2 mm to the right (+x): the prediction lies outside the
    manual surface on the right (red) and inside it on the left (blue)."""
    g = np.indices((32, 32, 32)).astype(float)
    ref = (np.sqrt(((g - 15.5) ** 2).sum(0)) < 9).astype(np.uint8)
    return surfaces.compare_class(ref, np.roll(ref, 2, axis=0), 1, np.eye(4))


def _sides(rgb: np.ndarray) -> dict:
    """{"red": (pixels, mean column), "blue": ...} of a panel: its clearly red and clearly blue pixels."""
    rgb = rgb.astype(int)
    diff = rgb[..., 0] - rgb[..., 2]
    out = {}
    for name, mask in (("red", diff > 60), ("blue", diff < -60)):
        cols = np.nonzero(mask)[1]
        out[name] = (len(cols), cols.mean() if len(cols) else np.nan)
    return out


def test_each_view_shows_its_side_with_the_distance_colours(shifted, tmp_path):
    path = surface_views.render_views(tmp_path / "v.png", shifted, "ball", size=160)
    rgb = np.asarray(Image.open(path).convert("RGB"))
    h, w, _ = rgb.shape
    top, bottom = int(0.06 * h), int(0.9 * h)  # the three rows of panels, between title and colour bar
    rows = np.array_split(np.arange(top, bottom), 3)
    manual, pred = (
        [_sides(rgb[r[0] : r[-1], cols]) for r in rows] for cols in (slice(0, w // 2), slice(w // 2, w))
    )
    assert all(m["red"][0] == m["blue"][0] == 0 for m in manual)  # the manual surface in its one colour
    left, front, above = pred
    assert left["blue"][0] > 20 * max(left["red"][0], 1)  # from the left: the side where it is too thin
    assert front["red"][1] < front["blue"][1]  # from the front, the subject's right is on the screen's left
    assert above["red"][1] > above["blue"][1]  # from above (anterior up), the right is on the right
    assert min(front["red"][0], front["blue"][0], above["red"][0], above["blue"][0]) > 200


def test_headlight_lights_what_faces_the_camera():
    g = np.indices((20, 20, 20)).astype(float)
    ball = (np.sqrt(((g - 9.5) ** 2).sum(0)) < 7).astype(np.uint8)
    verts, faces = surfaces.compare_class(ball, ball, 1, np.eye(4))["view"]["ref"]
    normals = surface_views.vertex_normals(verts, faces)
    radial = (verts - verts.mean(0)) / np.linalg.norm(verts - verts.mean(0), axis=1, keepdims=True)
    assert np.einsum("ij,ij->i", normals, radial).min() > 0.8  # outward, whatever the winding
    np.testing.assert_allclose(surface_views.vertex_normals(verts, faces[:, ::-1]), normals, atol=1e-6)
    for elev, azim in [(0, 180), (0, 90), (90, -90), (15, 45)]:
        d = surface_views.camera_direction(elev, azim)
        lit = surface_views.headlight(normals, faces, d)
        facing = (verts[faces].mean(1) - verts.mean(0)) @ d
        assert lit.min() >= surface_views.AMBIENT - 1e-9 and lit.max() <= 1 + 1e-9
        assert lit[facing > 0].mean() > lit[facing < 0].mean() + 0.25  # 0.35 for an exact sphere


@pytest.mark.parametrize(
    ("elev", "azim", "toward"), [(0, 180, (-1, 0, 0)), (0, 90, (0, 1, 0)), (90, -90, (0, 0, 1))]
)
def test_named_views_look_from_their_side(elev, azim, toward):
    np.testing.assert_allclose(surface_views.camera_direction(elev, azim), toward, atol=1e-12)
    assert (elev, azim) in surface_views.VIEWS.values()


def test_turntable_turns_around_the_superior_axis(shifted, tmp_path):
    path = surface_views.render_turntable(tmp_path / "t.gif", shifted, "ball", frames=4, size=96)
    gif = Image.open(path)
    assert gif.format == "GIF" and gif.n_frames == 4 and gif.info.get("loop") == 0
    frames = []
    for k in range(4):
        gif.seek(k)
        frames.append(np.asarray(gif.convert("RGB")))
    w = frames[0].shape[1]
    start, quarter = (_sides(f[:, w // 2 :]) for f in (frames[0], frames[1]))
    assert start["blue"][0] > 5 * max(start["red"][0], 1)  # frame 0: from the left
    assert quarter["red"][1] > quarter["blue"][1]  # a quarter turn on: from behind, the right on the right
