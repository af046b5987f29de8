"""Variant discovery and construction: the variants are whatever `conf/model/*.yaml` lists.

    names = discover_variants()             # ["longformer", "performer", ...]
    mixer = build_mixer(model_cfg, d_model=256, n_heads=4, causal=True)
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = REPO_ROOT / "conf"



def cache_dir() -> Path:
    """Per-user state shared by the cells of a machine (GEMM peak cache, device locks)."""
    return Path(os.environ.get("ATTNBENCH_CACHE", Path.home() / ".cache" / "attnbench"))


# keys of a conf/model/*.yaml that describe the variant rather than construct it
_META_KEYS = ("name",)


def discover_variants(conf_dir: Path = CONF_DIR) -> list[str]:
    """Names of every variant config in conf/model/, sorted. Fails loudly when there are none."""
    names = sorted(p.stem for p in (conf_dir / "model").glob("*.yaml"))
    if not names:
        raise RuntimeError(f"no variant configs found in {conf_dir / 'model'}")
    return names


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
    (grouped-query attention) is passed only when set, so a mixer without it still builds."""
    from hydra.utils import instantiate

    kv = {} if n_kv_heads is None or int(n_kv_heads) == int(n_heads) else {"n_kv_heads": int(n_kv_heads)}
    return instantiate(mixer_kwargs(model_cfg), d_model=d_model, n_heads=n_heads, causal=causal, **kv)


def mixer_factory(model_cfg: Mapping[str, Any], causal: bool = True, n_kv_heads: int | None = None):
    """A callable (d_model, n_heads) -> mixer, for backbones that build one mixer per block."""
    cfg = dict(model_cfg)

    def make(d_model: int, n_heads: int):
        return build_mixer(cfg, d_model=d_model, n_heads=n_heads, causal=causal, n_kv_heads=n_kv_heads)

    return make
