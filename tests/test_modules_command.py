"""``collab-distill modules`` lists every module path of the cohort's members with its output's
shape, so a plugin author need not guess the paths of ``FeatureRequest`` (issue 22)."""

from __future__ import annotations

import pytest

from collab_distill import FeatureRequest, Plugin, hookimpl
from collab_distill.cli import main
from collab_distill.modules_listing import module_rows
from collab_distill.testing import tiny_engine
from conftest import REPO

DIGITS = str(REPO / "examples" / "digits.yaml")


def _table(out: str) -> dict[tuple[str, str], tuple[str, str]]:
    """``{(member, path): (module type, output shape)}`` of the printed table."""
    rows = {}
    for line in out.splitlines():
        parts = line.split(maxsplit=3)
        if len(parts) == 4 and parts[0] in ("xxs", "xs", "s", "teacher"):
            rows[(parts[0], parts[1])] = (parts[2], parts[3].strip())
    return rows


def test_modules_lists_every_members_paths_and_output_shapes_on_digits(capsys):
    assert main(["modules", "--config", DIGITS]) == 0
    rows = _table(capsys.readouterr().out)
    assert {member for member, _ in rows} == {"xxs", "xs", "s", "teacher"}  # all students and teachers
    assert rows[("xs", "layer3")] == ("Sequential", "[2, 16, 2, 2]")
    assert rows[("teacher", "layer3")][0] == "Sequential" and rows[("teacher", "layer3")][1].startswith("[2, ")
    assert rows[("xs", "layer1.0.relu")] == ("ReLU", "[2, 8, 8, 8] (the last of 2 calls)")
    assert rows[("xs", "fc")] == ("Linear", "[2, 10]")  # ten digit classes

    assert main(["modules", "--config", DIGITS, "--member", "[xs, teacher]", "--trainer.max_epochs", "2"]) == 0
    assert {member for member, _ in _table(capsys.readouterr().out)} == {"xs", "teacher"}


def test_an_unknown_member_is_one_error_naming_the_cohort(capsys):
    assert main(["modules", "--config", DIGITS, "--member", "xl"]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip() == (
        "collab-distill: error: --member 'xl': not a member of this cohort; students: ['s', 'xs', 'xxs'], "
        "teachers: ['teacher'] (leave out --member to list them all)"
    )
    assert captured.out == ""


class _Requests(Plugin):
    def __init__(self, paths: list[str]) -> None:
        self.paths = paths

    @hookimpl
    def collab_distill_feature_requests(self, engine):
        return [FeatureRequest("xs", path) for path in self.paths]


@pytest.mark.parametrize("path", ["layer3", "layer2.0.conv1", "stem.2"])
def test_a_listed_path_is_a_feature_the_engine_captures_with_the_listed_shape(tmp_path, path):
    engine = tiny_engine([_Requests([path])], root_dir=tmp_path, teacher=None, subset=64)
    listed = {row.path: row.shape for row in module_rows(engine.task, engine.cohort, engine.seed, ["xs"])}
    engine.build()
    assert listed[path] == str([2, *engine.feature_shapes["xs"][path]])
