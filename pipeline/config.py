"""Config checks and identities: every value a cell depends on is checked here, before any compute,
and turned into the flattened params and the `config_hash` that MLflow records.

    validate(cfg)                 # raises ConfigError("seq_len must be ... got 0")
    config_hash(cfg), flatten(cfg)
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf

from pipeline.registry import CONF_DIR

# Keys that do not change what a cell measures: excluded from config_hash (so a resumed sweep,
# another store or another timeout still finds the earlier run).
NON_MEASUREMENT_KEYS = ("tracking", "overwrite", "isolate", "timeout_s", "budget", "grid", "experiment")
DTYPES = ("float32", "bfloat16", "float16", "float64")


class ConfigError(ValueError):
    """An impossible or unknown setting; its message is one line naming the field."""


def to_dict(cfg: DictConfig | Mapping) -> dict[str, Any]:
    if isinstance(cfg, DictConfig):
        # drop Hydra's own node before resolving: a composed sweep config has unresolvable
        # per-job fields in it (hydra.job.num) and none of it describes the measurement
        keep = [k for k in cfg.keys() if k != "hydra"]
        d = OmegaConf.to_container(OmegaConf.masked_copy(cfg, keep), resolve=True)
    else:
        d = dict(cfg)
    d.pop("hydra", None)
    return d


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"model": {"window": 8}} -> {"model.window": 8}; lists stay values."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _measurement_part(d: Mapping[str, Any], drop: tuple[str, ...] = ()) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k not in NON_MEASUREMENT_KEYS + drop}


def config_hash(cfg: DictConfig | Mapping) -> str:
    """Identity of a cell: sha256 over the measurement-relevant resolved config."""
    blob = json.dumps(_measurement_part(to_dict(cfg)), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def family_hash(cfg: DictConfig | Mapping) -> str:
    """Identity of a cell's line in a sweep: the same cell at every seq_len (for OOM skipping)."""
    blob = json.dumps(_measurement_part(to_dict(cfg), ("seq_len",)), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def check_group_overrides(args: list[str]) -> None:
    """One-line errors for unknown group choices (`model=nope`), before Hydra composes anything.
    Hydra would fail too, with several lines; this names the field and the choices in one."""
    for arg in args:
        if "=" not in arg or arg.startswith(("+", "~", "hydra")):
            continue
        key, value = arg.split("=", 1)
        key = key.lstrip("+")
        if "/" in key or "." in key or not (CONF_DIR / key).is_dir():
            continue
        if value in ("null",) or any(c in value for c in ",()*[]"):
            continue  # sweeps and globs are checked by the sweeper
        if not (CONF_DIR / key / f"{value}.yaml").exists():
            raise ConfigError(f"{key}={value!r} is not a known {key}; choose one of: {', '.join(group_options(key))}")


def _positive_int(d: Mapping, key: str, name: str | None = None) -> None:
    v = d.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ConfigError(f"{name or key} must be a positive integer, got {v!r}")


def validate(cfg: DictConfig | Mapping) -> None:
    """Check a composed cell config; raise ConfigError naming the first bad field."""
    d = to_dict(cfg)
    _positive_int(d, "seq_len")
    _positive_int(d, "batch_size")
    if not isinstance(d.get("seed"), int) or isinstance(d.get("seed"), bool):
        raise ConfigError(f"seed must be an integer, got {d.get('seed')!r}")
    t = d.get("timeout_s")
    if not isinstance(t, (int, float)) or t <= 0:
        raise ConfigError(f"timeout_s must be a positive number of seconds, got {t!r}")
    mem = (d.get("budget") or {}).get("memory_gb")
    if mem is not None and (not isinstance(mem, (int, float)) or mem <= 0):
        raise ConfigError(f"budget.memory_gb must be positive or null, got {mem!r}")

    trk = d.get("tracking") or {}
    if trk.get("require_server"):
        uri = trk.get("uri") or ""
        if not uri.startswith(("http://", "https://")):
            raise ConfigError("tracking=server needs MLFLOW_TRACKING_URI=http://host:port of a running "
                              f"`mlflow server` (make server); got {uri or 'none'}")

    model = d.get("model") or {}
    if "name" not in model or "_target_" not in model:
        raise ConfigError("model must name a variant from conf/model/ (model.name and model._target_)")

    bb = d.get("backbone") or {}
    for key in ("d_model", "n_layers", "n_heads", "mlp_ratio"):
        _positive_int(bb, key, f"backbone.{key}")
    if bb["d_model"] % bb["n_heads"]:
        raise ConfigError(
            f"backbone.d_model={bb['d_model']} must be divisible by backbone.n_heads={bb['n_heads']}"
        )
    if bb.get("dtype") not in DTYPES:
        raise ConfigError(f"backbone.dtype must be one of {DTYPES}, got {bb.get('dtype')!r}")

    sc = d.get("scenario") or {}
    if sc.get("name") not in group_options("scenario"):
        raise ConfigError(f"scenario.name must be one of {group_options('scenario')}, got {sc.get('name')!r}")
    for key in ("min_repeats",):
        if key in sc:
            _positive_int(sc, key, f"scenario.{key}")
    for key in ("warmup", "warmup_s", "min_time_s", "max_time_s"):
        if key in sc and (not isinstance(sc[key], (int, float)) or sc[key] < 0):
            raise ConfigError(f"scenario.{key} must be >= 0, got {sc[key]!r}")

    tr = d.get("trainer") or {}
    _positive_int(tr, "devices", "trainer.devices")
    nt = tr.get("num_threads")
    if nt is not None:
        _positive_int(tr, "num_threads", "trainer.num_threads")
    if str(tr.get("strategy", "")).startswith("ddp") and sc.get("name") == "kernel":
        raise ConfigError("trainer.strategy=ddp runs Lightning's train and predict loops on several ranks; "
                          "the kernel scenario times one process: use scenario=train, infer or full, "
                          "or trainer=cpu / trainer=gpu")

    # knobs every windowed / feature-based variant shares a meaning for; the variant's own
    # check_seq_len (run before compute, in the cell) covers the rest
    for key in ("window", "global_tokens", "features", "state_size", "chunk_size"):
        if key in model and model[key] is not None:
            v = model[key]
            lo = 0 if key == "global_tokens" else 1
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ConfigError(f"model.{key} must be an integer >= {lo}, got {v!r}")
    if model.get("window") is not None and model["window"] > d["seq_len"]:
        raise ConfigError(f"model.window={model['window']} is larger than seq_len={d['seq_len']}")
    if model.get("global_tokens") is not None and model["global_tokens"] > d["seq_len"]:
        raise ConfigError(
            f"model.global_tokens={model['global_tokens']} is larger than seq_len={d['seq_len']}"
        )
