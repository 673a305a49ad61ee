"""A stub window predictor whose behaviour is known exactly, for propagation and CLI tests."""

from __future__ import annotations

import numpy as np

from slidesam.inference.predictor import WindowPrediction


class ThresholdPredictor:
    """Same interface as SlideSAMPredictor. Each window slice's mask = (image > 0.5) inside the
    prompt box grown by ``grow`` px; logits are +gain inside, -gain outside, where gain can
    depend on the window centre (to check fusion). IoU prediction: ``iou`` (or a function)."""

    def __init__(self, iou=0.9, gain=lambda c: 5.0, grow=6):
        self.iou, self.gain, self.grow = iou, gain, grow
        self.encoder_passes = 0
        self.calls: list[tuple[int, list]] = []

    def set_volume(self, volume, *, axis=0):
        self.stack = np.moveaxis(volume.array, axis, 0)
        self.seen: set[int] = set()

    def predict(
        self,
        window_center,
        *,
        boxes=None,
        points=None,
        point_labels=None,
        mask_prompt=None,
        multimask=True,
    ):
        if window_center not in self.seen:
            self.seen.add(window_center)
            self.encoder_passes += 1
        self.calls.append((window_center, None if boxes is None else list(boxes[0])))
        n = self.stack.shape[0]
        idx = [min(max(i, 0), n - 1) for i in (window_center - 1, window_center, window_center + 1)]
        region = np.zeros(self.stack.shape[1:], bool)
        if boxes is not None:
            # pixels whose centre lies in the box grown by ``grow`` (flip-equivariant rounding)
            x0, y0, x1, y1 = boxes[0]
            g, eps = self.grow, 1e-6
            r0, r1 = int(np.ceil(y0 - g - eps)), int(np.floor(y1 + g + eps))
            c0, c1 = int(np.ceil(x0 - g - eps)), int(np.floor(x1 + g + eps))
            region[max(0, r0) : r1 + 1, max(0, c0) : c1 + 1] = True
        else:
            region[:] = True
        gain = self.gain(window_center)
        logits = np.stack([np.where((self.stack[i] > 0.5) & region, gain, -gain) for i in idx])
        k = 3 if multimask else 1
        logits = np.repeat(logits[None, None], k, axis=1).astype(np.float32)
        iou = self.iou(window_center, boxes) if callable(self.iou) else self.iou
        return WindowPrediction(
            center=window_center,
            slices=tuple(idx),
            masks=logits > 0,
            logits=logits,
            low_res_logits=logits,
            iou=np.full((1, k), iou, np.float32),
            stability=np.ones((1, k, 3), np.float32),
        )
