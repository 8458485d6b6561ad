"""The engine in-process: the loss mix, hook precedence, warm-up, the meta step, checkpoints."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from collab_distill import ConfigError, Plugin, SoftTarget, hookimpl, unwrap
from collab_distill.config import Cohort, Teacher, TrainerConfig
from collab_distill.engine import Engine
from collab_distill.meta import BilevelConfig
from collab_distill.plugins.fixed_weights import FixedLossWeights
from collab_distill.tasks.classification import Digits, ImageClassification, ResNet
from support_plugins import ConstantConsensus, CountingPlugin, LearnedImageWeights


def make_engine(tmp_path, teacher_file=None, plugins=(), students=("xxs", "xs"), meta=None, subset=400, task=None, **trainer):
    settings = dict(accelerator="cpu", root_dir=str(tmp_path), progress_bar=False, loggers=[], max_epochs=1)
    settings.update(trainer)
    teachers = {"t": Teacher(model=ResNet("s"), checkpoint=str(teacher_file))} if teacher_file else {}
    return Engine(
        task=task or ImageClassification(Digits(batch_size=32, subset=subset)),
        cohort=Cohort(students={s: ResNet(s) for s in students}, teachers=teachers),
        trainer=TrainerConfig(**settings),
        plugins=list(plugins),
        meta=meta,
        seed=0,
    )


def ready(engine):
    engine.build()
    engine.ready_training()
    loader, sampler = engine.loaders["train"]
    sampler.select_epoch(0)
    return next(iter(loader))


def records_of(engine, batch):
    teacher = {n: engine.task.knowledge(m, batch) for n, m in engine.teachers.items()}
    students = {n: engine.task.knowledge(m, batch, view=i) for i, (n, m) in enumerate(engine.students.items())}
    return students, {k: v.detach() for k, v in teacher.items()}


def kl(p_logits, q_logits, tau):
    p = F.softmax(p_logits / tau, dim=-1)
    return (p * (F.log_softmax(p_logits / tau, -1) - F.log_softmax(q_logits / tau, -1))).sum(-1)


def test_kd_loss_is_hintons_formula(tmp_path, teacher_file):
    engine = make_engine(tmp_path, teacher_file, [FixedLossWeights(alpha=0.3, beta=0.7)], temperature=3.0)
    batch = ready(engine)
    students, teachers = records_of(engine, batch)
    loss, logs = engine.cohort_loss(batch, students, teachers)
    t = teachers["t"].logits
    expected = sum(
        (0.3 * F.cross_entropy(r.logits, batch["targets"], reduction="none") + 0.7 * 9.0 * kl(t, r.logits, 3.0)).mean()
        for r in students.values()
    )
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert set(logs) >= {"loss", "xxs/loss", "xxs/distill", "xs/alpha", "xs/beta"}
    assert float(logs["xs/beta"]) == pytest.approx(0.7)


def test_gamma_zero_removes_the_consensus_term_exactly(tmp_path, teacher_file):
    with_term = make_engine(tmp_path, teacher_file, [FixedLossWeights(0.3, 0.5, 0.2), ConstantConsensus()])
    batch = ready(with_term)
    students, teachers = records_of(with_term, batch)
    loss_g, logs = with_term.cohort_loss(batch, students, teachers)
    assert "xxs/consensus" in logs
    no_gamma = make_engine(tmp_path, teacher_file, [FixedLossWeights(0.3, 0.5, 0.0), ConstantConsensus()])
    no_gamma.build()
    no_gamma.ready_training()
    off, _ = no_gamma.cohort_loss(batch, students, teachers)
    without = make_engine(tmp_path, teacher_file, [FixedLossWeights(0.3, 0.5, 0.0)])
    without.build()
    without.ready_training()
    base, logs_base = without.cohort_loss(batch, students, teachers)
    assert "xxs/consensus" not in logs_base
    assert torch.equal(off, base)
    consensus = SoftTarget.from_logits(torch.stack([r.logits for r in students.values()]), 4.0).probs.mean(0)
    extra = sum((0.2 * 16.0 * SoftTarget(consensus).kl_per_unit(r.logits, 4.0)).mean() for r in students.values())
    torch.testing.assert_close(loss_g, base + extra, rtol=1e-5, atol=1e-6)


def test_warmup_epochs_train_on_labels_only(tmp_path, teacher_file):
    engine = make_engine(tmp_path, teacher_file, [FixedLossWeights(0.3, 0.7)], warmup_epochs=1, max_epochs=2)
    batch = ready(engine)
    students, teachers = records_of(engine, batch)
    loss, _ = engine.cohort_loss(batch, students, teachers)
    expected = sum(F.cross_entropy(r.logits, batch["targets"]) for r in students.values())
    torch.testing.assert_close(loss, expected)
    engine.loop.epoch = 1
    assert not torch.allclose(engine.cohort_loss(batch, students, teachers)[0], expected)


def test_configured_plugin_overrides_builtin_default(tmp_path, teacher_file):
    class UniformTarget(Plugin):
        @hookimpl
        def collab_distill_soft_targets(self, records, temperature):
            return {n: SoftTarget(torch.full_like(r.logits, 0.1)) for n, r in records.items()}

    engine = make_engine(tmp_path, teacher_file, [FixedLossWeights(0.0, 1.0), UniformTarget()], temperature=1.0)
    batch = ready(engine)
    students, teachers = records_of(engine, batch)
    loss, _ = engine.cohort_loss(batch, students, teachers)
    uniform = torch.full((10,), 0.1)
    expected = sum(
        (uniform * (uniform.log() - F.log_softmax(r.logits, -1))).sum(-1).mean() for r in students.values()
    )
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_misspelled_hook_is_a_config_error():
    class Typo(Plugin):
        @hookimpl
        def collab_distill_loss_weight(self, records):  # missing "s"
            return None

    from collab_distill.plugin_manager import make_plugin_manager

    with pytest.raises(ConfigError, match="collab_distill_loss_weight"):
        make_plugin_manager([Typo()])


def test_disabling_the_defaults_plugin_is_reported(tmp_path, teacher_file):
    engine = make_engine(tmp_path, teacher_file)
    engine.pm = __import__("collab_distill.plugin_manager", fromlist=["x"]).make_plugin_manager([], ["defaults"])
    engine.hook = engine.pm.hook
    batch = ready(engine)
    students, teachers = records_of(engine, batch)
    with pytest.raises(ConfigError, match="no plugin provides loss weights"):
        engine.cohort_loss(batch, students, teachers)


def test_meta_step_moves_only_meta_modules(tmp_path, teacher_file):
    plugin = LearnedImageWeights(in_features=64, lr=1.0)
    engine = make_engine(tmp_path, teacher_file, [plugin], meta=BilevelConfig(every_n_steps=1))
    batch = ready(engine)
    _, teachers = records_of(engine, batch)
    before = {n: {k: v.clone() for k, v in unwrap(m).state_dict().items()} for n, m in engine.students.items()}
    meta_before = [p.detach().clone() for p in plugin.net.parameters()]
    log = engine.meta_step(batch, teachers, None)
    assert torch.isfinite(log["meta/loss"])
    for n, m in engine.students.items():  # parameters and BatchNorm statistics untouched
        for k, v in unwrap(m).state_dict().items():
            assert torch.equal(v, before[n][k]), f"{n}.{k} changed in the meta step"
    changed = [not torch.equal(a, b.detach()) for a, b in zip(meta_before, plugin.net.parameters())]
    assert all(changed)


@pytest.mark.parametrize("mode", ["second_order", "finite_difference"])
def test_meta_gradient_points_downhill_on_the_meta_objective(tmp_path, teacher_file, mode):
    """One small meta step must lower the meta objective of the looked-ahead students."""
    plugin = LearnedImageWeights(in_features=64, lr=0.5)
    engine = make_engine(tmp_path, teacher_file, [plugin], meta=BilevelConfig(every_n_steps=1, hypergradient=mode))
    batch = ready(engine)
    _, teachers = records_of(engine, batch)
    engine.bilevel.meta_batches.load_state_dict({"epoch": 0, "position": 0})
    first = float(engine.meta_step(batch, teachers, None)["meta/loss"])
    engine.bilevel.meta_batches.load_state_dict({"epoch": 0, "position": 0})  # same meta batch again
    second = float(engine.meta_step(batch, teachers, None)["meta/loss"])
    assert second < first


def test_fit_on_digits_learns(tmp_path, teacher_file):
    # the teacher here is untrained, so the students learn from labels (CE)
    engine = make_engine(tmp_path, teacher_file, [FixedLossWeights(1.0, 0.0)], max_epochs=3, subset=None)
    engine.build()
    engine.ready_training()
    untrained = engine.evaluate("test")
    engine = make_engine(tmp_path, teacher_file, [FixedLossWeights(1.0, 0.0)], max_epochs=3, subset=None)
    results = engine.fit()
    for name in ("xxs", "xs"):
        assert untrained[name]["top1"] < 30
        assert results["students"][name]["last"]["test_top1"] > 50
        assert results["students"][name]["best_on_val"]["epoch"] in (1, 2, 3)
    run = engine.run_dir
    for f in ("results.json", "config.yaml", "versions.json", "models.json", "checkpoints/last.ckpt"):
        assert (run / f).exists() or f == "config.yaml"  # config.yaml only when started from the CLI


def test_checkpoint_restores_meta_modules_optimizers_and_plugin_state(tmp_path, teacher_file):
    def build(plugins, **kw):
        return make_engine(tmp_path, teacher_file, plugins, meta=BilevelConfig(every_n_steps=2), max_epochs=2, name="m", **kw)

    counting = CountingPlugin()
    first = build([LearnedImageWeights(64), counting], max_steps=5)
    first.fit()
    saved = torch.load(first.run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert saved["loop"]["global_step"] == 5
    assert saved["meta_optimizers"]["image_weights"]["state"], "meta optimizer state is saved"

    weights, counting2 = LearnedImageWeights(64), CountingPlugin()
    second = build([weights, counting2])
    second.open_run(resume=str(first.run_dir / "checkpoints" / "last.ckpt"))
    for a, b in zip(weights.net.state_dict().values(), saved["meta_modules"]["image_weights"].values()):
        assert torch.equal(a, b)
    opt_state = second.meta_optimizers["image_weights"].state_dict()
    assert opt_state["param_groups"][0]["lr"] == saved["meta_optimizers"]["image_weights"]["param_groups"][0]["lr"]
    assert counting2.events == counting.events
    assert counting.events["train_step_end"] == 5
    assert second.global_step == 5 and second.bilevel.meta_batches.state_dict() == saved["meta_batches"]


def test_per_student_warmup(tmp_path, teacher_file):
    engine = make_engine(tmp_path, teacher_file, [FixedLossWeights(0.3, 0.7)], warmup_epochs={"xxs": 2}, max_epochs=3)
    batch = ready(engine)
    students, teachers = records_of(engine, batch)
    _, logs = engine.cohort_loss(batch, students, teachers)
    assert float(logs["xxs/alpha"]) == 1.0 and float(logs["xxs/beta"]) == 0.0  # still warming up
    assert float(logs["xs/alpha"]) == pytest.approx(0.3) and float(logs["xs/beta"]) == pytest.approx(0.7)
    assert engine.in_warmup  # meta steps wait for every student
    engine.loop.epoch = 2
    _, logs = engine.cohort_loss(batch, students, teachers)
    assert float(logs["xxs/beta"]) == pytest.approx(0.7) and not engine.in_warmup


def test_warmup_naming_an_unknown_student_is_a_config_error(tmp_path, teacher_file):
    engine = make_engine(tmp_path, teacher_file, warmup_epochs={"nobody": 1})
    with pytest.raises(ConfigError, match="trainer.warmup_epochs names"):
        engine.build()


@pytest.mark.parametrize("weights,teacher_calls", [((1.0, 0.0), 0), ((0.5, 0.5), 1)])
def test_teacher_runs_only_when_a_student_learns_from_it(tmp_path, teacher_file, weights, teacher_calls):
    engine = make_engine(tmp_path, teacher_file, [FixedLossWeights(*weights)], log_every_n_steps=1)
    batch = ready(engine)
    calls = []
    engine.teachers["t"].register_forward_hook(lambda *_: calls.append(1))
    logs = engine.training_step(batch)
    assert len(calls) == teacher_calls
    assert ("xs/distill" in logs) == bool(teacher_calls)


def test_step_logs_are_detailed_only_on_logging_steps(tmp_path, teacher_file):
    engine = make_engine(tmp_path, teacher_file, [FixedLossWeights(0.5, 0.5)], log_every_n_steps=2)
    batch = ready(engine)
    quiet = engine.training_step(batch)
    engine.loop.global_step += 1
    loud = engine.training_step(batch)
    assert set(quiet) == {"loss", "xxs/loss", "xs/loss"}
    assert {"xs/supervised", "xs/distill", "xs/loss", "xs/alpha"} <= set(loud)


def test_a_warm_up_as_long_as_the_run_is_one_warning_naming_the_students(tmp_path, teacher_file, capsys):
    engine = make_engine(tmp_path, teacher_file, warmup_epochs={"xxs": 2}, max_epochs=2)
    engine.build()
    out = capsys.readouterr().out
    assert "[warning] trainer.warmup_epochs >= trainer.max_epochs (2) for ['xxs']" in " ".join(out.split())
    assert "'xs'" not in out  # xs has no warm-up
