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
