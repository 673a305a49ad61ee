from __future__ import annotations

import json

import numpy as np

from slidesam.core import Geometry, Volume
from slidesam.data.io import read_image, read_label, write_image
from slidesam.data.prompts import read_prompts
from slidesam.inference.propagation import PropagationConfig
from slidesam.inference.segment import segment_volume, write_result
from tests.inference.stub import ThresholdPredictor


def flipped_copy(vol: Volume) -> Volume:
    """The same physical image stored with its y and x axes reversed (another direction)."""
    g = vol.geometry
    d = g.direction.copy()
    d[:, 1:] *= -1
    origin = g.index_to_world([0, g.shape[1] - 1, g.shape[2] - 1])
    return Volume(
        vol.array[:, ::-1, ::-1].copy(),
        Geometry(shape=g.shape, spacing=g.spacing, origin=origin, direction=d),
    )


def test_flipped_copy_gives_the_mask_on_the_same_physical_voxels(real_fixtures, tmp_path):
    ct = read_image(real_fixtures / "abdomen_ct_3mm.nii.gz")
    labels = read_label(real_fixtures / "abdomen_ct_3mm_totalseg_labels.nii.gz", reference=ct)
    kidney = labels.array == 2  # right kidney
    z = int(np.argmax(kidney.sum(axis=(1, 2))))
    ys, xs = np.nonzero(kidney[z])
    corners = ct.geometry.index_to_world([[z, ys.min(), xs.min()], [z, ys.max(), xs.max()]])
    (tmp_path / "p.json").write_text(json.dumps({"prompts": [{"box_mm": corners.tolist()}]}))
    flipped = flipped_copy(ct)
    write_image(flipped, tmp_path / "flipped.nii.gz")
    flipped = read_image(tmp_path / "flipped.nii.gz")
    masks = {}
    for name, vol in (("orig", ct), ("flip", flipped)):
        prompts = read_prompts(tmp_path / "p.json", vol.geometry)
        # the stub thresholds the image (> 0.5 HU) inside the box: flip-equivariant by design
        result = segment_volume(vol, prompts, ThresholdPredictor(grow=0), PropagationConfig(step=3))
        write_result(result, vol, tmp_path / f"{name}.nii.gz", info={})
        masks[name] = read_label(tmp_path / f"{name}.nii.gz", reference=vol)
    a, b = masks["orig"], masks["flip"]
    assert a.array.sum() > 100
    assert a.array.sum() == b.array.sum()
    idx_a = np.argwhere(a.array > 0)
    world = a.geometry.index_to_world(idx_a)
    idx_b = np.rint(b.geometry.world_to_index(world)).astype(int)
    assert b.array[tuple(idx_b.T)].all()  # every voxel of A is a voxel of B, same place
    np.testing.assert_array_equal(b.array, a.array[:, ::-1, ::-1])
