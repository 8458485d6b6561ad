"""What plugins answer is checked, and what the engine hands them back (issue 22): per-term
constant loss weights, the loss weights the meta objective sees, answers the engine cannot use
named with their plugin and hook, and a NaN from a plugin's weights blamed on that plugin."""

from __future__ import annotations

import re

import pytest
import torch

from bad_input_plugins import NonFiniteLossWeights
from collab_distill import ConfigError, LossWeights, Plugin, SoftTarget, hookimpl
from collab_distill.cli import main
from collab_distill.loss import PluginAnswerError
from collab_distill.meta import BilevelConfig
from collab_distill.plugins.fixed_weights import FixedLossWeights
from collab_distill.plugins.mc_distil import CNet
from collab_distill.training.guards import NonFiniteLossError
from support_plugins import ConstantConsensus
from test_engine import make_engine, ready, records_of
from tiny_config import tiny_digits_yaml


class PerImageMix(Plugin):
    """A per-image alpha and beta (a ramp over the batch), gamma 0, with ``constant`` as given."""

    def __init__(self, constant=None) -> None:
        self.constant = constant

    @hookimpl
    def collab_distill_loss_weights(self, records):
        out = {}
        for student, rec in records.items():
            n, device = rec.num_images, rec.logits.device
            alpha, beta = torch.linspace(0.5, 1.0, n, device=device), torch.linspace(1.0, 0.2, n, device=device)
            out[student] = LossWeights(alpha, beta, torch.zeros(n, device=device), constant=self.constant)
        return out


class CountingConsensus(ConstantConsensus):
    def __init__(self) -> None:
        self.calls = 0

    @hookimpl
    def collab_distill_consensus_targets(self, records, temperature):
        self.calls += 1
        return super().collab_distill_consensus_targets(records, temperature)


# ---------------------------------------------------------------------------- 4. constant per term


def test_a_constant_zero_gamma_beside_per_image_alpha_and_beta_skips_the_consensus(tmp_path, teacher_file):
    skipping, counting = PerImageMix(constant=(None, None, 0.0)), CountingConsensus()
    engine = make_engine(tmp_path, teacher_file, [skipping, counting])
    batch = ready(engine)
    students, teachers = records_of(engine, batch)
    loss, logs = engine.cohort_loss(batch, students, teachers)
    assert counting.calls == 0 and "xxs/consensus" not in logs
    assert "xxs/distill" in logs and logs["xxs/gamma"] == 0.0

    per_image, computing = PerImageMix(constant=None), CountingConsensus()
    other = make_engine(tmp_path, teacher_file, [per_image, computing])
    ready(other)
    base, base_logs = other.cohort_loss(batch, students, teachers)
    assert computing.calls == 1 and "xxs/consensus" in base_logs
    torch.testing.assert_close(loss, base)
    for key in ("xxs/alpha", "xs/beta", "xs/distill", "xs/supervised"):
        torch.testing.assert_close(torch.as_tensor(logs[key]), torch.as_tensor(base_logs[key]))


def test_constant_entries_are_numbers_or_none():
    n = 4
    ramp = torch.linspace(0.0, 1.0, n)
    w = LossWeights(ramp, ramp, torch.zeros(n), constant=(None, 0.5, 0))
    assert [w.uses(t) for t in LossWeights.TERMS] == [True, True, False]
    alpha, beta, gamma = w.factors()
    assert alpha is ramp and beta == 0.5 and gamma == 0.0 and isinstance(gamma, float)  # the number wins over the tensor
    every = LossWeights.constant_weights(n, 0.3, 0.0, 0.2)
    assert every.factors() == (0.3, 0.0, 0.2) and [every.uses(t) for t in LossWeights.TERMS] == [True, False, True]
    assert LossWeights(ramp, ramp, ramp).factors() == (ramp, ramp, ramp)


# ---------------------------------------------------------------------------- 3. the meta objective sees the weights


class BetaPenalty(Plugin):
    """A custom meta objective, the worked example of ``collab_distill_meta_objective``: the
    looked-ahead students' cross-entropy on the meta batch plus ``lam`` times the batch mean of
    every student's beta, the weights the lookahead trained with (they keep the C-Net's graph), so
    the C-Net learns to lean on the labels unless distilling pays off on the meta batch."""

    def __init__(self, lam: float = 1.0) -> None:
        self.lam = lam
        self.seen: list[dict[str, LossWeights]] = []

    @hookimpl
    def collab_distill_meta_objective(self, records, weights):
        self.seen.append(dict(weights))
        ce = sum(rec.supervised_loss.mean() for rec in records.values())
        return ce + self.lam * sum(w.beta.mean() for w in weights.values())


