"""What the warm server of forked cells imports before it forks (pipeline/isolation.py): torch,
the measuring side, every scenario and every variant of conf/model/. Importing allocates no
tensors and starts no OpenMP pool; CUDA must stay uninitialised so that each forked cell can
initialise it for itself, which this module checks.
"""
from __future__ import annotations

import importlib

import torch

import pipeline.execute  # noqa: F401 - the child side: measure, registry, schema
from pipeline.registry import discover_variants, load_variant_cfg
from pipeline.scenarios import load_all

load_all()
for _name in discover_variants():
    importlib.import_module(load_variant_cfg(_name)["_target_"].rpartition(".")[0])
if torch.cuda.is_initialized():
    raise RuntimeError("CUDA was initialised before the fork: forked cells could not use it")
