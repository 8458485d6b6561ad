"""The twice-differentiable RoIAlign: torchvision's numbers, a second derivative, both adapters'
poolers, and a detection meta step with the exact hypergradient."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
import torchvision
from torchvision.ops import MultiScaleRoIAlign

from collab_distill.tasks.detection.roi_align import (
    TwiceDifferentiableROIAlign,
    multiscale_roi_align,
    roi_align,
    twice_differentiable_pooling,
)


def _rois(n: int, images: int, generator: torch.Generator) -> torch.Tensor:
    """Boxes of every kind the kernel treats specially: inside, crossing the border, beyond it,
    smaller than a pixel, empty, and larger than the map."""
    corner = torch.rand(n, 2, generator=generator, dtype=torch.float64) * torch.tensor([30.0, 20.0]) - 3
    size = torch.rand(n, 2, generator=generator, dtype=torch.float64) * torch.tensor([40.0, 30.0])
    boxes = torch.cat([corner, corner + size], dim=1)
    boxes[0] = torch.tensor([-5.0, -5.0, -2.0, -2.0])  # entirely outside
    boxes[1] = torch.tensor([20.0, 15.0, 60.0, 45.0])  # past the bottom-right corner
    boxes[2] = torch.tensor([3.0, 3.0, 3.0, 3.0])  # empty
    boxes[3] = torch.tensor([4.2, 5.1, 4.6, 5.3])  # below a pixel
    index = torch.randint(0, images, (n, 1), generator=generator).double()
    return torch.cat([index, boxes], dim=1)


@pytest.mark.parametrize(("aligned", "ratio"), [(False, 2), (True, 0), (False, -1), (True, 2)])
def test_equals_torchvisions_forward_and_backward_and_has_a_second_derivative(aligned, ratio):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 17, 23, dtype=torch.float64, generator=generator, requires_grad=True)
    rois = _rois(40, 3, generator)
    ref = torchvision.ops.roi_align(x, rois, (7, 7), 0.5, ratio, aligned)
    ours = roi_align(x, rois, (7, 7), 0.5, ratio, aligned)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)
    # the upstream gradient depends on other parameters (in the lookahead: the C-Net's weights),
    # so the backward itself must be differentiable
    upstream = torch.randn(ref.shape, dtype=torch.float64, generator=generator).requires_grad_(True)
    (ref_grad,) = torch.autograd.grad(ref, x, upstream, create_graph=True)
    (our_grad,) = torch.autograd.grad(ours, x, upstream, create_graph=True)
    torch.testing.assert_close(our_grad, ref_grad, rtol=0, atol=1e-12)
    with pytest.raises(RuntimeError, match="double backwards"):
        torch.autograd.grad(ref_grad.pow(2).sum(), upstream)
    # d/d(upstream) of |grad|^2 = 2 * roi_align(grad): the second derivative, against torchvision's forward
    (second,) = torch.autograd.grad(our_grad.pow(2).sum(), upstream)
    torch.testing.assert_close(second, 2 * torchvision.ops.roi_align(our_grad.detach(), rois, (7, 7), 0.5, ratio, aligned),
                               rtol=0, atol=1e-10)
    small = x.detach()[:1, :2, :9, :11].clone().requires_grad_(True)
    first = rois[rois[:, 0] == 0][:4]
    assert torch.autograd.gradgradcheck(lambda t: roi_align(t, first, (2, 2), 0.5, ratio, aligned), (small,))
    # boxes given as a list per image, float32 input
    boxes = [rois[rois[:, 0] == i, 1:].float() for i in range(3)]
    torch.testing.assert_close(roi_align(x.float(), boxes, 7, 0.5, ratio, aligned),
                               torchvision.ops.roi_align(x.float(), boxes, 7, 0.5, ratio, aligned), rtol=1e-5, atol=1e-5)


def test_the_torchvision_and_detectron2_poolers_match_their_kernels():
    generator = torch.Generator().manual_seed(1)
    pool = MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)
    features = OrderedDict((str(i), torch.randn(2, 8, 64 >> i, 64 >> i, generator=generator)) for i in range(4))
    boxes = [torch.tensor([[0.0, 0, 250, 250], [10, 10, 20, 30], [5, 5, 100, 60]]), torch.tensor([[30.0, 30, 90, 200]])]
    sizes = [(256, 256)] * 2
    torch.testing.assert_close(multiscale_roi_align(pool, features, boxes, sizes), pool(features, boxes, sizes))
    # detectron2's ROIAlign module (aligned, adaptive sampling) has the same arguments as ours
    module = TwiceDifferentiableROIAlign((7, 7), 0.25, 0, True)
    rois = torch.cat([torch.zeros(3, 1), boxes[0]], dim=1)
    torch.testing.assert_close(module(features["0"], rois), torchvision.ops.roi_align(features["0"], rois, 7, 0.25, 0, True))
    with twice_differentiable_pooling():
        from collab_distill.tasks.detection.roi_align import exact_pooling_enabled

        assert exact_pooling_enabled()
    assert not exact_pooling_enabled()
