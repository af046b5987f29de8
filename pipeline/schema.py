"""The config schema: one typed dataclass per config group, every field with its role and a
one-line reason for its default. The roles decide, in one place, what a field is:

    axis       what is measured (a report line of its own when it varies); in config_hash
    length     seq_len, the x axis of every figure; in config_hash
    replicate  seed: cells differing only here are repeats; in config_hash
    timing     how long or how precisely a cell measures, not what; in config_hash, never a line
    switch     how a cell is run or recorded (tracking, overwrite, timeouts); not in config_hash

    check(cell_dict)                    # ConfigError naming the first bad field
    role("scenario.min_time_s")         # "timing"
    spec = cell_spec(cell_dict)         # typed sections for the scenarios

Open groups (model/, task/) hold each choice's own knobs: every key there is an axis; the
model knobs are checked by models/knobs.py (the constructors use the same checks), the task's
layout by the task itself (pipeline/tasks.py) before the sweep starts.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

AXIS, LENGTH, REPLICATE, TIMING, SWITCH = "axis", "length", "replicate", "timing", "switch"
DTYPES = ("float32", "bfloat16", "float16", "float64")


class ConfigError(ValueError):
    """An impossible or unknown setting; its message is one line naming the field."""


def _f(default: Any, role: str, why: str, check: str | None = None, absent_when_null: bool = False):
    """A schema field: its default, its role, a one-line reason, and a check (see _CHECKS).
    `absent_when_null`: a field added after cells were recorded without it; left unset (null) it
    is dropped from the config (`drop_unset`), so those cells keep their identity."""
    return field(default=default, metadata={"role": role, "why": why, "check": check,
                                            "absent_when_null": absent_when_null})


# ----------------------------------------------------------------------------- groups


@dataclass
class Backbone:
    d_model: int = _f(128, AXIS, "model width D (the kernel scenario's mixer width too)", "positive")
    n_layers: int = _f(2, AXIS, "blocks of the token model", "positive")
    n_heads: int = _f(4, AXIS, "attention heads H (head dim D / H)", "positive")
    n_kv_heads: Any = _f(None, AXIS, "key/value heads H_kv: null = n_heads; a divisor of n_heads (grouped-query "
                         "attention; 1: multi-query)", "positive_or_null", absent_when_null=True)
    mlp_ratio: int = _f(4, AXIS, "MLP hidden width / D", "positive")
    dtype: str = _f("float32", AXIS, "parameter and activation dtype", "dtype")


@dataclass
class Trainer:
    accelerator: str = _f("cpu", AXIS, "cpu or gpu")
    devices: int = _f(1, AXIS, "processes (ranks) of a Lightning loop", "positive")
    strategy: str = _f("auto", AXIS, "Lightning strategy (ddp for several ranks)")
    precision: Any = _f("32-true", AXIS, "Lightning precision of the train and infer loops")
    num_threads: Any = _f(None, AXIS, "torch intra-op threads; null = every core the process may use", "positive_or_null")
    grad_checkpointing: bool = _f(False, AXIS, "activation checkpoint per block during training")


@dataclass
class Tracking:
    uri: Any = _f(None, SWITCH, "MLflow store; null = MLFLOW_TRACKING_URI or <repo>/mlflow.db")
    experiment: str = _f("attnbench", SWITCH, "MLflow experiment name")
    require_server: bool = _f(False, SWITCH, "refuse anything but an http(s) tracking server")
    offline: bool = _f(False, SWITCH, "write no store: every cell's record waits in the sweep's spool/ for make replay")


@dataclass
class Budget:
    memory_gb: Any = _f(None, SWITCH, "pre-flight limit; null = 80% of available RAM or free GPU memory",
                        "positive_or_null")


@dataclass
class _Timed:
    """The timing knobs every timed loop shares (pipeline/measure.py time_calls)."""
    warmup: int = _f(2, TIMING, "untimed calls first (allocator, caches, lazy init)", "non_negative")
    warmup_s: float = _f(0.5, TIMING, "and at least this much untimed time", "non_negative")
    min_repeats: int = _f(5, TIMING, "at least this many timed calls", "positive")
    min_time_s: float = _f(1.0, TIMING, "and at least this much timed wall time", "non_negative")
    max_time_s: float = _f(30.0, TIMING, "stop repeating after this long", "non_negative")
    noise_target: float = _f(0.03, TIMING, "then repeat until the median's 95 % CI is within ± this share of it ...",
                             "non_negative")
    noise_max_s: float = _f(2.0, TIMING, "... for at most this much longer (never past max_time_s)", "non_negative")


@dataclass
class KernelScenario(_Timed):
    name: str = _f("kernel", AXIS, "what the cell measures")
    uses_task: bool = _f(False, TIMING, "the mixer alone on random inputs: no task")
    fwdbwd: bool = _f(True, AXIS, "also time forward+backward")
    count_flops: bool = _f(True, TIMING, "cross-check analytic FLOPs with torch.utils.flop_counter")


@dataclass
class _Steps:
    warmup_steps: int = _f(10, TIMING, "first training steps left out of train/step_ms", "non_negative")


@dataclass
class _Batches:
    warmup: int = _f(2, TIMING, "predict batches left out of infer/latency_ms", "non_negative")
    batches: int = _f(20, TIMING, "timed predict batches", "positive")


@dataclass
class TrainScenario(_Steps):
    name: str = _f("train", AXIS, "what the cell measures")
    uses_task: bool = _f(True, TIMING, "trains on the task")


@dataclass
class InferScenario(_Batches):
    name: str = _f("infer", AXIS, "what the cell measures")
    uses_task: bool = _f(True, TIMING, "predicts on the task's inputs")


@dataclass
class FullScenario(_Steps, _Batches):
    name: str = _f("full", AXIS, "what the cell measures")
    uses_task: bool = _f(True, TIMING, "trains on the task, then predicts")


@dataclass
class DecodeScenario(_Timed):
    name: str = _f("decode", AXIS, "what the cell measures")
    uses_task: bool = _f(False, TIMING, "the mixer (or the small LM) on random inputs: no task")
    new_tokens: int = _f(32, AXIS, "k generated tokens after the prompt; each is one timed step", "positive")
    with_backbone: bool = _f(False, AXIS, "the small LM with greedy sampling instead of the mixer alone")
    vocab_size: int = _f(256, AXIS, "the LM's vocabulary when with_backbone", "positive")

    @staticmethod
    def check_cell(d: Mapping[str, Any]) -> None:
        """The variant's step interface and n + k against its limits (imports the variant)."""
        from pipeline.scenarios.decode import check_decode

        check_decode(d)


