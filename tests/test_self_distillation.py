"""Multi-exit students and the self-boosting rules: DSN, SD and MetaDistiller."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from collab_distill import unwrap
from collab_distill.config import Cohort, TrainerConfig
from collab_distill.engine import Engine
from collab_distill.meta import BilevelConfig
from collab_distill.plugins.fixed_weights import FixedLossWeights
from collab_distill.plugins.metadistiller import META_MODULE, MetaDistiller, TopDownLabelGenerator
from collab_distill.plugins.self_distillation import DeepSupervision, SelfDistillation
from collab_distill.profiling import count_macs, count_parameters
from collab_distill.records import Knowledge
from collab_distill.task import ConfigError, ModelFactory, TaskInfo
from collab_distill.tasks.classification import (
    Digits,
    ImageClassification,
    MultiExit,
    MultiExitOutput,
    ResNet,
    TopKEvaluator,
    TorchvisionModel,
)
from test_engine import ready

DIGITS = TaskInfo(num_classes=10, in_channels=1, image_size=(8, 8))


# ---------------------------------------------------------------------------- models


@pytest.mark.parametrize(
    "factory, info",
    [
        (MultiExit(ResNet("xs")), DIGITS),
        (MultiExit(TorchvisionModel("resnet18", cifar_stem=True)), TaskInfo(num_classes=7, in_channels=3, image_size=(32, 32))),
    ],
    ids=["resnet10-xs", "torchvision-resnet18"],
)
def test_multi_exit_outputs_and_generated_targets(factory, info):
    torch.manual_seed(0)
    net = factory.build(info)
    x = torch.randn(3, info.in_channels, *info.image_size)
    for mode in (net.train, net.eval):  # the same structure in training and evaluation
        mode()
        out = net(x)
        assert isinstance(out, MultiExitOutput) and len(out.exits) == len(out.features) == net.num_exits == 4
        assert all(e.shape == (3, info.num_classes) for e in out.exits)
        assert out.exits[-1] is out.logits
    # the backbone alone is the deployed classifier: same final logits, fewer parameters and MACs
    torch.testing.assert_close(net.deploy_model(x), out.logits)
    assert count_parameters(net.deploy_model) < count_parameters(net)
    assert count_macs(net.deploy_model, x[:1]) < count_macs(net, x[:1])

    generator = TopDownLabelGenerator(net.stage_channels, info.num_classes, net.head_downsamples)
    plugin = MetaDistiller(temperature=2.0)
    engine = SimpleNamespace(meta_modules={META_MODULE: nn.ModuleDict({"s": generator})},
                             trainer=SimpleNamespace(temperature=4.0))
    record = ImageClassification(Digits()).knowledge(net, {"inputs": x, "targets": torch.tensor([0, 1, 2])})
    targets = plugin.exit_targets(engine, "s", record, "train")
    assert len(targets) == net.num_exits - 1  # one per early exit
    for t in targets:
        assert t.probs.shape == (3, info.num_classes)
        torch.testing.assert_close(t.probs.sum(-1), torch.ones(3))


class _LinearFactory(ModelFactory):
    def build(self, info):
        return nn.Sequential(nn.Flatten(), nn.Linear(64, info.num_classes))


def test_unsupported_backbones_are_config_errors():
    with pytest.raises(ConfigError, match=r"MultiExit.backbone: TorchvisionModel\(mobilenet_v2\) is not supported"):
        MultiExit(TorchvisionModel("mobilenet_v2"))
    with pytest.raises(ConfigError, match="MultiExit.backbone builds a Sequential"):
        MultiExit(_LinearFactory()).build(DIGITS)
    with pytest.raises(ConfigError, match="is itself a MultiExit"):
        MultiExit(MultiExit(ResNet("xs")))
    with pytest.raises(ConfigError, match="MultiExit.head_width=0"):
        MultiExit(ResNet("xs"), head_width=0)
    assert MultiExit(ResNet("s")).describe() == "MultiExit(ResNet(s))"


def test_classification_task_records_exits_and_stage_maps():
    task = ImageClassification(Digits())
    torch.manual_seed(0)
    net = MultiExit(ResNet("xxs")).build(DIGITS)
    batch = {"inputs": torch.randn(5, 1, 8, 8), "targets": torch.arange(5), "index": torch.arange(5)}
    record = task.knowledge(net, batch)
    assert record.features["exit_logits"].shape == (4, 5, 10)
    assert [record.features[f"stage_{k}"].shape[1] for k in range(1, 5)] == [8, 8, 16, 16]
    torch.testing.assert_close(record.supervised_loss,
                               F.cross_entropy(record.features["exit_logits"][-1], batch["targets"], reduction="none"))
    predicted = task.predict(net.eval(), batch)
    assert len(predicted.exits) == 4 and predicted.features == ()
    plain = ResNet("xxs").build(DIGITS)
    assert task.knowledge(plain, batch).features == {} and isinstance(task.predict(plain, batch), torch.Tensor)


# ---------------------------------------------------------------------------- evaluator


def test_evaluator_scores_every_exit_and_the_softmax_ensemble():
    # exit 1 is very sure of class 0, exits 2 and 3 fairly sure of class 1 (the label): the mean
    # of the logits picks class 0 for sample 0, the mean of the probabilities picks class 1
    exits = torch.tensor([
        [[9.0, 0.0, 0.0], [0.0, 0.0, 5.0]],
        [[0.0, 3.0, 0.0], [0.0, 0.0, 2.0]],
        [[0.0, 3.0, 0.0], [1.0, 0.0, 0.0]],
    ])
    targets = torch.tensor([1, 2])
    assert exits.mean(0)[0].argmax() == 0 and exits.softmax(-1).mean(0)[0].argmax() == 1
    ev = TopKEvaluator(None, topk=(1, 2))
    ev.update(MultiExitOutput(exits[-1], tuple(exits), ()), {"targets": targets, "index": torch.tensor([0, 1])})
    # a sample seen twice (a distributed sampler's padding) counts once
    ev.update(MultiExitOutput(exits[-1][:1], tuple(exits[:, :1]), ()), {"targets": targets[:1], "index": torch.tensor([0])})
    m = ev.compute()
    assert m["top1"] == m["exit3_top1"] == 50.0  # the final exit: sample 0 right, sample 1 wrong
    assert m["exit1_top1"] == 50.0 and m["exit2_top1"] == 100.0
    probs = exits.softmax(-1).mean(0)
    expected = 100.0 * float((probs.argmax(-1) == targets).float().mean())
    assert m["ensemble_top1"] == expected == 100.0
    assert m["ensemble_top2"] == 100.0
    assert m["loss"] == pytest.approx(float(F.cross_entropy(exits[-1], targets)))
    plain = TopKEvaluator(None, topk=(1,))
    plain.update(exits[-1], {"targets": targets, "index": torch.tensor([0, 1])})
    assert set(plain.compute()) == {"top1", "loss"}


# ---------------------------------------------------------------------------- loss terms


def _record(seed=0, batch=4, classes=5, exits=3):
    g = torch.Generator().manual_seed(seed)
    stacked = torch.randn(exits, batch, classes, generator=g).requires_grad_()
    labels = torch.randint(0, classes, (batch,), generator=g)
    stages = {f"stage_{k + 1}": torch.randn(batch, c, s, s, generator=g).requires_grad_()
              for k, (c, s) in enumerate([(4, 8), (6, 4), (8, 2)])}
    return Knowledge.for_images(stacked[-1], labels, exit_logits=stacked, **stages), stacked, labels


def _kl(p, logits, tau):
    return F.kl_div(F.log_softmax(logits / tau, -1), p, reduction="none").sum(-1)


def _fake_engine(temperature=4.0, warming=False, **meta):
    return SimpleNamespace(trainer=SimpleNamespace(temperature=temperature), warming_up=lambda name: warming, meta_modules=meta)


def test_dsn_is_the_sum_of_the_early_exits_ce():
    record, exits, labels = _record()
    out = DeepSupervision().collab_distill_auxiliary_losses(_fake_engine(), {"a": record})
    expected = sum(F.cross_entropy(exits[k], labels) for k in range(2))
    torch.testing.assert_close(out["a/exits"], expected)


def test_sd_distils_the_detached_final_exit_into_every_early_exit():
    record, exits, labels = _record()
    plugin = SelfDistillation(alpha=0.3, temperature=2.0)
    loss = plugin.collab_distill_auxiliary_losses(_fake_engine(), {"a": record})["a/exits"]
    target = F.softmax(exits[-1].detach() / 2.0, -1)
    expected = sum((0.3 * F.cross_entropy(exits[k], labels, reduction="none") + 0.7 * 4.0 * _kl(target, exits[k], 2.0)).mean()
                   for k in range(2))
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert exits.grad[-1].abs().sum() == 0  # the final exit is the teacher: no gradient from this term
    # temperature None follows trainer.temperature; a warming-up student gets the labels only
    same = SelfDistillation(alpha=0.3).collab_distill_auxiliary_losses(_fake_engine(temperature=2.0), {"a": record})["a/exits"]
    torch.testing.assert_close(same, expected)
    warm = plugin.collab_distill_auxiliary_losses(_fake_engine(warming=True), {"a": record})["a/exits"]
    torch.testing.assert_close(warm, sum(F.cross_entropy(exits[k], labels) for k in range(2)))


def test_metadistiller_targets_come_from_the_generator_with_graph_only_in_the_lookahead():
    record, exits, labels = _record()
    torch.manual_seed(0)
    generator = TopDownLabelGenerator([4, 6, 8], 5, downsamples=[2, 1])
    engine = _fake_engine(**{META_MODULE: nn.ModuleDict({"a": generator})})
    plugin = MetaDistiller(alpha=0.5, temperature=1.5)
    stages = [record.features[f"stage_{k}"] for k in (1, 2, 3)]

    def loss_in(phase):
        return plugin.collab_distill_auxiliary_losses(engine, {"a": record}, phase=phase)["a/exits"]

    generator.eval()  # fixed BatchNorm statistics, so the expected value sees the same targets
    with torch.no_grad():
        generated = generator([s.detach() for s in stages])
    expected = sum((0.5 * F.cross_entropy(exits[k], labels, reduction="none")
                    + 0.5 * 1.5**2 * _kl(F.softmax(generated[k] / 1.5, -1), exits[k], 1.5)).mean() for k in range(2))
    real = loss_in("train")
    torch.testing.assert_close(real, expected)
    real.backward()
    assert all(p.grad is None for p in generator.parameters()), "the real step leaves no gradient on the generator"
    assert all(s.grad is None for s in stages), "targets never train the student's features"
    assert exits.grad is not None and exits.grad[:2].abs().sum() > 0

    ahead = loss_in("lookahead")
    torch.testing.assert_close(ahead, expected)
    ahead.backward()
    assert all(p.grad is not None for p in generator.parameters()), "the lookahead keeps the generator's graph"
    assert all(s.grad is None for s in stages)


def test_self_boosting_needs_multi_exit_students(tmp_path):
    engine = _engine(tmp_path, [SelfDistillation()], multi_exit=False)
    with pytest.raises(ConfigError, match="SelfDistillation needs multi-exit students: wrap them in MultiExit.*xxs"):
        engine.build()


# ---------------------------------------------------------------------------- the engine


def _engine(tmp_path, plugins, multi_exit=True, meta=None, students=("xxs", "xs")):
    factory = (lambda s: MultiExit(ResNet(s))) if multi_exit else ResNet
    return Engine(
        task=ImageClassification(Digits(batch_size=32, subset=400)),
        cohort=Cohort(students={s: factory(s) for s in students}),
        trainer=TrainerConfig(accelerator="cpu", root_dir=str(tmp_path), progress_bar=False, loggers=[], max_epochs=1,
                              temperature=1.0),
        plugins=[FixedLossWeights(1.0, 0.0, 0.0), *plugins],
        meta=meta,
        seed=0,
    )


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def test_generator_learns_only_in_the_meta_step(tmp_path):
    plugin = MetaDistiller(lr=1e-2)
    schedule = BilevelConfig(every_n_epochs=2, steps_in_meta_epoch="every_n_steps", every_n_steps=1)
    engine = _engine(tmp_path, [plugin], meta=schedule)
    batch = ready(engine)
    generators = engine.meta_modules[META_MODULE]
    assert set(generators) == {"xxs", "xs"}

    engine.loop.epoch = 1  # not a meta epoch: a plain training step
    assert not engine.meta_step_due()
    before, student = _snapshot(generators), _snapshot(unwrap(engine.students["xxs"]))
    logs = engine.training_step(batch)
    assert float(logs["xxs/exits"]) > 0 and "meta/loss" not in logs
    assert all(torch.equal(v, before[k]) for k, v in generators.named_parameters())
    assert all(p.grad is None for p in generators.parameters())
    assert any(not torch.equal(v, student[k]) for k, v in unwrap(engine.students["xxs"]).named_parameters())

    engine.loop.epoch = 2  # a meta epoch: the bilevel step runs first and updates the generators
    assert engine.meta_step_due()
    before = _snapshot(generators)
    logs = engine.training_step(batch)
    assert torch.isfinite(logs["meta/loss"])
    moved = {k for k, v in generators.named_parameters() if not torch.equal(v, before[k])}
    for student in ("xxs", "xs"):  # Adam moves exactly the parameters with a non-zero meta-gradient
        for part in ("lateral.0.", "lateral.3.", "refine.0.", "refine.2.", "heads.0.fc.", "heads.2.fc."):
            assert any(k.startswith(f"{student}.{part}") for k in moved), f"no meta-gradient reached {student}.{part}"


@pytest.mark.parametrize(
    "options",
    [{}, {"meta_objective": "exits", "target_ce": 0.0}, {"meta_objective": "final", "target_ce": 0.0}],
    ids=["default", "exits-only", "paper-final-exit"],
)
def test_generator_meta_gradient_is_the_derivative_of_the_meta_objective(tmp_path, monkeypatch, options):
    """The engine's second-order hypergradient of the generator against a central difference of
    ``L_meta(theta - lr * dL_train/dtheta)`` in float64 (smooth activations, so the difference is exact
    to O(t^2)), for the default L^val (every exit's CE plus the generator's own CE), every exit's CE
    alone, and the paper's final-exit CE; the finite-difference hypergradient is refused, since it
    would move the detached maps."""
    import collab_distill.training.bilevel as engine_module
    from collab_distill.meta import hypergradient, lookahead

    monkeypatch.setattr(nn.ReLU, "forward", lambda self, x: F.softplus(x))
    with pytest.raises(ConfigError, match="MetaDistiller needs meta.hypergradient=second_order"):
        _engine(tmp_path, [MetaDistiller()], meta=BilevelConfig(hypergradient="finite_difference")).build()
    captured = {}

    def capture(**kwargs):
        captured.update(kwargs)
        return hypergradient(**kwargs)

    monkeypatch.setattr(engine_module, "hypergradient", capture)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        engine = _engine(tmp_path, [MetaDistiller(**options)], meta=BilevelConfig(every_n_steps=1), students=("xxs",))
        batch = ready(engine)
        move = engine.task.move_batch
        monkeypatch.setattr(engine.task, "move_batch", lambda b, fabric: {k: v.double() if v.is_floating_point() else v
                                                                          for k, v in move(b, fabric).items()})
        batch = engine.task.move_batch(batch, engine.fabric)
        generator = engine.meta_modules[META_MODULE]
        before = _snapshot(generator)
        engine.meta_step(batch, {}, None)  # captures the step's closures (and moves the generator)
        params, meta_params = captured["params"], captured["meta_params"]
        assert len(meta_params) == len(before)

        def meta_objective() -> float:
            flat = [(s, n) for s, p in params.items() for n in p]
            grads = torch.autograd.grad(captured["train_loss"]({s: dict(p) for s, p in params.items()}),
                                        [params[s][n] for s, n in flat], allow_unused=True)
            g = {}
            for (s, n), x in zip(flat, grads):
                g.setdefault(s, {})[n] = torch.zeros_like(params[s][n]) if x is None else x
            base = {s: {n: t.detach() for n, t in p.items()} for s, p in params.items()}
            with torch.no_grad():
                return float(captured["meta_loss"](lookahead(base, params, g, captured["optimizers"], captured["config"])))

        with torch.no_grad():  # back to the generator the hypergradient was taken at
            for p, v in zip(meta_params, before.values()):
                p.copy_(v)
        exact, _ = hypergradient(**captured)
        torch.manual_seed(1)
        direction = [torch.randn_like(p) for p in meta_params]
        t = 1e-3
        values = []
        for sign in (1.0, -1.0):
            with torch.no_grad():
                for p, d, (_, v) in zip(meta_params, direction, before.items()):
                    p.copy_(v + sign * t * d)
            values.append(meta_objective())
        numerical = (values[0] - values[1]) / (2 * t)
        analytic = sum(float((g * d).sum()) for g, d in zip(exact, direction))
        print(f"hypergradient along a random direction: {analytic:.6g}, central difference: {numerical:.6g}")
        assert analytic != 0.0
        assert analytic == pytest.approx(numerical, rel=0.02)
    finally:
        torch.set_default_dtype(default)


def test_generator_learns_informative_targets_in_a_short_fit(tmp_path):
    """A short real fit on digits with the method file's generator settings: the generated targets
    leave the uniform distribution (entropy well below log K) and mostly name the label, as the
    run's plugins/metadistiller/targets.json (val split) and the meta-step logs report."""
    import json
    import math

    import yaml

    from conftest import REPO

    method = yaml.safe_load((REPO / "examples" / "methods" / "metadistiller.yaml").read_text())
    [init] = [p["init_args"] for p in method["plugins"] if p["class_path"].endswith("MetaDistiller")]
    plugin = MetaDistiller(**init)
    engine = Engine(
        task=ImageClassification(Digits(batch_size=32, subset=800)),
        cohort=Cohort(students={"xxs": MultiExit(ResNet("xxs"))}),
        trainer=TrainerConfig(accelerator="cpu", root_dir=str(tmp_path), progress_bar=False, loggers=[], max_epochs=6,
                              temperature=1.0, val_every_n_epochs=6),
        plugins=[FixedLossWeights(1.0, 0.0, 0.0), plugin],
        meta=BilevelConfig(every_n_steps=1),  # 6 epochs of 20 steps: 120 meta steps (the file: every 2nd of 255)
        seed=0,
    )
    engine.fit()
    stats = json.loads((engine.run_dir / "plugins" / "metadistiller" / "targets.json").read_text())
    assert stats["split"] == "val" and stats["log_k"] == pytest.approx(math.log(10))
    xxs = stats["students"]["xxs"]
    assert len(xxs["exits"]) == 3
    print({k: round(v, 3) for k, v in xxs.items() if k != "exits"})  # seed 0: 0.35 log K, agreement 0.72
    assert xxs["entropy"] < 0.9 * math.log(10)  # not near-uniform: the targets carry information
    assert all(e["entropy_over_log_k"] < 0.9 for e in xxs["exits"])
    assert xxs["label_agreement"] > 0.4  # ... about the label (chance: 0.1)
    assert all(e["label_agreement"] > 0.3 for e in xxs["exits"])
    logs = plugin.last_logs  # what the last meta step logged through engine.fabric.log_dict
    assert {"metadistiller/xxs/entropy", "metadistiller/xxs/exit1_agreement", "metadistiller/xxs/grad_norm"} <= set(logs)
    assert logs["metadistiller/xxs/grad_norm"] > 0


