import os
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))  # support_plugins is importable by class_path


@pytest.fixture
def cli_env():
    """Environment for CLI subprocesses: tests/ importable, no colour codes, one thread each."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["NO_COLOR"] = "1"
    env["COLUMNS"] = "200"
    return env


def digits_args(root, name="run", epochs=2, extra=()):
    """Command-line arguments of a small, fast digits fit."""
    return [
        "fit", "--config", str(REPO / "examples" / "digits.yaml"),
        "--trainer.root_dir", str(root), "--trainer.name", name,
        "--trainer.max_epochs", str(epochs), "--trainer.progress_bar", "false",
        "--cohort.teachers.teacher.train_epochs", "1",
        *extra,
    ]


@pytest.fixture(scope="session")
def teacher_file(tmp_path_factory):
    """A (randomly initialised) teacher for digits, saved as a plain state dict."""
    import torch

    from collab_distill.task import TaskInfo
    from collab_distill.tasks.classification import ResNet

    torch.manual_seed(0)
    model = ResNet("s").build(TaskInfo(num_classes=10, in_channels=1, image_size=(8, 8)))
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    torch.save(model.state_dict(), path)
    return path
