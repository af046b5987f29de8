"""What a mixer's ops allocate, seen from PyTorch's dispatcher: the shape of every tensor an op
returns (`ShapeRecorder`, for "no T x T tensor") and the peak of the bytes those tensors hold
at once (`LiveBytes`, for the memory exponent). Both see every aten op of eager code, forward and
backward; buffers a fused kernel allocates inside itself are invisible to them.

    with ShapeRecorder() as rec:
        mixer(x).sum().backward()
    quadratic(rec.shapes, T)                # [("aten.bmm.default", (4, 2048, 2048)), ...]
"""
from __future__ import annotations

import math
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def _tensors(out):
    return (t for t in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(t, torch.Tensor))


class ShapeRecorder(TorchDispatchMode):
    """Records the shape of every tensor an aten op returns (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.shapes.extend((str(func), tuple(t.shape)) for t in _tensors(out))
        return out


def quadratic(shapes: list[tuple[str, tuple[int, ...]]], T: int) -> list[tuple[str, tuple[int, ...]]]:
    """The recorded tensors that are T x T in size: two trailing dims >= T, or as many elements
    as a (T, T) score matrix."""
    return [(f, s) for f, s in shapes if (len(s) >= 2 and min(s[-2:]) >= T) or math.prod(s) >= T * T]


class LiveBytes(TorchDispatchMode):
    """The most bytes that tensors returned by ops held at one time (`peak`), each storage counted
    once however many views share it, freed when its last tensor dies (saved-for-backward tensors
    stay alive with the graph, so a forward with autograd on counts what it keeps)."""

    def __init__(self):
        super().__init__()
        self.now = self.peak = 0
        self._bytes: dict[int, int] = {}  # storage -> its bytes
        self._refs: dict[int, int] = {}  # storage -> live tensors seen on it

    def _release(self, key: int) -> None:
        self._refs[key] -= 1
        if not self._refs[key]:
            del self._refs[key]
            self.now -= self._bytes.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in _tensors(out):
            if t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            key = storage._cdata
            if key not in self._bytes:
                self._bytes[key], self._refs[key] = storage.nbytes(), 0
                self.now += storage.nbytes()
                self.peak = max(self.peak, self.now)
            self._refs[key] += 1
            weakref.finalize(t, self._release, key)
        return out
