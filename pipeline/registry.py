"""Variant discovery and construction: the variants are whatever `conf/model/*.yaml` lists,
except templates (a yaml whose `_target_` is `???`, such as conf/model/custom.yaml: a user's
class named on the command line, `model=custom model._target_=pkg.module.Class`).

    names = discover_variants()             # ["longformer", "performer", ...]
    mixer = build_mixer(model_cfg, d_model=256, n_heads=4, causal=True)
    provenance("models.vanilla.VanillaAttention")   # {"mixer_class": ..., "mixer_file": ...}
"""
from __future__ import annotations

import functools
import importlib
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from pipeline import record as R

REPO_ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = REPO_ROOT / "conf"


def _class_name(*, _parent_) -> str:
    """`${class_name:}` in a model config: the last component of its `_target_` (a template's
    default run name: the user's class under its own name); `custom` while the target is unset."""
    if OmegaConf.is_missing(_parent_, "_target_"):
        return "custom"
    return str(_parent_["_target_"]).rpartition(".")[2]


if not OmegaConf.has_resolver("class_name"):
    OmegaConf.register_new_resolver("class_name", _class_name)


def cache_dir() -> Path:
    """Per-user state shared by the cells of a machine (GEMM peak cache, device locks)."""
    return Path(os.environ.get("ATTNBENCH_CACHE", Path.home() / ".cache" / "attnbench"))


# a plain nn.Module's capability flags, given as model.<flag> keys (a SequenceMixer subclass
# declares its own): the attributes the pipeline reads, recorded as the tags of the same names
FLAG_KEYS = R.CAPABILITY_TAGS
# keys of a conf/model/*.yaml that describe the variant rather than construct it
_META_KEYS = ("name", *FLAG_KEYS)


@functools.lru_cache(maxsize=256)
def _model_yaml(path: str, mtime_ns: int) -> tuple[bool, str]:
    """(is a template, its `_target_`) of a model config, read once per version of the file."""
    cfg = OmegaConf.load(path)
    template = "_target_" not in cfg or OmegaConf.is_missing(cfg, "_target_")
    return template, "" if template else str(cfg["_target_"])


def _read(path: Path) -> tuple[bool, str]:
    return _model_yaml(str(path), path.stat().st_mtime_ns)


def is_template(path: Path) -> bool:
    """A model config that is not a variant: its `_target_` is left for the command line (`???`)."""
    return _read(path)[0]


def _model_configs(conf_dir: Path) -> list[Path]:
    return sorted((conf_dir / "model").glob("*.yaml"))


def discover_variants(conf_dir: Path = CONF_DIR) -> list[str]:
    """Names of every variant config in conf/model/ (templates left out), sorted. Fails loudly
    when there are none."""
    names = [p.stem for p in _model_configs(conf_dir) if not is_template(p)]
    if not names:
        raise RuntimeError(f"no variant configs found in {conf_dir / 'model'}")
    return names


def templates(conf_dir: Path = CONF_DIR) -> list[str]:
    """Names of the template configs in conf/model/ (what `model=glob(*)` leaves out)."""
    return [p.stem for p in _model_configs(conf_dir) if is_template(p)]


def builtin_targets(conf_dir: Path = CONF_DIR) -> dict[str, str]:
    """Each variant's name and the class its config names (`_target_`), torch-free."""
    return {name: _read(conf_dir / "model" / f"{name}.yaml")[1] for name in discover_variants(conf_dir)}


def import_target(target: str) -> Any:
    """The object a dotted `_target_` names, importing only its module; ValueError in one line
    naming the module or the attribute that is missing."""
    module, _, attr = str(target).rpartition(".")
    if not module or not attr:
        raise ValueError(f"{target!r} is not a dotted path pkg.module.Class")
    try:
        mod = importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - any failure to import is the config's problem, said in one line
        first = (str(e).strip().splitlines() or [""])[0]
        raise ValueError(f"cannot import module {module} ({type(e).__name__}: {first})") from None
    if not hasattr(mod, attr):
        raise ValueError(f"module {module} ({getattr(mod, '__file__', None) or 'no file'}) has no attribute {attr}")
    return getattr(mod, attr)


@functools.lru_cache(maxsize=1)
def _distributions() -> dict[str, list[str]]:
    from importlib.metadata import packages_distributions

    return packages_distributions()