def test_meta_epochs_can_step_at_every_n_steps():
    from collab_distill.training.bilevel import BilevelStep

    def due(config, epochs=11, batches=4):
        step, out = 0, set()
        for epoch in range(epochs):
            for batch in range(batches):
                if BilevelStep.due(SimpleNamespace(config=config), epoch, batch, step):  # type: ignore[arg-type]
                    out.add((epoch, batch))
                step += 1
        return out

    every = BilevelConfig(every_n_epochs=5, steps_in_meta_epoch="every_n_steps", every_n_steps=2)
    assert due(every) == {(e, b) for e in (0, 5, 10) for b in (0, 2)}
    assert due(BilevelConfig(every_n_epochs=5)) == {(0, 0), (5, 0), (10, 0)}  # the default: the first step only
    assert due(BilevelConfig(every_n_steps=6)) == {(e, b) for e in range(11) for b in range(4) if (4 * e + b) % 6 == 0}
    with pytest.raises(ValueError, match="steps_in_meta_epoch"):
        BilevelConfig(steps_in_meta_epoch="all")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- DDP


@pytest.mark.slow
@pytest.mark.ddp
def test_two_process_metadistiller_keeps_ranks_identical_and_exit_metrics_exact(tmp_path, cli_env):
    """Under DDP every rank holds the same students and generators, and the exit/ensemble metrics
    gathered over the shards equal a single-process evaluation of the saved weights."""
    import json

    from conftest import REPO, digits_args
    from test_cli import run_cli

    extra = [
        "--config", str(REPO / "examples" / "methods" / "metadistiller.yaml"),
        "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
        "--task.init_args.data.init_args.subset", "600", "--trainer.limit_train_batches", "3",
        "--plugins+", json.dumps({"class_path": "support_plugins.WeightChecksums"}),
    ]
    run_cli(digits_args(tmp_path, "md", epochs=1, extra=extra), cli_env, timeout=600)
    run = tmp_path / "md" / "version_0"
    sums = [json.loads((run / f"checksums_rank{r}.json").read_text()) for r in (0, 1)]
    assert sums[0]["world_size"] == 2 and sums[0] == sums[1] and "meta:label_generator" in sums[0]
    results = json.loads((run / "results.json").read_text())
    out = tmp_path / "single"
    run_cli(["test", "--config", str(run / "config.yaml"), "--ckpt_path", str(run / "checkpoints" / "last.ckpt"),
             "--trainer.devices", "1", "--trainer.strategy", "auto", "--trainer.progress_bar", "false",
             "--output_dir", str(out)], cli_env)
    single = json.loads((out / "metrics.json").read_text())["metrics"]
    for name in ("xxs", "xs", "s"):
        gathered = {k.removeprefix("test_"): v for k, v in results["students"][name]["last"].items() if k.startswith("test_")}
        assert {"ensemble_top1", "exit1_top1", "exit4_top1"} <= set(gathered)
        assert set(gathered) == set(single[name])
        for key, value in single[name].items():
            assert gathered[key] == pytest.approx(value, rel=1e-4, abs=1e-9), (name, key)
