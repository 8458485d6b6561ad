"""Whether a multi-node run was launched as one: ``trainer.num_nodes`` > 1 on a machine that no
cluster launched would wait forever for the other nodes to join."""

from __future__ import annotations

import os

from collab_distill.task import ConfigError

__all__ = ["launching_environment", "check_num_nodes"]


def launching_environment() -> str | None:
    """The cluster environment Fabric would detect (the ones it picks by itself, in its order:
    torchrun/TorchElastic, SLURM, LSF, MPI), ``"NODE_RANK"`` for a launch by hand (every node run
    with ``NODE_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` set), or ``None``."""
    from lightning_fabric.plugins.environments import (
        LSFEnvironment,
        MPIEnvironment,
        SLURMEnvironment,
        TorchElasticEnvironment,
    )

    for environment in (TorchElasticEnvironment, SLURMEnvironment, LSFEnvironment, MPIEnvironment):
        if environment.detect():
            return environment.__name__
    return "NODE_RANK" if "NODE_RANK" in os.environ else None


def check_num_nodes(num_nodes: int) -> None:
    """Refuse ``num_nodes`` > 1 when nothing launched this process as one node of several."""
    if num_nodes > 1 and launching_environment() is None:
        raise ConfigError(
            f"trainer.num_nodes={num_nodes}, but this process was not launched as one node of {num_nodes} (no "
            "torchrun, SLURM, LSF or MPI environment, no NODE_RANK), so it would wait forever for the others: "
            f"start it on every node with torchrun --nnodes {num_nodes} --node_rank R --master_addr HOST, or srun "
            f"under SLURM, or with NODE_RANK, MASTER_ADDR and MASTER_PORT set; on one machine use --trainer.num_nodes 1"
        )
