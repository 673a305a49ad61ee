"""Slide-SAM's hybrid loss (paper §2.3, Eq. 2-4): ranked per-slice CE/focal + Dice, IoU MSE.

Shapes (B samples, K mask candidates, S slices, usually 3, H x W pixels):

- ``logits``: (B, K, S, H, W) float, the decoder's low-res mask logits (``Sam.decode``);
- ``target``: (B, S, H, W) binary (bool or 0/1), **at the logits' resolution** (the caller
  resizes the prepared ``(K, 3, size, size)`` masks, e.g. nearest to 4E x 4E);
- ``indicator``: (B, S) in {0, 1}, 1 where the slice carries a label (all ones for a 3D label,
  one-hot for a 2D label or a 2D pseudo-label);
- ``iou_pred``: (B, K) the decoder's IoU predictions.

Definition, for sample b, candidate j and slice s (I = indicator)::

    seg[b, j, s]  = lambda_ce * CE(logits[b, j, s], target[b, s])        (mean over H x W pixels)
                  + lambda_dice * Dice(sigmoid(logits[b, j, s]), target[b, s])
    seg[b, j]     = sum_s I[b, s] * seg[b, j, s] / sum_s I[b, s]       (mean over labelled slices)
    k_b           = argmin_j seg[b, j]                                  (the best candidate)
    iou_true[b,j] = |P ∩ G| / |P ∪ G| over the labelled slices, P = logits > 0 (detached;
                    1 when P ∪ G is empty there)
    iou[b]        = (iou_pred[b, k_b] - iou_true[b, k_b])^2 if all I[b, :] == 1, else 0
                    (``iou_candidates="all"``: the mean over j of the squared errors)
    total         = mean_b (seg[b, k_b] + iou_weight * iou[b])

- CE is binary cross-entropy with logits (``torch.nn.functional.binary_cross_entropy_with_logits``)
  or, with ``focal=True``, MONAI's sigmoid focal loss ``(1 - p_t)^gamma * CE``, times
  ``alpha_t = alpha`` on foreground and ``1 - alpha`` on background pixels when ``focal_alpha``
  is set (the alpha-balanced form of Lin et al.).
- Dice is ``monai.losses.DiceLoss(sigmoid=True)`` per slice:
  ``1 - (2 sum(p g) + 1e-5) / (sum p + sum g + 1e-5)``.
- Slices with indicator 0 contribute nothing, whatever is predicted there. The IoU term is 0
  for samples whose label is not 3D (indicator not all ones): their true IoU is unknown (§2.3).

Against the reference code (github.com/Curli-quan/Slide-SAM, ``core/loss.py``,
``ranked_combined_loss_with_indicators``): it trains with focal loss ``0.2 * (1 - p_t)^2 * CE``
(a uniform factor 0.2, not an alpha balance) weighted 20, i.e. ``focal=True, focal_alpha=None,
lambda_ce=4.0`` here; it zeroes the logits of unlabelled slices instead of leaving them out (a
constant is added to the loss and the mean runs over all three slices); it keeps the IoU term for
2D labels (the paper sets it to 0, as we do) and gives IoU 0 to an empty union (we give 1, as
``slidesam.evaluation.metrics`` does).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss, FocalLoss
from torch import nn

from slidesam.core.errors import InputError

__all__ = ["LossConfig", "LossOutput", "SlideSAMLoss", "mask_iou", "slidesam_loss"]


@dataclass(frozen=True)
class LossConfig:
    """Weights of the Slide-SAM loss (paper: lambda_ce 20, lambda_dice 1, plain CE).

    Attributes:
        lambda_ce: weight of the per-pixel term (CE, or focal when ``focal``); lambda_1.
        lambda_dice: weight of the soft Dice term; lambda_2.
        focal: use the sigmoid focal loss instead of plain binary cross-entropy.
        focal_gamma: focusing exponent gamma of the focal loss.
        focal_alpha: alpha of the alpha-balanced focal loss (foreground weight, background
            gets ``1 - alpha``), in [0, 1]; None = no balancing.
        iou_weight: weight of the IoU-prediction MSE term.
        iou_candidates: which candidates' IoU predictions are trained: ``best`` (the paper's
            text: only the best candidate's) or ``all`` (SAM's: every candidate against its own
            true IoU). With ``best``, a candidate that never wins on positives is never told it
            is wrong there; once negative samples (empty targets) exist, one candidate learns
            to answer "empty" with IoU 1 and wins every selection by predicted IoU, so a model
            trained with negatives needs ``all``.
    """

    lambda_ce: float = 20.0
    lambda_dice: float = 1.0
    focal: bool = False
    focal_gamma: float = 2.0
    focal_alpha: float | None = None
    iou_weight: float = 1.0
    iou_candidates: str = "best"

    def __post_init__(self) -> None:
        if self.iou_candidates not in ("best", "all"):
            raise InputError(
                f"LossConfig.iou_candidates must be 'best' or 'all', got {self.iou_candidates!r}"
            )
        for name in ("lambda_ce", "lambda_dice", "focal_gamma", "iou_weight"):
            value = getattr(self, name)
            if not value >= 0:
                raise InputError(f"LossConfig.{name} must be >= 0, got {value!r}")
        if self.focal_alpha is not None and not 0 <= self.focal_alpha <= 1:
            raise InputError(
                f"LossConfig.focal_alpha must be in [0, 1] or None, got {self.focal_alpha!r}"
            )


@dataclass(frozen=True)
class LossOutput:
    """What ``slidesam_loss`` computed.

    Attributes:
        total: scalar, the loss to back-propagate.
        seg: (B,) segmentation loss of each sample's best candidate.
        iou: (B,) IoU-prediction squared error of the best candidate, or the mean over all
            candidates (``iou_candidates="all"``); 0 for 2D-labelled samples; before
            ``iou_weight``.
        best: (B,) int64 index of the best candidate (lowest segmentation loss).
        per_candidate: (B, K) segmentation loss of every candidate (the ranking criterion).
        true_iou: (B, K) detached IoU of every binarised candidate over the labelled slices.
    """

    total: torch.Tensor
    seg: torch.Tensor
    iou: torch.Tensor
    best: torch.Tensor
    per_candidate: torch.Tensor
    true_iou: torch.Tensor


def slidesam_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    indicator: torch.Tensor,
    iou_pred: torch.Tensor,
    config: LossConfig | None = None,
) -> LossOutput:
    """The Slide-SAM loss of a batch (definition in the module docstring).

    Args:
        logits: (B, K, S, H, W) float mask logits.
        target: (B, S, H, W) bool or 0/1 ground truth at the logits' resolution.
        indicator: (B, S) 0/1 (or bool), which slices are labelled; at least one per sample.
        iou_pred: (B, K) predicted IoU of each candidate.
        config: loss weights; ``LossConfig()`` (the paper's) when None.

    Returns:
        ``LossOutput``; only ``total`` carries gradients to back-propagate (``seg``, ``iou`` and
        ``per_candidate`` are differentiable too, ``best`` and ``true_iou`` are not).
    """
    config = config or LossConfig()
    _check_inputs(logits, target, indicator, iou_pred)
    b, k, s, h, w = logits.shape
    target = target.to(logits.dtype)
    labelled = indicator.bool()  # (B, S)

    flat_logits = logits.reshape(b * k * s, 1, h, w)
    flat_target = target[:, None].expand(b, k, s, h, w).reshape(b * k * s, 1, h, w)
    per_slice = config.lambda_ce * _pixel_loss(flat_logits, flat_target, config)
    dice = DiceLoss(sigmoid=True, reduction="none")(flat_logits, flat_target).reshape(-1)
    per_slice = (per_slice + config.lambda_dice * dice).reshape(b, k, s)

    keep = labelled[:, None, :].expand(b, k, s)
    per_slice = torch.where(keep, per_slice, torch.zeros_like(per_slice))
    per_candidate = per_slice.sum(dim=2) / labelled.sum(dim=1, keepdim=True).to(per_slice.dtype)

    best = per_candidate.detach().argmin(dim=1)
    seg = per_candidate.gather(1, best[:, None]).squeeze(1)

    true_iou = mask_iou(logits.detach() > 0, target > 0.5, labelled).to(iou_pred.dtype)
    sq_err = (iou_pred - true_iou).pow(2)
    if config.iou_candidates == "all":
        sq_err = sq_err.mean(dim=1)
    else:
        sq_err = sq_err.gather(1, best[:, None]).squeeze(1)
    is_3d = labelled.all(dim=1)
    iou = torch.where(is_3d, sq_err, torch.zeros_like(sq_err))

    total = (seg + config.iou_weight * iou.to(seg.dtype)).mean()
    return LossOutput(
        total=total, seg=seg, iou=iou, best=best, per_candidate=per_candidate, true_iou=true_iou
    )


class SlideSAMLoss(nn.Module):
    """``slidesam_loss`` as a module returning the scalar total (for ``loss = crit(...)`` loops)."""

    def __init__(self, *, config: LossConfig | None = None):
        super().__init__()
        self.config = config or LossConfig()

    def forward(
        self,
        logits: torch.Tensor,
        target: torch.Tensor,
        indicator: torch.Tensor,
        iou_pred: torch.Tensor,
    ) -> torch.Tensor:
        return slidesam_loss(logits, target, indicator, iou_pred, self.config).total


def mask_iou(pred: torch.Tensor, target: torch.Tensor, labelled: torch.Tensor) -> torch.Tensor:
    """IoU of each candidate over the labelled slices.

    Args:
        pred: (B, K, S, H, W) bool binarised predictions.
        target: (B, S, H, W) bool ground truth.
        labelled: (B, S) bool, slices counted.

    Returns:
        (B, K) float32 ``|P ∩ G| / |P ∪ G|`` over the labelled slices; 1 where the union is empty.
    """
    region = labelled[:, None, :, None, None]
    tgt = target[:, None]
    inter = (pred & tgt & region).sum(dim=(2, 3, 4))
    union = ((pred | tgt) & region).sum(dim=(2, 3, 4))
    return torch.where(
        union > 0, inter / union.clamp(min=1), torch.ones_like(inter, dtype=torch.float32)
    )


def _pixel_loss(logits: torch.Tensor, target: torch.Tensor, config: LossConfig) -> torch.Tensor:
    """(N, 1, H, W) -> (N,) CE or focal loss averaged over the pixels of each slice."""
    if config.focal:
        focal = FocalLoss(
            gamma=config.focal_gamma, alpha=config.focal_alpha, reduction="none", use_softmax=False
        )
        per_pixel = focal(logits, target).to(logits.dtype)
    else:
        per_pixel = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return per_pixel.mean(dim=(1, 2, 3))


def _check_inputs(
    logits: torch.Tensor, target: torch.Tensor, indicator: torch.Tensor, iou_pred: torch.Tensor
) -> None:
    for name, value in (
        ("logits", logits),
        ("target", target),
        ("indicator", indicator),
        ("iou_pred", iou_pred),
    ):
        if not isinstance(value, torch.Tensor):
            raise InputError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if logits.ndim != 5 or not logits.is_floating_point():
        raise InputError(
            f"logits must be a float tensor (B, K, S, H, W), got {tuple(logits.shape)} "
            f"{logits.dtype}"
        )
    b, k, s, h, w = logits.shape
    if tuple(target.shape) != (b, s, h, w):
        raise InputError(
            f"target must be (B, S, H, W) = {(b, s, h, w)} to match logits {tuple(logits.shape)}, "
            f"got {tuple(target.shape)}; resize the masks to the logits' resolution first"
        )
    if tuple(indicator.shape) != (b, s):
        raise InputError(f"indicator must be (B, S) = {(b, s)}, got {tuple(indicator.shape)}")
    if tuple(iou_pred.shape) != (b, k):
        raise InputError(f"iou_pred must be (B, K) = {(b, k)}, got {tuple(iou_pred.shape)}")
    if target.dtype != torch.bool and bool(((target != 0) & (target != 1)).any()):
        raise InputError("target must be binary (bool or 0/1); threshold soft masks first")
    if indicator.dtype != torch.bool and bool(((indicator != 0) & (indicator != 1)).any()):
        raise InputError("indicator must hold 0/1 values (1 = slice labelled)")
    unlabelled = (~indicator.bool().any(dim=1)).nonzero().flatten().tolist()
    if unlabelled:
        raise InputError(
            f"sample(s) {unlabelled} have no labelled slice (indicator all 0); every sample needs "
            "at least one"
        )