SCENARIOS: dict[str, type] = {"kernel": KernelScenario, "train": TrainScenario, "infer": InferScenario,
                              "full": FullScenario, "decode": DecodeScenario}


def register_scenario(cls: type) -> type:
    """A scenario's section schema, keyed by its `name` default (a new scenario adds one)."""
    SCENARIOS[cls.__dataclass_fields__["name"].default] = cls
    return cls


@dataclass
class Root:
    """The root config's own keys (conf/config.yaml); the groups are the other fields."""
    seq_len: int = _f(1024, LENGTH, "tokens per sequence (n)", "positive")
    batch_size: int = _f(1, AXIS, "sequences per step (B)", "positive")
    causal: bool = _f(True, AXIS, "causal (decoder) attention; false = bidirectional")
    seed: int = _f(0, REPLICATE, "torch and data seed", "integer")
    overwrite: bool = _f(False, SWITCH, "rerun a cell even when an ok run with its config_hash exists")
    isolate: bool = _f(True, SWITCH, "run the cell in a child process of its own")
    isolation: str = _f("fork", SWITCH, "fork: from a warm pre-imported server; spawn: a fresh interpreter", "isolation")
    timeout_s: float = _f(900, SWITCH, "kill the cell's process after this long", "positive_number")
    rounds: int = _f(1, SWITCH, "measure every kernel cell in this many rounds, each forked from a server of its "
                     "own, the rounds interleaved across the sweep in shuffled order", "positive")
    round: Any = _f(None, REPLICATE, "which round a cell is (set by the sweeper when rounds > 1; absent otherwise)",
                    "positive_or_null")
    remeasure: int = _f(2, SWITCH, "measure a cell that is not stable again, in a new process, up to this many times",
                        "non_negative_int")
    remeasure_pause_s: float = _f(3.0, SWITCH, "wait this long before measuring again (a burst of load may pass)",
                                  "non_negative")
    grid: Any = _f(None, SWITCH, "the grid config a sweep composed (hydra.sweeper.grids)")
    experiment: Any = _f(None, SWITCH, "the experiment preset composed")


