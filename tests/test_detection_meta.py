"""MC-Distil's machinery on detectors: the exact (second-order) meta step through both adapters,
its agreement with the finite-difference one, per-region weights, and the loss terms' logging."""

from __future__ import annotations

import math

import pytest
import torch

from collab_distill.cli import engine_from_args
from collab_distill.records import per_image_mean
from collab_distill.tasks.detection.shapes import write_shapes_coco
from conftest import REPO

CONFIGS = {"torchvision": "coco_tiny.yaml", "detectron2": "coco_tiny_detectron2.yaml"}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return write_shapes_coco(tmp_path_factory.mktemp("shapes_meta"), train=24, val=4, size=64, seed=2)


def _engine(adapter, shapes, tmp_path, *extra):
    if adapter == "detectron2":
        pytest.importorskip("detectron2", reason="detectron2 is not installed (see the README)")
    torch.manual_seed(0)
    engine = engine_from_args([
        "--config", str(REPO / "examples" / CONFIGS[adapter]),
        "--config", str(REPO / "examples" / "methods" / "mc_distil_detection.yaml"),
        "--task.init_args.data.init_args.root", str(shapes), "--task.init_args.min_size", "64",
        "--task.init_args.max_size", "64", "--trainer.root_dir", str(tmp_path), "--trainer.loggers", "[]",
        "--trainer.progress_bar", "false", *extra])
    engine.build()
    engine.ready_training()  # the teacher keeps its initial weights (it is never trained here)
    return engine


def _batch(engine, split="train"):
    loader, sampler = engine.loaders[split]
    if hasattr(sampler, "select_epoch"):
        sampler.select_epoch(0)
    return engine.task.move_batch(next(iter(loader)), engine.fabric)


@pytest.mark.parametrize("adapter", ["torchvision", "detectron2"])
def test_an_exact_detection_meta_step_changes_the_cnet_and_agrees_with_finite_differences(adapter, shapes, tmp_path):
    engine = _engine(adapter, shapes, tmp_path, "--meta.hypergradient", "second_order")
    with torch.no_grad():  # a C-Net that already weighs images differently (its head starts at zero)
        for p in engine.meta_modules["cnet"].parameters():
            p.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(p.numel()))
    batch, meta_batch = _batch(engine), _batch(engine, "meta")
    context = engine.task.shared_context(batch, engine.teachers, engine.students)
    teachers = engine.teacher_records(batch, context)
    params, exact, _ = engine.bilevel.gradients(engine.fabric, batch, teachers, context, meta_batch=meta_batch)
    engine.meta_config.hypergradient = "finite_difference"
    # detectron2's box losses are L1 (SMOOTH_L1_BETA 0): a finite step crosses their kinks, so it
    # needs a smaller one (cosine 0.89 at 1e-2 and 1e-3, 0.997 at 1e-4 on this cohort)
    engine.meta_config.fd_epsilon = 1e-4 if adapter == "detectron2" else 1e-3
    _, fd, _ = engine.bilevel.gradients(engine.fabric, batch, teachers, context, meta_batch=meta_batch)
    exact_flat, fd_flat = torch.cat([g.flatten() for g in exact]), torch.cat([g.flatten() for g in fd])
    assert exact_flat.norm() > 0 and torch.isfinite(exact_flat).all()
    # the finite difference keeps what the C-Net reads and the regions each detector samples at the
    # unperturbed students, as the exact one does (without that: cosine 0.70 on torchvision)
    assert torch.nn.functional.cosine_similarity(exact_flat, fd_flat, dim=0) > 0.99
    engine.meta_config.hypergradient = "second_order"
    before = [p.detach().clone() for p in params]
    engine.meta_step_due = lambda: True  # type: ignore[method-assign]
    logs = engine.training_step(batch)
    assert math.isfinite(float(logs["meta/loss"])) and float(logs["meta/grad_norm"]) > 0
    assert any(not torch.equal(a, p) for a, p in zip(before, params)), "the exact meta step moved the C-Net"


def test_per_region_weights_give_every_shared_region_its_own_factor(shapes, tmp_path):
    engine = _engine("torchvision", shapes, tmp_path)
    cnet = next(p for p in engine.pm.get_plugins() if type(p).__name__ == "CNet")
    cnet.per_region = True
    engine.meta_modules["cnet"] = cnet.module = torch.nn.ModuleDict(
        {"shared": cnet._network(engine.info, len(cnet.students), len(cnet.students) + 1)})
    batch = _batch(engine)
    context = engine.task.shared_context(batch, engine.teachers, engine.students)
    records = {s: engine.task.knowledge(m, batch, context=context) for s, m in engine.students.items()}
    teachers = engine.teacher_records(batch, context)
    first = next(iter(records.values()))
    units, images = first.logits.shape[0], first.num_images
    weights = cnet.collab_distill_loss_weights(engine, batch, records, teachers)
    for w in weights.values():
        assert w.unit_beta.shape == (units,) and w.unit_gamma.shape == (units,)
        assert torch.equal(w.unit_beta, torch.ones(units))  # untrained: the image's weight spread evenly
    region_head = cnet.module["shared"].regions[-1]
    torch.nn.init.normal_(region_head.weight, std=1.0)
    weights = cnet.collab_distill_loss_weights(engine, batch, records, teachers)
    for w in weights.values():
        assert w.unit_beta.std() > 0  # regions now differ...
        # ...but within an image they average to 1
        torch.testing.assert_close(per_image_mean(w.unit_beta, first.unit_image, images), torch.ones(images))
    # the cohort loss (which asks the C-Net again) weighs each region's KL by its factor before the image's mean
    _, logs = engine.cohort_loss(batch, records, teachers, phase="lookahead")
    tau = engine.trainer.temperature
    target = engine.hook.collab_distill_soft_targets(engine=engine, batch=batch, records=records, teacher_records=teachers,
                                                     temperature=tau)
    for name, rec in records.items():
        kl = target[name].kl_per_unit(rec.logits, tau) * weights[name].unit_beta
        expected = (weights[name].beta * tau * tau * per_image_mean(kl, rec.unit_image, images)).mean()
        torch.testing.assert_close(logs[f"{name}/distill"], expected.detach())
