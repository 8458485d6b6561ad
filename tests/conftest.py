import os
import sys
from pathlib import Path

import pytest


def _threads_per_worker() -> None:
    """Under pytest-xdist each worker would start as many torch threads as the machine has cores,
    so N workers oversubscribe the cores N times over; each worker (and the processes it starts,
    through OMP_NUM_THREADS) gets its share instead. An OMP_NUM_THREADS the user set is kept."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))
        import torch

        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


_threads_per_worker()

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


#: modules whose every test trains a detector, spawns processes or runs the command line end to end
_SLOW_MODULES = {"test_cli", "test_ddp", "test_detection", "test_detection_meta", "test_detection_noise", "test_detectron2",
                 "test_docs", "test_dry_run", "test_examples", "test_fpn_imitation", "test_resume", "test_teacher_cache"}


def pytest_collection_modifyitems(items):
    """``slow`` also marks every test that runs the CLI in a subprocess (the ``cli_env`` fixture)
    or lives in a module of end-to-end runs: ``pytest -q -m "not slow"`` is the edit-test loop."""
    for item in items:
        module = getattr(item, "module", None)
        if "cli_env" in getattr(item, "fixturenames", ()) or (module is not None and module.__name__ in _SLOW_MODULES):
            item.add_marker(pytest.mark.slow)
