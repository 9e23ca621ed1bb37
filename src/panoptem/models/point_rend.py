"""PointRend refinement of coarse semantic logits (Kirillov et al., 2020).

Training: logits are sampled at uncertain random points and a small MLP predicts refined
logits there (the loss compares them with the labels at those points). Inference: the coarse
logits are upsampled x2 per step and the most uncertain grid cells are re-predicted by the
same MLP from the *coarse* logits and the decoder features sampled at the cell centres.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from panoptem.models.blocks import fuse_sequential

__all__ = [
    "calculate_uncertainty",
    "point_sample",
    "uncertain_points_with_randomness",
    "uncertain_points_on_grid",
    "bilinear_taps",
    "sample_rows",
    "StandardPointHead",
    "PointRendSemSegHead",
]


def calculate_uncertainty(logits: torch.Tensor) -> torch.Tensor:
    """Uncertainty of logits (N, C, ...) -> (N, 1, ...); higher means less certain.

    One channel: ``-|logit|``. Several: second-best minus best logit.
    """
    if logits.size(1) == 1:
        return -torch.abs(logits)
    top2 = torch.topk(logits, k=2, dim=1)[0]
    return (top2[:, 1] - top2[:, 0]).unsqueeze(1)


def point_sample(features: torch.Tensor, point_coords: torch.Tensor) -> torch.Tensor:
    """Bilinearly sample ``features`` (N, C, H, W) at points given in [0, 1] x [0, 1].

    ``point_coords`` is (N, P, 2) in (x, y) order -> returns (N, C, P); a 4-D grid
    (N, Hg, Wg, 2) returns (N, C, Hg, Wg). Uses ``grid_sample`` with align_corners=False.
    """
    squeeze = point_coords.dim() == 3
    if squeeze:
        point_coords = point_coords.unsqueeze(2)
    out = F.grid_sample(features, 2.0 * point_coords - 1.0, mode="bilinear", align_corners=False)
    if squeeze:
        out = out.squeeze(3)
    return out


def bilinear_taps(point_coords: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The four pixels and weights of bilinear sampling at ``point_coords`` (N, P, 2) on an
    h x w map, as :func:`point_sample` samples (align_corners=False, zeros outside).

    Returns flat pixel indices (N, P, 4) into h * w and their weights (N, P, 4); a pixel
    outside the map has weight 0 (and a clamped index). :func:`sample_rows` applies them.
    """
    ix = point_coords[..., 0] * w - 0.5
    iy = point_coords[..., 1] * h - 0.5
    x0 = torch.floor(ix)
    y0 = torch.floor(iy)
    fx = ix - x0
    fy = iy - y0
    x0 = x0.long()
    y0 = y0.long()
    xs = torch.stack([x0, x0 + 1, x0, x0 + 1], dim=-1)
    ys = torch.stack([y0, y0, y0 + 1, y0 + 1], dim=-1)
    gx = 1.0 - fx
    gy = 1.0 - fy
    weights = torch.stack([gx * gy, fx * gy, gx * fy, fx * fy], dim=-1)
    inside = (xs >= 0) & (xs < w) & (ys >= 0) & (ys < h)
    weights = weights * inside.to(weights.dtype)
    indices = ys.clamp(0, h - 1) * w + xs.clamp(0, w - 1)
    return indices, weights


def sample_rows(features: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
                image: int) -> torch.Tensor:
    """Image ``image`` of ``features`` (N, C, h, w) sampled at the taps of
    :func:`bilinear_taps` -> (P, C): one row per point (no copy of the map is made when
    ``features`` is channels-last, as the outputs of int8 convolutions are)."""
    c = features.shape[1]
    # contiguous: on strided rows embedding_bag ran 20x slower
    rows = features[image].permute(1, 2, 0).reshape(-1, c).contiguous()
    return F.embedding_bag(indices[image], rows, per_sample_weights=weights[image], mode="sum")


def uncertain_points_with_randomness(
    coarse_logits: torch.Tensor,
    num_points: int,
    oversample_ratio: int,
    importance_sample_ratio: float,
) -> torch.Tensor:
    """Training-time point selection -> coordinates (N, num_points, 2) in [0, 1].

    ``num_points * oversample_ratio`` uniform random candidates are drawn; the
    ``int(importance_sample_ratio * num_points)`` most uncertain are kept and the rest of the
    points are new uniform random ones.
    """
    n = coarse_logits.shape[0]
    num_sampled = int(num_points * oversample_ratio)
    device = coarse_logits.device
    candidates = torch.rand(n, num_sampled, 2, device=device)
    uncertainty = calculate_uncertainty(point_sample(coarse_logits, candidates))
    num_uncertain = int(importance_sample_ratio * num_points)
    num_random = num_points - num_uncertain
    idx = torch.topk(uncertainty[:, 0, :], k=num_uncertain, dim=1)[1]
    idx = idx + num_sampled * torch.arange(n, dtype=torch.long, device=device)[:, None]
    coords = candidates.view(-1, 2)[idx.view(-1), :].view(n, num_uncertain, 2)
    if num_random > 0:
        coords = torch.cat([coords, torch.rand(n, num_random, 2, device=device)], dim=1)
    return coords


