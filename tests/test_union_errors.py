"""A value that no member of an ``Optional[...]`` field accepts is one message naming the field and
what is wrong, not jsonargparse's list of every member's complaint and a dump of the given node."""

from __future__ import annotations

import pytest

from collab_distill.cli import main
from collab_distill.cli_hints import simplify_union_error
from tiny_config import tiny_digits_yaml


@pytest.mark.parametrize("extra, expected, absent", [
    (["--task.init_args.topk", "[0]"], "collab-distill: error: task.topk=[0] must be positive integers\n", "Namespace("),
    (["--trainer.gradient_clip", "nan"], 'Parser key "trainer.gradient_clip":\n  expected float or null, got \'nan\'',
     "NoneType"),
    (["--task.init_args.data.init_args.augment", "maybe"],  # a nested class's field: the option the user gives
     'Parser key "task.init_args.data.init_args.augment":\n  Expected a <class \'bool\'>. Got value: maybe', "Problem with"),
    (["--task.init_args.data.init_args.subset", "abc"],  # a union inside a nested class
     'Parser key "task.init_args.data.init_args.subset":\n  expected int or null, got \'abc\'', "NestedArg"),
], ids=["topk_0", "gradient_clip_nan", "nested_bool", "nested_optional_int"])
def test_a_value_no_member_of_a_union_accepts_is_one_message(capsys, tmp_path, extra, expected, absent):
    config = tmp_path / "base.yaml"
    config.write_text(tiny_digits_yaml())
    rc = main(["fit", "--config", str(config), "--trainer.root_dir", str(tmp_path / "runs"), *extra])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert expected in err and absent not in err and "Union subtypes" not in err, err
    assert err.count("error:") == 1 and not (tmp_path / "runs").exists(), err


def test_other_messages_pass_unchanged():
    assert simplify_union_error('Parser key "seed":\n  Expected a <class \'int\'>. Got value: 1.5') == \
        'Parser key "seed":\n  Expected a <class \'int\'>. Got value: 1.5'
