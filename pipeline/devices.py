"""Which device a cell asks for, and whether this machine has it. Torch-free to import: the
parent side and the sweeper ask before any cell runs (`cuda_missing` imports torch itself).

    if wants_cuda(cell) and (why := cuda_missing()): fail(why)
"""
from __future__ import annotations


def wants_cuda(d) -> bool:
    """Whether a cell config (dict or DictConfig) asks for a CUDA device."""
    return str((d.get("trainer") or {}).get("accelerator")) in ("gpu", "cuda")


def cuda_missing() -> str | None:
    """Why a cell asking for a GPU cannot run on this machine (None when CUDA is there). Imports
    torch: call it only for such cells. `is_available` counts devices without creating a context."""
    import torch

    if torch.cuda.is_available():
        return None
    build = "built without CUDA" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}, no device visible"
    return f"trainer.accelerator=gpu but this machine has no usable CUDA device (torch {torch.__version__}: {build})"
