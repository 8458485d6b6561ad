"""Features by module path, plugin-owned trainable modules, FitNets and attention transfer.

Runs real tiny fits on digits through ``collab_distill.testing`` (the kit outside authors use).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from torch import nn

from collab_distill import ConfigError, FeatureRequest, Plugin, hookimpl, unwrap
from collab_distill.features import parse_feature
from collab_distill.plugins.fixed_weights import FixedLossWeights
from collab_distill.plugins.hints import AttentionTransfer, FitNets, attention_loss_per_image, hint_loss_per_image
from collab_distill.plugins.mc_distil import CNet
from collab_distill.testing import make_records, tiny_engine, tiny_fit
from conftest import REPO, digits_args
from test_cli import run_cli

KD = FixedLossWeights(alpha=0.3, beta=0.7)


# ------------------------------------------------------------------ golden values


def test_hint_loss_golden_values():
    student = torch.tensor([[[[1.0, -2.0], [0.5, 0.0]], [[3.0, 1.0], [-1.0, 2.0]]]])  # [1, 2, 2, 2]
    teacher = torch.tensor([[[[0.0, -1.0], [1.5, 0.5]], [[2.0, 2.0], [0.0, 0.0]]]])
    value = hint_loss_per_image(torch.cat([student, teacher]), torch.cat([teacher, teacher]))
    # (1 + 1 + 1 + 0.25 + 1 + 1 + 1 + 4) / 8 = 1.28125 for the first image, 0 for the second
    assert value.tolist() == [1.28125, 0.0]


def test_attention_loss_golden_values_and_formula():
    g = torch.Generator().manual_seed(3)
    fs, ft = torch.randn(2, 4, 4, 4, generator=g), torch.randn(2, 6, 8, 8, generator=g)
    value = attention_loss_per_image(fs, ft)
    # the formula written out: the teacher's larger map is average-pooled to 4x4 first
    pooled = torch.nn.functional.adaptive_avg_pool2d(ft, (4, 4))

    def at(f):
        a = f.pow(2).mean(1).flatten(1)
        return a / a.norm(dim=1, keepdim=True)

    assert torch.allclose(value, (at(fs) - at(pooled)).pow(2).mean(1), atol=1e-7)
    assert value.tolist() == pytest.approx([0.04988510161, 0.05837126076], rel=1e-5)


def test_feature_spec_parsing():
    assert parse_feature("layer3") == ("layer3", None)
    assert parse_feature("backbone.fpn[1]") == ("backbone.fpn", "1")
    with pytest.raises(ConfigError, match="module path"):
        parse_feature("backbone[p4")


def test_make_records_is_seeded():
    a, b = make_records(("s",), features={"layer3": (4, 2, 2)}), make_records(("s",), features={"layer3": (4, 2, 2)})
    assert torch.equal(a["s"].logits, b["s"].logits) and torch.equal(a["s"].features["layer3"], b["s"].features["layer3"])


# ------------------------------------------------------------------ errors before any work


def test_misspelled_module_path_names_the_nearest_valid_paths(tmp_path):
    engine = tiny_engine([KD, FitNets(student_features=["layr3"])], root_dir=tmp_path)
    with pytest.raises(ConfigError) as err:
        engine.build()
    message = str(err.value)
    assert "'layr3'" in message and "'teacher'" in message and "layer3" in message and "nearest valid paths" in message
    assert not (tmp_path / "tiny").exists(), "nothing is written before the error"


def test_feature_shape_mismatch_without_adaptor_names_both_sides(tmp_path):
    engine = tiny_engine([KD, FitNets(student_features=["layer3"], adaptor="none")], root_dir=tmp_path)
    with pytest.raises(ConfigError) as err:
        engine.build()
    message = str(err.value)
    # xxs's layer3 is narrower than the teacher's (ResNet10-s)
    assert "student 'xxs' feature 'layer3' (" in message and "teacher 'teacher' feature 'layer3' (" in message
    assert "adaptor is none" in message


class StrayProjection(Plugin):
    """Keeps a trainable module as an attribute instead of declaring it: a bug the engine must catch."""

    def __init__(self) -> None:
        self.projection = nn.Linear(10, 10)

    @hookimpl
    def collab_distill_auxiliary_losses(self, records):
        return {"stray": sum(self.projection(r.logits).pow(2).mean() for r in records.values())}


def test_plugin_parameter_left_out_of_the_optimizer_stops_the_first_step(tmp_path):
    with pytest.raises(ConfigError) as err:
        tiny_fit([StrayProjection()], root_dir=tmp_path, steps=2, teacher=None)
    message = str(err.value)
    assert "StrayProjection#0: projection.weight (10, 10)" in message and "collab_distill_student_modules" in message


# ------------------------------------------------------------------ capture


class FeatureProbe(Plugin):
    """Requests layer2 of every student and the teacher on even steps and records what it saw."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []

    @hookimpl
    def collab_distill_feature_requests(self, engine):
        def even(engine, phase):
            return engine.global_step % 2 == 0

        return [FeatureRequest(m, "layer2", even) for m in [*engine.cohort.students, *engine.cohort.teachers]]

    @hookimpl
    def collab_distill_auxiliary_losses(self, engine, records, teacher_records, phase):
        teacher = teacher_records["teacher"].features.get("layer2")
        student = records["xxs"].features.get("layer2")
        self.seen.append({
            "step": engine.global_step, "phase": phase,
            "student": None if student is None else (tuple(student.shape), student.requires_grad),
            "teacher": None if teacher is None else (tuple(teacher.shape), teacher.requires_grad, teacher.dtype),
        })
        return {}


