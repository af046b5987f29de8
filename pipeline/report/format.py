"""Numbers as the report prints them: significant digits, 2.0·10⁸ scientific, mean ± std over
seeds, lengths with thousands separators, a missing value as a dash.

    fmt(1234.5) -> "1,234"   fmt(2.5e8) -> "2.50·10⁸"   fmt(None) -> "—"
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pandas as pd

_SUPERSCRIPT = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")
MISSING = "—"


def sci(x: float, digits: int = 2) -> str:
    """2.0·10⁸ style, `digits` significant digits."""
    mant, exp = f"{float(x):.{digits - 1}e}".split("e")
    return f"{mant}·10{str(int(exp)).translate(_SUPERSCRIPT)}"


def fmt(x: Any, digits: int = 3, thousands: str = ",", missing: str = MISSING) -> str:
    """Significant digits; scientific from 1e6 up or below 1e-3; `missing` for None or NaN.
    Whole numbers from 1,000 up are printed in full, grouped by `thousands` ("" for none)."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return missing
    x = float(x)
    if x == 0:
        return "0"
    if abs(x) >= 1e6 or abs(x) < 1e-3:
        return sci(x, digits)
    short = f"{x:.{digits}g}"
    return f"{x:,.0f}".replace(",", thousands) if "e" in short else short  # 1234 -> "1,234", not "1.23e+03"


def mean_std(values: pd.Series, digits: int = 3) -> str:
    """One value as it is; several as mean ± sample std (n seeds)."""
    v = values.dropna()
    if v.empty:
        return MISSING
    if len(v) == 1:
        return fmt(v.iloc[0], digits)
    return f"{fmt(v.mean(), digits)} ± {fmt(v.std(ddof=1), 2)} ({len(v)} seeds)"


def fmt_n(n: Any) -> str:
    """A length: 65,536; a dash when it is not a number."""
    try:
        return f"{int(n):,}"
    except (TypeError, ValueError):
        return MISSING


def fmt_lengths(lengths: Sequence[int]) -> str:
    return ", ".join(f"{v:,}" for v in lengths)


def span(lengths: Sequence[int]) -> str:
    """n = 256…4,096, or n = 256 for one length."""
    return f"n = {lengths[0]:,}…{lengths[-1]:,}" if len(lengths) > 1 else f"n = {lengths[0]:,}"


def fmt_value(v: Any) -> str:
    """An axis value in a label: 64.0 -> 64."""
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def run_ref(r) -> str:
    """A cell's run as the tables name it: `vanilla-n512-kernel `1a2b3c4d``."""
    return f"{r['run_name']} `{r['run_id'][:8]}`"
