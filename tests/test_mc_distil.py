"""MC-Distil's plugins: PooledStudent (eq. 4), the C-Net and its bilevel training."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from collab_distill import unwrap
from collab_distill.meta import BilevelConfig
from collab_distill.plugins.fixed_weights import FixedLossWeights
from collab_distill.plugins.mc_distil import CNet, PooledStudent, largest_spread, pooled_student_logits
from collab_distill.records import Knowledge
from collab_distill.tasks.classification import ResNet
from test_engine import make_engine, ready, records_of
from test_report import store_sections


def test_pooled_student_is_eq4_on_hand_made_logits():
    logits = torch.tensor([
        [[1.0, 5.0, -2.0], [0.0, 0.0, 3.0]],   # student a, units 0 and 1
        [[4.0, 2.0, -1.0], [2.0, -1.0, 1.0]],  # student b
        [[0.0, 3.0, -3.0], [1.0, 1.0, 0.5]],   # student c
    ])
    labels = torch.tensor([1, 2])
    expected = torch.tensor([
        [0.0, 5.0, -3.0],  # true class 1: max(5,2,3); others: min
        [0.0, -1.0, 3.0],  # true class 2: max(3,1,0.5); others: min
    ])
    torch.testing.assert_close(pooled_student_logits(logits, labels), expected)
    unlabeled = pooled_student_logits(logits, torch.tensor([-1, 2]))
    torch.testing.assert_close(unlabeled[0], logits[:, 0].min(0).values)

    records = {n: Knowledge.for_images(logits[i].clone().requires_grad_(), labels) for i, n in enumerate("abc")}
    targets = PooledStudent().collab_distill_consensus_targets(records, temperature=2.0)
    assert set(targets) == {"a", "b", "c"}
    torch.testing.assert_close(targets["a"].probs, torch.softmax(expected / 2.0, -1))
    assert not targets["a"].probs.requires_grad


def cnet(**kw):
    return CNet(backbone=ResNet("xxs"), embedding_dim=8, **kw)


@pytest.mark.parametrize("independent", [False, True])
def test_cnet_meta_step_reaches_head_and_backbone(tmp_path, teacher_file, independent):
    plugin = cnet(independent=independent, gamma=not independent, lr=1e-2, weight_decay=0.0)
    plugins = [plugin] + ([] if independent else [PooledStudent()])
    engine = make_engine(tmp_path, teacher_file, plugins, meta=BilevelConfig(every_n_steps=1))
    batch = ready(engine)
    students, teachers = records_of(engine, batch)
    weights = plugin.weights(engine, batch, students)
    assert set(weights) == {"xxs", "xs"} and weights["xs"].shape == (len(batch["targets"]), 3)
    # an untrained C-Net gives every image exactly its starting mix
    assert torch.equal(weights["xs"], torch.tensor(plugin.mix).expand_as(weights["xs"]))
    before = {k: v.detach().clone() for k, v in plugin.module.named_parameters()}
    engine.meta_step(batch, teachers, None)
    moved = {k for k, v in plugin.module.named_parameters() if not torch.equal(v, before[k])}
    assert any(".head." in k for k in moved), "the C-Net's head is trained"
    # the head starts at zero, so the backbone's first meta-gradient is zero; from the second on it is not
    assert not any(".backbone." in k for k in moved)
    engine.meta_step(batch, teachers, None)
    moved = {k for k, v in plugin.module.named_parameters() if not torch.equal(v, before[k])}
    assert any(".backbone." in k for k in moved), "the meta-gradient reaches the backbone"
    engine.flush_meta_history()  # meta steps are read on the host at logging steps
    assert engine.meta_history[-1]["grad_norm"] > 0 and len(engine.meta_history) == 2


@pytest.mark.parametrize("activation", ["sigmoid", "softplus", "softmax"])
def test_unnormalised_activations(tmp_path, teacher_file, activation):
    plugin = cnet(normalize="none", activation=activation, scale=2.0)
    engine = make_engine(tmp_path, teacher_file, [plugin])
    batch = ready(engine)
    students, _ = records_of(engine, batch)
    w = plugin.weights(engine, batch, students)["xxs"]
    assert (w >= 0).all()
    if activation == "softmax":
        torch.testing.assert_close(w.sum(1), torch.full((w.shape[0],), 2.0))
    if activation == "sigmoid":
        assert (w < 2.0).all()


@pytest.mark.parametrize("inputs", [{}, {"use_losses": True, "use_label": True, "use_image": False, "hidden": 16},
                                    {"use_losses": True, "use_logits": True, "independent": True, "gamma": False}])
def test_normalised_weights_cannot_change_the_loss_scale(tmp_path, teacher_file, inputs):
    """Whatever the C-Net's parameters, each student's alpha + beta + gamma has batch mean
    sum(mix): the meta step can move weight between images and terms, never scale the loss."""
    plugin = cnet(**inputs)
    engine = make_engine(tmp_path, teacher_file, [plugin] + ([PooledStudent()] if plugin.gamma else []))
    batch = ready(engine)
    students, teachers = records_of(engine, batch)
    torch.manual_seed(3)
    with torch.no_grad():
        for p in plugin.module.parameters():
            p.normal_(std=0.3)
    weights = plugin.weights(engine, batch, students, teachers)
    budget = sum(plugin.mix)
    for w in weights.values():
        assert w.min() >= 0 and w.std(dim=0).max() > 0.05  # the weights differ between images...
        torch.testing.assert_close(w.sum(dim=1).mean(), torch.tensor(budget), rtol=1e-5, atol=1e-6)  # ...the budget does not
    if not plugin.gamma:
        assert all(float(w[:, 2].abs().max()) == 0.0 for w in weights.values())
    # and so the budget's gradient with respect to the C-Net is zero
    total = sum(w.sum(dim=1).mean() for w in plugin.weights(engine, batch, students, teachers).values())
    grads = torch.autograd.grad(total, [p for p in plugin.module.parameters()], allow_unused=True)
    assert max(float(g.abs().max()) for g in grads if g is not None) < 1e-5


def fit_weights(engine):
    engine.fit()
    return {n: {k: v.clone() for k, v in unwrap(m).state_dict().items()} for n, m in engine.students.items()}


def test_gamma_off_reproduces_nops_exactly(tmp_path, teacher_file):
    meta = BilevelConfig(every_n_steps=3)
    with_ps = fit_weights(make_engine(tmp_path, teacher_file, [cnet(gamma=False), PooledStudent()], meta=meta, name="a"))
    nops = fit_weights(make_engine(tmp_path, teacher_file, [cnet(gamma=False)], meta=meta, name="b"))
    for name in nops:
        for key, value in nops[name].items():
            assert torch.equal(value, with_ps[name][key]), f"{name}.{key}"


def test_cnet_started_at_the_kd_mix_gives_kds_steps_exactly(tmp_path, teacher_file):
    """A C-Net that never learns is plain KD, bit for bit: its zero head gives every image the
    KD mix (0.3, 0.7), and the batch rescaling leaves it unchanged."""
    plugin = cnet(gamma=False)
    engine = make_engine(tmp_path, teacher_file, [plugin], meta=BilevelConfig(every_n_steps=4), name="c")
    engine.build()
    plugin.module.requires_grad_(False)  # frozen: the engine skips its meta steps
    learned = fit_weights(engine)
    fixed = fit_weights(make_engine(tmp_path, teacher_file, [FixedLossWeights(0.3, 0.7, 0.0)], name="d"))
    for name in fixed:
        for key, value in fixed[name].items():
            assert torch.equal(learned[name][key], value), f"{name}.{key}"


def test_inert_weights_warn_and_trained_weights_do_not(tmp_path, teacher_file):
    """A C-Net without meta steps weighs every image alike: the fit warns; one that is trained
    (loss-aware, a meta step every step) spreads its weights and does not."""
    frozen = make_engine(tmp_path, teacher_file, [cnet(gamma=False)], meta=BilevelConfig(every_n_steps=10_000), name="inert")
    with pytest.warns(UserWarning, match="stayed inert"):
        frozen.fit()
    assert json.loads((frozen.run_dir / "results.json").read_text())["meta"]["steps"] == 1  # only step 0
    import warnings

    trained = make_engine(tmp_path, teacher_file, [cnet(gamma=False, use_losses=True, lr=5e-2)],
                          meta=BilevelConfig(every_n_steps=1), name="trained", max_epochs=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        trained.fit()
    summary = json.loads((trained.run_dir / "plugins" / "cnet" / "summary.json").read_text())
    assert largest_spread(summary["val"]["students"]) > CNet().inert_threshold
    meta = json.loads((trained.run_dir / "results.json").read_text())["meta"]
    assert meta["steps"] == trained.global_step and meta["grad_norm_median"] > 0 and meta["zero_grad_share"] < 0.5


def test_short_mc_distil_fit_on_digits_learns(tmp_path, teacher_file):
    engine = make_engine(tmp_path, teacher_file, [cnet(), PooledStudent()], meta=BilevelConfig(every_n_steps=5),
                         max_epochs=3, subset=None)
    engine.build()
    engine.ready_training()
    untrained = engine.evaluate("test")
    engine = make_engine(tmp_path, teacher_file, [cnet(), PooledStudent()], meta=BilevelConfig(every_n_steps=5),
                         max_epochs=3, subset=None)
    results = engine.fit()
    for name in ("xxs", "xs"):
        assert results["students"][name]["last"]["test_top1"] > untrained[name]["top1"] + 30


def test_resume_restores_cnet_and_its_optimizer(tmp_path, teacher_file):
    meta = BilevelConfig(every_n_steps=2)
    first = make_engine(tmp_path, teacher_file, [cnet(), PooledStudent()], meta=meta, max_epochs=2, max_steps=7, name="r")
    first.fit()
    step7 = tmp_path / "step7.ckpt"
    shutil.copy(first.run_dir / "checkpoints" / "last.ckpt", step7)  # resuming continues (and updates) that run
    saved = torch.load(step7, weights_only=False)
    assert saved["meta_optimizers"]["cnet"]["state"], "Adam state of the C-Net is saved"
    plugin = cnet()
    second = make_engine(tmp_path, teacher_file, [plugin, PooledStudent()], meta=meta, max_epochs=2, name="r")
    second.fit(resume=str(first.run_dir / "checkpoints" / "last.ckpt"))
    resumed = torch.load(second.run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert resumed["loop"]["global_step"] > 7
    # restoring the step-7 file puts back exactly the saved C-Net and its Adam state
    third_plugin = cnet()
    third = make_engine(tmp_path, teacher_file, [third_plugin, PooledStudent()], meta=meta, max_epochs=2, name="r2")
    third.open_run(resume=str(step7))
    for key, value in saved["meta_modules"]["cnet"].items():
        assert torch.equal(third_plugin.module.state_dict()[key], value)
    assert third.meta_optimizers["cnet"].state_dict()["state"].keys() == saved["meta_optimizers"]["cnet"]["state"].keys()


def test_report_renders_results_weights_and_accuracy_vs_macs(tmp_path, teacher_file):
    from collab_distill.report import write_report
    from collab_distill.task import ConfigError

    engine = make_engine(tmp_path, teacher_file, [cnet(), PooledStudent()], meta=BilevelConfig(every_n_steps=2),
                         max_epochs=1, name="rep", loggers=["csv"], log_every_n_steps=2)
    results = engine.fit()
    weights = (engine.run_dir / "plugins" / "cnet" / "val_weights.csv").read_text().splitlines()
    assert weights[0] == "index,label,student,alpha,beta,gamma"
    val_size = len(engine.task.dataset("val"))
    assert len(weights) - 1 == 2 * val_size  # every val image, for both students
    store_sections(engine, results)
    md, page = write_report(engine.run_dir)
    text = md.read_text()
    assert "| xxs |" in text and "| t (teacher) |" in text and "## MC-Distil: the C-Net's loss weights" in text
    for figure in ("weights_over_training.png", "meta_steps.png", "cnet_val_weights_distribution.png", "accuracy_vs_macs.png",
                   "cnet_val_extremes.png"):
        assert (md.parent / figure).stat().st_size > 1000 and figure in text and figure in page.read_text()
    stopped = make_engine(tmp_path, teacher_file, [cnet()], max_epochs=2, max_steps=2, name="unfinished")
    stopped.fit()
    with pytest.raises(ConfigError, match="did not finish"):
        write_report(stopped.run_dir)


def test_every_meta_step_is_logged(tmp_path, teacher_file):
    import csv

    from collab_distill import Plugin, hookimpl

    class Steps(Plugin):
        """What meta_step_end and train_step_end say the step is."""

        def __init__(self):
            self.meta, self.train = [], []

        @hookimpl
        def collab_distill_meta_step_end(self, step):
            self.meta.append(step)

        @hookimpl
        def collab_distill_train_step_end(self, step):
            self.train.append(step)

    seen = Steps()
    engine = make_engine(tmp_path, teacher_file, [cnet(), PooledStudent(), seen], meta=BilevelConfig(every_n_steps=4),
                         max_epochs=1, name="metalog", loggers=["csv"], log_every_n_steps=10)
    engine.fit()
    with (engine.run_dir / "logs" / "csv" / "metrics.csv").open() as f:
        steps = [int(r["step"]) for r in csv.DictReader(f) if r.get("train/meta/loss")]
    assert steps == list(range(1, engine.global_step + 1, 4))
    # one numbering: the hook, the logged metrics and meta_history name the same step
    assert seen.meta == steps == [h["step"] for h in engine.meta_history] and set(seen.meta) <= set(seen.train)


def test_saved_cnet_is_applied_to_a_split_by_validate_and_test(tmp_path, cli_env, capsys):
    """``validate``/``test`` of a finished run restore its C-Net: applied to val it gives exactly
    the weights written at the end of fit; applied to test it covers every test image; a second
    evaluation goes to a new folder and an explicit non-empty --output_dir is refused."""
    import csv

    from conftest import REPO, digits_args
    from test_cli import run_cli

    method = str(REPO / "examples" / "methods" / "mc_distil.yaml")
    extra = ("--config", method, "--meta.every_n_steps", "3", "--trainer.warmup_epochs", "0",
             "--task.init_args.data.init_args.subset", "400")  # the test split stays whole
    run_cli(digits_args(tmp_path, "mc", epochs=1, extra=extra), cli_env)
    run = tmp_path / "mc" / "version_0"
    ckpt = str(run / "checkpoints" / "last.ckpt")
    from collab_distill.cli import main

    assert main(["validate", "--config", str(run / "config.yaml"), "--ckpt_path", ckpt]) == 0  # in-process: faster
    applied = run / "evaluations" / "val-last" / "plugins" / "cnet"
    assert (applied / "val_weights.csv").read_text() == (run / "plugins" / "cnet" / "val_weights.csv").read_text()
    assert (applied / "val_extremes.png").stat().st_size > 1000

    assert main(["test", "--config", str(run / "config.yaml"), "--ckpt_path", ckpt]) == 0
    with (run / "evaluations" / "test-last" / "plugins" / "cnet" / "test_weights.csv").open() as f:
        rows = list(csv.DictReader(f))
    results = json.loads((run / "results.json").read_text())
    from collab_distill.tasks.classification import Digits

    test_size = Digits().setup(0).extra["split_sizes"]["test"]
    assert len(rows) == test_size * len(results["students"])
    assert all(float(r[w]) > 0 for r in rows for w in ("alpha", "beta", "gamma"))
    # normalised weights: alpha + beta + gamma averages to the 0.3/0.5/0.2 mix's budget of 1 in every batch
    totals = [sum(float(r[w]) for w in ("alpha", "beta", "gamma")) for r in rows]
    assert sum(totals) / len(totals) == pytest.approx(1.0, abs=0.05)
    metrics = json.loads((run / "evaluations" / "test-last" / "metrics.json").read_text())["metrics"]
    for name, r in results["students"].items():
        assert metrics[name]["top1"] == pytest.approx(r["last"]["test_top1"])
    assert main(["test", "--config", str(run / "config.yaml"), "--ckpt_path", ckpt]) == 0
    assert (run / "evaluations" / "test-last-1" / "metrics.json").is_file()  # nothing overwritten
    capsys.readouterr()
    rc = main(["test", "--config", str(run / "config.yaml"), "--ckpt_path", ckpt,
               "--output_dir", str(run / "evaluations" / "test-last")])
    err = capsys.readouterr().err
    assert rc == 2 and "--output_dir" in err and "not empty" in err


def test_with_label_noise_the_cnet_reports_clean_vs_flipped_weights(tmp_path, teacher_file):
    """With noisy training labels the fit applies the C-Net to the training split: a `flipped`
    column, alpha's AUC for clean vs flipped labels and their histograms. A loss-aware C-Net
    trained for a few epochs already gives flipped labels less weight than clean ones."""
    import csv

    from collab_distill.tasks.classification import Digits, ImageClassification, LabelNoise

    # no teacher: the C-Net reweighs each image's label loss (mix 1/0/0), as Meta-Weight-Net does
    plugin = cnet(gamma=False, use_image=False, use_losses=True, hidden=16, mix=(1.0, 0.0, 0.0), lr=1e-2)
    noisy = ImageClassification(Digits(batch_size=32, label_noise=LabelNoise(kind="symmetric", rate=0.4)))
    engine = make_engine(tmp_path, None, [plugin], meta=BilevelConfig(every_n_steps=2), name="noisy", max_epochs=3, task=noisy)
    engine.fit()
    folder = engine.run_dir / "plugins" / "cnet"
    with (folder / "train_weights.csv").open() as f:
        rows = list(csv.DictReader(f))
    flipped = engine.task.dataset("train").flipped
    # every training image the loader serves (it drops the last partial batch), once per student
    xxs = [int(r["index"]) for r in rows if r["student"] == "xxs"]
    assert len(set(xxs)) == len(xxs) > 0.95 * len(flipped) and len(rows) == 2 * len(xxs)
    assert all(int(r["flipped"]) == int(flipped[int(r["index"])]) for r in rows)
    noise = json.loads((folder / "summary.json").read_text())["train"]["label_noise"]
    for student in ("xxs", "xs"):
        assert noise[student]["flipped"] == sum(int(flipped[i]) for i in xxs)
        assert noise[student]["alpha_auc_clean_vs_flipped"] > 0.7
        assert noise[student]["alpha_mean_flipped"] < noise[student]["alpha_mean_clean"]
    assert (folder / "train_alpha_clean_vs_flipped.png").stat().st_size > 1000
    # the report's C-Net section shows the separation and the histograms
    [section] = plugin.collab_distill_report_sections(engine=engine)
    assert "plugins/cnet/train_alpha_clean_vs_flipped.png" in section.figures and "alpha AUC clean vs flipped" in section.text
    # the val split is clean: no flipped column there
    assert "flipped" not in (folder / "val_weights.csv").read_text().splitlines()[0]
