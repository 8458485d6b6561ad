"""MC-Distil's coordinator network ``g_phi`` (:class:`CoordinatorNetwork`): the torch module that
gives alpha, beta and gamma per student and image (and per region), with the normalised forms.

Kept apart from the :class:`~collab_distill.plugins.mc_distil.CNet` plugin (which configures,
builds and trains it) so that the network can be read and reused without the plugin's hooks.
"""

from __future__ import annotations

import math
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["CoordinatorNetwork", "Activation", "Normalize"]

Activation = Literal["sigmoid", "softplus", "softmax"]
Normalize = Literal["batch", "term", "none"]


class CoordinatorNetwork(nn.Module):
    """``g_phi``: per image, features (the image through ``backbone``, and/or detached per-image
    signals of the cohort) and a head with 3 outputs (alpha, beta, gamma) per student.

    ``normalize="batch"`` (the default) turns the head's outputs into *relative* weights: each
    term's weight is its starting ``mix`` times a factor in ``(1/max_factor, max_factor)`` that is
    exactly 1 while the head is zero (as it is at initialisation), and each student's weights are rescaled
    so that their sum over the three terms has batch mean ``sum(mix)``. The network can shift
    weight between images and between terms but cannot change the loss scale: a one-step
    lookahead otherwise learns a larger step (every weight saturates), not a different mix.
    ``normalize="term"`` rescales each term on its own to batch mean ``mix``: the mix itself stays
    the fixed one (e.g. KD's, chosen on val) and the network only decides, per image, which term
    each image's share goes to (trust the label here, the teacher there). A greedy one-step
    lookahead cannot then drift the mix toward the supervised term, which its meta objective
    (the supervised loss) favours whatever the horizon.
    A term whose ``mix`` is 0 stays 0. ``normalize="none"`` is the unnormalised form
    ``scale * activation(head)``.

    With ``region_inputs`` a second head reads per-unit (per-region) signals and gives each region
    a factor on beta and gamma (:meth:`region_factors`).
    """

    mix: Tensor  # ``[S, W]`` (W = 3 + named terms), a (non-persistent) buffer: see ``__init__``

    def __init__(
        self,
        backbone: Optional[nn.Module],
        embedding_dim: int,
        extra_inputs: int,
        num_students: int,
        mix: tuple[float, ...],
        normalize: Normalize = "batch",
        max_factor: float = 10.0,
        hidden: int = 0,
        activation: Activation = "sigmoid",
        scale: float = 1.0,
        region_inputs: int = 0,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.num_students = num_students
        self.normalize = normalize
        self.activation = activation
        self.scale = scale
        self.max_factor = max_factor
        width = (embedding_dim if backbone is not None else 0) + extra_inputs
        layers: list[nn.Module] = [nn.Linear(width, hidden), nn.ReLU()] if hidden else []
        self.terms = len(mix)  # alpha, beta, gamma and any named terms (``CNet.terms``)
        last = nn.Linear(hidden or width, self.terms * num_students)
        self.head = nn.Sequential(*layers, last)
        if normalize in ("batch", "term"):
            # a zero head gives every image exactly ``mix``: doing nothing is the fixed-mix baseline
            nn.init.zeros_(last.weight)
        else:
            # start near the same weights for every image (0.5 * scale for sigmoid); small non-zero
            # head weights so the backbone gets a meta-gradient from the first meta step on
            nn.init.normal_(last.weight, std=1e-2)
        nn.init.zeros_(last.bias)
        self.register_buffer("mix", torch.tensor(mix, dtype=torch.float32).expand(num_students, self.terms).clone(),
                             persistent=False)
        self.regions: Optional[nn.Sequential] = None
        if region_inputs:
            # per-region factors on beta and gamma; a zero last layer spreads every image's weight evenly
            region_last = nn.Linear(hidden or region_inputs, 2 * num_students)
            nn.init.zeros_(region_last.weight)
            nn.init.zeros_(region_last.bias)
            region_layers: list[nn.Module] = [nn.Linear(region_inputs, hidden), nn.ReLU()] if hidden else []
            self.regions = nn.Sequential(*region_layers, region_last)

    def region_factors(self, unit_inputs: Tensor, unit_image: Tensor, num_images: int) -> Tensor:
        """``[U, S, 2]`` factors on beta and gamma for every unit (region) and student, each in
        ``(1/max_factor, max_factor)`` before being rescaled to mean 1 over each image's units,
        so they move an image's distillation weight between its regions, never its total."""
        assert self.regions is not None, "built without region_inputs"
        raw = self.regions(unit_inputs.float()).view(-1, self.num_students, 2)
        factor = torch.exp(math.log(self.max_factor) * torch.tanh(raw))
        flat = factor.flatten(1)
        mean = flat.new_zeros(num_images, flat.shape[1]).index_add(0, unit_image, flat)
        count = flat.new_zeros(num_images).index_add(0, unit_image, torch.ones_like(flat[:, 0])).clamp_min(1.0)
        return (flat / (mean / count[:, None])[unit_image]).view_as(factor)

    def forward(self, images: Optional[Tensor], extras: Optional[Tensor] = None) -> Tensor:
        """``[B, S, W]`` weights (alpha, beta, gamma, then the named terms) for ``S`` students."""
        parts = ([self.backbone(images)] if self.backbone is not None else []) + ([extras] if extras is not None else [])
        raw = self.head(torch.cat(parts, dim=1).float() if len(parts) > 1 else parts[0].float())
        raw = raw.view(-1, self.num_students, self.terms)
        if self.normalize in ("batch", "term"):
            # a factor in (1/max_factor, max_factor), exactly 1 at raw = 0 (so is the rescaling below:
            # a zero head reproduces the fixed mix bit for bit)
            factor = torch.exp(math.log(self.max_factor) * torch.tanh(raw))
            if self.normalize == "term":  # every term keeps its batch mean: only images are traded
                return self.mix * (factor / factor.mean(dim=0, keepdim=True))
            budget = self.mix.sum(dim=-1)  # [S]
            relative = (self.mix * factor).sum(dim=-1) / budget  # [B, S]
            return self.mix * (factor / relative.mean(dim=0)[None, :, None])
        if self.activation == "sigmoid":
            return self.scale * torch.sigmoid(raw)
        if self.activation == "softplus":
            return self.scale * F.softplus(raw)
        return self.scale * torch.softmax(raw, dim=-1)  # the three terms of a student sum to scale
