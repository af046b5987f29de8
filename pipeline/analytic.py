"""Closed-form costs of exact attention (no torch needed): the figures a report reproduces.

    score_macs(512, 768)   # 201326592 ~ 2.0e8 multiply-adds of one QK^T over the full width
"""
from __future__ import annotations


def score_macs(n: int, d: int) -> int:
    """Multiply-adds of one QK^T score matrix over the full width d: n^2 * d."""
    return n * n * d


def score_entries(n: int) -> int:
    """Entries of the n x n score matrix (per head and batch element)."""
    return n * n


# ---------------------------------------------------------------- a variant's own analytic models


def analytic(model, *args, absent: dict[str, str] | None = None, **kwargs):
    """`model(*args, **kwargs)`, one of a variant's analytic models (its bound `flops`,
    `memory_bytes` or `state_bytes`), or None where the variant has none (it raises
    NotImplementedError): the figure is absent, never guessed. With `absent` (a cell's tags),
    the model's name joins its `analytic_absent` tag."""
    try:
        return model(*args, **kwargs)
    except NotImplementedError:
        if absent is not None:
            note_absent(absent, model.__name__)
        return None


def note_absent(tags: dict[str, str], what: str) -> None:
    """Add `what` (flops, memory_bytes, state_bytes) to the tags' `analytic_absent` list."""
    from pipeline import record as R

    names = {n for n in tags.get(R.ANALYTIC_ABSENT, "").split(",") if n} | {what}
    tags[R.ANALYTIC_ABSENT] = ",".join(sorted(names))