# group -> its schema; None: an open group (each choice's own keys, all axes)
GROUPS: dict[str, type | None] = {"model": None, "task": None, "backbone": Backbone, "trainer": Trainer,
                                  "tracking": Tracking, "budget": Budget, "scenario": None}
# whole groups of run switches (the root's `grid`/`experiment` keys: a preset names no measurement)
_SWITCH_GROUPS = ("tracking", "budget", "grid", "experiment")


# ----------------------------------------------------------------------------- roles


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def role(key: str) -> str | None:
    """The role of a flattened config key (`backbone.dtype`, `scenario.min_time_s`); None for a
    key no config has (a param the cell adds, such as gemm_peak_tflops)."""
    head, _, rest = key.partition(".")
    if head in _SWITCH_GROUPS:
        return SWITCH
    if not rest:
        f = _fields(Root).get(head)
        return f.metadata["role"] if f else None
    if head in ("model", "task"):
        return AXIS
    if head == "scenario":
        for cls in SCENARIOS.values():  # a knob means the same in every scenario that has it
            f = _fields(cls).get(rest)
            if f:
                return f.metadata["role"]
        return None
    cls = GROUPS.get(head)
    f = _fields(cls).get(rest) if cls else None
    return f.metadata["role"] if f else None


def drop_unset(d: dict[str, Any]) -> dict[str, Any]:
    """The config without the `absent_when_null` fields that are null: such a config is the one
    recorded before the field existed (the same config_hash, params and report lines)."""
    for group, cls in GROUPS.items():
        section = d.get(group)
        if cls is None or not isinstance(section, Mapping):
            continue
        unset = [k for k, f in _fields(cls).items() if f.metadata.get("absent_when_null") and section.get(k, 0) is None]
        if unset:
            d[group] = {k: v for k, v in section.items() if k not in unset}
    return d


def in_hash(key: str) -> bool:
    """Whether a top-level or dotted key is part of a cell's identity (config_hash)."""
    return role(key) != SWITCH


def is_line_axis(key: str) -> bool:
    """Whether a varying value of this param makes a report line of its own."""
    return role(key) == AXIS


# ----------------------------------------------------------------------------- checks


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


_CHECKS = {
    "positive": (lambda v: _is_int(v) and v >= 1, "must be a positive integer"),
    "positive_or_null": (lambda v: v is None or (_is_num(v) and v > 0), "must be positive or null"),
    "non_negative": (lambda v: _is_num(v) and v >= 0, "must be >= 0"),
    "positive_number": (lambda v: _is_num(v) and v > 0, "must be a positive number of seconds"),
    "integer": (lambda v: _is_int(v), "must be an integer"),
    "non_negative_int": (lambda v: _is_int(v) and v >= 0, "must be an integer >= 0"),
    "dtype": (lambda v: v in DTYPES, f"must be one of {DTYPES}"),
    "isolation": (lambda v: v in ("fork", "spawn"), "must be fork or spawn"),
}


def _check_section(d: Mapping[str, Any], cls: type, prefix: str, what: str) -> None:
    fields = _fields(cls)
    for key in d:
        if key not in fields:
            raise ConfigError(f"{prefix}{key} is not a field of {what}; fields: {', '.join(sorted(fields))}")
    for name, f in fields.items():
        check = f.metadata.get("check")
        if check and name in d:
            ok, msg = _CHECKS[check]
            if not ok(d[name]):
                raise ConfigError(f"{prefix}{name} {msg}, got {d[name]!r}")


