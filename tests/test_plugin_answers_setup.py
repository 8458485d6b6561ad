"""More plugin answers checked, each a PluginAnswerError naming the plugin and the hook (issue 22):
the set-up hooks' answers (feature requests, declared terms, meta modules) at build, before any
file is written; a bare tensor of targets, an auxiliary term of no student and a meta objective
that cannot be differentiated at the first step; state that overwrites another plugin's; a
BaseException from a hook, named like any exception."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from collab_distill import LossWeights, MetaModule, Plugin, hookimpl
from collab_distill.answers import PluginAnswerError, plugin_state
from collab_distill.meta import BilevelConfig
from collab_distill.plugin_manager import NamedHookRelay, PluginError, make_plugin_manager
from collab_distill.plugins.fixed_weights import FixedLossWeights
from test_engine import make_engine, ready, records_of


def _error(plugin: str, hook: str, rest: str) -> str:
    return "^" + re.escape(f"plugin '{plugin}' answered collab_distill_{hook} with {rest}")


# ---------------------------------------------------------------------------- set-up hooks, at build


class FeatureAsStrings(Plugin):
    @hookimpl
    def collab_distill_feature_requests(self):
        return ["layer3"]


class TermsAsString(Plugin):
    @hookimpl
    def collab_distill_declare_loss_terms(self):
        return "hint"  # read letter by letter, it would declare 'h', 'i', 'n', 't'


class TermsUndeclared(Plugin):
    @hookimpl
    def collab_distill_loss_terms(self, records):
        return {s: {"surprise": r.logits.pow(2).mean(dim=1)} for s, r in records.items()}


class MetaModules(Plugin):
    """``meta_modules`` answers ``modules`` as they are (a sound plugin, a bare module, no parameters)."""

    def __init__(self, *modules) -> None:
        self.modules = modules

    @hookimpl
    def collab_distill_meta_modules(self):
        return list(self.modules)


@pytest.mark.parametrize("plugin, hook, expected", [
    (FeatureAsStrings(), "feature_requests", "'layer3' (a str); expected a list of FeatureRequest(member, module path)"),
    (TermsAsString(), "declare_loss_terms", "'hint' (a str); expected a list of term names"),
    (MetaModules(nn.Linear(4, 2)), "meta_modules", "a Linear (torch.nn.modules.linear.Linear); expected a list of "
                                                   "MetaModule(name, module)"),
    (MetaModules(MetaModule("relu", nn.ReLU())), "meta_modules", "the meta module 'relu' (ReLU), which has no parameters; "
                                                                 "expected meta modules with parameters"),
])
def test_a_wrong_set_up_answer_stops_the_build_naming_the_plugin(tmp_path, plugin, hook, expected):
    sound = MetaModules(MetaModule("fine", nn.Linear(2, 1)))  # asked alone too: not blamed
    engine = make_engine(tmp_path, None, [sound, plugin])
    with pytest.raises(PluginAnswerError, match=_error(f"{type(plugin).__name__}#1", hook, expected)) as err:
        engine.build()
    assert err.value.hook == f"collab_distill_{hook}"
    assert not list(tmp_path.iterdir())  # nothing written


def test_terms_returned_but_never_declared_stop_the_build(tmp_path):
    engine = make_engine(tmp_path, None, [FixedLossWeights(), TermsUndeclared()])
    with pytest.raises(PluginAnswerError, match=re.escape(
            "plugin 'TermsUndeclared#1' implements collab_distill_loss_terms but declares no term "
            "(collab_distill_declare_loss_terms), so its terms would never be asked for")):
        engine.build()


# ---------------------------------------------------------------------------- answers at the first step


class TargetsAsATensor(Plugin):
    @hookimpl
    def collab_distill_soft_targets(self, records):
        return torch.softmax(next(iter(records.values())).logits.detach(), dim=-1)


class GhostTerm(Plugin):
    @hookimpl
    def collab_distill_auxiliary_losses(self, records):
        return {"ghost/extra": next(iter(records.values())).logits.pow(2).mean() * 0.0}


@pytest.mark.parametrize("plugins, name, hook, expected", [
    ([FixedLossWeights(1.0, 1.0), TargetsAsATensor()], "TargetsAsATensor#1", "soft_targets",
     "a tensor of shape (32, 10) and dtype float32; expected a mapping {student: SoftTarget}"),
    ([FixedLossWeights(), GhostTerm()], "GhostTerm#1", "auxiliary_losses",
     "the term 'ghost/extra', but 'ghost' is not a student; expected '<student>/<term>' for a student's own term "
     "(students: ['xs', 'xxs']), or a name without '/' for a term of the whole cohort"),
])
def test_a_wrong_loss_answer_names_the_plugin(tmp_path, plugins, name, hook, expected):
    engine = make_engine(tmp_path, None, plugins)
    batch = ready(engine)
    students, teachers = records_of(engine, batch)
    with pytest.raises(PluginAnswerError, match=_error(name, hook, expected)):
        engine.cohort_loss(batch, students, teachers)


class MetaWeights(Plugin):
    """Per-image alpha from a meta-learned layer; the meta objective is wrong as ``kind`` says."""

    def __init__(self, kind: str) -> None:
        self.kind, self.net = kind, nn.Linear(10, 1)

    @hookimpl
    def collab_distill_meta_modules(self):
        return [MetaModule("w", self.net)]

    @hookimpl
    def collab_distill_loss_weights(self, engine, records):
        out = {}
        for s, r in records.items():
            a = torch.sigmoid(engine.meta_modules["w"](r.logits.detach())).squeeze(1)
            out[s] = LossWeights(a, torch.zeros_like(a), torch.zeros_like(a))
        return out

    @hookimpl
    def collab_distill_meta_objective(self, records):
        total = sum(r.supervised_loss for r in records.values())
        return total if self.kind == "vector" else torch.tensor(total.mean().item())


@pytest.mark.parametrize("kind, expected", [
    ("vector", "a tensor of shape (32,) and dtype float32; expected a scalar (0-d) floating-point tensor"),
    ("detached", "a tensor of shape () and dtype float32 without a graph; expected a scalar (0-d) floating-point tensor "
                 "computed from records or weights with their graph (not float(...), .item() or .detach())"),
])
@pytest.mark.parametrize("hypergradient", ["second_order", "finite_difference"])
def test_a_meta_objective_that_cannot_be_differentiated_names_the_plugin(tmp_path, kind, expected, hypergradient):
    engine = make_engine(tmp_path, None, [MetaWeights(kind)], meta=BilevelConfig(every_n_steps=1, hypergradient=hypergradient))
    batch = ready(engine)
    with pytest.raises(PluginAnswerError, match=_error("MetaWeights#0", "meta_objective", expected)):
        engine.bilevel.gradients(engine.fabric, batch, engine.teacher_records(batch), None)


# ---------------------------------------------------------------------------- checkpoint state, exceptions


class Keeps(Plugin):
    @hookimpl
    def collab_distill_save_state(self, state):
        state["keeps"] = {"count": 1}


class Clobbers(Plugin):
    @hookimpl
    def collab_distill_save_state(self, state):
        for key in list(state):
            state[key] = "clobbered"
        state["clobbered"] = True


def test_state_that_overwrites_another_plugins_is_refused_before_the_checkpoint(tmp_path):
    assert plugin_state(make_engine(tmp_path, None, [Keeps(), Clobbers()])) == {"keeps": {"count": 1}, "clobbered": True}
    engine = make_engine(tmp_path, None, [Clobbers(), Keeps()])  # called last registered first: Keeps, then Clobbers
    with pytest.raises(PluginAnswerError, match=re.escape(
            "plugin 'Clobbers#0' replaced or removed the state ['keeps'] that plugin(s) ['Keeps#1'] put there in "
            "collab_distill_save_state; a plugin must only add a key of its own")):
        plugin_state(engine)


class Stop(BaseException):
    pass


class RaisesBaseException(Plugin):
    @hookimpl
    def collab_distill_fit_start(self):
        raise Stop("stop here")


def test_a_base_exception_from_a_hook_is_a_plugin_error_but_ctrl_c_is_not():
    hook = NamedHookRelay(make_plugin_manager([RaisesBaseException()]))
    with pytest.raises(PluginError, match=r"^plugin 'RaisesBaseException#0' failed in hook collab_distill_fit_start: "
                                          r"Stop: stop here$") as err:
        hook.collab_distill_fit_start(engine=None)
    assert isinstance(err.value.__cause__, Stop)

    class Interrupted(Plugin):
        @hookimpl
        def collab_distill_fit_start(self):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        NamedHookRelay(make_plugin_manager([Interrupted()])).collab_distill_fit_start(engine=None)


# ---------------------------------------------------------------------------- state that cannot be saved, before the first step


class StepCounter(Plugin):
    """Counts its steps and keeps a callable in its state, which no checkpoint can hold."""

    def __init__(self) -> None:
        self.steps = 0

    @hookimpl
    def collab_distill_train_step_end(self):
        self.steps += 1

    @hookimpl
    def collab_distill_save_state(self, state):
        state["step_counter"] = {"steps": self.steps, "format": lambda n: f"{n} steps"}


def test_plugin_state_that_cannot_be_saved_stops_the_run_before_its_first_step(tmp_path):
    """It used to be found at the first checkpoint, after an epoch of training that was then lost."""
    counter = StepCounter()
    engine = make_engine(tmp_path, None, [FixedLossWeights(), counter])
    with pytest.raises(Exception, match=re.escape("plugin state state['step_counter']['format'] is a builtins.function")) as err:
        engine.fit()
    assert "Nothing was trained yet" in str(err.value)
    assert counter.steps == 0
    assert not list(tmp_path.iterdir())  # the new run's folder is removed: it saved nothing


class NaNTargets(Plugin):
    """Distils every student towards a target full of NaN."""

    @hookimpl
    def collab_distill_loss_weights(self, records):
        return {n: LossWeights.constant_weights(r.num_images, 1.0, 1.0, 0.0, r.logits.device) for n, r in records.items()}

    @hookimpl
    def collab_distill_soft_targets(self, records):
        from collab_distill import SoftTarget

        return {n: SoftTarget(torch.full_like(r.logits.detach(), float("nan"))) for n, r in records.items()}


def test_soft_targets_with_nan_at_the_first_step_name_the_plugin(tmp_path):
    """It used to be a NaN loss blamed on the learning rate, the data or the teacher."""
    engine = make_engine(tmp_path, None, [NaNTargets()])
    with pytest.raises(PluginAnswerError, match=_error("NaNTargets#0", "soft_targets", "probabilities with NaN/inf for")):
        engine.fit()
    assert not list(tmp_path.iterdir())  # refused at the first step: the new run's folder is removed
