"""The one volume loader (issue 22): every 3-D format nibabel reads (NIfTI-1/2, .hdr/.img pairs, MGH/MGZ)
read alike, outputs written as NIfTI named after the input, and those names recognised where .nii is."""

from __future__ import annotations

import jax
import nibabel as nib
import numpy as np
import pytest

from cerebrum_jax.cli import main
from cerebrum_jax.data import datasets as data
from cerebrum_jax.data import nifti
from cerebrum_jax.errors import InputError
from cerebrum_jax.model import network as model
from cerebrum_jax.model.checkpoint import save_checkpoint

FORMATS = {  # file name -> nibabel class that writes it
    "a.nii.gz": nib.Nifti1Image,
    "b.nii": nib.Nifti2Image,
    "c.img": nib.Nifti1Pair,
    "d.hdr": nib.Nifti2Pair,
    "e.mgz": nib.MGHImage,
    "f.mgh": nib.MGHImage,
}
SHAPE = (9, 12, 10)


def affine():
    a = np.diag([0.7, 0.63, 0.9, 1.0])
    a[:3, :3] = a[:3, :3] @ np.array([[1, 0.1, 0], [0, 1, 0], [0, 0, 1]])
    a[:3, 3] = (-12.5, 30.0, 4.2)
    return a


def write(path, cls, seed=0):
    volume = np.random.default_rng(seed).normal(100, 20, SHAPE).astype(np.float32)
    nib.save(cls(volume, affine()), str(path))
    return volume


@pytest.mark.parametrize("name", FORMATS)
def test_every_format_reads_alike(tmp_path, name, capfd):
    volume = write(tmp_path / name, FORMATS[name])
    got, img = nifti.load_nifti(tmp_path / name)
    assert type(img) is nib.Nifti1Image  # one header type downstream
    assert np.array_equal(got, volume) and np.allclose(img.affine, affine(), atol=1e-5)
    assert np.allclose(img.header.get_zooms()[:3], np.linalg.norm(affine()[:3, :3], axis=0), atol=1e-5)
    assert capfd.readouterr().err == ""  # nibabel's header notes are not printed


def test_a_file_nibabel_reads_that_is_no_volume_is_named(tmp_path):
    path = tmp_path / "lh.white.gii"
    nib.save(nib.gifti.GiftiImage(), str(path))
    with pytest.raises(InputError, match="not a volume format read here .*GiftiImage"):
        nifti.load_nifti(path)


@pytest.mark.parametrize(
    "name, stem",
    [
        ("x.nii.gz", "x"),
        ("x.NII", "x"),
        ("brain.mgz", "brain"),
        ("p.img", "p"),
        ("q.hdr.gz", "q"),
        ("r.txt", None),
    ],
)
def test_volume_names(name, stem):
    assert nifti.is_volume_name(name) == (stem is not None)
    assert nifti.volume_stem(name) == (stem if stem is not None else name)


@pytest.mark.slow  # compiles a toy network
def test_segment_reads_every_format_and_writes_nifti_named_after_it(tmp_path):
    config = model.ModelConfig(n_filters=2, n_classes=3)
    ckpt = save_checkpoint(
        tmp_path / "ck", model.init_params(config, jax.random.key(0)), config, classes=["bg", "wm", "gm"]
    )
    for i, (name, cls) in enumerate(FORMATS.items()):
        write(tmp_path / name, cls, seed=i)
    out = tmp_path / "out"
    # volume names at the end of a greedy --weights are inputs, whatever their format
    argv = ["segment", "--out", str(out), "--no-probseg", "--weights", str(ckpt)]
    assert main([*argv, *(str(tmp_path / n) for n in FORMATS)]) == 0
    for name in FORMATS:
        written = out / f"{nifti.volume_stem(name)}_space-orig_desc-cerebrum_dseg.nii.gz"
        img = nib.load(written)
        assert type(img) is nib.Nifti1Image and img.shape == SHAPE, name
        assert np.allclose(img.affine, affine(), atol=1e-5), name


def test_a_bids_subject_image_in_any_format(tmp_path):
    anat = tmp_path / "anat"
    anat.mkdir()
    write(anat / "sub-01_T1w.img", nib.Nifti1Pair)  # .hdr + .img: one image
    (anat / "sub-01_T1w.json").write_text("{}")
    assert data._one(anat, "*_T1w.nii.gz", "T1w image").name == "sub-01_T1w.img"
    write(anat / "sub-01_T1w.mgz", nib.MGHImage)
    with pytest.raises(InputError, match=r"expected exactly one T1w image \(\*_T1w.nii.gz\), found 2"):
        data._one(anat, "*_T1w.nii.gz", "T1w image")


@pytest.mark.parametrize(
    "axcodes,want",
    [("RAS", 0), ("LPS", 0), ("ASR", 2), ("SLP", 1), ("PIL", 2)],
)
def test_lr_axis_is_the_voxel_axis_along_left_right(axcodes, want):
    """Each orientation's affine (nibabel's axcodes, 0.7 mm voxels, a 10 degree tilt): the voxel axis
    whose direction is left-right, whatever the order and signs of the axes."""
    world = {"R": (0, 1), "L": (0, -1), "A": (1, 1), "P": (1, -1), "S": (2, 1), "I": (2, -1)}
    affine = np.eye(4)
    affine[:3, :3] = 0.0
    for i, code in enumerate(axcodes):  # voxel axis i runs along world axis j, towards ``code``
        j, sign = world[code]
        affine[j, i] = 0.7 * sign
    tilt = np.eye(4)
    tilt[:3, :3] = nib.eulerangles.euler2mat(z=np.deg2rad(10))
    affine = tilt @ affine
    assert "".join(nib.aff2axcodes(affine)) == axcodes
    assert nib.aff2axcodes(affine)[want] in "LR"
    assert nifti.lr_axis(affine) == want
