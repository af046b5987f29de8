"""Config identities and the entry checks: a composed config becomes the plain dict a cell runs
on, its flattened params and its `config_hash`; `validate` checks it against the schema
(pipeline/schema.py, which decides what is a measurement) before any compute.

    validate(cfg)                 # raises ConfigError("seq_len must be ... got 0")
    config_hash(cfg), flatten(cfg)
    cell = Cell.of(cfg)           # all of it at once: cell.config, .hash, .family, .name, .params
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from pipeline.registry import CONF_DIR
from pipeline.schema import ConfigError, check, drop_unset, in_hash

__all__ = ["Cell", "ConfigError", "config_hash", "family_hash", "flatten", "to_dict", "validate"]


def compose(overrides: list[str], return_hydra_config: bool = False) -> DictConfig:
    """The real config tree (conf/config.yaml) with overrides, as `python -m pipeline.run
    <overrides>` composes it: the one composition outside Hydra's entry point."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import pipeline  # noqa: F401 - registers the config resolvers

    if GlobalHydra.instance().is_initialized():  # inside a Hydra app: compose there
        return hydra_compose(config_name="config", overrides=overrides, return_hydra_config=return_hydra_config)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides, return_hydra_config=return_hydra_config)


def to_dict(cfg: DictConfig | Mapping) -> dict[str, Any]:
    if isinstance(cfg, DictConfig):
        # drop Hydra's own node before resolving: a composed sweep config has unresolvable
        # per-job fields in it (hydra.job.num) and none of it describes the measurement
        keep = [k for k in cfg.keys() if k != "hydra"]
        d = OmegaConf.to_container(OmegaConf.masked_copy(cfg, keep), resolve=True)
    else:
        d = dict(cfg)
    d.pop("hydra", None)
    return drop_unset(_drop_unset_flags(d))


def _drop_unset_flags(d: dict[str, Any]) -> dict[str, Any]:
    """The capability flags a template config leaves null (conf/model/custom.yaml) are not part of
    the cell: unset, the class's own (or SequenceMixer's default) stands."""
    from pipeline.registry import FLAG_KEYS

    model = d.get("model")
    if isinstance(model, Mapping) and any(k in model and model[k] is None for k in FLAG_KEYS):
        d["model"] = {k: v for k, v in model.items() if not (k in FLAG_KEYS and v is None)}
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
    """The top-level keys the schema counts as part of a cell's identity (not run switches)."""
    return {k: v for k, v in d.items() if in_hash(k) and k not in drop}


def _digest(part: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(part, sort_keys=True, default=str).encode()).hexdigest()[:16]


def config_hash(cfg: DictConfig | Mapping) -> str:
    """Identity of a cell: sha256 over the measurement-relevant resolved config."""
    return _digest(_measurement_part(to_dict(cfg)))


def family_hash(cfg: DictConfig | Mapping) -> str:
    """Identity of a cell's line in a sweep: the same cell at every seq_len (for OOM skipping)."""
    return _digest(_measurement_part(to_dict(cfg), ("seq_len",)))


@dataclass(frozen=True)
class Cell:
    """One grid point as the parent side uses it, made once (`Cell.of`) and passed down: the
    validated, resolved config, its identities, its run name and its flattened params."""

    config: dict[str, Any]
    hash: str
    family: str
    name: str
    params: dict[str, Any]

    @classmethod
    def of(cls, cfg: DictConfig | Mapping) -> Cell:
        """Resolve and check the config (ConfigError naming the first bad field), then derive the rest."""
        from pipeline.record import run_name

        d = to_dict(cfg)
        check(d)
        name = run_name(d["model"]["name"], d["seq_len"], d["scenario"]["name"],
                        bool((d.get("trainer") or {}).get("grad_checkpointing")), d.get("round"))
        return cls(d, _digest(_measurement_part(d)), _digest(_measurement_part(d, ("seq_len",))), name, flatten(d))


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
    _check_template_keys(args)


def _check_template_keys(args: list[str]) -> None:
    """A knob of a user's class (model=custom) is not in the template: Hydra adds it only with `+`,
    and would say so in several lines; this says it in one."""
    from omegaconf import OmegaConf

    from pipeline.registry import is_template

    choice = next((a.split("=", 1)[1] for a in args if a.startswith("model=")), None)
    path = CONF_DIR / "model" / f"{choice}.yaml"
    if choice is None or not path.exists() or not is_template(path):
        return
    known = set(OmegaConf.load(path))
    for arg in args:
        key, eq, value = arg.partition("=")
        if eq and key.startswith("model.") and key.split(".")[1] not in known:
            raise ConfigError(f"{key} is a knob of your class, not a key of conf/model/{choice}.yaml: add it with "
                              f"+{key}={value}")


def validate(cfg: DictConfig | Mapping) -> None:
    """Check a composed cell config; raise ConfigError naming the first bad field."""
    check(to_dict(cfg))
