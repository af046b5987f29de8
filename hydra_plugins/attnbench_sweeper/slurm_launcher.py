"""The launcher of hydra/launcher=slurm: hydra-submitit-launcher's SlurmLauncher, with the launch
of pipeline.slurm_array.ArrayLauncher (a task that dies is recorded as its cell's status, the sweep
goes on) and two settings of its own. Hydra instantiates launchers only from the hydra_plugins
namespace package, and reads their config schema from its ConfigStore: both are here.
"""
from dataclasses import dataclass

from hydra.core.config_store import ConfigStore
from hydra_plugins.hydra_submitit_launcher.config import SlurmQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import (
    SlurmLauncher as _SubmititSlurmLauncher,
)

from pipeline.slurm_array import ArrayLauncher


@dataclass
class AttnbenchSlurmConf(SlurmQueueConf):
    _target_: str = "hydra_plugins.attnbench_sweeper.slurm_launcher.SlurmLauncher"
    # seconds between two looks at the tasks (their result files, then sacct or squeue)
    poll_s: float = 15.0
    # a task without a result about which neither sacct nor squeue has answered for this long (the
    # controller is down) is given up and its cell recorded as error
    lost_after_s: float = 600.0


ConfigStore.instance().store(group="hydra/launcher", name="attnbench_slurm", node=AttnbenchSlurmConf,
                             provider="attnbench")


class SlurmLauncher(ArrayLauncher, _SubmititSlurmLauncher):
    """submitit's SLURM launcher whose launch waits on the scheduler (pipeline/slurm_array.py)."""
