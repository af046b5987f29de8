"""The one interface every sequence mixer implements, and the capability flags the pipeline reads.

A mixer maps ``(B, T, D) -> (B, T, D)``. The pipeline never branches on a variant's name: it
reads the class attributes below and calls ``flops`` / ``memory_bytes`` / ``check_seq_len``.

Autoregressive decoding (causal mixers only): ``init_state`` allocates the variant's natural
cache (a `DecodeState`), ``prefill`` runs the prompt through the full forward and fills the state
from its projections, ``step`` consumes one token. Prefill + steps equal the causal forward of
the whole sequence (up to float rounding). ``state_bytes`` is the analytic size of the state,
``DecodeState.nbytes`` the measured one.

Shape legend used across models/: B batch, T sequence length, D model width, H heads,
K head dim (D = H * K), M random features, W window, G global tokens, N state size.

    mixer = VanillaAttention(d_model=256, n_heads=4, causal=True)
    y_BTD = mixer(x_BTD)

    state = mixer.init_state(batch=1, max_len=T + 8)
    y_BTD, state = mixer.prefill(x_BTD, state)
    y_B1D, state = mixer.step(x_B1D, state)       # the token at position T
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class DecodeState:
    """One mixer's decoding state for a batch of sequences, updated in place by prefill/step.

    `tensors`: the per-sequence cache or state (what `nbytes` counts: KV cache, ring buffer,
    running sums, recurrent state). `consts`: values derived from the weights when the state was
    made (shared by the batch, independent of the context; not counted). `pos`: tokens consumed
    so far, the position of the next one; `max_len`: the capacity it was allocated for.
    """

    batch: int
    max_len: int
    pos: int = 0
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    consts: dict[str, torch.Tensor] = field(default_factory=dict)

    def nbytes(self) -> int:
        """Measured bytes of the state tensors (their storage as allocated)."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


