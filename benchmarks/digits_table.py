"""The digits results table: CE vs KD for every student of ``examples/digits.yaml``, over seeds.

Everything runs through the real command line (``collab-distill fit``), one process per run:

* for every seed S, first the CE run (``examples/methods/ce.yaml``); it trains the teacher with
  the config's ``train_epochs`` and stores it as ``teachers/teacher/teacher.pt`` in its run folder;
* then the KD run (``examples/methods/kd.yaml``) with the same seed, loading exactly that file
  (``--cohort.teachers.teacher.checkpoint <file> --cohort.teachers.teacher.train_epochs 0``), so CE
  and KD of one seed share the teacher, the students' initial weights (seeded by seed and student
  name), the data splits, the data order and the augmentation (all seeded by the seed).

Reported: mean ± std over seeds of every student's test top-1 with its last-epoch and its
best-on-val weights, the teacher's test top-1, the paired per-seed differences KD − CE, and wall
time per run (and the ratio of the students' epoch times KD / CE).

Usage::

    python benchmarks/digits_table.py                       # seeds 0..4, the config's 15 epochs
    python benchmarks/digits_table.py --seeds 0 1 2 --epochs 5 --out benchmarks/out/digits_quick
    python benchmarks/digits_table.py --reuse               # pick up finished runs in --runs-dir

Writes ``digits_ce_vs_kd.json`` and ``digits_ce_vs_kd.md`` to ``--out`` (default
``benchmarks/results``); the run folders go to ``--runs-dir``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def _portable(cmd: list[str]) -> str:
    """The command as a user would type it from the repository root (no paths of this machine)."""
    words = []
    for word in cmd:
        if word.endswith("collab-distill") or word == sys.executable:
            word = "collab-distill" if word.endswith("collab-distill") else "python"
        elif word.startswith(str(REPO)):
            word = str(Path(word).relative_to(REPO))
        words.append(word)
    return " ".join(words)
CONFIG = REPO / "examples" / "digits.yaml"
METHODS = {"ce": REPO / "examples" / "methods" / "ce.yaml", "kd": REPO / "examples" / "methods" / "kd.yaml"}
STUDENTS = ["xxs", "xs", "s"]


def _cli() -> list[str]:
    exe = Path(sys.executable).with_name("collab-distill")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "collab_distill"]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _finished_run(root: Path, name: str) -> Optional[Path]:
    """The newest ``root/name/version_N`` whose results.json says finished (for --reuse)."""
    folders = sorted((root / name).glob("version_*"),
                     key=lambda p: int(p.name.split("_")[-1]) if p.name.split("_")[-1].isdigit() else -1)
    for folder in reversed(folders):
        f = folder / "results.json"
        if f.is_file() and json.loads(f.read_text()).get("status") == "finished" and (folder / "wall.json").is_file():
            return folder
    return None


def run_one(method: str, method_file: Path, seed: int, args: argparse.Namespace, teacher: Optional[Path],
            extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """One ``collab-distill fit`` of examples/digits.yaml composed with ``method_file`` (plus the
    command-line overrides ``extra``)."""
    name = f"{method}_s{seed}"
    runs = args.runs_dir
    if args.reuse:
        found = _finished_run(runs, name)
        if found is not None:
            print(f"  reusing {found}", flush=True)
            return {"run_dir": found, **json.loads((found / "wall.json").read_text())}
    cmd = [*_cli(), "fit", "--config", str(CONFIG), "--config", str(method_file), "--seed", str(seed),
           "--trainer.root_dir", str(runs), "--trainer.name", name, "--trainer.progress_bar", "false"]
    if args.epochs is not None:
        cmd += ["--trainer.max_epochs", str(args.epochs)]
    if teacher is not None:
        cmd += ["--cohort.teachers.teacher.checkpoint", str(teacher), "--cohort.teachers.teacher.train_epochs", "0"]
    elif args.teacher_epochs is not None:
        cmd += ["--cohort.teachers.teacher.train_epochs", str(args.teacher_epochs)]
    cmd += list(extra)
    env = dict(os.environ)
    if args.threads > 0:
        env["OMP_NUM_THREADS"] = str(args.threads)
    print("  $ " + _portable(cmd), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    log = runs / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed with exit code {proc.returncode}; see {log}\n{proc.stderr[-3000:]}")
    match = re.findall(r"run folder: (\S+)", proc.stdout)
    run_dir = Path(match[-1]) if match else _finished_run(runs, name)
    if run_dir is None:
        raise SystemExit(f"{name}: cannot find the run folder; see {log}")
    if not run_dir.is_absolute():
        run_dir = REPO / run_dir
    info = {"wall_s": wall, "command": cmd}
    (run_dir / "wall.json").write_text(json.dumps(info, indent=1))
    return {"run_dir": run_dir, **info}


def run_paired_seeds(
    methods: dict[str, Path], args: argparse.Namespace
) -> tuple[dict[int, dict[str, Any]], dict[int, dict[str, Any]], dict[int, str]]:
    """Every method for every seed, sharing one teacher per seed: the ``ce`` run trains it, the
    others load its ``teacher.pt``. Returns (results per seed and method, run infos, teacher hashes)."""
    per_seed: dict[int, dict[str, Any]] = {}
    runs: dict[int, dict[str, Any]] = {}
    teacher_hashes: dict[int, str] = {}
    for seed in args.seeds:
        print(f"seed {seed}", flush=True)
        done = {"ce": run_one("ce", methods["ce"], seed, args, teacher=None)}
        teacher_file = done["ce"]["run_dir"] / "teachers" / "teacher" / "teacher.pt"
        if not teacher_file.is_file():
            raise SystemExit(f"the CE run of seed {seed} wrote no {teacher_file}")
        for m, method_file in methods.items():
            if m != "ce":
                done[m] = run_one(m, method_file, seed, args, teacher=teacher_file)
        results = {m: json.loads((r["run_dir"] / "results.json").read_text()) for m, r in done.items()}
        t_ce = results["ce"]["teachers"]["teacher"]["test"]["top1"]
        for m, r in results.items():
            if r["teachers"]["teacher"]["test"]["top1"] != t_ce:
                raise SystemExit(f"seed {seed}: the teacher's test top-1 differs between CE ({t_ce}) and {m}")
        teacher_hashes[seed] = _sha256(teacher_file)
        per_seed[seed] = results
        runs[seed] = done
        for m in methods:
            print(f"  {m}: " + ", ".join(f"{st} {results[m]['students'][st]['last']['test_top1']:.2f}" for st in STUDENTS)
                  + f" (teacher {t_ce:.2f}); wall {done[m]['wall_s']:.0f} s", flush=True)
    return per_seed, runs, teacher_hashes


def _summary(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


def _paired(diffs: list[float]) -> dict[str, Any]:
    out: dict[str, Any] = _summary(diffs)
    n = len(diffs)
    out["kd_better"] = sum(d > 0 for d in diffs)
    out["ties"] = sum(d == 0 for d in diffs)
    out["ce_better"] = sum(d < 0 for d in diffs)
    if n > 1:
        se = out["std"] / math.sqrt(n)
        out["se"] = se
        t = out["mean"] / se if se > 0 else (0.0 if out["mean"] == 0 else math.copysign(math.inf, out["mean"]))
        out["t"] = t
        try:
            from scipy import stats

            out["p_two_sided"] = float(2 * stats.t.sf(abs(t), n - 1)) if math.isfinite(t) else (1.0 if t == 0 else 0.0)
        except ImportError:  # pragma: no cover - scipy comes with scikit-learn
            out["p_two_sided"] = None
    return out


def collect(per_seed: dict[int, dict[str, dict[str, Any]]]) -> dict[str, Any]:
    seeds = sorted(per_seed)
    table: dict[str, Any] = {}
    for student in STUDENTS:
        row: dict[str, Any] = {}
        for method in ("ce", "kd"):
            for which in ("last", "best_on_val"):
                row[f"{method}_{which}"] = _summary([per_seed[s][method]["students"][student][which]["test_top1"] for s in seeds])
        for which in ("last", "best_on_val"):
            diffs = [per_seed[s]["kd"]["students"][student][which]["test_top1"]
                     - per_seed[s]["ce"]["students"][student][which]["test_top1"]
                     for s in seeds]
            row[f"kd_minus_ce_{which}"] = {"per_seed": diffs, **_paired(diffs)}
        row["params"] = per_seed[seeds[0]]["ce"]["students"][student]["params"]
        row["macs"] = per_seed[seeds[0]]["ce"]["students"][student].get("macs")
        table[student] = row
    return table


def _pm(s: dict[str, float]) -> str:
    return f"{s['mean']:.2f} ± {s['std']:.2f}"


def _p(p: Optional[float]) -> str:
    return "n/a" if p is None else ("< 0.001" if p < 0.001 else f"= {p:.3f}")


def verdict(student: str, d: dict[str, Any]) -> str:
    p = d.get("p_two_sided")
    sig = p is not None and p < 0.05
    direction = "higher" if d["mean"] > 0 else "lower"
    count = f"KD ahead on {d['kd_better']}/{d['n']} seeds, behind on {d['ce_better']}, tied on {d['ties']}"
    if sig:
        return (f"**{student}**: KD is {direction} than CE by {abs(d['mean']):.2f} points (paired, last epoch; "
                f"{count}; paired t = {d['t']:.2f}, p {_p(p)}).")
    return (f"**{student}**: no reliable difference: KD − CE = {d['mean']:+.2f} ± {d['std']:.2f} points (last epoch; "
            f"{count}; paired t-test p {_p(p)}), within the seed-to-seed noise.")


def markdown(res: dict[str, Any]) -> str:
    s = res["settings"]
    env = res["environment"]
    t = res["teacher_test_top1"]
    lines = [
        "# Digits: CE vs KD (examples/digits.yaml)",
        "",
        f"Seeds {', '.join(map(str, s['seeds']))} (paired: CE and KD of one seed share the teacher, initial weights, splits, "
        f"data order and augmentation). {s['student_epochs']} student epochs, teacher ResNet(m) trained "
        f"{s['teacher_epochs']} epochs with CE once per seed. Test split: {res['test_size']} images "
        f"(one image = {100 / res['test_size']:.2f} points). KD: alpha 0.3, beta 0.7, tau 2. "
        f"{env['platform']}, {env['cpu_count']} CPU cores, OMP_NUM_THREADS={s['threads'] or 'default'}.",
        "",
        "Test top-1 (%), mean ± std over seeds:",
        "",
        "| student | params | CE last | KD last | CE best-val | KD best-val | KD−CE paired (last) | KD−CE paired (best-val) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for student, row in res["table"].items():
        dl, db = row["kd_minus_ce_last"], row["kd_minus_ce_best_on_val"]
        lines.append(
            f"| {student} | {row['params'] / 1e3:.1f}K | {_pm(row['ce_last'])} | {_pm(row['kd_last'])} "
            f"| {_pm(row['ce_best_on_val'])} | {_pm(row['kd_best_on_val'])} "
            f"| {dl['mean']:+.2f} ± {dl['std']:.2f} ({dl['kd_better']}↑ {dl['ce_better']}↓ {dl['ties']}=) "
            f"| {db['mean']:+.2f} ± {db['std']:.2f} ({db['kd_better']}↑ {db['ce_better']}↓ {db['ties']}=) |"
        )
    lines.append(f"| teacher (m) | {res['teacher_params'] / 1e3:.1f}K | {_pm(t)} (same teacher for CE and KD) | | | | | |")
    lines += [
        "",
        "Paired columns: mean ± std over seeds of (KD − CE) for the same seed; ↑/↓/= count the seeds where KD is "
        "above/below/equal to CE.",
        "",
        "Per-seed KD − CE (last epoch), points: " + "; ".join(
            f"{st}: " + ", ".join(f"{d:+.2f}" for d in row["kd_minus_ce_last"]["per_seed"]) for st, row in res["table"].items()),
        "",
        "**Does KD beat CE?** " + " ".join(verdict(st, row["kd_minus_ce_last"]) for st, row in res["table"].items()),
        "",
        "With best-on-val weights: " + "; ".join(
            f"{st} {row['kd_minus_ce_best_on_val']['mean']:+.2f} ± {row['kd_minus_ce_best_on_val']['std']:.2f} "
            f"(p {_p(row['kd_minus_ce_best_on_val'].get('p_two_sided'))})" for st, row in res["table"].items())
        + " (the val split has only " + str(res.get("val_size", "?")) + " images, so best-on-val selection is itself noisy).",
        "",
        f"Caveats: {len(s['seeds'])} seeds; the test split is the same {res['test_size']} images for every seed "
        "(Digits' fixed `test_seed`), so the spread above is training noise (initialisation, splits, order, "
        "augmentation), not test-sampling noise; one test image is "
        f"{100 / res['test_size']:.2f} points; three students are tested without correction for multiple comparisons. "
        "Runs are bit-for-bit reproducible at the same OMP_NUM_THREADS, but a different thread count changes the numbers "
        "(CPU reduction order).",
        "",
        "## Wall time",
        "",
        "| method | wall s per run (mean ± std) | student epoch s (median over epochs, mean over seeds) |",
        "|---|---|---|",
    ]
    w = res["timing"]
    lines.append(f"| CE (incl. training the teacher, {s['teacher_epochs']} epochs) "
                 f"| {_pm(w['ce_wall_s'])} | {_pm(w['ce_epoch_s'])} |")
    lines.append(f"| KD (teacher loaded) | {_pm(w['kd_wall_s'])} | {_pm(w['kd_epoch_s'])} |")
    lines += [
        "",
        f"Epoch-time ratio KD / CE: {w['epoch_ratio_kd_over_ce']['mean']:.3f} ± {w['epoch_ratio_kd_over_ce']['std']:.3f} "
        "(per seed, median epoch time of the cohort phase, data loading included, validation excluded): what the "
        "teacher's forward pass and the KL term add to an epoch. The CE runs keep the teacher in the cohort (they "
        "train it), but with beta = 0 the engine never runs it during the students' epochs. The CE wall time includes "
        "training the teacher. The machine was shared with other jobs while these ran, so wall times carry a "
        "few-percent noise (see the std).",
        "",
    ]
    return "\n".join(lines) + "\n"


def run_arguments(description: str, runs_dir: str, seeds: list[int]) -> argparse.ArgumentParser:
    """The options every script that runs ``collab-distill fit`` over seeds shares (``run_one``
    reads them)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--seeds", type=int, nargs="+", default=seeds, help="at least 3")
    p.add_argument("--epochs", type=int, default=None, help="student epochs (default: the config's)")
    p.add_argument("--teacher-epochs", type=int, default=None, help="teacher CE epochs (default: the config's)")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each run (0: torch's default)")
    p.add_argument("--out", type=Path, default=HERE / "results", help="where the .json/.md go")
    p.add_argument("--runs-dir", type=Path, default=REPO / "benchmarks" / "out" / runs_dir, help="run folders")
    p.add_argument("--reuse", action="store_true", help="reuse finished runs found in --runs-dir")
    p.add_argument("--fresh", action="store_true", help="delete --runs-dir first")
    p.add_argument("--render-only", action="store_true", help="only rewrite the .md from the .json in --out")
    return p


def write_outputs(out: Path, stem: str, res: dict[str, Any], markdown: Callable[[dict[str, Any]], str]) -> None:
    """Write ``stem.json`` and its rendering ``stem.md`` into ``out`` and print the table."""
    (out / f"{stem}.json").write_text(json.dumps(res, indent=1) + "\n")
    (out / f"{stem}.md").write_text(markdown(res))
    print((out / f"{stem}.md").read_text())
    print(f"wrote {out}/{stem}.{{json,md}} in {res['elapsed_s']:.0f} s")


def prepare_output(p: argparse.ArgumentParser, args: argparse.Namespace, stem: str,
                   markdown: Callable[[dict[str, Any]], str], min_seeds: int = 3) -> bool:
    """The common start of the seed-sweeping scripts: ``--render-only`` rewrites ``stem.md``
    from ``stem.json`` and returns True (nothing to run); otherwise checks the seeds, clears
    ``--runs-dir`` with ``--fresh`` and creates the output folders."""
    if args.render_only:
        res = json.loads((args.out / f"{stem}.json").read_text())
        (args.out / f"{stem}.md").write_text(markdown(res))
        print((args.out / f"{stem}.md").read_text())
        return True
    if len(set(args.seeds)) < min_seeds:
        p.error(f"give at least {min_seeds} distinct seeds")
    if args.fresh and args.runs_dir.exists():
        shutil.rmtree(args.runs_dir)
    args.runs_dir.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    return False


def main(argv: list[str] | None = None) -> int:
    p = run_arguments(__doc__.split("\n\n")[0], "digits_table", [0, 1, 2, 3, 4])
    args = p.parse_args(argv)
    if prepare_output(p, args, "digits_ce_vs_kd", markdown):
        return 0
    started = time.perf_counter()

    per_seed, runs, teacher_hashes = run_paired_seeds(METHODS, args)

    seeds = sorted(per_seed)
    epoch_s = {m: {s: statistics.median(h["seconds"] for h in per_seed[s][m]["history"]) for s in seeds} for m in ("ce", "kd")}
    first = per_seed[seeds[0]]["ce"]
    teacher_results = json.loads((Path(runs[seeds[0]]["ce"]["run_dir"]) / "teachers" / "teacher" / "results.json").read_text()) \
        if (Path(runs[seeds[0]]["ce"]["run_dir"]) / "teachers" / "teacher" / "results.json").is_file() else {}
    from collab_distill.tasks.classification import Digits  # the config's test split (fixed test_seed)

    sizes = Digits().setup(seeds[0]).extra["split_sizes"]
    test_size = sizes["test"]
    res = {
        "environment": {"platform": platform.platform(), "python": sys.version.split()[0], "cpu_count": os.cpu_count()},
        "settings": {"seeds": seeds, "student_epochs": first["epochs"],
                     "teacher_epochs": teacher_results.get("epochs", args.teacher_epochs), "threads": args.threads,
                     "config": str(CONFIG.relative_to(REPO)),
                     "methods": {m: str(f.relative_to(REPO)) for m, f in METHODS.items()}},
        "test_size": test_size,
        "val_size": sizes["val"],
        "table": collect(per_seed),
        "teacher_test_top1": _summary([per_seed[s]["ce"]["teachers"]["teacher"]["test"]["top1"] for s in seeds]),
        "teacher_params": first["teachers"]["teacher"]["params"],
        "teacher_sha256": teacher_hashes,
        "per_seed": {s: {m: {st: {w: per_seed[s][m]["students"][st][w]["test_top1"] for w in ("last", "best_on_val")}
                             for st in STUDENTS} | {"teacher": per_seed[s][m]["teachers"]["teacher"]["test"]["top1"]}
                         for m in ("ce", "kd")} for s in seeds},
        "timing": {
            "ce_wall_s": _summary([runs[s]["ce"]["wall_s"] for s in seeds]),
            "kd_wall_s": _summary([runs[s]["kd"]["wall_s"] for s in seeds]),
            "ce_epoch_s": _summary([epoch_s["ce"][s] for s in seeds]),
            "kd_epoch_s": _summary([epoch_s["kd"][s] for s in seeds]),
            "epoch_ratio_kd_over_ce": _summary([epoch_s["kd"][s] / epoch_s["ce"][s] for s in seeds]),
        },
        "runs": {s: {m: {"wall_s": r["wall_s"], "command": _portable(r["command"])} for m, r in v.items()}
                 for s, v in runs.items()},
        "elapsed_s": time.perf_counter() - started,
    }
    write_outputs(args.out, "digits_ce_vs_kd", res, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
