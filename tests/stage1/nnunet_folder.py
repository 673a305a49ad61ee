"""A small but real nnU-Net v2 model folder, built in seconds on a CPU.

Training nnU-Net itself takes ~18 min per epoch on this CPU even for a toy dataset, so this
helper writes the folder ``nnUNetv2_train`` would write, in nnU-Net's exact format, with weights
from a quick fit of our own:

    <root>/Dataset990_ToyKidney/nnUNetTrainer__nnUNetPlans__3d_fullres/
        dataset.json                 labels background/kidney/tumor/cyst, channel_names {"0": "CT"}
        plans.json                   3d_fullres: a tiny PlainConvUNet, patch (16, 32, 32)
        fold_0/checkpoint_final.pth  the keys nnUNetTrainer.save_checkpoint writes

The toy "CT" (HU) is soft tissue (40) holding a kidney (150, label 1) with a bright tumour (300,
label 2) and a dark cyst (0, label 3), defined in millimetres so that any grid samples the same
anatomy. The training images are preprocessed by nnU-Net's own ``DefaultPreprocessor`` (CT
normalisation with the plans' intensity statistics, resampling to the plans' spacing), and the
network is the one ``get_network_from_plans`` builds from the plans, so the fit and nnU-Net's
inference see the same inputs.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import torch

DATASET = "Dataset990_ToyKidney"
TRAINING_FOLDER = "nnUNetTrainer__nnUNetPlans__3d_fullres"
LABELS = {"background": 0, "kidney": 1, "tumor": 2, "cyst": 3}
#: training grid (z, y, x) and spacing = the plans' target spacing
TRAIN_SHAPE = (24, 48, 48)
TARGET_SPACING = (2.0, 1.5, 1.5)
PATCH_SIZE = (16, 32, 32)

_HU = {"tissue": 40.0, "kidney": 150.0, "tumor": 300.0, "cyst": 0.0}


def toy_case(
    shape: tuple[int, int, int], spacing: tuple[float, float, float], *, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """One toy case sampled on a grid: ``(image int16 HU, labels uint8)``, both ``(z, y, x)``.

    The anatomy is placed in millimetres from the grid centre (array index space), with a
    seeded random offset, so different grids of about the same field of view hold the same
    structures.
    """
    rng = np.random.default_rng(seed)
    centre = (np.asarray(shape) - 1) / 2.0
    zz, yy, xx = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij")
    pos = np.stack([zz, yy, xx], axis=-1)
    mm = (pos - centre) * np.asarray(spacing)  # (z, y, x) mm from the centre

    kidney_c = rng.uniform(-4, 4, size=3)
    kidney_r = np.array([15.0, 20.0, 14.0]) * rng.uniform(0.9, 1.1, size=3)
    inside_kidney = np.sum(((mm - kidney_c) / kidney_r) ** 2, axis=-1) <= 1.0

    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction)
    tumor_c = kidney_c + direction * kidney_r * 0.55
    tumor_r = rng.uniform(7.0, 9.0)
    inside_tumor = np.linalg.norm(mm - tumor_c, axis=-1) <= tumor_r
    cyst_c = kidney_c - direction * kidney_r * 0.5
    inside_cyst = (np.linalg.norm(mm - cyst_c, axis=-1) <= 5.0) & inside_kidney & ~inside_tumor

    labels = np.zeros(shape, dtype=np.uint8)
    labels[inside_kidney] = LABELS["kidney"]
    labels[inside_cyst] = LABELS["cyst"]
    labels[inside_tumor] = LABELS["tumor"]

    image = np.full(shape, _HU["tissue"])
    image[labels == 1] = _HU["kidney"]
    image[labels == 2] = _HU["tumor"]
    image[labels == 3] = _HU["cyst"]
    image += rng.normal(0.0, 10.0, size=shape)
    return np.round(image).astype(np.int16), labels


def dataset_json() -> dict:
    return {
        "channel_names": {"0": "CT"},
        "labels": dict(LABELS),
        "numTraining": 3,
        "file_ending": ".nii.gz",
        "name": "ToyKidney",
    }


def _intensity_properties(cases) -> dict:
    fg = np.concatenate([img[lab > 0].astype(np.float64) for img, lab in cases])
    p005, median, p995 = np.percentile(fg, [0.5, 50.0, 99.5])
    return {
        "0": {
            "max": float(fg.max()),
            "mean": float(fg.mean()),
            "median": float(median),
            "min": float(fg.min()),
            "percentile_00_5": float(p005),
            "percentile_99_5": float(p995),
            "std": float(fg.std()),
        }
    }


def plans_json(intensity_properties: dict, *, image_reader_writer: str = "SimpleITKIO") -> dict:
    """Plans in the format of nnU-Net 2.8's ExperimentPlanner, with one tiny 3d_fullres."""
    n_stages = 3
    return {
        "dataset_name": DATASET,
        "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": list(TARGET_SPACING),
        "original_median_shape_after_transp": list(TRAIN_SHAPE),
        "image_reader_writer": image_reader_writer,
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "configurations": {
            "3d_fullres": {
                "data_identifier": "nnUNetPlans_3d_fullres",
                "preprocessor_name": "DefaultPreprocessor",
                "batch_size": 2,
                "patch_size": list(PATCH_SIZE),
                "median_image_size_in_voxels": list(TRAIN_SHAPE),
                "spacing": list(TARGET_SPACING),
                "normalization_schemes": ["CTNormalization"],
                "use_mask_for_norm": [False],
                "resampling_fn_data": "resample_data_or_seg_to_shape",
                "resampling_fn_seg": "resample_data_or_seg_to_shape",
                "resampling_fn_data_kwargs": {
                    "is_seg": False,
                    "order": 3,
                    "order_z": 0,
                    "force_separate_z": None,
                },
                "resampling_fn_seg_kwargs": {
                    "is_seg": True,
                    "order": 1,
                    "order_z": 0,
                    "force_separate_z": None,
                },
                "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
                "resampling_fn_probabilities_kwargs": {
                    "is_seg": False,
                    "order": 1,
                    "order_z": 0,
                    "force_separate_z": None,
                },
                "architecture": {
                    "network_class_name": (
                        "dynamic_network_architectures.architectures.unet.PlainConvUNet"
                    ),
                    "arch_kwargs": {
                        "n_stages": n_stages,
                        "features_per_stage": [8, 16, 32],
                        "conv_op": "torch.nn.modules.conv.Conv3d",
                        "kernel_sizes": [[3, 3, 3]] * n_stages,
                        "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]],
                        "n_conv_per_stage": [2] * n_stages,
                        "n_conv_per_stage_decoder": [2] * (n_stages - 1),
                        "conv_bias": True,
                        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                        "norm_op_kwargs": {"eps": 1e-05, "affine": True},
                        "dropout_op": None,
                        "dropout_op_kwargs": None,
                        "nonlin": "torch.nn.LeakyReLU",
                        "nonlin_kwargs": {"inplace": True},
                    },
                    "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
                },
                "batch_dice": False,
            }
        },
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": intensity_properties,
    }