@pytest.mark.parametrize("mode", ["second_order", "finite_difference"])
def test_the_meta_gradient_of_a_penalty_on_the_weights_reaches_the_cnet(tmp_path, teacher_file, mode):
    cnet = CNet(use_image=False, use_losses=True, hidden=8, mix=(0.3, 0.7, 0.0), gamma=False)
    objective = BetaPenalty(lam=1.0)
    engine = make_engine(tmp_path, teacher_file, [cnet, objective], meta=BilevelConfig(every_n_steps=1, hypergradient=mode))
    batch = ready(engine)
    meta_batch = engine.task.move_batch(next(iter(engine.loaders["meta"][0])), engine.fabric)
    teachers = engine.teacher_records(batch)
    params, with_penalty, _ = engine.bilevel.gradients(engine.fabric, batch, teachers, None, meta_batch=meta_batch)
    seen = objective.seen[-1]
    assert set(seen) == {"xxs", "xs"} and all(w.beta.requires_grad for w in seen.values())  # with the C-Net's graph
    assert seen["xs"].beta.shape == (batch["targets"].shape[0],)
    objective.lam = 0.0
    _, without, _ = engine.bilevel.gradients(engine.fabric, batch, teachers, None, meta_batch=meta_batch)

    # the penalty's own gradient, d/dphi lam * sum_s mean(beta_s), from the weights the lookahead used
    students, _ = records_of(engine, batch)
    weights = cnet.collab_distill_loss_weights(engine=engine, batch=batch, records=students, teacher_records=teachers)
    penalty = sum(w.beta.mean() for w in weights.values())
    expected = torch.autograd.grad(penalty, params, allow_unused=True)
    expected = [torch.zeros_like(p) if g is None else g for p, g in zip(params, expected)]
    assert sum(float(g.abs().sum()) for g in expected) > 0
    for a, b, e in zip(with_penalty, without, expected):
        torch.testing.assert_close(a - b, e, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------- 1. answers checked, each named


def _good(records):
    return {s: LossWeights.constant_weights(r.num_images, 1.0, 0.0, 0.0, r.logits.device) for s, r in records.items()}


def _bad_weights(kind, records):
    """A loss-weight answer that is wrong in the way ``kind`` says."""
    out = _good(records)
    n, device = next(iter(records.values())).num_images, next(iter(records.values())).logits.device
    ones, zeros = torch.ones(n, device=device), torch.zeros(n, device=device)
    student = next(iter(records))
    if kind == "list":
        return [out[s] for s in records]
    out[student] = {
        "float": 0.5,
        "dict": {"alpha": 1.0, "beta": 0.0, "gamma": 0.0},
        "tensor": torch.ones(n, 3, device=device),
        "0-d": LossWeights(torch.tensor(1.0), zeros, zeros),
        "shape": LossWeights(ones, torch.ones(n + 1, device=device), zeros),
        "integer": LossWeights(ones, zeros, torch.zeros(n, dtype=torch.long, device=device)),
        "units": LossWeights(ones, ones, zeros, unit_beta=torch.ones(n, 2, device=device)),
        "term": LossWeights(ones, zeros, zeros, terms={"x": torch.ones(2, device=device)}),
        "constant": LossWeights(ones, zeros, zeros, constant=(1.0, 0.0)),  # type: ignore[arg-type]
        "negative": LossWeights.constant_weights(n, 1.0, -0.5, 0.0, device),
    }.get(kind, out[student])
    if kind == "nobody":
        out["nobody"] = out[student]
    return out


WRONG_WEIGHTS = {
    "float": "with a float for 'xxs'; expected a LossWeights per student",
    "dict": "with a dict for 'xxs'; expected a LossWeights per student",
    "tensor": "with a tensor of shape (32, 3) and dtype float32 for 'xxs'; expected a LossWeights per student",
    "0-d": "with alpha a tensor of shape () and dtype float32 for 'xxs'; expected a floating-point tensor of shape "
           "[num_images] = (32,)",
    "shape": "with beta a tensor of shape (33,) and dtype float32 for 'xxs'; expected a floating-point tensor of shape "
             "[num_images] = (32,)",
    "integer": "with gamma a tensor of shape (32,) and dtype int64 for 'xxs'",
    "units": "with unit_beta a tensor of shape (32, 2) and dtype float32 for 'xxs'; expected a floating-point tensor of "
             "shape [units]",
    "term": "with terms['x'] a tensor of shape (2,) and dtype float32 for 'xxs'",
    "constant": "with constant=(1.0, 0.0) for 'xxs'; expected constant as (alpha, beta, gamma)",
    "nobody": "with weights for 'nobody', which is not a student; expected weights for the students ['xs', 'xxs']",
    "list": "with a list; expected a mapping {student: LossWeights}",
    "negative": "with a negative beta for 'xxs' at step 0; expected weights >= 0",
}


class BadWeights(Plugin):
    """Loss weights that are wrong as ``kind`` says (good ones while ``kind`` is None)."""

    def __init__(self, kind=None) -> None:
        self.kind = kind

    @hookimpl
    def collab_distill_loss_weights(self, records):
        return _good(records) if self.kind is None else _bad_weights(self.kind, records)


def test_wrong_loss_weights_on_the_first_step_name_the_plugin_the_hook_and_what_was_expected(tmp_path):
    plugin = BadWeights("shape")
    engine = make_engine(tmp_path, None, [plugin])
    batch = ready(engine)
    students, teachers = records_of(engine, batch)
    with pytest.raises(PluginAnswerError) as err:
        engine.cohort_loss(batch, students, teachers)
    assert str(err.value).startswith("plugin 'BadWeights#0' answered collab_distill_loss_weights " + WRONG_WEIGHTS["shape"])
    assert (err.value.plugin, err.value.hook) == ("BadWeights#0", "collab_distill_loss_weights")
    assert isinstance(err.value, ConfigError)  # the CLI prints it as one line


def test_wrong_loss_weights_on_a_later_step_are_named_by_asking_each_provider_alone(tmp_path):
    plugin = BadWeights()
    engine = make_engine(tmp_path, None, [plugin, ConstantConsensus()])
    batch = ready(engine)
    students, teachers = records_of(engine, batch)
    engine.cohort_loss(batch, students, teachers)  # the first step: good weights
    for kind, expected in WRONG_WEIGHTS.items():
        plugin.kind = kind
        with pytest.raises(PluginAnswerError) as err:
            engine.cohort_loss(batch, students, teachers)
        assert str(err.value).startswith(f"plugin 'BadWeights#0' answered collab_distill_loss_weights {expected}"), kind
        assert err.value.plugin == "BadWeights#0", kind


class PerImageWeights(Plugin):
    """Per-image weights (tensors, no ``constant``): alpha 1, beta 0.5, and from training step
    ``after`` on ``value`` in beta's first image. Counts its calls in the training phase."""

    def __init__(self, after: int = 0, value: float = -0.5) -> None:
        self.after, self.value, self.steps = after, value, []

    @hookimpl
    def collab_distill_loss_weights(self, engine, records, phase):
        if phase == "train":
            self.steps.append(engine.global_step)
        out = {}
        for student, rec in records.items():
            n, device = rec.num_images, rec.logits.device
            beta = torch.full((n,), 0.5, device=device)
            if engine.global_step >= self.after:
                beta[0] = self.value
            out[student] = LossWeights(torch.ones(n, device=device), beta, torch.zeros(n, device=device))
        return out


@pytest.mark.parametrize("after", [0, 1])
def test_negative_per_image_weights_are_found_without_a_host_sync_per_step(tmp_path, teacher_file, after):
    """Tensor weights are judged on the device: on the first step at once, later when the NaN
    guard reads its flags (logging steps, every 3rd here), naming the step they went wrong."""
    plugin = PerImageWeights(after=after)
    engine = make_engine(tmp_path, teacher_file, [plugin], max_steps=6, log_every_n_steps=3)
    with pytest.raises(PluginAnswerError) as err:
        engine.fit()
    assert str(err.value).startswith(f"plugin 'PerImageWeights#0' answered collab_distill_loss_weights with a negative "
                                     f"beta for 'xxs' at step {after}; expected weights >= 0"), str(err.value)
    # found on the first step itself, else at the logging step 2 (steps 0, 1, 2 ran)
    assert plugin.steps == ([0] if after == 0 else [0, 1, 2])


class Targets(Plugin):
    """A soft target (``hook='soft'``) or consensus answer that is wrong as ``kind`` says."""

    def __init__(self, kind, hook="soft") -> None:
        self.kind, self.hook = kind, hook

    def answer(self, records, temperature):
        out = {s: SoftTarget.from_logits(r.logits, temperature) for s, r in records.items()}
        first = next(iter(records))
        if self.kind == "nobody":
            out["nobody"] = out[first]
        elif self.kind == "classes":
            out[first] = SoftTarget(torch.softmax(torch.zeros(out[first].probs.shape[0], 3), -1))
        elif self.kind == "flat":
            out[first] = SoftTarget(out[first].probs[0])
        elif self.kind == "tensor":
            out[first] = out[first].probs  # type: ignore[assignment]
        return out

    @hookimpl
    def collab_distill_soft_targets(self, records, temperature):
        return self.answer(records, temperature) if self.hook == "soft" else None

    @hookimpl
    def collab_distill_consensus_targets(self, records, temperature):
        return self.answer(records, temperature) if self.hook == "consensus" else None


@pytest.mark.parametrize("hook", ["soft", "consensus"])
@pytest.mark.parametrize("kind, expected", [
    ("nobody", "with a target for 'nobody', which is not a student; expected targets for the students ['xs', 'xxs']"),
    ("classes", "with probabilities a tensor of shape (32, 3) and dtype float32 for 'xxs'; expected floating-point "
                "probabilities of shape [units, classes] = (32, 10), as the student's logits"),
    ("flat", "with probabilities a tensor of shape (10,) and dtype float32 for 'xxs'"),
    ("tensor", "with a tensor of shape (32, 10) and dtype float32 for 'xxs'; expected a SoftTarget per student"),
])
def test_wrong_targets_name_the_plugin_and_the_hook(tmp_path, hook, kind, expected):
    mix = (0.5, 0.5, 0.0) if hook == "soft" else (0.5, 0.0, 0.5)
    engine = make_engine(tmp_path, None, [FixedLossWeights(*mix), Targets(kind, hook)])
    batch = ready(engine)
    students, teachers = records_of(engine, batch)
    name = f"collab_distill_{'soft' if hook == 'soft' else 'consensus'}_targets"
    with pytest.raises(PluginAnswerError, match="^" + re.escape(f"plugin 'Targets#1' answered {name} {expected}")):
        engine.cohort_loss(batch, students, teachers)


class Auxiliary(Plugin):
    """An auxiliary loss ``key`` that is wrong as ``kind`` says from training step ``after`` on."""

    def __init__(self, kind, key="xxs/extra", after=0) -> None:
        self.kind, self.key, self.after = kind, key, after

    @hookimpl
    def collab_distill_auxiliary_losses(self, engine, records):
        rec = records[self.key.split("/")[0]] if "/" in self.key else next(iter(records.values()))
        value = 0.01 * rec.logits.pow(2).mean()
        if engine.global_step >= self.after:
            value = {"float": 0.5, "vector": 0.01 * rec.logits.pow(2).mean(1), "integer": torch.tensor(1),
                     "nan": value * float("nan"), "good": value}[self.kind]
        return {self.key: value}


@pytest.mark.parametrize("kind, expected", [
    ("float", "with a float for the term 'xxs/extra'; expected a scalar (0-d) floating-point tensor per term"),
    ("vector", "with a tensor of shape (32,) and dtype float32 for the term 'xxs/extra'; expected a scalar (0-d)"),
    ("integer", "with a tensor of shape () and dtype int64 for the term 'xxs/extra'"),
])
@pytest.mark.parametrize("step", ["first", "later"])
def test_an_auxiliary_loss_that_is_no_scalar_tensor_names_its_plugin(tmp_path, kind, expected, step):
    plugins = [FixedLossWeights(), Auxiliary("good", "xs/fine"), Auxiliary(kind, after=0 if step == "first" else 1)]
    engine = make_engine(tmp_path, None, plugins)
    batch = ready(engine)
    students, teachers = records_of(engine, batch)
    if step == "later":
        engine.cohort_loss(batch, students, teachers)
        engine.loop.global_step = 1
    with pytest.raises(PluginAnswerError, match="^" + re.escape(f"plugin 'Auxiliary#2' answered "
                                                                f"collab_distill_auxiliary_losses {expected}")):
        engine.cohort_loss(batch, students, teachers)


@pytest.mark.parametrize("after", [0, 1])
def test_a_nan_auxiliary_loss_is_blamed_on_its_plugin(tmp_path, after):
    plugins = [FixedLossWeights(), Auxiliary("good", "xs/fine"), Auxiliary("nan", "xxs/broken", after=after)]
    engine = make_engine(tmp_path, None, plugins, max_steps=6, log_every_n_steps=3)
    with pytest.raises(NonFiniteLossError) as err:
        engine.fit()
    found = 0 if after == 0 else 2  # the first step checks at once; later, the logging step 2
    assert str(err.value).startswith(f"non-finite loss at epoch 0 step {after}: the auxiliary loss 'xxs/broken' from plugin "
                                     f"'Auxiliary#2' became NaN/inf at step {after}; collab_distill_auxiliary_losses must "
                                     "return a finite scalar tensor per term"), str(err.value)
    assert (err.value.plugin, err.value.hook) == ("Auxiliary#2", "collab_distill_auxiliary_losses")
    assert engine.global_step == found  # the step that found it did not finish


def cli_fit(tmp_path, capsys, plugin: str) -> tuple[int, str]:
    """``collab-distill fit`` of the tiny digits config with one plugin of ``bad_input_plugins``: (exit code, stderr)."""
    config = tmp_path / "config.yaml"
    config.write_text(tiny_digits_yaml(extra=f"plugins: [{{class_path: bad_input_plugins.{plugin}}}]\n"))
    rc = main(["fit", "--config", str(config), "--trainer.root_dir", str(tmp_path / "runs")])
    return rc, capsys.readouterr().err


def test_the_cli_prints_a_wrong_answer_as_one_error_line(tmp_path, capsys):
    rc, err = cli_fit(tmp_path, capsys, "WrongShapeWeights")
    assert rc == 2, err
    assert err == ("collab-distill: error: plugin 'WrongShapeWeights#0' answered collab_distill_loss_weights with beta a "
                   "tensor of shape (33,) and dtype float32 for 's'; expected a floating-point tensor of shape "
                   "[num_images] = (32,)\n"), err


# ---------------------------------------------------------------------------- 2. a NaN from a plugin's weights is blamed on it


@pytest.mark.parametrize("weights", ["per_image", "numbers"])
def test_a_nan_from_a_plugins_loss_weights_is_blamed_on_that_plugin(tmp_path, teacher_file, weights):
    """Per-image weights are read on the device at the next logging step (every 3rd), numbers at
    once; either way the message names the plugin and the step, not the learning rate."""
    plugin = PerImageWeights(after=1, value=float("nan")) if weights == "per_image" else NonFiniteLossWeights(after_step=1)
    engine = make_engine(tmp_path, teacher_file, [plugin], max_steps=6, log_every_n_steps=3)
    with pytest.raises(NonFiniteLossError) as err:
        engine.fit()
    message, name = str(err.value), type(plugin).__name__ + "#0"
    which = "beta" if weights == "per_image" else "alpha"
    assert message.startswith(f"non-finite loss at epoch 0 step 1: the loss weights from plugin '{name}' became NaN/inf "
                              f"at step 1 ({which} of 'xxs'; collab_distill_loss_weights must return finite weights >= 0), "
                              "so xxs/loss is NaN/inf"), message
    assert "Lower optimizer.init_args.lr" not in message and "No checkpoint had been written yet." in message
    assert (err.value.plugin, err.value.hook) == (name, "collab_distill_loss_weights")
    assert engine.global_step == (2 if weights == "per_image" else 1)


def test_the_cli_blames_a_nan_on_the_plugin_whose_weights_caused_it(tmp_path, capsys):
    rc, err = cli_fit(tmp_path, capsys, "NaNImageWeights")
    assert rc == 1, err
    assert err.count("error:") == 1 and "Traceback" not in err, err
    assert err.startswith("collab-distill: error: non-finite loss at epoch 0 step 1: the loss weights from plugin "
                          "'NaNImageWeights#0' became NaN/inf at step 1 (beta of 's'"), err
