"""The variants' quality and speed knobs and the one check of each: the mixers' constructors call
it, and the pipeline calls it on a composed config before any compute. Torch-free, so a bad
knob is refused before torch is imported.

    check_knob("window", 128, seq_len=64)    # ValueError: window=128 is larger than seq_len=64
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Knob:
    minimum: int  # smallest allowed value
    meaning: str  # one line: what the knob sets
    at_most_seq_len: bool = False  # a value above the sequence length means nothing
    even: bool = False


KNOBS: dict[str, Knob] = {
    "window": Knob(1, "one-sided look-back width w of the sliding window", at_most_seq_len=True),
    "global_tokens": Knob(0, "g leading positions that attend to and are attended by every position",
                          at_most_seq_len=True),
    "chunk_size": Knob(1, "query block (longformer) or causal chunk (performer) per fused call"),
    "block_size": Knob(16, "query and key block of FlexAttention's block mask (flex)"),
    "features": Knob(1, "M random features of FAVOR+"),
    "state_size": Knob(2, "N, the SSM's state size (N/2 complex modes)", even=True),
}


def check_knob(name: str, value: Any, seq_len: int | None = None) -> int:
    """The knob's value as an int, or ValueError with a one-line reason naming it."""
    k = KNOBS[name]
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and int(value) == value
    if not ok or value < k.minimum or (k.even and value % 2):
        kind = "an even integer" if k.even else "an integer"
        raise ValueError(f"{name} must be {kind} >= {k.minimum} ({k.meaning}), got {value!r}")
    if k.at_most_seq_len and seq_len is not None and value > seq_len:
        raise ValueError(f"{name}={value} is larger than seq_len={seq_len}")
    return int(value)


def check_knobs(knobs: dict[str, Any], seq_len: int | None = None) -> None:
    """Every known knob of a model config (unknown keys are the variant's constructor's own)."""
    for name, value in knobs.items():
        if name in KNOBS and value is not None:
            check_knob(name, value, seq_len)