def _build_network(plans: dict, ds: dict):
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pm = PlansManager(plans)
    cm = pm.get_configuration("3d_fullres")
    n_out = pm.get_label_manager(ds).num_segmentation_heads
    return get_network_from_plans(
        cm.network_arch_class_name,
        cm.network_arch_init_kwargs,
        cm.network_arch_init_kwargs_req_import,
        len(ds["channel_names"]),
        n_out,
        allow_init=True,
        deep_supervision=False,
    )


def _preprocess(cases, plans: dict, ds: dict) -> list[tuple[np.ndarray, np.ndarray]]:
    """nnU-Net's own preprocessing of the training cases: (1, z, y, x) float32, (z, y, x) int."""
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pm = PlansManager(plans)
    cm = pm.get_configuration("3d_fullres")
    out = []
    for image, labels in cases:
        data, seg, _ = DefaultPreprocessor(verbose=False).run_case_npy(
            image[None].astype(np.float32),
            labels[None].astype(np.int16),
            {"spacing": list(TARGET_SPACING)},
            pm,
            cm,
            ds,
        )
        out.append((data.astype(np.float32), np.clip(seg[0], 0, None).astype(np.int64)))
    return out


def _fit(network, data, *, steps: int, seed: int) -> list[float]:
    """A few dozen Adam steps on random patches (weighted CE + soft Dice), with random flips.

    Like nnU-Net, half of the patches are centred on foreground (here: on the tumour, the
    smallest class), so that every class is seen in every batch.
    """
    gen = np.random.default_rng(seed)
    torch.manual_seed(seed)
    opt = torch.optim.Adam(network.parameters(), lr=1e-2)
    n_classes = len(LABELS)
    weight = torch.tensor([1.0, 2.0, 4.0, 4.0])
    losses = []
    network.train()
    for _ in range(steps):
        xs, ys = [], []
        for b in range(2):
            img, lab = data[gen.integers(len(data))]
            if b == 0:
                zyx = np.argwhere(lab == LABELS["tumor"])
                centre = zyx[gen.integers(len(zyx))]
                starts = [
                    int(np.clip(c - p // 2 + gen.integers(-p // 4, p // 4 + 1), 0, s - p))
                    for c, s, p in zip(centre, lab.shape, PATCH_SIZE, strict=True)
                ]
            else:
                starts = [
                    int(gen.integers(0, s - p + 1))
                    for s, p in zip(lab.shape, PATCH_SIZE, strict=True)
                ]
            sl = tuple(slice(a, a + p) for a, p in zip(starts, PATCH_SIZE, strict=True))
            x, y = img[(slice(None), *sl)], lab[sl]
            for ax in range(3):
                if gen.random() < 0.5:
                    x, y = np.flip(x, ax + 1), np.flip(y, ax)
            xs.append(np.ascontiguousarray(x))
            ys.append(np.ascontiguousarray(y))
        x = torch.from_numpy(np.stack(xs))
        y = torch.from_numpy(np.stack(ys))
        logits = network(x)
        ce = torch.nn.functional.cross_entropy(logits, y, weight=weight)
        prob = logits.softmax(1)
        onehot = torch.nn.functional.one_hot(y, n_classes).permute(0, 4, 1, 2, 3).float()
        inter = (prob * onehot).sum((0, 2, 3, 4))
        denom = prob.sum((0, 2, 3, 4)) + onehot.sum((0, 2, 3, 4))
        dice = (2 * inter + 1e-3) / (denom + 1e-3)
        loss = ce + (1 - dice[1:]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    network.eval()
    return losses


def build_model_folder(
    root: str | Path,
    *,
    seed: int = 0,
    steps: int = 60,
    mirror_axes: tuple[int, ...] | None = (0, 1, 2),
) -> Path:
    """Write the toy model folder under ``root`` and return the training output folder."""
    root = Path(root)
    cases = [toy_case(TRAIN_SHAPE, TARGET_SPACING, seed=seed + i) for i in range(3)]
    ds = dataset_json()
    plans = plans_json(_intensity_properties(cases))
    network = _build_network(plans, ds)
    losses = _fit(network, _preprocess(cases, plans, ds), steps=steps, seed=seed)

    folder = root / DATASET / TRAINING_FOLDER
    (folder / "fold_0").mkdir(parents=True, exist_ok=True)
    (folder / "dataset.json").write_text(json.dumps(ds, indent=4))
    (folder / "plans.json").write_text(json.dumps(plans, indent=4))
    ema = np.float64(0.9)
    checkpoint = {  # the keys of nnUNetTrainer.save_checkpoint, numpy scalars included
        "network_weights": network.state_dict(),
        "optimizer_state": {},
        "grad_scaler_state": None,
        "logging": {
            "mean_fg_dice": [np.float64(0.9)],
            "ema_fg_dice": [ema],
            "dice_per_class_or_region": [[np.float64(0.9)] * 3],
            "train_losses": [losses[-1]],
            "val_losses": [losses[-1]],
            "lrs": [3e-3],
            "epoch_start_timestamps": [0.0],
            "epoch_end_timestamps": [1.0],
        },
        "_best_ema": ema,
        "current_epoch": 1,
        "init_args": {
            "plans": copy.deepcopy(plans),
            "configuration": "3d_fullres",
            "fold": 0,
            "dataset_json": copy.deepcopy(ds),
            "device": torch.device("cpu"),
        },
        "trainer_name": "nnUNetTrainer",
        "inference_allowed_mirroring_axes": mirror_axes,
    }
    torch.save(checkpoint, folder / "fold_0" / "checkpoint_final.pth")
    return folder


def set_image_reader_writer(folder: Path, reader: str) -> None:
    """Switch the reader named in a model folder's plans.json (same weights)."""
    plans = json.loads((folder / "plans.json").read_text())
    plans["image_reader_writer"] = reader
    (folder / "plans.json").write_text(json.dumps(plans, indent=4))
