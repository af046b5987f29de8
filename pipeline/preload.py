"""What the warm server of forked cells imports before it forks (pipeline/isolation.py): torch,
the measuring side, every scenario and every variant of conf/model/. Importing allocates no
tensors and starts no OpenMP pool; CUDA must stay uninitialised so that each forked cell can
initialise it for itself, which this module checks.

The server is killed with the process that started it (the sweep), and each forked cell with the
server: a killed sweep leaves no cell measuring on. (multiprocessing's server would otherwise
outlive its client while a forked child holds the fd that keeps it alive.)
"""
from __future__ import annotations

import importlib

import torch

import pipeline.execute  # noqa: F401 - the child side: measure, registry, schema
from pipeline.isolation import _die_with_parent
from pipeline.registry import discover_variants, load_variant_cfg
from pipeline.scenarios import load_all

_die_with_parent()
load_all()
for _name in discover_variants():
    importlib.import_module(load_variant_cfg(_name)["_target_"].rpartition(".")[0])
if torch.cuda.is_initialized():
    raise RuntimeError("CUDA was initialised before the fork: forked cells could not use it")