def test_features_are_captured_only_on_steps_that_want_them(tmp_path):
    probe = FeatureProbe()
    run = tiny_fit([KD, probe], root_dir=tmp_path, steps=4, batch_size=16)
    assert run.engine.feature_shapes["xxs"]["layer2"] == (8, 4, 4)
    assert run.engine.feature_shapes["teacher"]["layer2"] == (16, 4, 4)
    train = [s for s in probe.seen if s["phase"] == "train"]
    assert [s["step"] for s in train] == [0, 1, 2, 3]
    for s in train:
        if s["step"] % 2 == 0:
            assert s["student"] == ((16, 8, 4, 4), True)  # with graph
            assert s["teacher"] == ((16, 16, 4, 4), False, torch.float32)  # without
        else:
            assert s["student"] is None and s["teacher"] is None


def test_no_request_means_no_hook(tmp_path):
    run = tiny_fit([KD], root_dir=tmp_path, steps=1)
    assert run.engine.forward.features is None
    assert not any(m._forward_hooks for model in run.engine.students.values() for m in unwrap(model).modules())


def test_teachers_run_under_the_students_autocast(tmp_path):
    probe = FeatureProbe()
    tiny_fit([KD, probe], root_dir=tmp_path, steps=1, precision="bf16-mixed", batch_size=16)
    assert probe.seen[0]["teacher"][2] == torch.bfloat16


# ------------------------------------------------------------------ plugin modules


def _state(engine):
    students = {n: {k: v.clone() for k, v in unwrap(m).state_dict().items()} for n, m in engine.students.items()}
    modules = {f"{s}/{k}": {p: v.clone() for p, v in unwrap(m).state_dict().items()}
               for s, mods in engine.plugin_modules.items() for k, m in mods.items()}
    return students, modules


def test_fitnets_regressors_train_with_their_student_and_resume_bit_identically(tmp_path):
    options = dict(epochs=2, batch_size=32, subset=300)
    whole = tiny_fit([KD, FitNets(weight=10.0)], root_dir=tmp_path / "whole", steps=None, **options)
    students, modules = _state(whole.engine)
    assert set(modules) == {"xxs/fitnets_regressor_0", "xs/fitnets_regressor_0"}
    # in the student's optimizer, and trained
    for name, optimizer in whole.engine.optimizers.items():
        ids = {id(p) for g in optimizer.param_groups for p in g["params"]}
        assert all(id(p) in ids for p in unwrap(whole.engine.plugin_modules[name]["fitnets_regressor_0"]).parameters())
    fresh = tiny_engine([KD, FitNets(weight=10.0)], root_dir=tmp_path / "fresh", **options)
    fresh.build()
    fresh_weight = fresh.plugin_modules["xs"]["fitnets_regressor_0"][0].weight
    assert not torch.equal(modules["xs/fitnets_regressor_0"]["0.weight"], fresh_weight)
    assert all(0 < step["xs/hint"] < 1e4 for step in whole.losses)

    # stopped mid-epoch 1, then resumed in a new engine: the same bits as the uninterrupted run
    cut = tiny_fit([KD, FitNets(weight=10.0)], root_dir=tmp_path / "cut", steps=5, **options)
    assert cut.results["status"] == "stopped"
    assert "train/xs/hint" in (cut.run_dir / "logs" / "csv" / "metrics.csv").read_text()  # a stopped run keeps its logs
    resumed = tiny_engine([KD, FitNets(weight=10.0)], root_dir=tmp_path / "cut", **options)
    resumed.fit(resume=str(cut.run_dir / "checkpoints" / "last.ckpt"))
    students_b, modules_b = _state(resumed)
    for key in modules:
        for p, value in modules[key].items():
            assert torch.equal(value, modules_b[key][p]), f"{key}.{p} differs after resume"
    for name in students:
        for p, value in students[name].items():
            assert torch.equal(value, students_b[name][p]), f"{name}.{p} differs after resume"


