"""The checks of a cell config that read its model's class (pipeline/schema.py's `check` calls
them): a built-in variant's name only with its own class, a user's class (model=custom)
importable and constructible, capability flags only for a plain module, grouped key/value heads
only where the variant takes them, and what the mixer refuses (`SequenceMixer.refusal`). Each
raises ConfigError in one line, before any compute.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pipeline.schema import SCENARIOS, ConfigError, _is_num, _Steps


def check_grouped_kv(model: Mapping[str, Any], bb: Mapping[str, Any]) -> None:
    """A variant that does not take fewer key/value heads says so now, in one line (the only
    check here that imports the variant's class, and torch with it: grouped cells only)."""
    from hydra.utils import get_class

    try:
        cls = get_class(model["_target_"])
    except Exception:  # noqa: BLE001 - an unimportable target is reported where the cell builds it
        return
    if not getattr(cls, "grouped_kv", False):
        why = getattr(cls, "kv_heads_refusal", "it has no grouped-query attention")
        raise ConfigError(f"model={model.get('name')} does not take backbone.n_kv_heads={bb['n_kv_heads']} < "
                          f"n_heads={bb['n_heads']} (grouped-query attention): {why}")


def check_model_name(model: Mapping[str, Any]) -> bool:
    """The model config's name is its class's own: a built-in variant's name only with that
    variant's class, and capability flags only where the class is not a built-in (torch-free).
    Returns whether the class is a built-in variant's (known good: not imported here)."""
    from pipeline.registry import builtin_targets

    name, target = model["name"], model["_target_"]
    if not isinstance(target, str) or target in ("", "???"):
        raise ConfigError("model=custom needs model._target_=pkg.module.Class: the mixer class to benchmark")
    builtins = builtin_targets()
    if name in builtins and target != builtins[name]:
        own = target.rpartition(".")[2]
        raise ConfigError(f"model.name={name} is the built-in variant {builtins[name]}; to benchmark {target} use "
                          f"model=custom model._target_={target}, under its own name ({own}) or a model.name "
                          "no built-in variant has")
    if target in builtins.values():
        _refuse_flags(model, target)
        return True
    return False


def _refuse_flags(model: Mapping[str, Any], target: str, cls: type | None = None) -> None:
    """A SequenceMixer declares its capability flags itself: model.<flag> keys are refused."""
    from pipeline.registry import FLAG_KEYS

    given = [k for k in FLAG_KEYS if k in model]
    if given:
        declared = f" ({', '.join(f'{k}={getattr(cls, k)}' for k in given)})" if cls is not None else ""
        raise ConfigError(f"{', '.join('model.' + k for k in given)}: {target} is a SequenceMixer and declares its "
                          f"own capability flags{declared}; drop these keys")


# a plain module's flags, as the config may give them: (check, what it must be)
_FLAG_CHECKS = {
    "exact": (lambda v: isinstance(v, bool), "true or false"),
    "is_attention": (lambda v: isinstance(v, bool), "true or false"),
    "materialises_scores": (lambda v: isinstance(v, bool), "true or false"),
    "time_order": (lambda v: _is_num(v) and v > 0, "a positive number (the exponent of n)"),
    "memory_order": (lambda v: _is_num(v) and v > 0, "a positive number (the exponent of n)"),
}


def check_model_class(model: Mapping[str, Any]) -> None:
    """A user's class (model=custom), imported (its module only, and torch with it): an nn.Module
    whose constructor takes (d_model, n_heads, causal) and the config's knobs; a SequenceMixer
    brings its own capability flags, a plain module takes them from the config."""
    import inspect

    from torch import nn

    from models.base import SequenceMixer
    from pipeline.registry import FLAG_KEYS, import_target

    target = model["_target_"]
    try:
        cls = import_target(target)
    except ValueError as e:
        raise ConfigError(f"model._target_={target}: {e}") from None
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        what = (f"{cls.__name__} derives from {', '.join(b.__name__ for b in cls.__bases__)}" if isinstance(cls, type)
                else f"a {type(cls).__name__}")
        raise ConfigError(f"model._target_={target} is not an nn.Module subclass ({what}): a mixer is an nn.Module "
                          "mapping (B, T, D) -> (B, T, D)")
    if issubclass(cls, SequenceMixer):
        _refuse_flags(model, target, cls)
    for key in FLAG_KEYS:
        if model.get(key) is not None and not _FLAG_CHECKS[key][0](model[key]):
            raise ConfigError(f"model.{key} must be {_FLAG_CHECKS[key][1]}, got {model[key]!r}")
    knobs = {k: v for k, v in model.items() if k not in ("name", *FLAG_KEYS) and not k.startswith("_")}
    try:
        sig = inspect.signature(cls)
    except (TypeError, ValueError):
        return  # no signature to read (a builtin): the constructor itself will say
    try:
        sig.bind(d_model=1, n_heads=1, causal=True, **knobs)
    except TypeError as e:
        call = ", ".join(["d_model", "n_heads", "causal", *(f"{k}={v!r}" for k, v in knobs.items())])
        raise ConfigError(f"model._target_={target}: its constructor {cls.__name__}{sig} cannot take ({call}): {e}") from None


def check_refusal(d: Mapping[str, Any]) -> None:
    """A cell its mixer says it cannot run (`SequenceMixer.refusal`), in one line before any
    compute: training (a scenario with training steps on a task that trains) on a device where
    the mixer has no backward, or a dtype it does not compute in there (backbone.dtype; float32
    too where a task's model is built, whose parameters are float32). The kernel scenario's
    forward+backward is not refused here: that cell records it skipped. Imports the variant's
    class, and torch with it."""
    from hydra.utils import get_class

    from pipeline.devices import wants_cuda

    model, sc = d["model"], d["scenario"]
    try:
        cls = get_class(model["_target_"])
    except Exception:  # noqa: BLE001 - an unimportable target is reported where the cell builds it
        return
    refusal = getattr(cls, "refusal", None)
    if refusal is None:
        return
    uses_task = bool(sc.get("uses_task", True))
    backward = uses_task and issubclass(SCENARIOS[sc["name"]], _Steps) and _task_trains(d.get("task") or {})
    device = "cuda" if wants_cuda(d) else "cpu"
    dtype = str((d.get("backbone") or {}).get("dtype", "float32"))
    for dt in dict.fromkeys([dtype, "float32"] if uses_task else [dtype]):
        why = refusal(device, dt, backward=backward)
        if why is not None:
            what = f"scenario={sc['name']}" + (f" task={d['task'].get('name')}" if uses_task and d.get("task") else "")
            raise ConfigError(f"model={model.get('name')} cannot run {what} on {device}: {why}")


def _task_trains(task: Mapping[str, Any]) -> bool:
    """Whether the cell's task trains a model (a backward); an unknown task is reported where it is built."""
    from pipeline.tasks import task_classes

    cls = task_classes().get(task.get("name"))
    return bool(getattr(cls, "trains", True)) if cls is not None else False
