"""attnbench's pipeline: Hydra entry, cells, scenarios, measurement, MLflow tracking, reports."""
from omegaconf import OmegaConf

# `${min:512,${seq_len}}` in a config: knobs that must not exceed the sequence length (a window
# at short n) are written relative to it.
if not OmegaConf.has_resolver("min"):
    OmegaConf.register_new_resolver("min", lambda *xs: min(xs))