def provenance(target: str) -> dict[str, str]:
    """Where the mixer class of a `_target_` comes from: its dotted path, the file of the module
    that defines it and, when that file belongs to an installed distribution (not a source tree on
    the path, nor an editable install: the git sha tells those), the distribution's name==version.
    Torch-free for a module that is not imported yet (its file is found, not executed)."""
    from importlib.metadata import PackageNotFoundError, distribution
    from importlib.util import find_spec

    module, _, attr = str(target).rpartition(".")
    tags = {R.MIXER_CLASS: str(target)}
    obj = getattr(sys.modules.get(module), attr, None)
    defining = sys.modules.get(getattr(obj, "__module__", None) or module)
    path = getattr(defining, "__file__", None)
    if path is None:
        try:
            spec = find_spec(module)
            path = spec.origin if spec is not None else None
        except Exception:  # noqa: BLE001 - provenance is recorded as far as it can be found
            path = None
    if not path or not Path(path).exists():
        return tags
    path = Path(path).resolve()
    tags[R.MIXER_FILE] = str(path)
    found = []
    for name in dict.fromkeys(_distributions().get(module.partition(".")[0], [])):
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            continue
        if path.is_relative_to(Path(dist.locate_file("")).resolve()):
            found.append(f"{dist.metadata['Name']}=={dist.version}")
    if found:
        tags[R.MIXER_DIST] = ", ".join(found)
    return tags


def load_variant_cfg(name: str, seq_len: int | None = None, conf_dir: Path = CONF_DIR) -> dict[str, Any]:
    """The plain dict of conf/model/<name>.yaml (for tests and tools outside Hydra). Knobs written
    relative to the sequence length (`${min:512,${seq_len}}`) resolve against `seq_len`; with
    None they take their unclamped value."""
    from omegaconf import OmegaConf

    import pipeline  # noqa: F401 - registers the config resolvers

    path = conf_dir / "model" / f"{name}.yaml"
    if not path.exists():
        raise ValueError(f"unknown variant {name!r}; choose one of {discover_variants(conf_dir)}")
    root = OmegaConf.create({"seq_len": seq_len if seq_len is not None else 2**62,
                             "model": OmegaConf.load(path)})
    return OmegaConf.to_container(root, resolve=True)["model"]


def mixer_kwargs(model_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The constructor part of a model config: everything but the descriptive keys."""
    return {k: v for k, v in dict(model_cfg).items() if k not in _META_KEYS}


def build_mixer(model_cfg: Mapping[str, Any], d_model: int, n_heads: int, causal: bool = True,
                n_kv_heads: int | None = None):
    """Instantiate the mixer a model config names (`_target_` plus its own knobs). `n_kv_heads`
    (grouped-query attention) is passed only when set, so a mixer without it still builds. A
    class that is not a SequenceMixer (a plain nn.Module) runs inside models.custom.PlainMixer,
    with the capability flags the config gives."""
    from hydra.utils import instantiate

    from models.base import SequenceMixer

    kv = {} if n_kv_heads is None or int(n_kv_heads) == int(n_heads) else {"n_kv_heads": int(n_kv_heads)}
    cls = import_target(model_cfg["_target_"])
    if isinstance(cls, type) and not issubclass(cls, SequenceMixer):
        from models.custom import PlainMixer

        knobs = {k: v for k, v in mixer_kwargs(model_cfg).items() if k != "_target_"}
        flags = {k: model_cfg[k] for k in FLAG_KEYS if model_cfg.get(k) is not None}
        return PlainMixer(cls, d_model=d_model, n_heads=n_heads, causal=causal, flags=flags, **kv, **knobs)
    return instantiate(mixer_kwargs(model_cfg), d_model=d_model, n_heads=n_heads, causal=causal, **kv)


def mixer_factory(model_cfg: Mapping[str, Any], causal: bool = True, n_kv_heads: int | None = None):
    """A callable (d_model, n_heads) -> mixer, for backbones that build one mixer per block."""
    cfg = dict(model_cfg)

    def make(d_model: int, n_heads: int):
        return build_mixer(cfg, d_model=d_model, n_heads=n_heads, causal=causal, n_kv_heads=n_kv_heads)

    return make
