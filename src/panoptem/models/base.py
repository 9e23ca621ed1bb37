"""The call interface shared by all panoptem architectures.

Every model is called as ``model(x, render_steps=2, interpolate_ins=True)`` like the
released empanada TorchScript files, and returns a ``Dict[str, Tensor]``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["PanopticBase"]


def _upsample(x: torch.Tensor, factor: float) -> torch.Tensor:
    return F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=True)


class PanopticBase(nn.Module):
    """Encoder-decoder with semantic, centre and offset heads and optional PointRend.

    Subclasses build ``encoder``, their decoders, ``semantic_head``, ``ins_center``,
    ``ins_xy`` and (PointRend variants) ``semantic_pr``, and implement
    ``_decode(x) -> (semantic_x, instance_x)`` returning 1/4-resolution features.

    Calling the model
    -----------------
    ``forward(x, render_steps=2, interpolate_ins=True)`` with ``x`` of shape (N, 1, H, W),
    H and W multiples of the architecture's padding factor (16 for Panoptic-DeepLab with
    ``stage4_stride`` 16, 32 with 32, 128 for BiFPN).

    Eval mode returns

    * ``sem_logits`` (N, C, H * 2**(render_steps - 2), W * 2**(render_steps - 2)): the
      1/4-resolution semantic logits upsampled ``render_steps`` times x2 - by PointRend
      (PR variants) or, without PointRend, by bilinear interpolation (align_corners=True).
      C = 1 (binary, sigmoid) or number of classes + 1 (softmax, background channel 0).
    * ``ctr_hmp`` (N, 1, H/4, W/4), or (N, 1, H, W) when ``interpolate_ins`` (bilinear x4,
      align_corners=True): raw centre heat-map.
    * ``offsets`` (N, 2, ...), same resolution rule; channel 0 = dy, 1 = dx, in input pixels.

    Train mode ignores the two extra arguments and returns ``sem_logits``, ``ctr_hmp`` and
    ``offsets`` upsampled x4 (bilinear, align_corners=True); PointRend variants add
    ``sem_points`` (N, C, P) and ``point_coords`` (N, P, 2, (x, y) in [0, 1]).
    """

    def _init_heads_placeholder(self) -> None:
        # PointRend variants replace this with a PointRendSemSegHead (registered last, as
        # in the original, so state-dict order matches too)
        self.semantic_pr = None

    def _decode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def forward(
        self, x: torch.Tensor, render_steps: int = 2, interpolate_ins: bool = True
    ) -> dict[str, torch.Tensor]:
        semantic_x, instance_x = self._decode(x)
        sem = self.semantic_head(semantic_x)
        ctr_hmp = self.ins_center(instance_x)
        offsets = self.ins_xy(instance_x)

        out: dict[str, torch.Tensor] = {}
        if self.training:
            if self.semantic_pr is not None:
                points, coords = self.semantic_pr.sample_train_points(sem, semantic_x)
                out["sem_points"] = points
                out["point_coords"] = coords
            out["sem_logits"] = _upsample(sem, 4.0)
            out["ctr_hmp"] = _upsample(ctr_hmp, 4.0)
            out["offsets"] = _upsample(offsets, 4.0)
            return out

        if render_steps < 0:
            raise ValueError("render_steps must be >= 0")
        if self.semantic_pr is not None:
            out["sem_logits"] = self.semantic_pr.render(sem, semantic_x, render_steps)
        elif render_steps > 0:
            out["sem_logits"] = _upsample(sem, float(2**render_steps))
        else:
            out["sem_logits"] = sem
        if interpolate_ins:
            ctr_hmp = _upsample(ctr_hmp, 4.0)
            offsets = _upsample(offsets, 4.0)
        out["ctr_hmp"] = ctr_hmp
        out["offsets"] = offsets
        return out
