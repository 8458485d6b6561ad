"""Detection distillation on both adapters (torchvision and detectron2), paired over seeds.

For each adapter (``benchmarks/configs/detection_<adapter>.yaml``, the shapes data in COCO's
layout) and each annotation-noise setting (``--noise``):

1. **teacher**: trained once (seed 0, ``teacher_epochs``) as a run whose only student is the
   teacher, on the same (noisy) training split the students see; every student run loads its
   ``last.ckpt``. A finished teacher run is always reused (delete its folder to retrain).
2. **tune**: KD's beta (alpha 1) chosen on **val** (mean last-epoch val AP over the students) on
   the tuning seed ``--tune-seed``, which no table row uses.
3. **runs**: for every seed of ``--seeds`` (the same initial weights and data order for every
   method of one seed): students alone, KD (beta from 2.), MC-Distil as shipped
   (``examples/methods/mc_distil_detection.yaml``, its mix's beta set to KD's), MC-Distil with the
   paper's image-only C-Net (the same, the C-Net reading only the image),
   the fixed-mix control (per student the mean of MC-Distil's logged weights of the same seed as
   constant weights, with PooledStudent: what per-image weighting adds beyond its mean mix), FPN
   imitation + KD (the adapter's ``fpn_imitation*.yaml`` with KD's beta), and optionally
   MC-Distil with per-region weights (``--methods``).
4. **table**: per student, mean ± std over seeds of test AP (last epoch and best-on-val
   weights), paired differences to KD with per-seed wins and the paired t-test's p, the teacher's
   AP, and with noise the C-Net's AUC of alpha separating images with corrupted boxes from clean
   ones; each goal of the issue stated met or not.

Runs are CLI subprocesses (``python -m collab_distill fit``), ``--jobs`` at a time with one thread
each. ``--reuse`` takes the newest finished run of a (method, seed) instead of training it again,
so an interrupted table is finished by running the same command with ``--reuse``. Nothing is
selected on test.

    python benchmarks/detection.py --adapters torchvision detectron2 --seeds 0 1 2 --jobs 2
    python benchmarks/detection.py --noise class_flip=0.4,kind=instance --reuse --jobs 2
    python benchmarks/detection.py --render-only [--noise ...]

Writes ``detection.{json,md}`` (clean) or ``detection_noise.{json,md}`` to ``--out``
(``benchmarks/results``); run folders go to ``--runs-dir`` (``benchmarks/out/detection``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
METHOD_DIR = REPO / "examples" / "methods"
MC_DISTIL = METHOD_DIR / "mc_distil_detection.yaml"

ADAPTERS: dict[str, dict[str, Any]] = {
    "torchvision": {"config": HERE / "configs" / "detection_torchvision.yaml", "fpn": METHOD_DIR / "fpn_imitation.yaml",
                    "teacher_epochs": 24},
    "detectron2": {"config": HERE / "configs" / "detection_detectron2.yaml",
                   "fpn": METHOD_DIR / "fpn_imitation_detectron2.yaml", "teacher_epochs": 30},
}
LABELS = {
    "alone": "students alone",
    "kd": "KD (beta on val)",
    "mc_distil": "MC-Distil (as shipped)",
    "mc_distil_image_only": "MC-Distil, image-only C-Net (paper)",
    "fixed_mix": "fixed mix (MC-Distil's mean weights) + PooledStudent",
    "fpn_kd": "FPN imitation + KD",
    "mc_distil_region": "MC-Distil, per-region weights",
}
DEFAULT_METHODS = ["alone", "kd", "mc_distil", "mc_distil_region", "mc_distil_image_only", "fixed_mix", "fpn_kd"]
KD_BETAS = [0.25, 0.5, 1.0]


# ---------------------------------------------------------------------------------------------
# method files


def _plugins(path: Path) -> list[dict[str, Any]]:
    return yaml.safe_load(path.read_text())["plugins"]


def _write_overlay(folder: Path, name: str, document: dict[str, Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def _fixed(alpha: float, beta: float, gamma: float = 0.0) -> dict[str, Any]:
    return {"class_path": "collab_distill.plugins.fixed_weights.FixedLossWeights",
            "init_args": {"alpha": alpha, "beta": beta, "gamma": gamma}}


def _cnet(plugins: list[dict[str, Any]]) -> dict[str, Any]:
    return next(p for p in plugins if p["class_path"].endswith(".CNet"))


def method_files(adapter: str, beta: float, folder: Path) -> dict[str, list[Path]]:
    """The ``--config`` files of every method (after the adapter's base config). The C-Net
    methods start from KD's mix: the method file's with its beta set to KD's (chosen on val), so
    that they differ from KD only by what the C-Net does per image (and PooledStudent)."""
    shipped = yaml.safe_load(MC_DISTIL.read_text())
    mix = _cnet(shipped["plugins"])["init_args"]["mix"]
    _cnet(shipped["plugins"])["init_args"]["mix"] = [mix[0], beta, mix[2]]
    image_only = json.loads(json.dumps(shipped))
    args = _cnet(image_only["plugins"])["init_args"]
    for key in ("use_losses", "use_unit_losses", "use_logits", "use_label", "per_region", "hidden"):
        args.pop(key, None)
    # the paper's g_phi(x): a small ResNet on the image, at the paper's Adam lr
    args.update(use_image=True, backbone={"class_path": "collab_distill.tasks.classification.ResNet",
                                          "init_args": {"size": "s"}}, embedding_dim=64, lr=1.0e-3)
    region = json.loads(json.dumps(shipped))
    _cnet(region["plugins"])["init_args"]["per_region"] = True
    fpn = [p if not p["class_path"].endswith(".FixedLossWeights") else _fixed(1.0, beta)
           for p in _plugins(ADAPTERS[adapter]["fpn"])]
    return {
        "alone": [_write_overlay(folder, "alone", {"plugins": [_fixed(1.0, 0.0)]})],
        "kd": [_write_overlay(folder, f"kd_beta{beta:g}", {"plugins": [_fixed(1.0, beta)]})],
        "mc_distil": [_write_overlay(folder, f"mc_distil_beta{beta:g}", shipped)],
        "mc_distil_image_only": [_write_overlay(folder, f"mc_distil_image_only_beta{beta:g}", image_only)],
        "mc_distil_region": [_write_overlay(folder, f"mc_distil_region_beta{beta:g}", region)],
        "fpn_kd": [_write_overlay(folder, f"fpn_kd_beta{beta:g}", {"plugins": fpn})],
    }


def mean_logged_weights(run_dir: Path) -> dict[str, list[float]]:
    """Per student the mean over training of the logged batch-mean alpha, beta, gamma."""
    import csv

    files = sorted(run_dir.glob("logs/**/metrics.csv"))
    if not files:
        raise SystemExit(f"{run_dir} has no logs/csv/metrics.csv (the fixed-mix control reads the C-Net's logged weights)")
    with files[0].open() as f:
        rows = list(csv.DictReader(f))
    students = json.loads((run_dir / "results.json").read_text())["students"]
    out = {}
    for student in students:
        out[student] = [statistics.fmean(float(r[f"train/{student}/{term}"]) for r in rows if r.get(f"train/{student}/{term}"))
                        for term in ("alpha", "beta", "gamma")]
    return out


def fixed_mix_file(folder: Path, name: str, weights: dict[str, list[float]]) -> Path:
    """The fixed-mix control: MC-Distil's C-Net replaced by constants, per student the mean of its
    logged weights, with the same PooledStudent target."""
    return _write_overlay(folder, name, {"plugins": [
        {"class_path": "collab_distill.plugins.fixed_weights.FixedLossWeights",
         "init_args": {"per_student": {s: [round(v, 6) for v in w] for s, w in weights.items()}}},
        {"class_path": "collab_distill.plugins.mc_distil.PooledStudent"}]})


# ---------------------------------------------------------------------------------------------
# runs


def noise_tag(noise: Optional[dict[str, Any]]) -> str:
    if not noise:
        return "clean"
    return "noise_" + "_".join(f"{k}{v}" for k, v in sorted(noise.items()))


def parse_noise(text: Optional[str]) -> Optional[dict[str, Any]]:
    """``class_flip=0.4,kind=instance`` -> ``{"class_flip": 0.4, "kind": "instance", "seed": 0}``."""
    if not text or text == "none":
        return None
    out: dict[str, Any] = {}
    for part in text.split(","):
        key, _, value = part.partition("=")
        out[key.strip()] = value.strip() if key.strip() == "kind" else float(value)
    out.setdefault("seed", 0)  # one noisy data set for the teacher and every seed
    out["seed"] = int(out["seed"])
    return out


def _finished(folder: Path) -> Optional[Path]:
    """The newest run under ``folder`` whose results.json says finished."""
    runs = sorted(folder.glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    for run in reversed(runs):
        results = run / "results.json"
        if results.is_file() and json.loads(results.read_text()).get("status") == "finished":
            return run
    return None


def fit(name: str, configs: list[Path], root: Path, seed: int, extra: list[str], reuse: bool, log_dir: Path) -> dict[str, Any]:
    """One CLI fit in ``root / name`` (or the newest finished one with ``reuse``)."""
    folder = root / name
    if reuse and (done := _finished(folder)) is not None:
        return {"run_dir": done, "reused": True}
    cmd = [sys.executable, "-m", "collab_distill", "fit"]
    for config in configs:
        cmd += ["--config", str(config)]
    cmd += ["--seed", str(seed), "--trainer.root_dir", str(root), "--trainer.name", name,
            "--trainer.progress_bar", "false", *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    print("  $ " + " ".join(str(c) for c in cmd[1:]), flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    log = log_dir / f"{name.replace('/', '_')}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed with exit code {proc.returncode}; see {log}\n{proc.stderr[-3000:]}")
    match = re.findall(r"run folder: (\S+)", proc.stdout)
    run_dir = Path(match[-1]) if match else _finished(folder)
    if run_dir is None:
        raise SystemExit(f"{name}: cannot find its run folder; see {log}")
    run_dir = run_dir if run_dir.is_absolute() else REPO / run_dir
    (run_dir / "wall.json").write_text(json.dumps({"wall_s": wall, "command": cmd[1:]}, indent=1))
    print(f"  {name}: {wall:.0f} s", flush=True)
    return {"run_dir": run_dir, "reused": False, "wall_s": wall}


def _results(run: dict[str, Any]) -> dict[str, Any]:
    return json.loads((run["run_dir"] / "results.json").read_text())


def _mean_val(results: dict[str, Any]) -> float:
    return statistics.fmean(r["last"]["val_AP"] for r in results["students"].values())


class Group:
    """One adapter under one noise setting: its teacher, KD tuning and paired runs."""

    def __init__(self, adapter: str, noise: Optional[dict[str, Any]], args: argparse.Namespace) -> None:
        self.adapter, self.noise, self.args = adapter, noise, args
        self.root = args.runs_dir / adapter / noise_tag(noise)
        self.base = ADAPTERS[adapter]["config"]
        self.data = ["--task.init_args.data.init_args.root", str(args.data)]
        if noise:
            spec = ", ".join(f"{k}: {v}" for k, v in noise.items())
            self.data += ["--task.init_args.data.init_args.annotation_noise", "{" + spec + "}"]
        self.epochs = ["--trainer.max_epochs", str(args.epochs)] if args.epochs else []

    def run(self, name: str, configs: list[Path], seed: int, extra: list[str], reuse: Optional[bool] = None) -> dict[str, Any]:
        return fit(name, [self.base, *configs], self.root, seed, [*self.data, *extra],
                   self.args.reuse if reuse is None else reuse, self.root / "logs")

    def student_run(self, name: str, configs: list[Path], seed: int, teacher: dict[str, Any]) -> dict[str, Any]:
        return self.run(name, configs, seed, [*self.epochs, *self.teacher_args(teacher)])

    def teacher(self) -> dict[str, Any]:
        base = yaml.safe_load(self.base.read_text())
        overlay = {"cohort": {"teachers": {}, "students": {"teacher": base["cohort"]["teachers"]["teacher"]["model"]}},
                   "plugins": [_fixed(1.0, 0.0)]}
        configs = [_write_overlay(self.root / "overlays", "teacher", overlay)]
        epochs = ["--trainer.max_epochs", str(self.args.teacher_epochs or ADAPTERS[self.adapter]["teacher_epochs"])]
        return self.run("teacher", configs, 0, epochs, reuse=True)  # a finished teacher is always reused

    def teacher_args(self, teacher: dict[str, Any]) -> list[str]:
        return ["--cohort.teachers.teacher.checkpoint", str(teacher["run_dir"] / "checkpoints" / "last.ckpt"),
                "--cohort.teachers.teacher.train_epochs", "0"]

    def tune(self, teacher: dict[str, Any], pool: ThreadPoolExecutor) -> dict[str, Any]:
        if self.args.kd_beta is not None:
            return {"beta": self.args.kd_beta, "val_AP": {}, "chosen_by": "--kd-beta"}
        folder = self.root / "overlays"
        futures = {beta: pool.submit(self.student_run, f"tune-kd-beta{beta:g}", method_files(self.adapter, beta, folder)["kd"],
                                     self.args.tune_seed, teacher) for beta in KD_BETAS}
        val = {beta: _mean_val(_results(f.result())) for beta, f in futures.items()}
        best = max(val, key=lambda b: val[b])
        print(f"  {self.adapter}/{noise_tag(self.noise)}: KD beta on val (seed {self.args.tune_seed}): "
              + ", ".join(f"{b:g}: {v:.2f}" for b, v in val.items()) + f" -> {best:g}", flush=True)
        return {"beta": best, "val_AP": {f"{b:g}": v for b, v in val.items()}, "chosen_by": f"val, seed {self.args.tune_seed}"}


def run_group(group: Group, pool: ThreadPoolExecutor) -> dict[str, Any]:
    teacher = group.teacher()
    tuning = group.tune(teacher, pool)
    files = method_files(group.adapter, tuning["beta"], group.root / "overlays")
    first = [m for m in group.args.methods if m != "fixed_mix"]
    futures = {(m, s): pool.submit(group.student_run, f"{m}-seed{s}", files[m], s, teacher)
               for s in group.args.seeds for m in first}
    runs = {key: f.result() for key, f in futures.items()}
    if "fixed_mix" in group.args.methods:  # needs MC-Distil's run of the same seed
        overlays = group.root / "overlays"
        futures = {("fixed_mix", s): pool.submit(
            group.student_run, f"fixed_mix-seed{s}",
            [fixed_mix_file(overlays, f"fixed_mix_seed{s}", mean_logged_weights(runs[("mc_distil", s)]["run_dir"]))], s, teacher)
            for s in group.args.seeds}
        runs.update({key: f.result() for key, f in futures.items()})
    teacher_results = _results(teacher)
    per_seed: dict[str, dict[int, Any]] = {m: {} for m in group.args.methods}
    for (m, s), run in runs.items():
        results = _results(run)
        summary_path = run["run_dir"] / "plugins" / "cnet" / "summary.json"
        per_seed[m][s] = {
            "students": {name: {"last": r["last"], "best_on_val": r["best_on_val"]} for name, r in results["students"].items()},
            "epoch_seconds": [h["seconds"] for h in results["history"]],
            "meta": results.get("meta"),
            "cnet": json.loads(summary_path.read_text()) if summary_path.is_file() else None,
            "run_dir": str(run["run_dir"].relative_to(REPO)) if run["run_dir"].is_relative_to(REPO) else str(run["run_dir"]),
        }
    return {"teacher": {"test_AP": teacher_results["students"]["teacher"]["last"]["test_AP"],
                        "val_AP": teacher_results["students"]["teacher"]["last"]["val_AP"],
                        "epochs": teacher_results["epochs"]},
            "kd_tuning": tuning, "per_seed": per_seed}


# ---------------------------------------------------------------------------------------------
# statistics and tables


def summary(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values)}


def paired(diffs: list[float]) -> dict[str, Any]:
    """Mean ± std of per-seed differences, how many seeds are above / below, and the paired
    t-test's two-sided p."""
    out: dict[str, Any] = {"per_seed": diffs, **summary(diffs), "above": sum(d > 0 for d in diffs),
                           "below": sum(d < 0 for d in diffs)}
    if len(diffs) > 1:
        se = out["std"] / math.sqrt(len(diffs))
        t = out["mean"] / se if se > 0 else (0.0 if out["mean"] == 0 else math.copysign(math.inf, out["mean"]))
        from scipy import stats

        out["p"] = float(2 * stats.t.sf(abs(t), len(diffs) - 1)) if math.isfinite(t) else (1.0 if t == 0 else 0.0)
    return out


def table(group: dict[str, Any]) -> dict[str, Any]:
    per_seed = group["per_seed"]
    methods = list(per_seed)
    seeds = sorted(next(iter(per_seed.values())))
    students = list(next(iter(per_seed[methods[0]].values()))["students"])
    rows: dict[str, Any] = {}
    for student in students:
        row: dict[str, Any] = {}
        for m in methods:
            for which in ("last", "best_on_val"):
                row[f"{m}_{which}"] = summary([per_seed[m][s]["students"][student][which]["test_AP"] for s in seeds])
            if m != "kd" and "kd" in per_seed:
                row[f"{m}_minus_kd"] = paired([per_seed[m][s]["students"][student]["last"]["test_AP"]
                                               - per_seed["kd"][s]["students"][student]["last"]["test_AP"] for s in seeds])
            cnet = [per_seed[m][s]["cnet"] for s in seeds]
            aucs = [c.get("train", {}).get("label_noise", {}).get(student, {}).get("alpha_auc_clean_vs_flipped")
                    for c in cnet if c]
            if aucs and all(a is not None for a in aucs):
                row[f"{m}_alpha_auc"] = summary(aucs)
        rows[student] = row
    return rows


def _corrupted_share(group: dict[str, Any]) -> Optional[tuple[int, int]]:
    """(corrupted, all) training images, from a C-Net run's noise report."""
    for runs in group["per_seed"].values():
        for run in runs.values():
            noise = ((run.get("cnet") or {}).get("train") or {}).get("label_noise") or {}
            for entry in noise.values():
                return int(entry["flipped"]), int(entry["images"])
    return None


def _pm(s: dict[str, float]) -> str:
    return f"{s['mean']:.1f} ± {s['std']:.1f}"


def _p(p: Optional[float]) -> str:
    return "–" if p is None else ("< 0.001" if p < 0.001 else f"{p:.3f}")


def goals(report: dict[str, Any]) -> list[tuple[str, bool, str]]:
    """Each goal of the issue, met or not, with its numbers."""
    out = []
    noisy = report.get("noise") is not None
    for adapter, group in report["groups"].items():
        rows = group["table"]
        diffs = {s: r.get("mc_distil_minus_kd") for s, r in rows.items()}
        if all(diffs.values()):
            text = ", ".join(f"{s} {d['mean']:+.2f} ({d['above']}/{d['n']} seeds above)" for s, d in diffs.items())
            if noisy:
                ok = all(d["mean"] >= 1.0 and d["above"] >= 2 for d in diffs.values())
                out.append((f"{adapter}, noise: MC-Distil − KD ≥ 1 AP on every student, above KD on ≥ 2 of 3 seeds", ok, text))
            else:
                ok = all(d["mean"] >= 0 for d in diffs.values())
                out.append((f"{adapter}, clean: MC-Distil ≥ KD on every student (mean)", ok, text))
        fpn = {s: r.get("fpn_kd_minus_kd") for s, r in rows.items()}
        if all(fpn.values()):
            out.append((f"{adapter}: FPN imitation + KD ≥ KD on every student (mean)", all(d["mean"] >= 0 for d in fpn.values()),
                        ", ".join(f"{s} {d['mean']:+.2f}" for s, d in fpn.items())))
        aucs = {s: r.get("mc_distil_alpha_auc") for s, r in rows.items()}
        if noisy and all(aucs.values()):
            out.append((f"{adapter}, noise: C-Net alpha AUC (corrupted vs clean images) ≥ 0.8 on every student",
                        all(a["mean"] >= 0.8 for a in aucs.values()), ", ".join(f"{s} {a['mean']:.2f}" for s, a in aucs.items())))
        teacher = group["teacher"]["test_AP"]
        alone = {s: r["alone_last"]["mean"] for s, r in rows.items() if "alone_last" in r}
        if alone:
            out.append((f"{adapter}: teacher ≥ 5 AP above every student alone", all(teacher - a >= 5 for a in alone.values()),
                        f"teacher {teacher:.1f}; alone " + ", ".join(f"{s} {a:.1f}" for s, a in alone.items())))
    return out


def markdown(report: dict[str, Any]) -> str:
    noise = report.get("noise")
    title = "with annotation noise " + json.dumps(noise) if noise else "clean annotations"
    lines = [f"# Detection distillation, both adapters: {title}", "",
             f"Seeds {', '.join(map(str, report['seeds']))}, paired (one seed: the same initial weights and data order for "
             f"every method). Test split: {report['test_images']} shapes images; COCO box AP (pycocotools) in %. "
             "Mean ± std over seeds; \"− KD\" is the paired per-seed difference to KD (last epoch) with the number of "
             "seeds above KD and the paired t-test's p. Nothing is selected on test.", ""]
    if noise:
        lines += ["Noise on the training split only (meta, val, test clean); the teacher is trained on the same noisy "
                  "split. AUC: the C-Net's alpha (weight of the image's detection loss) ranking images with clean "
                  "annotations above images with any corrupted box, on the training split after training.", ""]
    for adapter, group in report["groups"].items():
        t = group["teacher"]
        kd = group["kd_tuning"]
        lines += [f"## {adapter}", "",
                  f"Teacher: test AP {t['test_AP']:.1f} (val {t['val_AP']:.1f}, {t['epochs']} epochs, trained once). "
                  f"KD beta {kd['beta']:g} (alpha 1, tau 2), chosen on {kd['chosen_by']}"
                  + (": " + ", ".join(f"{b}: {v:.1f}" for b, v in kd["val_AP"].items()) if kd["val_AP"] else "") + ".", "",
                  "| method | " + " | ".join(f"{s} last | {s} − KD | {s} best-val" for s in group["table"]) + " |",
                  "|---|" + "---|---|---|" * len(group["table"])]
        for m in report["methods"]:
            cells = []
            for row in group["table"].values():
                d = row.get(f"{m}_minus_kd")
                diff = f"{d['mean']:+.2f} ({d['above']}/{d['n']}, p {_p(d.get('p'))})" if d else ""
                cells += [_pm(row[f"{m}_last"]), diff, _pm(row[f"{m}_best_on_val"])]
            lines.append(f"| {LABELS[m]} | " + " | ".join(cells) + " |")
        aucs = [(s, row[f"{m}_alpha_auc"]) for m in report["methods"] for s, row in group["table"].items()
                if f"{m}_alpha_auc" in row]
        share = _corrupted_share(group)
        if share is not None:
            lines += ["", f"Training images with at least one corrupted box: {share[0]} of {share[1]} "
                      f"({100 * share[0] / share[1]:.0f}%)."]
        if aucs:
            lines += ["", "C-Net alpha AUC, corrupted vs clean training images: " + "; ".join(
                f"{LABELS[m]}: " + ", ".join(f"{s} {row[f'{m}_alpha_auc']['mean']:.2f}" for s, row in group["table"].items())
                for m in report["methods"] if any(f"{m}_alpha_auc" in row for row in group["table"].values()))]
        seconds = {m: statistics.median(x for s in group["per_seed"][m].values() for x in s["epoch_seconds"])
                   for m in report["methods"]}
        lines += ["", "Median epoch seconds (runs shared the 2 cores, so only a rough cost; see the cost table): "
                  + ", ".join(f"{m} {v:.0f}" for m, v in seconds.items()) + ".", ""]
    lines += ["## Goals", ""] + [f"- {'**met**' if ok else '**not met**'}: {name}: {text}" for name, ok, text in goals(report)]
    lines += ["", f"Total wall time of the runs made by this invocation: {report['wall_minutes']:.0f} min "
              f"({report['environment']})."]
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--adapters", nargs="+", default=list(ADAPTERS), choices=list(ADAPTERS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=list(LABELS))
    p.add_argument("--noise", default=None, help="annotation noise, e.g. class_flip=0.4,kind=instance (default: none)")
    p.add_argument("--tune-seed", type=int, default=100)
    p.add_argument("--kd-beta", type=float, default=None, help="skip the tuning and use this KD beta")
    p.add_argument("--epochs", type=int, default=None, help="student epochs (default: the config's)")
    p.add_argument("--teacher-epochs", type=int, default=None)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--reuse", action="store_true", help="reuse finished runs (finish an interrupted table)")
    p.add_argument("--data", type=Path, default=REPO / "data" / "shapes_bench")
    p.add_argument("--runs-dir", type=Path, default=HERE / "out" / "detection")
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--name", default=None, help="output file name (default: detection or detection_noise)")
    p.add_argument("--render-only", action="store_true")
    args = p.parse_args(argv)
    noise = parse_noise(args.noise)
    name = args.name or ("detection_noise" if noise else "detection")
    path = args.out / f"{name}.json"
    if args.render_only:
        (args.out / f"{name}.md").write_text(markdown(json.loads(path.read_text())))
        return 0
    if "kd" not in args.methods:
        p.error("--methods must include kd (every row is paired with it)")
    if "fixed_mix" in args.methods and "mc_distil" not in args.methods:
        p.error("--methods: fixed_mix needs mc_distil (it takes that run's mean weights)")
    if not (args.data / "annotations" / "instances_train2017.json").is_file():
        from collab_distill.tasks.detection.shapes import write_shapes_coco

        write_shapes_coco(args.data, train=400, val=200, size=128, seed=0)
    start = time.perf_counter()
    groups = {}
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for adapter in args.adapters:
            result = run_group(Group(adapter, noise, args), pool)
            result["table"] = table(result)
            groups[adapter] = result
    test_images = len(json.loads((args.data / "annotations" / "instances_val2017.json").read_text())["images"])
    report = {"noise": noise, "seeds": args.seeds, "methods": args.methods, "groups": groups, "test_images": test_images,
              "wall_minutes": (time.perf_counter() - start) / 60,
              "environment": f"{platform.platform()}, {os.cpu_count()} CPU cores, {args.jobs} runs at a time, 1 thread each"}
    report["goals"] = [{"goal": g, "met": ok, "numbers": text} for g, ok, text in goals(report)]
    args.out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n")
    (args.out / f"{name}.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