def uncertain_points_on_grid(
    uncertainty_map: torch.Tensor, num_points: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``num_points`` most uncertain cells of an (N, 1, H, W) map.

    Returns
    -------
    indices : Tensor
        (N, P) flat indices into H * W, P = min(num_points, H * W).
    coords : Tensor
        (N, P, 2) cell centres as (x, y) in [0, 1].
    """
    n, _, h, w = uncertainty_map.shape
    num_points = min(h * w, num_points)
    indices = torch.topk(uncertainty_map.view(n, h * w), k=num_points, dim=1)[1]
    h_step = 1.0 / float(h)
    w_step = 1.0 / float(w)
    coords = torch.zeros(n, num_points, 2, dtype=torch.float, device=uncertainty_map.device)
    coords[:, :, 0] = 0.5 * w_step + w_step * (indices % w).float()
    coords[:, :, 1] = 0.5 * h_step + h_step * torch.div(indices, w, rounding_mode="floor").float()
    return indices, coords


class StandardPointHead(nn.Module):
    """MLP on sampled points, as 1-D convolutions with kernel 1.

    ``num_fc`` layers ``fc_layers.k`` (Conv1d + ReLU, width ``fc_dim``), the coarse
    prediction concatenated to the input of every layer, then ``predictor`` (Conv1d to
    ``num_classes``). ``forward(fine (N, nin, P), coarse (N, C, P)) -> (N, C, P)``.
    """

    def __init__(self, nin: int, num_classes: int, fc_dim: int, num_fc: int) -> None:
        super().__init__()
        self.fc_layers = nn.ModuleList()
        dim_in = nin + num_classes
        for _ in range(num_fc):
            conv = nn.Conv1d(dim_in, fc_dim, kernel_size=1)
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(conv.bias)
            self.fc_layers.append(nn.Sequential(conv, nn.ReLU(inplace=True)))
            dim_in = fc_dim + num_classes
        self.predictor = nn.Conv1d(dim_in, num_classes, kernel_size=1)
        nn.init.normal_(self.predictor.weight, std=0.001)
        nn.init.zeros_(self.predictor.bias)

    def forward(self, fine: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
        x = torch.cat([fine, coarse], dim=1)
        for layer in self.fc_layers:
            x = torch.cat([layer(x), coarse], dim=1)
        return self.predictor(x)

    def predict(self, features: torch.Tensor, coarse: torch.Tensor,
                point_coords: torch.Tensor) -> torch.Tensor:
        """Refined logits (N, C, P) at ``point_coords`` (N, P, 2) from the decoder features
        (N, nin, h, w) and coarse logits (N, C, h', w') sampled there."""
        return self(point_sample(features, point_coords), point_sample(coarse, point_coords))

    def fuse_model(self) -> None:
        for layer in self.fc_layers:
            fuse_sequential(layer, ["0", "1"])


class PointRendSemSegHead(nn.Module):
    """PointRend head on top of coarse semantic logits and decoder features.

    Parameters
    ----------
    nin : int
        Channels of the decoder features (also the MLP width).
    num_classes : int
        Channels of the logits.
    num_fc, train_num_points, oversample_ratio, importance_sample_ratio : see config
    subdivision_steps, subdivision_num_points : see config (``subdivision_steps`` is kept for
        reference; inference takes the number of steps as an argument).
    """

    def __init__(
        self,
        nin: int,
        num_classes: int,
        num_fc: int = 3,
        train_num_points: int = 1024,
        oversample_ratio: int = 3,
        importance_sample_ratio: float = 0.75,
        subdivision_steps: int = 2,
        subdivision_num_points: int = 8192,
    ) -> None:
        super().__init__()
        self.train_num_points = int(train_num_points)
        self.oversample_ratio = int(oversample_ratio)
        self.importance_sample_ratio = float(importance_sample_ratio)
        self.subdivision_steps = int(subdivision_steps)
        self.subdivision_num_points = int(subdivision_num_points)
        self.point_head = StandardPointHead(nin, num_classes, nin, num_fc)

    def sample_train_points(
        self, coarse: torch.Tensor, features: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Training: (point_logits (N, C, P), point_coords (N, P, 2)), P = train_num_points.

        ``coarse`` is (N, C, h, w), ``features`` (N, nin, h, w).
        """
        with torch.no_grad():
            coords = uncertain_points_with_randomness(
                coarse,
                self.train_num_points,
                self.oversample_ratio,
                self.importance_sample_ratio,
            )
        logits = self.point_head(point_sample(features, coords), point_sample(coarse, coords))
        return logits, coords

    def render(self, coarse: torch.Tensor, features: torch.Tensor, steps: int) -> torch.Tensor:
        """Inference: refine (N, C, h, w) logits to (N, C, h * 2**steps, w * 2**steps).

        Each step upsamples x2 (bilinear, align_corners=False) and re-predicts the
        ``subdivision_num_points`` most uncertain cells.
        """
        logits = coarse.clone()
        for _ in range(steps):
            logits = F.interpolate(logits, scale_factor=2.0, mode="bilinear", align_corners=False)
            indices, coords = uncertain_points_on_grid(
                calculate_uncertainty(logits), self.subdivision_num_points
            )
            point_logits = self.point_head.predict(features, coarse, coords)
            n, c, h, w = logits.shape
            indices = indices.unsqueeze(1).expand(-1, c, -1)
            logits = logits.reshape(n, c, h * w).scatter_(2, indices, point_logits)
            logits = logits.view(n, c, h, w)
        return logits

    def fuse_model(self) -> None:
        self.point_head.fuse_model()


POINT_REND_KEYS = ("num_fc", "train_num_points", "oversample_ratio", "importance_sample_ratio",
                   "subdivision_steps", "subdivision_num_points")


def split_point_rend_kwargs(kwargs: dict) -> dict:
    """Remove and return the PointRend keyword arguments (see :class:`PointRendSemSegHead`)."""
    return {k: kwargs.pop(k) for k in POINT_REND_KEYS if k in kwargs}