@pytest.mark.slow
def test_export_leaves_plugin_modules_out(tmp_path, cli_env):
    run_cli([*digits_args(tmp_path, "fitnets", epochs=1), "--config", str(REPO / "examples" / "methods" / "fitnets.yaml"),
             "--trainer.limit_train_batches", "2"], cli_env)
    ckpt = tmp_path / "fitnets" / "version_0" / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, weights_only=False)
    assert set(state["plugin_modules"]) == {"xxs", "xs", "s"}
    run_cli(["export", "--ckpt_path", str(ckpt), "--student", "xs", "--output", str(tmp_path / "export")], cli_env)
    exported = torch.load(tmp_path / "export" / "xs-last.pt", weights_only=True)
    assert set(exported) == set(state["students"]["xs"])
    assert not any("fitnets" in key or "regressor" in key for key in exported)


class LookaheadProbe(Plugin):
    """Notes what ``engine.student_module`` hands out in each phase."""

    def __init__(self) -> None:
        self.kinds: set[tuple[str, str]] = set()

    @hookimpl
    def collab_distill_auxiliary_losses(self, engine, phase):
        if engine.plugin_modules:
            module = engine.student_module("xs", "fitnets_regressor_0")
            self.kinds.add((phase, "module" if isinstance(module, nn.Module) else "lookahead"))
        return {}


def test_meta_step_looks_ahead_through_plugin_modules(tmp_path):
    """A C-Net's per-image beta also weighs the hint term; the lookahead evaluates the
    regressors at their looked-ahead parameters, and the meta-gradient is not zero."""
    probe = LookaheadProbe()
    cnet = CNet(use_image=False, use_losses=True, hidden=8, lr=1e-2)
    run = tiny_fit([cnet, FitNets(weight=10.0, per_image_weight="beta"), probe], root_dir=tmp_path, steps=4, batch_size=32)
    assert probe.kinds == {("train", "module"), ("lookahead", "lookahead")}
    assert len(run.meta_steps) == 2 and all(norm > 0 for _, _, norm in run.meta_steps)


def test_attention_transfer_trains(tmp_path):
    run = tiny_fit([KD, AttentionTransfer()], root_dir=tmp_path, steps=3)
    assert all(step["xxs/attention"] > 0 for step in run.losses)
    assert run.engine.plugin_modules == {}


# ------------------------------------------------------------------ DDP


@pytest.mark.slow
@pytest.mark.ddp
def test_two_process_ddp_fitnets_keeps_students_and_regressors_identical(tmp_path, cli_env):
    extra = [
        "--config", str(REPO / "examples" / "methods" / "fitnets.yaml"),
        "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
        "--task.init_args.data.init_args.subset", "400",
        "--plugins+", json.dumps({"class_path": "support_plugins.WeightChecksums"}),
    ]
    run_cli(digits_args(tmp_path, "ddp", epochs=1, extra=extra), cli_env, timeout=600)
    run = tmp_path / "ddp" / "version_0"
    sums = [json.loads((run / f"checksums_rank{r}.json").read_text()) for r in (0, 1)]
    assert sums[0]["world_size"] == 2
    assert {"plugin:xs/fitnets_regressor_0", "plugin:s/fitnets_regressor_0"} <= set(sums[0])
    assert sums[0] == sums[1]


