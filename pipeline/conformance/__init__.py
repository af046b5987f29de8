"""Conformance: what a sequence mixer must show before its figures mean anything. The same checks
hold the built-in variants (tests/models/test_conformance.py runs them on each) and a user's own
mixer to one standard.

    python -m pipeline.conformance model=custom model._target_=my_pkg.mixers.Windowed [+model.window=64]
    python -m pipeline.conformance model=longformer model.window=32 --checks causality,decoding
    make conformance TARGET=my_pkg.mixers.Windowed      # or MODEL=vanilla

One line per check: `pass`, `fail` with the reason, `info` (measured, not judged: the error of
an approximate mixer) or `skip` with why; exit status 1 when any check fails, 2 on a bad config.

- shapes: (B, T, D) in and out at T = 1, 7, 37 in float32, at 37 in float64 and bfloat16, finite,
  the same dtype out, a backend named;
- batch: each sequence's output is the same alone as in a batch of three;
- determinism: two builds under one seed, and two calls, give identical outputs;
- gradients: the input and every parameter get finite, non-zero gradients;
- exactness (a mixer that claims `exact`): error against float64 exact attention on the same
  weights at most 2x plain PyTorch's error in that dtype plus 1e-5 (FlashAttention's rule, as in
  pipeline/fidelity.py), outputs in float32 and bfloat16, input gradients in float32; an
  approximate mixer's error is printed next to the uniform mean's, not judged;
- causality (a causal mixer): outputs and input gradients at positions < t unchanged when inputs
  at >= t change, at t on both sides of block boundaries (8, 64, 128, 256); a bidirectional one
  must see the future;
- no-TxT: no op returns a T x T tensor at T = 2048 (forward and backward) unless the mixer
  declares `materialises_scores`; a mixer that runs only compiled (`runs_compiled`), whose
  kernels the dispatcher cannot see into, peaks below a quarter of one T x T score tensor;
- memory-order, time-order: the exponents of the peak bytes held by op outputs (forward and
  backward; the process's peak for a mixer that runs only compiled) and of forward time (fastest
  of interleaved rounds) over T = 1024, 2048, 4096, between the two longest, at most the declared
  `memory_order` + 0.2 and `time_order` + 0.3 (time is a measurement on a shared machine: a narrow
  miss is worth a rerun; `python -m pipeline.conformance` runs under the cells' allocator setup);
- decoding (a causal mixer with `step`): prefill + steps equal the causal forward, and the
  state's bytes equal `state_bytes`.

Knobs are the mixer's as configured: shrink windows and chunks (`model.window=5`) to put their
boundaries inside the short lengths of the behavioural checks.
"""
from pipeline.conformance.checks import CHECKS, LENGTHS, run_check
from pipeline.conformance.subject import Outcome, Subject

__all__ = ["CHECKS", "LENGTHS", "Outcome", "Subject", "run_check"]