def check(d: Mapping[str, Any]) -> None:
    """Check a composed cell config (a plain dict) against the schema; raise ConfigError naming
    the first bad field. Torch-free up to the checks that need the variant's class (grouped heads,
    the scenario's own check, the mixer's refusal), which come last."""
    from models.knobs import check_knobs
    from pipeline.model_checks import (
        check_grouped_kv,
        check_model_class,
        check_model_name,
        check_refusal,
    )

    root = {k: v for k, v in d.items() if k not in GROUPS}
    _check_section(root, Root, "", "the root config")
    for key in ("seq_len", "batch_size", "seed", "timeout_s"):  # required, not only typed
        if key not in d:
            raise ConfigError(f"{key} is missing from the config")
    _check_section(d.get("budget") or {}, Budget, "budget.", "budget")
    trk = d.get("tracking") or {}
    _check_section(trk, Tracking, "tracking.", "tracking")
    if trk.get("require_server"):
        uri = trk.get("uri") or ""
        if not uri.startswith(("http://", "https://")):
            raise ConfigError("tracking=server needs MLFLOW_TRACKING_URI=http://host:port of a running "
                              f"`mlflow server` (make server); got {uri or 'none'}")

    model = d.get("model") or {}
    if "name" not in model or "_target_" not in model:
        raise ConfigError("model must name a variant from conf/model/ (model.name and model._target_)")
    builtin = check_model_name(model)

    bb = d.get("backbone") or {}
    _check_section(bb, Backbone, "backbone.", "backbone")
    for key in ("d_model", "n_heads"):
        if key not in bb:
            raise ConfigError(f"backbone.{key} must be a positive integer, got None")
    if bb["d_model"] % bb["n_heads"]:
        raise ConfigError(f"backbone.d_model={bb['d_model']} must be divisible by backbone.n_heads={bb['n_heads']}")
    if bb.get("n_kv_heads") is not None and bb["n_heads"] % bb["n_kv_heads"]:
        raise ConfigError(f"backbone.n_kv_heads={bb['n_kv_heads']} must divide backbone.n_heads={bb['n_heads']} "
                          "(n_heads: multi-head, 1: multi-query attention)")
    if bb.get("n_kv_heads") not in (None, bb["n_heads"]):
        check_grouped_kv(model, bb)

    sc = d.get("scenario") or {}
    cls = SCENARIOS.get(sc.get("name"))
    if cls is None:
        raise ConfigError(f"scenario.name must be one of {sorted(SCENARIOS)}, got {sc.get('name')!r}")
    _check_section(sc, cls, "scenario.", f"scenario={sc['name']}")

    tr = d.get("trainer") or {}
    _check_section(tr, Trainer, "trainer.", "trainer")
    if str(tr.get("strategy", "")).startswith("ddp") and not sc.get("uses_task", True):
        raise ConfigError(f"trainer.strategy=ddp runs Lightning's train and predict loops on several ranks; "
                          f"the {sc['name']} scenario times one process: use scenario=train, infer or full, "
                          "or trainer=cpu / trainer=gpu")

    try:
        check_knobs({k: v for k, v in model.items() if k not in ("name", "_target_")}, int(d["seq_len"]))
    except ValueError as e:
        raise ConfigError(f"model.{e}") from None
    if not builtin:
        check_model_class(model)
    # last, since it may import the variant (torch): a scenario's own check of the whole cell
    if hasattr(cls, "check_cell"):
        try:
            cls.check_cell(d)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    check_refusal(d)


# ----------------------------------------------------------------------------- typed sections


@dataclass
class Workload:
    """What every scenario shares: the shape of the input and the parts that build the model.
    Run switches, tracking and the budget are not here: a scenario never sees them."""
    seq_len: int
    batch_size: int
    causal: bool
    seed: int
    model: dict[str, Any]  # the variant's config: name, _target_ and its knobs
    backbone: Backbone
    task: dict[str, Any]
    trainer: Trainer


def _build(cls: type, d: Mapping[str, Any]):
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})


def scenario_section(d: Mapping[str, Any]):
    """The scenario's own typed section of a checked cell config."""
    sc = d["scenario"]
    return _build(SCENARIOS[sc["name"]], sc)


def workload(d: Mapping[str, Any]) -> Workload:
    return Workload(seq_len=int(d["seq_len"]), batch_size=int(d["batch_size"]), causal=bool(d.get("causal", True)),
                    seed=int(d["seed"]), model=dict(d["model"]), backbone=_build(Backbone, d["backbone"]),
                    task=dict(d.get("task") or {}), trainer=_build(Trainer, d.get("trainer") or {}))
