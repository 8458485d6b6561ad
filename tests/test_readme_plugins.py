"""The README's plugin examples run as printed (a newcomer copies them)."""

from __future__ import annotations

import math
import re
import textwrap

from collab_distill.plugins.fixed_weights import FixedLossWeights
from collab_distill.testing import tiny_fit
from conftest import REPO


def _plugin_snippets() -> list[str]:
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Writing a plugin"):text.index("## Reproducibility")]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_readme_plugins_train_a_tiny_cohort(tmp_path):
    learned, hints = _plugin_snippets()[:2]
    namespace: dict = {}
    exec(learned, namespace)
    # the FitNets excerpt shows three hook methods; give them their class
    exec("import torch\nfrom torch import nn\nfrom collab_distill import FeatureRequest, Plugin, hookimpl\n"
         "class Hints(Plugin):\n" + textwrap.indent(hints, "    "), namespace)
    run = tiny_fit([namespace["LearnedImageWeights"]()], root_dir=tmp_path / "learned", steps=4)
    assert len(run.meta_steps) == 2 and all(norm > 0 for _, _, norm in run.meta_steps)
    run = tiny_fit([FixedLossWeights(alpha=0.3, beta=0.7), namespace["Hints"]()], root_dir=tmp_path / "hints", steps=2)
    assert all(math.isfinite(step["xs/hint"]) and step["xs/hint"] > 0 for step in run.losses)
    assert set(run.engine.plugin_modules) == {"xxs", "xs"}
