"""The one allocator setup every measuring process uses, and its record (the `allocator` tag).
Its own module, torch-free, so that the measuring side (pipeline/execute.py) and the process
side (pipeline/isolation.py) share it without importing each other.
"""
from __future__ import annotations

import os

# One allocator setup for every benchmark child process (CPU timings of T x T buffers depend on
# it: fresh pages fault on every call otherwise). THP_MEM_ALLOC_ENABLE makes torch's CPU allocator
# back large tensors with transparent huge pages; glibc then keeps freed heap memory instead of
# unmapping it (no mmap for big blocks, no trimming), so repeats reuse already-faulted pages.
ALLOCATOR_ENV = {
    "THP_MEM_ALLOC_ENABLE": "1",
    "MALLOC_MMAP_MAX_": "0",
    "MALLOC_TRIM_THRESHOLD_": "18446744073709551615",
}


def allocator_tag(env: dict[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    keys = list(ALLOCATOR_ENV)
    set_ = [f"{k}={env[k]}" for k in keys if k in env]
    return ",".join(set_) if set_ else "default"