class SequenceMixer(nn.Module):
    """Base class: validates the shared arguments and documents the capability flags."""

    # --- capabilities (read by the pipeline and the tests, never the class name) ---
    exact: bool = False  # computes exact softmax attention (up to float rounding)
    is_attention: bool = True  # approximates softmax attention, so fidelity vs exact is defined
    materialises_scores: bool = False  # builds a T x T tensor (allowed for exact-by-design only)
    time_order: float = 2.0  # promised exponent of T in forward time
    memory_order: float = 2.0  # promised exponent of T in activation memory
    devices: tuple[str, ...] = ("cpu", "cuda")  # device types it runs on
    # decoding state does not grow with the context (bounded by the variant's knobs); False: it
    # grows linearly (a KV cache), so a memory budget caps the context (`context_for_budget`)
    constant_state: bool = False
    # longest context `step` supports by itself (None: no limit beyond init_state's max_len)
    max_context: int | None = None

    # runs only under torch.compile: probes in the dispatcher (a shape recorder, a FLOP counter)
    # cannot see inside its kernels, so its memory is observed by the process's peak instead
    runs_compiled: bool = False
    # device types whose kernels have a backward (training, the kernel scenario's forward+backward)
    backward_devices: tuple[str, ...] = ("cpu", "cuda")
    # dtype names the kernels compute in, per device type (a device not listed: every float dtype)
    dtypes: dict[str, tuple[str, ...]] = {}

    # grouped-query attention: n_kv_heads < n_heads key/value heads, each shared by a group of
    # query heads (1: multi-query). False: the variant refuses it, saying why in `kv_heads_refusal`
    grouped_kv: bool = False
    kv_heads_refusal: str = "it has no separate key/value heads to share"

    def __init__(self, d_model: int, n_heads: int, causal: bool = True, n_kv_heads: int | None = None):
        super().__init__()
        if d_model <= 0 or n_heads <= 0:
            raise ValueError(f"d_model and n_heads must be positive, got {d_model} and {n_heads}")
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        self.d_model, self.n_heads, self.head_dim = d_model, n_heads, d_model // n_heads
        self.n_kv_heads = check_kv_heads(n_heads, n_kv_heads)
        if self.n_kv_heads != n_heads and not self.grouped_kv:
            raise ValueError(f"{type(self).__name__} does not take n_kv_heads={self.n_kv_heads} < n_heads={n_heads} "
                             f"(grouped-query attention): {self.kv_heads_refusal}")
        self.kv_dim = self.n_kv_heads * self.head_dim  # width of the key (and of the value) projection
        self.causal = causal
        # which kernel ran in the last forward; set by every forward, recorded as the run's `backend`
        self.backend: str = "unset"

    @classmethod
    def refusal(cls, device_type: str, dtype: str, backward: bool = False) -> str | None:
        """Why this mixer cannot run on `device_type` in `dtype` (a name: "float64"), with a
        backward when `backward`, in one line; None when it can. Read before any compute."""
        if device_type not in cls.devices:
            return f"{cls.__name__} runs on {', '.join(cls.devices)} only, not {device_type}"
        allowed = cls.dtypes.get(device_type)
        if allowed is not None and dtype not in allowed:
            return f"{cls.__name__} computes in {', '.join(allowed)} on {device_type}, not {dtype}"
        if backward and device_type not in cls.backward_devices:
            return f"{cls.__name__} has no backward on {device_type} (it has one on {', '.join(cls.backward_devices) or 'no device'})"
        return None

    # --- analytic models -------------------------------------------------------
    def projection_flops(self, batch: int, seq_len: int) -> float:
        """Q, K, V and output projections, 2 FLOPs per multiply-add: (B*T, D) x (D, D) for Q and
        the output, (B*T, D) x (D, H_kv K) for K and V (8 B T D^2 when H_kv = H)."""
        return 2.0 * batch * seq_len * self.d_model * (2 * self.d_model + 2 * self.kv_dim)

    def mixing_flops(self, batch: int, seq_len: int) -> float:
        """FLOPs of the sequence mixing itself (what differs between variants). Forward only."""
        raise NotImplementedError

    def flops(self, batch: int, seq_len: int) -> dict[str, float]:
        """Useful forward FLOPs split into projection and mixing (2 FLOPs per multiply-add)."""
        proj, mix = self.projection_flops(batch, seq_len), self.mixing_flops(batch, seq_len)
        return {"projection": proj, "mixing": mix, "total": proj + mix}

    def memory_bytes(self, batch: int, seq_len: int, dtype_bytes: int = 4) -> int:
        """Predicted peak activation bytes of one forward with autograd on (used for pre-flight)."""
        raise NotImplementedError

    def check_seq_len(self, seq_len: int) -> None:
        """Raise ValueError with a one-line reason if this mixer cannot be benchmarked at seq_len."""
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")

    # --- autoregressive decoding ----------------------------------------------
    @classmethod
    def has_step(cls) -> bool:
        """Whether the variant implements token-by-token decoding (overrides `_step`)."""
        return cls._step is not SequenceMixer._step

    def init_state(self, batch: int, max_len: int, device: torch.device | str | None = None,
                   dtype: torch.dtype | None = None) -> DecodeState:
        """An empty decoding state for `batch` sequences of up to `max_len` tokens (prompt and
        generated together). Device and dtype default to the mixer's parameters'."""
        self._require_decoding("init_state")
        if isinstance(batch, bool) or int(batch) != batch or batch < 1:
            raise ValueError(f"batch must be a positive integer, got {batch!r}")
        if isinstance(max_len, bool) or int(max_len) != max_len or max_len < 1:
            raise ValueError(f"max_len must be a positive integer, got {max_len!r}")
        if self.max_context is not None and max_len > self.max_context:
            raise ValueError(f"max_len={max_len} exceeds {type(self).__name__}'s max_context={self.max_context}")
        ref = next(iter(self.parameters()), None)
        device = torch.device(device) if device is not None else (ref.device if ref is not None else torch.device("cpu"))
        dtype = dtype or (ref.dtype if ref is not None else torch.float32)
        state = DecodeState(int(batch), int(max_len))
        state.tensors, state.consts = self._new_state(state.batch, state.max_len, device, dtype)
        return state

    def prefill(self, x_BTD: torch.Tensor, state: DecodeState) -> tuple[torch.Tensor, DecodeState]:
        """The prompt through the full (causal) forward: returns its output (B, T, D) and the
        state filled as if its T tokens had been stepped. Needs an empty state (pos 0)."""
        self._require_decoding("prefill")
        if state.pos != 0:
            raise ValueError(f"prefill needs an empty state (pos 0), got one at pos {state.pos}")
        T = self._check_decode_input(x_BTD, state)
        y_BTD = self._prefill(x_BTD, state)
        if state.pos != T:  # the variant's _prefill must leave the state after the prompt
            raise RuntimeError(f"{type(self).__name__}._prefill left pos={state.pos}, expected {T}")
        return y_BTD, state

    def step(self, x_B1D: torch.Tensor, state: DecodeState) -> tuple[torch.Tensor, DecodeState]:
        """One token (B, 1, D) at position `state.pos`: its output (B, 1, D), the state advanced."""
        self._require_decoding("step")
        if x_B1D.dim() != 3 or x_B1D.shape[1] != 1:
            raise ValueError(f"step takes one token per sequence, shape (B, 1, D); got {tuple(x_B1D.shape)}")
        self._check_decode_input(x_B1D, state)
        y_B1D = self._step(x_B1D, state)
        state.pos += 1
        return y_B1D, state

    def state_bytes(self, batch: int, max_len: int, dtype_bytes: int = 4) -> int:
        """Analytic bytes of the decoding state for `batch` sequences of up to `max_len` tokens
        (what `DecodeState.nbytes` measures), at parameter dtype of `dtype_bytes` bytes."""
        raise NotImplementedError(f"{type(self).__name__} has no analytic decoding-state size")

    def context_for_budget(self, batch: int, budget_bytes: float, dtype_bytes: int = 4,
                           limit: int = 1 << 40) -> int | None:
        """Longest max_len whose state fits in `budget_bytes`: 0 when not even one token's does,
        None when every length up to `limit` fits (a constant-size state). Bisection on the
        (nondecreasing) `state_bytes`, so it holds for any variant."""
        if self.state_bytes(batch, 1, dtype_bytes) > budget_bytes:
            return 0
        if self.state_bytes(batch, limit, dtype_bytes) <= budget_bytes:
            return None
        lo, hi = 1, limit  # fits at lo, not at hi
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if self.state_bytes(batch, mid, dtype_bytes) <= budget_bytes else (lo, mid)
        return lo

    # hooks a variant implements (init_state / prefill / step do the checks around them)
    def _new_state(self, batch: int, max_len: int, device: torch.device, dtype: torch.dtype
                   ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(state tensors, weight-derived constants) of an empty state."""
        raise NotImplementedError(f"{type(self).__name__} implements no decoding state")

    def _step(self, x_B1D: torch.Tensor, state: DecodeState) -> torch.Tensor:
        """The output of one token at position state.pos; updates state.tensors (not pos)."""
        raise NotImplementedError(f"{type(self).__name__} implements no step")

    def _prefill(self, x_BTD: torch.Tensor, state: DecodeState) -> torch.Tensor:
        """Default: step through the prompt (O(T) calls). Variants override it with one pass
        of their forward that also fills the state; either way it leaves state.pos = T."""
        return self._prefill_by_steps(x_BTD, state)

    def _prefill_by_steps(self, x_BTD: torch.Tensor, state: DecodeState) -> torch.Tensor:
        ys = []
        for t in range(x_BTD.shape[1]):
            ys.append(self._step(x_BTD[:, t:t + 1], state))
            state.pos += 1
        return torch.cat(ys, dim=1)

    def _require_decoding(self, what: str) -> None:
        if not self.has_step():
            raise NotImplementedError(f"{type(self).__name__} has no step interface ({what}): "
                                      "it cannot decode token by token")
        if not self.causal:
            raise ValueError(f"{what} needs a causal mixer: this {type(self).__name__} was built with "
                             "causal=False, and a bidirectional mixer's output depends on later tokens")

    def _check_decode_input(self, x_BTD: torch.Tensor, state: DecodeState) -> int:
        if x_BTD.dim() != 3 or x_BTD.shape[0] != state.batch or x_BTD.shape[2] != self.d_model:
            raise ValueError(f"expected input (B={state.batch}, T, D={self.d_model}), got {tuple(x_BTD.shape)}")
        T = x_BTD.shape[1]
        if state.pos + T > state.max_len:
            raise ValueError(f"decoding past max_len: {T} token(s) at position {state.pos} "
                             f"exceed the state's max_len={state.max_len}")
        return T

    def extra_repr(self) -> str:
        kv = f", n_kv_heads={self.n_kv_heads}" if self.n_kv_heads != self.n_heads else ""
        return f"d_model={self.d_model}, n_heads={self.n_heads}{kv}, causal={self.causal}"


def check_kv_heads(n_heads: int, n_kv_heads: int | None) -> int:
    """n_kv_heads (None: n_heads) checked: a positive divisor of n_heads; ValueError otherwise."""
    if n_kv_heads is None:
        return n_heads
    if isinstance(n_kv_heads, bool) or int(n_kv_heads) != n_kv_heads or n_kv_heads < 1 or n_heads % int(n_kv_heads):
        raise ValueError(f"n_kv_heads={n_kv_heads!r} must be a positive divisor of n_heads={n_heads} "
                         "(n_heads: multi-head, 1: multi-query attention)")
    return int(n_kv_heads)


def grouped_scores(q_BHTK: torch.Tensor, k_BhSK: torch.Tensor) -> torch.Tensor:
    """Q K^T with h <= H key heads, each shared by H/h consecutive query heads: (B, H, T, S).
    A group's query rows are stacked (G T rows against its one key head), so every key head is
    read once per call and never copied or broadcast."""
    B, H, T, K = q_BHTK.shape
    h = k_BhSK.shape[1]
    if h == H:
        return q_BHTK @ k_BhSK.transpose(-2, -1)
    q_BhRK = q_BHTK.reshape(B, h, (H // h) * T, K)  # R = G T rows per key head
    return (q_BhRK @ k_BhSK.transpose(-2, -1)).view(B, H, T, -1)


def grouped_values(p_BHTS: torch.Tensor, v_BhSK: torch.Tensor) -> torch.Tensor:
    """P V with h <= H value heads shared as in `grouped_scores`: (B, H, T, K)."""
    B, H, T, S = p_BHTS.shape
    h = v_BhSK.shape[1]
    if h == H:
        return p_BHTS @ v_BhSK
    return (p_BHTS.reshape(B, h, (H // h) * T, S) @ v_BhSK).view(B, H, T, -1)


def repeat_kv(x_BhTK: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Key or value heads repeated over their groups, (B, H, T, K): grouped-query attention as
    multi-head attention computes it (the reference, and the layout some kernels need)."""
    h = x_BhTK.shape[1]
    return x_BhTK if h == n_heads else x_BhTK.repeat_interleave(n_heads // h, dim=1)


def exact_attention_flops(batch: int, heads: int, seq_len: int, head_dim: int, causal: bool) -> float:
    """QK^T and PV: 2 matmuls of T*T*K multiply-adds per head, 2 FLOPs each; causal needs half."""
    f = 4.0 * batch * heads * seq_len**2 * head_dim
    return f / 2 if causal else f


def causal_mask(t: int, device: torch.device) -> torch.Tensor:
    """Boolean (T, T) mask, True where attention is allowed (key index <= query index)."""
    return torch.ones(t, t, dtype=torch.bool, device=device).tril()
