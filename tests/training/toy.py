"""A toy labelled dataset in nnU-Net layout, shared by the training tests."""

from __future__ import annotations

import json

import numpy as np

from slidesam.core import Geometry, Volume
from slidesam.data.io import write_image, write_mask

SHAPE = (6, 40, 50)  # z has the fewest voxels: axial windows, centres 1..4


def toy_dataset(root, name="Dataset900_Toy", n_cases=2):
    """Kidney (1) on slices 1..4, tumor (2) of 6 x 6 px on slices 2..3.

    Windows per case: centre 1 {kidney}, 2 {kidney, tumor}, 3 {kidney, tumor}, 4 {kidney}
    -> 6 samples per case once prepared.
    """
    ds = root / name
    g = Geometry(shape=SHAPE, spacing=(3.0, 1.5, 1.5), origin=(0, 0, 0), direction=np.eye(3))
    for i in range(n_cases):
        image = np.full(SHAPE, -1000, np.int16)
        image[:, 5:35, 5:45] = 100 + 10 * i
        image[:, 25:31, 30:36] = 300
        labels = np.zeros(SHAPE, np.uint8)
        labels[1:5, 10:16, 20:25] = 1
        labels[2:4, 25:31, 30:36] = 2
        write_image(Volume(image, g), ds / "imagesTr" / f"case_{i:03d}_0000.nii.gz")
        write_mask(labels, g, ds / "labelsTr" / f"case_{i:03d}.nii.gz")
    (ds / "dataset.json").write_text(
        json.dumps({"labels": {"background": 0, "kidney": 1, "tumor": 2}, "file_ending": ".nii.gz"})
    )
    return ds
