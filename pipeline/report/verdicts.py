"""The three verdicts a claim of the report can get, and how a measured interval earns one:
holds (the interval lies inside the criterion), does not hold here (wholly outside), or
inconclusive (it straddles a bound). Used by "The answer" (pipeline/report/answer.py).

    interval_verdict(1.88, 1.98, 1.85, 2.15)   # "holds"
"""
from __future__ import annotations

HOLDS, FAILS, INCONCLUSIVE = "holds", "does not hold here", "inconclusive"


def interval_verdict(lo: float, hi: float, low: float, high: float) -> str:
    """A measured interval [lo, hi] against the criterion [low, high]: holds when it lies inside,
    does not hold when it lies wholly outside, inconclusive when it straddles a bound."""
    if lo >= low and hi <= high:
        return HOLDS
    if hi < low or lo > high:
        return FAILS
    return INCONCLUSIVE


def combine_verdicts(verdicts: list[str]) -> str:
    """Every part must hold; one that does not fails the claim; otherwise it is inconclusive."""
    if FAILS in verdicts:
        return FAILS
    return HOLDS if all(v == HOLDS for v in verdicts) else INCONCLUSIVE
