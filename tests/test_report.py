"""``collab-distill report``: generic parts, and the sections plugins add through the
``collab_distill_report_sections`` hook (stored by ``write_sections``)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from collab_distill import ReportSection, hookimpl
from collab_distill.report import read_sections, write_report, write_sections


def store_sections(engine: Any, results: Any) -> Path:
    """What the engine does right after ``fit_end`` on rank 0 (calling it again is harmless)."""
    sections = [s for group in engine.hook.collab_distill_report_sections(engine=engine, results=results) if group for s in group]
    return write_sections(engine.run_dir, sections)


def _png(path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(3, 2))
    ax.plot([0, 1, 2], [1, 0, 2])
    fig.savefig(path, dpi=80)
    plt.close(fig)


class ThirdPartyFigures:
    """A plugin as an outside package would write it: a figure of its own and a section on it."""

    @hookimpl
    def collab_distill_report_sections(self, engine: Any, results: Any) -> list[ReportSection]:
        folder = engine.run_dir / "plugins" / "thirdparty"
        folder.mkdir(parents=True, exist_ok=True)
        _png(folder / "curve.png")
        students = ", ".join(results["students"])
        text = f"Students: {students}.\n\n- first point\n- **second** point\n\n| a | b |\n|---|---|\n| 1 | `x<y` |"
        return [ReportSection("Third party: my curve", text, ["plugins/thirdparty/curve.png"])]


class Silent:
    @hookimpl
    def collab_distill_report_sections(self) -> None:
        return None


@pytest.mark.filterwarnings("ignore:CNet. the C-Net's weights stayed inert")
def test_a_real_run_reports_the_cnet_and_a_third_party_section(tmp_path):
    from collab_distill.plugins.mc_distil import CNet
    from collab_distill.testing import tiny_fit

    run = tiny_fit([CNet(use_image=False, use_losses=True, hidden=8), ThirdPartyFigures(), Silent()],
                   root_dir=tmp_path, steps=None, epochs=1)
    assert run.results["status"] == "finished"
    stored = store_sections(run.engine, run.results)
    assert stored == run.run_dir / "report_sections.json"
    sections = {s.title: s for s in read_sections(run.run_dir)}
    [cnet_title] = [t for t in sections if "C-Net" in t]
    cnet = sections[cnet_title]
    assert cnet.figures[:2] == ["plugins/cnet/val_weights_distribution.png", "plugins/cnet/val_extremes.png"]
    assert "meta steps" in cnet.text and "largest spread" in cnet.text and "| xxs |" in cnet.text

    md, page = write_report(run.run_dir)
    text, html = md.read_text(), page.read_text()
    # generic parts first, then the plugins' sections
    assert "| xxs |" in text and "| teacher (teacher) |" in text
    for figure in ("weights_over_training.png", "meta_steps.png", "accuracy_vs_macs.png"):
        assert (md.parent / figure).stat().st_size > 1000 and f"({figure})" in text and figure in html
    assert text.index("accuracy_vs_macs.png") < text.index(f"## {cnet_title}")
    for figure in ("cnet_val_weights_distribution.png", "cnet_val_extremes.png", "thirdparty_curve.png"):
        assert (md.parent / figure).stat().st_size > 1000 and f"({figure})" in text and f"src='{figure}'" in html
    assert "## Third party: my curve" in text and "<h2>Third party: my curve</h2>" in html
    assert "Students: xxs, xs." in text
    # the section's Markdown as HTML: list, bold, table, escaped code
    assert "<li><strong>second</strong> point</li>" in html
    assert "<th>a</th><th>b</th>" in html and "<td><code>x&lt;y</code></td>" in html
    # a figure written only by a plugin without a section does not reach the report
    (run.run_dir / "plugins" / "thirdparty" / "stray.png").write_bytes((md.parent / "thirdparty_curve.png").read_bytes())
    md, _ = write_report(run.run_dir)
    assert "stray" not in md.read_text() and not (md.parent / "thirdparty_stray.png").exists()


def test_write_sections_checks_the_figures(tmp_path):
    (tmp_path / "plugins" / "p").mkdir(parents=True)
    (tmp_path / "plugins" / "p" / "a.png").write_bytes(b"png")
    path = write_sections(tmp_path, [ReportSection("ok", "text", [Path("plugins/p/a.png")]), ReportSection("bare")])
    assert json.loads(path.read_text()) == {"sections": [
        {"title": "ok", "text": "text", "figures": ["plugins/p/a.png"]}, {"title": "bare", "text": "", "figures": []}]}
    assert read_sections(tmp_path)[1] == ReportSection("bare")
    assert write_sections(tmp_path, []) and read_sections(tmp_path) == []
    write_sections(tmp_path, [ReportSection("kept")])
    for bad in (str(tmp_path / "plugins" / "p" / "a.png"), "../x.png", "plugins/p/missing.png"):
        with pytest.raises(ValueError, match="'bad section'"):
            write_sections(tmp_path, [ReportSection("bad section", figures=[bad])])
    with pytest.raises(TypeError, match="ReportSection"):
        write_sections(tmp_path, [{"title": "a dict"}])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="list of paths"):
        write_sections(tmp_path, [ReportSection("one", figures="plugins/p/a.png")])  # type: ignore[arg-type]
    assert read_sections(tmp_path) == [ReportSection("kept")]  # a failed write leaves the stored sections alone


def _finished_results(students: dict[str, int], teachers: dict[str, int]) -> dict[str, Any]:
    return {
        "status": "finished", "seed": 0, "epochs": 1, "global_step": 3, "selection_metric": "top1",
        "students": {n: {"params": m // 10, "macs": m, "last": {"test_top1": 50.0 + i},
                         "best_on_val": {"epoch": 1, "test_top1": 51.0 + i}}
                     for i, (n, m) in enumerate(students.items())},
        "teachers": {n: {"params": m // 10, "macs": m, "test": {"top1": 90.0}} for n, m in teachers.items()},
    }


@pytest.mark.parametrize("students, teachers", [
    ({"xxs": 31_000, "xs": 95_000, "s": 370_000}, {"t": 1_460_000}),  # digits' ResNet10 family: 5 decades of minor ticks
    ({"a": 1_200_000, "b": 1_900_000}, {}),  # within one decade: no decade tick inside
    ({"a": 2_000, "b": 40_000_000_000}, {"t": 90_000_000_000}),  # many decades
])
def test_accuracy_vs_macs_has_readable_ticks_and_the_teacher(tmp_path, monkeypatch, students, teachers):
    from collab_distill import report

    drawn = []
    save = report._save

    def keep(fig: Any, path: Path) -> Path:
        fig.tight_layout()
        fig.canvas.draw()
        ax = fig.axes[0]
        labels = [t for t in ax.get_xticklabels() if t.get_visible() and t.get_text()]
        boxes = [t.get_window_extent() for t in labels]
        drawn.append(([t.get_text() for t in labels], boxes, [line.get_label() for line in ax.get_lines()],
                      [a.get_text() for a in ax.texts]))
        return save(fig, path)

    monkeypatch.setattr(report, "_save", keep)
    path = report._accuracy_vs_macs(_finished_results(students, teachers), tmp_path)
    assert path is not None and path.stat().st_size > 1000
    [(labels, boxes, lines, notes)] = drawn
    assert 2 <= len(labels) <= 8 and all(label[-1] in "KMGT" or label[-1].isdigit() for label in labels)
    assert all(a.x1 <= b.x0 for a, b in zip(boxes, boxes[1:])), f"tick labels overlap: {labels}"
    assert ("teacher" in lines) == bool(teachers) and all(name in notes for name in [*students, *teachers])
    assert report._si(100_000) == "100K" and report._si(1_000_000) == "1M" and report._si(1_460_000) == "1.46M"


def test_report_source_names_no_method():
    source = (Path(__file__).resolve().parents[1] / "collab_distill" / "report.py").read_text().lower()
    for name in ("cnet", "c-net", "mc_distil", "mc-distil", "metadistiller", "plugins/*"):
        assert name not in source


def test_metadistiller_reports_its_target_statistics(tmp_path):
    from collab_distill.plugins.metadistiller import MetaDistiller

    plugin = MetaDistiller()
    engine = SimpleNamespace(run_dir=tmp_path, fabric=SimpleNamespace(is_global_zero=True))
    assert plugin.collab_distill_report_sections(engine=engine) is None  # no statistics: nothing to show
    plugin.last_statistics = {
        "split": "val", "images": 100, "num_classes": 10, "log_k": 2.302585, "temperature": 1.0,
        "students": {"xxs": {"entropy": 1.0, "entropy_over_log_k": 0.43, "label_agreement": 0.8, "exits": [
            {"exit": 1, "entropy": 1.2, "entropy_over_log_k": 0.52, "label_agreement": 0.7, "final_exit_agreement": 0.6},
            {"exit": 2, "entropy": 0.8, "entropy_over_log_k": 0.35, "label_agreement": 0.9, "final_exit_agreement": 0.8}]}},
    }
    [section] = plugin.collab_distill_report_sections(engine=engine)
    assert section.figures == [] and "| xxs | 2 | 0.350 | 0.900 | 0.800 |" in section.text
    other_rank = SimpleNamespace(run_dir=tmp_path, fabric=SimpleNamespace(is_global_zero=False))
    assert plugin.collab_distill_report_sections(engine=other_rank) is None
