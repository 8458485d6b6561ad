"""RoIAlign whose gradient can be differentiated again, for the exact (second-order) meta step.

torchvision's ``roi_align`` (used by torchvision's and detectron2's detectors) has no double
backward, so the one-step lookahead ``theta' = theta - lr * dL/dtheta`` cannot keep its graph
through a detector. With the boxes held constant (they are detached proposals and ground truth
here, and torchvision gives boxes no gradient either), RoIAlign is *linear* in the feature map:
each output is a fixed weighted sum of feature pixels, and the bilinear weights factor into a
row part and a column part. So

    out[k, c, ph, pw] = sum_{h, w} Ay[k, ph, h] * F[n_k, c, h, w] * Ax[k, pw, w]

with ``Ay``/``Ax`` built (without gradient) from the same sampling points, boundary rules and
averaging as torchvision's kernel. Two matrix products of differentiable ops: forward, first and
second derivatives are all exact (checked against torchvision's op in the tests).

:func:`twice_differentiable_pooling` switches both adapters' box poolers to it inside a
``with`` block; the engine enters it around the lookahead of a ``second_order`` meta step
(:meth:`collab_distill.task.Task.twice_differentiable`), so ordinary steps keep torchvision's
faster kernel.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, Union

import torch
from torch import Tensor, nn

if TYPE_CHECKING:  # torchvision ships no type information: Any to mypy
    from torchvision.ops import MultiScaleRoIAlign

__all__ = ["roi_align", "multiscale_roi_align", "TwiceDifferentiableROIAlign", "twice_differentiable_pooling",
           "exact_pooling_enabled"]

_EXACT = contextvars.ContextVar("collab_distill_exact_roi_align", default=False)


@contextlib.contextmanager
def twice_differentiable_pooling() -> Iterator[None]:
    """Inside this block the detection adapters pool regions with :func:`roi_align`."""
    token = _EXACT.set(True)
    try:
        yield
    finally:
        _EXACT.reset(token)


def exact_pooling_enabled() -> bool:
    """Whether :func:`twice_differentiable_pooling` is active."""
    return _EXACT.get()


def _rois(boxes: Union[Tensor, Sequence[Tensor]]) -> Tensor:
    """``[K, 5]`` rows ``(image index, x1, y1, x2, y2)`` from a tensor of them or a list of
    ``[L_i, 4]`` boxes per image (torchvision's two forms)."""
    if isinstance(boxes, Tensor):
        return boxes
    parts = [torch.cat([torch.full_like(b[:, :1], i), b], dim=1) for i, b in enumerate(boxes)]
    return torch.cat(parts, dim=0) if parts else torch.zeros((0, 5))


def _axis_weights(start: Tensor, length: Tensor, pooled: int, grid: Tensor, size: int) -> Tensor:
    """``[K, pooled, size]``: for every roi and output bin along one axis, the weight of each
    pixel row (or column), i.e. the bilinear weights of the bin's ``grid`` sample points averaged
    over them; torchvision's boundary rules (a point beyond -1 or ``size`` counts as 0, one in
    [-1, 0] is clamped to 0, one past the last pixel is clamped to it)."""
    k = start.shape[0]
    bin_size = length / pooled
    most = max(int(grid.max()) if k else 1, 1)
    step = torch.arange(most, dtype=start.dtype, device=start.device)
    bins = torch.arange(pooled, dtype=start.dtype, device=start.device)
    g = grid.clamp_min(1).to(start.dtype)
    # sample points [K, pooled, most]
    # torchvision's order of operations, so that points on a pixel border round alike
    at = start[:, None, None] + bins[None, :, None] * bin_size[:, None, None] \
        + (step[None, None, :] + 0.5) * bin_size[:, None, None] / g[:, None, None]
    used = step[None, None, :] < grid[:, None, None]
    inside = (at >= -1.0) & (at <= size) & used
    at = at.clamp_min(0.0)
    low = at.floor().to(torch.int64)
    last = low >= size - 1
    low = torch.where(last, torch.full_like(low, size - 1), low)
    high = torch.where(last, low, low + 1)
    at = torch.where(last, low.to(at.dtype), at)
    frac = at - low.to(at.dtype)
    scale = inside.to(at.dtype) / g[:, None, None]
    weights = torch.zeros(k, pooled, size, dtype=start.dtype, device=start.device)
    weights.scatter_add_(2, low, (1 - frac) * scale)
    weights.scatter_add_(2, high, frac * scale)
    return weights


def roi_align(input: Tensor, boxes: Union[Tensor, Sequence[Tensor]], output_size: Union[int, Sequence[int]],
              spatial_scale: float = 1.0, sampling_ratio: int = -1, aligned: bool = False) -> Tensor:
    """``torchvision.ops.roi_align`` (same arguments, same result) as differentiable tensor ops:
    ``input`` gets exact first and second derivatives; ``boxes`` get none (as in torchvision)."""
    ph, pw = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
    rois = _rois(boxes).detach()
    num, channels, height, width = input.shape
    if rois.shape[0] == 0:
        return input.new_zeros((0, channels, ph, pw))
    with torch.no_grad():
        coords = rois[:, 1:].to(torch.float64 if input.dtype == torch.float64 else torch.float32)
        offset = 0.5 if aligned else 0.0
        x1, y1, x2, y2 = (coords * spatial_scale - offset).unbind(dim=1)
        roi_w, roi_h = x2 - x1, y2 - y1
        if not aligned:
            roi_w, roi_h = roi_w.clamp_min(1.0), roi_h.clamp_min(1.0)
        if sampling_ratio > 0:
            grid_h = torch.full_like(roi_h, sampling_ratio, dtype=torch.int64)
            grid_w = torch.full_like(roi_w, sampling_ratio, dtype=torch.int64)
        else:
            grid_h = torch.ceil(roi_h / ph).to(torch.int64)
            grid_w = torch.ceil(roi_w / pw).to(torch.int64)
        rows = _axis_weights(y1, roi_h, ph, grid_h, height).to(input.dtype)
        cols = _axis_weights(x1, roi_w, pw, grid_w, width).to(input.dtype)
        image = rois[:, 0].to(torch.int64)
    parts, order = [], []
    for n in range(num):
        mine = (image == n).nonzero().flatten()
        if mine.numel() == 0:
            continue
        k = mine.numel()
        # rows then columns, as two matrix products: [k*ph, H] @ [H, C*W], then per roi [ph*C, W] @ [W, pw]
        partial = rows[mine].reshape(k * ph, height) @ input[n].transpose(0, 1).reshape(height, channels * width)
        pooled = torch.bmm(partial.view(k, ph * channels, width), cols[mine].transpose(1, 2))
        parts.append(pooled.view(k, ph, channels, pw).transpose(1, 2))
        order.append(mine)
    return _in_order(parts, order, rois.shape[0])


def _in_order(parts: list[Tensor], order: list[Tensor], total: int) -> Tensor:
    """The rows of ``parts`` (computed for the roi indices in ``order``) back in roi order,
    without writing into a buffer (an index_put per part would copy the whole output each time)."""
    if len(parts) == 1 and order[0].numel() == total:
        return parts[0][torch.argsort(order[0])]
    inverse = torch.empty(total, dtype=torch.int64, device=order[0].device)
    inverse[torch.cat(order)] = torch.arange(total, device=order[0].device)
    return torch.cat(parts)[inverse]


class TwiceDifferentiableROIAlign(nn.Module):
    """A drop-in for a RoIAlign module (detectron2's ``ROIAlign``) with :func:`roi_align` inside."""

    def __init__(self, output_size: Any, spatial_scale: float, sampling_ratio: int, aligned: bool) -> None:
        super().__init__()
        self.output_size, self.spatial_scale = output_size, spatial_scale
        self.sampling_ratio, self.aligned = sampling_ratio, aligned

    def forward(self, input: Tensor, rois: Tensor) -> Tensor:
        return roi_align(input, rois, self.output_size, self.spatial_scale, self.sampling_ratio, self.aligned)


def multiscale_roi_align(pool: MultiScaleRoIAlign, features: dict[str, Tensor], boxes: list[Tensor],
                         image_sizes: list[tuple[int, int]]) -> Tensor:
    """What torchvision's ``MultiScaleRoIAlign`` module ``pool`` returns, through :func:`roi_align`
    (each box on the FPN level its size maps to, with the module's scales and level mapper)."""
    if pool.scales is None or pool.map_levels is None:
        with torch.no_grad():
            pool(features, boxes, image_sizes)  # torchvision infers the scales on its first call
    maps = [features[name] for name in pool.featmap_names]
    rois = _rois(boxes)
    size, ratio = pool.output_size, pool.sampling_ratio
    if len(maps) == 1:
        return roi_align(maps[0], rois, size, pool.scales[0], ratio)
    levels = pool.map_levels(boxes)
    parts, order = [], []
    for level, (feature, scale) in enumerate(zip(maps, pool.scales)):
        index = torch.where(levels == level)[0]
        if index.numel():
            parts.append(roi_align(feature, rois[index], size, scale, ratio).to(maps[0].dtype))
            order.append(index)
    if not parts:
        return maps[0].new_zeros((0, maps[0].shape[1], *size))
    return _in_order(parts, order, rois.shape[0])