@pytest.mark.slow
def test_compile_and_channels_last_keep_the_losses_and_the_lookahead(tmp_path):
    """``trainer.compile`` (aot_eager: the dynamo/AOTAutograd path without a C++ build) with
    channels-last weights: same losses as eager up to float error, the C-Net's second-order meta
    step still runs (the lookahead uses the uncompiled students), and hooked members stay eager."""
    # FitNets on xxs only: xxs and the teacher are hooked (eager), xs and the C-Net are compiled
    def plugins():
        return [CNet(use_image=False, use_losses=True, hidden=8), FitNets(weight=10.0, students=["xxs"], per_image_weight="beta")]

    eager = tiny_fit(plugins(), root_dir=tmp_path / "eager", steps=4)
    compiled = tiny_fit(plugins(), root_dir=tmp_path / "compiled", steps=4, compile="aot_eager", channels_last=True)
    for a, b in zip(eager.losses, compiled.losses):
        assert b["loss"] == pytest.approx(a["loss"], rel=2e-3)
    assert len(compiled.meta_steps) == 2 and all(norm > 0 for _, _, norm in compiled.meta_steps)
    state = torch.load(compiled.run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert set(state["students"]["xs"]) == set(unwrap(eager.engine.students["xs"]).state_dict())  # no _orig_mod. keys
    assert set(state["teachers"]["teacher"]) == set(eager.engine.teachers["teacher"].state_dict())


def test_any_fabric_logger_receives_the_runs_metrics(tmp_path):
    from support_plugins import MemoryLogger

    memory = MemoryLogger()
    run = tiny_fit([KD], root_dir=tmp_path, steps=None, epochs=1, loggers=["csv", memory], log_every_n_steps=2)
    logged = {key for _, row in memory.rows for key in row}
    assert {"train/loss", "train/xs/distill", "val/xs/val_top1"} <= logged and memory.finalized
    assert (run.run_dir / "logs" / "csv" / "metrics.csv").is_file()  # beside the configured csv logger


def test_every_term_is_logged_as_it_enters_the_loss_and_the_students_loss_is_their_sum(tmp_path):
    run = tiny_fit([KD, FitNets(weight=10.0, normalize="channel")], root_dir=tmp_path, steps=3, batch_size=16)
    for step in run.losses:
        for student in ("xxs", "xs"):
            terms = step[f"{student}/supervised"] + step[f"{student}/distill"] + step[f"{student}/hint"]
            assert step[f"{student}/loss"] == pytest.approx(terms, rel=1e-5)
            # the supervised term is weighted: alpha (0.3) times the batch-mean cross-entropy
            assert step[f"{student}/alpha"] == pytest.approx(0.3)
        assert step["loss"] == pytest.approx(step["xxs/loss"] + step["xs/loss"], rel=1e-5)


class EpochOfEachStep:
    def __init__(self) -> None:
        self.steps: list[tuple[int, set[str]]] = []

    @hookimpl
    def collab_distill_train_step_end(self, engine: Any, losses: Any) -> None:
        self.steps.append((engine.epoch, {name for name, value in losses.items() if float(value) > 0}))


def test_a_student_past_its_own_warm_up_gets_its_hint_while_another_still_warms_up(tmp_path):
    probe = EpochOfEachStep()
    tiny_fit([KD, FitNets(weight=10.0, normalize="channel"), probe], root_dir=tmp_path, steps=None, epochs=2,
             batch_size=32, subset=200, warmup_epochs={"xs": 1})
    first = [terms for epoch, terms in probe.steps if epoch == 0]
    second = [terms for epoch, terms in probe.steps if epoch == 1]
    assert first and second
    assert all("xxs/hint" in terms and "xs/hint" not in terms for terms in first)  # xs: labels only in epoch 0
    assert all({"xxs/hint", "xs/hint"} <= terms for terms in second)


def test_channel_normalised_hint_is_scale_free_and_bounded():
    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(3, 4, 5, 5, generator=generator), torch.randn(3, 4, 5, 5, generator=generator)
    plain = hint_loss_per_image(student, 30 * teacher)
    normalised = hint_loss_per_image(student, 30 * teacher + 7, normalize="channel")
    torch.testing.assert_close(normalised, hint_loss_per_image(student, teacher, normalize="channel"), rtol=1e-4, atol=1e-4)
    assert plain.min() > 100 and bool(((normalised >= 0) & (normalised <= 4)).all())
    # 2 * (1 - Pearson correlation), averaged over channels
    s, t = student.flatten(2), teacher.flatten(2)
    pearson = torch.stack([torch.stack([torch.corrcoef(torch.stack([s[b, c], t[b, c]]))[0, 1] for c in range(4)])
                           for b in range(3)])
    torch.testing.assert_close(normalised, (2 * (1 - pearson)).mean(dim=1), rtol=1e-4, atol=1e-4)
    assert float(hint_loss_per_image(teacher, 5 * teacher - 1, normalize="channel").max()) < 1e-6
