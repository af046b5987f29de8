"""The quality tasks (conf/task/): their data, their metric, and how a trained model is scored.

- `mqar`: multi-query associative recall (Arora et al. 2023, "Zoology: Measuring and Improving
  Recall in Efficient Language Models"), generated in-process from a seed; `val/acc` on the
  query positions.
- `code_lm`: byte-level language modelling on this Python's standard-library sources;
  `val/bpc` against the unigram entropy of the same validation bytes.
- `fidelity`: no training; one mixer's output against exact attention on the same weights and
  inputs, `quality/rel_err_vs_exact` against the uniform-average baseline.

Every task is a small class built from its config (`build_task(cfg.task)`); the scenario reads
`task.trains` (a capability, not the task's name) to decide whether there is a model to train.
Targets use -100 (`IGNORE`) wherever there is nothing to score.
Shape legend: B batch, T sequence length, D model width, H heads, K head dim, P key-value
pairs, Q queries.

    task = build_task(cfg.task)
    tokens_BT, targets_BT = next(iter(task.train_loader(seq_len=128, batch_size=64, seed=0)))
"""
from __future__ import annotations

import functools
import hashlib
import math
import sys
import sysconfig
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset

from pipeline import record as R

IGNORE = -100  # F.cross_entropy's default ignore_index


# ----------------------------------------------------------------------------- data plumbing


def _rank_offset() -> int:
    """The global rank under torch.distributed (0 otherwise), so DDP ranks draw different data."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


class _BatchStream(IterableDataset):
    """An endless stream of ready-made batches from `make(generator) -> (tokens_BT, targets_BT)`.

    Fresh data every step (no epochs, no over-fitting to a fixed set); seeded, so the same seed
    gives the same stream. Batches are built whole (vectorised) rather than sample by sample.
    """

    def __init__(self, make, seed: int):
        self.make, self.seed = make, seed

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        g = torch.Generator().manual_seed(_stream_seed(self.seed, "train", _rank_offset()))
        while True:
            yield self.make(g)


def _stream_seed(seed: int, stream: str, rank: int = 0) -> int:
    """Independent generator seeds for the train/val/predict streams of one run seed."""
    h = hashlib.sha256(f"{seed}:{stream}:{rank}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def _tensor_loader(tokens_NT: torch.Tensor, targets_NT: torch.Tensor, batch_size: int) -> DataLoader:
    ds = torch.utils.data.TensorDataset(tokens_NT, targets_NT)
    return DataLoader(ds, batch_size=batch_size, shuffle=False)


class Task:
    """What the scenarios need from a task. Subclasses set `name`, `trains`, `vocab_size`."""

    name: str = ""
    trains: bool = True  # False: quality is measured without training (see `evaluate`)
    vocab_size: int = 0
    positions: str = "none"  # "learned": the backbone gets a position table of seq_len rows
    prev_token: bool = True  # the backbone embeds each position's previous token too (models/lm.py)

    def __init__(self, train: Mapping[str, Any] | None = None, eval_batch_size: int = 256,
                 positions: str = "none", prev_token: bool = True):
        if positions not in ("learned", "none"):
            raise ValueError(f"task.positions must be 'learned' or 'none', got {positions!r}")
        self.train = dict(train or {})
        self.eval_batch_size = eval_batch_size
        self.positions, self.prev_token = positions, bool(prev_token)

    def check(self, seq_len: int) -> None:
        """Raise ValueError with a one-line reason when the task cannot run at seq_len."""

    def train_loader(self, seq_len: int, batch_size: int, seed: int) -> DataLoader:
        raise NotImplementedError

    def val_loader(self, seq_len: int, seed: int) -> DataLoader:
        raise NotImplementedError

    def predict_loader(self, seq_len: int, batch_size: int, n_batches: int, seed: int) -> DataLoader:
        """`n_batches` batches of inputs shaped like the task's (for the inference timing)."""
        g = torch.Generator().manual_seed(_stream_seed(seed, "predict"))
        tokens = torch.randint(0, self.vocab_size, (n_batches * batch_size, seq_len), generator=g)
        return _tensor_loader(tokens, torch.full_like(tokens, IGNORE), batch_size)

    def val_metrics(self, nll_sum: float, n_scored: int, n_correct: int) -> dict[str, float]:
        """Turn the summed validation counts into the task's `val/*` metrics."""
        loss = nll_sum / max(n_scored, 1)
        return {R.VAL_LOSS: loss, R.VAL_ACC: n_correct / max(n_scored, 1)}

    def baselines(self, seq_len: int) -> dict[str, float]:
        """Reference figures a trained model's `val/*` metrics are judged against."""
        return {}

    def describe(self) -> dict[str, Any]:
        """Facts about the data this run used, recorded as `data.*` params (never a config key:
        MLflow refuses to log one param twice with different values)."""
        return {}


# ----------------------------------------------------------------------------- mqar


class MQAR(Task):
    """Multi-query associative recall.

    Layout of one sequence (token ids: keys [0, Kk), values [Kk, Kk+Kv), noise after that):

        k1 v1 k2 v2 ... kP vP  n n n n ... n  q n q n n q ...
        |--- P pairs ---|      |-- gap --|    |-- query region --|

    A query is a key seen earlier; the target at a query position is that key's value. Each of
    the Q queries asks a different pair. Queries sit at random positions of the query region,
    which starts `min_distance` tokens after the last key, so every query is at least
    `min_distance` tokens after its key; every other position is a noise token with target -100.
    The answer is not written after the query (a next-token formulation would put it there):
    leaving it out keeps the task well-posed for bidirectional (`causal=false`) models too.

    Why the gap: a sliding window of width w over L layers sees at most L*w tokens back, so with
    `min_distance` above that a windowed mixer cannot reach any key from its query, while exact
    attention, at any distance, can; this is the separation the task is set up to show.
    """

    name = "mqar"

    def __init__(self, num_pairs: int = 8, num_queries: int | None = None, num_keys: int = 64,
                 num_values: int = 64, num_noise: int = 16, min_distance: int | None = None,
                 val_samples: int = 1024, **common):
        super().__init__(**common)
        num_queries = num_pairs if num_queries is None else num_queries
        if not 1 <= num_queries <= num_pairs:
            raise ValueError(f"task.num_queries must be in [1, num_pairs={num_pairs}], got {num_queries}")
        if num_pairs > num_keys:
            raise ValueError(f"task.num_pairs={num_pairs} needs at least as many keys, got num_keys={num_keys}")
        if min(num_values, num_noise) < 1:
            raise ValueError("task.num_values and task.num_noise must be positive")
        self.P, self.Q = num_pairs, num_queries
        self.num_keys, self.num_values, self.num_noise = num_keys, num_values, num_noise
        self.min_distance_cfg = min_distance
        self.val_samples = val_samples
        self.vocab_size = num_keys + num_values + num_noise

    def min_distance(self, seq_len: int) -> int:
        """Tokens from a key to its query at the least; null in the config = seq_len // 2."""
        return seq_len // 2 if self.min_distance_cfg is None else int(self.min_distance_cfg)

    def _region_start(self, seq_len: int) -> int:
        # the last key sits at 2(P-1); no query may come before the key-value section ends
        return max(2 * self.P, 2 * (self.P - 1) + self.min_distance(seq_len))

    def check(self, seq_len: int) -> None:
        start = self._region_start(seq_len)
        if seq_len - start < self.Q:
            raise ValueError(
                f"mqar: {self.P} pairs, {self.Q} queries and min_distance={self.min_distance(seq_len)} "
                f"need seq_len >= {start + self.Q}, got {seq_len}"
            )

    def generate(self, batch: int, seq_len: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens_BT, targets_BT), int64; targets are -100 except at the Q query positions."""
        self.check(seq_len)
        P, Q, Kk, Kv = self.P, self.Q, self.num_keys, self.num_values
        keys_BP = torch.rand(batch, Kk, generator=g).argsort(dim=-1)[:, :P]  # P distinct keys
        vals_BP = torch.randint(0, Kv, (batch, P), generator=g) + Kk
        tokens_BT = torch.randint(0, self.num_noise, (batch, seq_len), generator=g) + Kk + Kv
        tokens_BT[:, 0 : 2 * P : 2] = keys_BP
        tokens_BT[:, 1 : 2 * P : 2] = vals_BP
        targets_BT = torch.full((batch, seq_len), IGNORE, dtype=torch.long)

        start = self._region_start(seq_len)
        asked_BQ = torch.rand(batch, P, generator=g).argsort(dim=-1)[:, :Q]  # which pairs, distinct
        slots_BQ = torch.rand(batch, seq_len - start, generator=g).argsort(dim=-1)[:, :Q] + start
        tokens_BT.scatter_(1, slots_BQ, keys_BP.gather(1, asked_BQ))
        targets_BT.scatter_(1, slots_BQ, vals_BP.gather(1, asked_BQ))
        return tokens_BT, targets_BT

    def train_loader(self, seq_len: int, batch_size: int, seed: int) -> DataLoader:
        self.check(seq_len)
        # a partial, not a lambda: spawn-started DDP workers pickle the loader
        stream = _BatchStream(functools.partial(self.generate, batch_size, seq_len), seed)
        return DataLoader(stream, batch_size=None)

    def val_loader(self, seq_len: int, seed: int) -> DataLoader:
        g = torch.Generator().manual_seed(_stream_seed(seed, "val"))
        tokens, targets = self.generate(self.val_samples, seq_len, g)
        return _tensor_loader(tokens, targets, self.eval_batch_size)

    def predict_loader(self, seq_len: int, batch_size: int, n_batches: int, seed: int) -> DataLoader:
        g = torch.Generator().manual_seed(_stream_seed(seed, "predict"))
        tokens, targets = self.generate(n_batches * batch_size, seq_len, g)
        return _tensor_loader(tokens, targets, batch_size)

    def baselines(self, seq_len: int) -> dict[str, float]:
        # guessing a value uniformly; a model that ignores the query does no better
        return {R.VAL_ACC_CHANCE: 1.0 / self.num_values}


# ----------------------------------------------------------------------------- code_lm


def stdlib_files(stdlib: Path | None = None) -> list[Path]:
    """The standard library's own .py files (third-party site-/dist-packages left out), sorted."""
    root = Path(stdlib or sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "__pycache__"}
    files = [p for p in root.rglob("*.py") if p.is_file() and not skip.intersection(p.relative_to(root).parts)]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def unigram_entropy_bits(data_N: torch.Tensor, vocab_size: int = 256) -> float:
    """Entropy in bits per symbol of the empirical symbol distribution of `data_N`: what the best
    context-free model of that very text scores, the floor a language model has to beat."""
    counts = torch.bincount(data_N.flatten(), minlength=vocab_size).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log2()).sum())


class CodeLM(Task):
    """Byte-level language modelling on this interpreter's standard-library sources.

    The split is by file and deterministic: each file's relative path is hashed with
    `split_seed`; a fraction `val_fraction` of files (by hash) is validation, the rest training.
    Files are then taken in hash order until `max_train_chars` / `max_val_chars` are filled, so
    the corpus is a spread of the library rather than its alphabetical start. Bytes, not
    characters: the vocabulary is the 256 byte values, the stdlib is nearly all ASCII, and `bpc`
    is bits per byte. The corpus depends on the Python version (recorded with the run).
    Training draws random windows; validation is every consecutive window of the validation text.
    """

    name = "code_lm"
    vocab_size = 256

    def __init__(self, max_train_chars: int = 2_000_000, max_val_chars: int = 100_000,
                 val_fraction: float = 0.1, split_seed: int = 0, stdlib: str | None = None, **common):
        super().__init__(**common)
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"task.val_fraction must be in (0, 1), got {val_fraction}")
        self.max_train_chars, self.max_val_chars = max_train_chars, max_val_chars
        self.val_fraction, self.split_seed = val_fraction, split_seed
        self.stdlib = Path(stdlib) if stdlib else Path(sysconfig.get_paths()["stdlib"])
        self._corpus: dict[str, Any] | None = None

    def _key(self, rel: str) -> int:
        return int.from_bytes(hashlib.sha256(f"{self.split_seed}:{rel}".encode()).digest()[:8], "little")

    def corpus(self) -> dict[str, Any]:
        """Train and val bytes as uint8 tensors (read once per task object), plus file counts."""
        if self._corpus is not None:
            return self._corpus
        files = stdlib_files(self.stdlib)
        if not files:
            raise RuntimeError(f"code_lm: no .py files under {self.stdlib}")
        keyed = sorted((self._key(p.relative_to(self.stdlib).as_posix()), p) for p in files)
        parts: dict[str, list[bytes]] = {"train": [], "val": []}
        caps = {"train": self.max_train_chars, "val": self.max_val_chars}
        used = {"train": 0, "val": 0}
        paths: dict[str, list[str]] = {"train": [], "val": []}
        for key, path in keyed:
            split = "val" if (key % 10_000) < self.val_fraction * 10_000 else "train"
            if used[split] >= caps[split]:
                if all(used[s] >= caps[s] for s in caps):
                    break
                continue
            data = path.read_bytes()[: caps[split] - used[split]] + b"\n"
            parts[split].append(data)
            used[split] += len(data)
            paths[split].append(path.relative_to(self.stdlib).as_posix())
        out: dict[str, Any] = {s: torch.frombuffer(bytearray(b"".join(parts[s])), dtype=torch.uint8) for s in parts}
        out["paths"] = paths
        self._corpus = out
        return out

    def check(self, seq_len: int) -> None:
        c = self.corpus()
        for split in ("train", "val"):
            if c[split].numel() < seq_len + 1:
                raise ValueError(f"code_lm: {split} text has {c[split].numel()} bytes, fewer than seq_len+1={seq_len + 1}")

    def _windows(self, data: torch.Tensor, starts_N: torch.Tensor, seq_len: int):
        idx_NT1 = starts_N[:, None] + torch.arange(seq_len + 1)  # (N, T+1)
        w = data[idx_NT1].long()
        return w[:, :-1], w[:, 1:]  # inputs, next-byte targets

    def train_loader(self, seq_len: int, batch_size: int, seed: int) -> DataLoader:
        self.check(seq_len)
        return DataLoader(_BatchStream(functools.partial(self._train_batch, batch_size, seq_len), seed), batch_size=None)

    def _train_batch(self, batch_size: int, seq_len: int, g: torch.Generator):
        data = self.corpus()["train"]
        starts = torch.randint(0, data.numel() - seq_len, (batch_size,), generator=g)
        return self._windows(data, starts, seq_len)

    def val_targets(self, seq_len: int) -> torch.Tensor:
        """Every byte the validation pass scores, (N, T)."""
        return self._val(seq_len)[1]

    def baselines(self, seq_len: int) -> dict[str, float]:
        # the unigram entropy of exactly the bytes val/bpc is averaged over
        return {R.VAL_BPC_UNIGRAM: unigram_entropy_bits(self.val_targets(seq_len))}

    def _val(self, seq_len: int):
        data = self.corpus()["val"]
        starts = torch.arange(0, data.numel() - seq_len, seq_len)  # consecutive, non-overlapping targets
        return self._windows(data, starts, seq_len)

    def val_loader(self, seq_len: int, seed: int) -> DataLoader:
        self.check(seq_len)
        tokens, targets = self._val(seq_len)
        return _tensor_loader(tokens, targets, self.eval_batch_size)

    def predict_loader(self, seq_len: int, batch_size: int, n_batches: int, seed: int) -> DataLoader:
        self.check(seq_len)
        data = self.corpus()["val"]
        g = torch.Generator().manual_seed(_stream_seed(seed, "predict"))
        starts = torch.randint(0, data.numel() - seq_len, (n_batches * batch_size,), generator=g)
        tokens, targets = self._windows(data, starts, seq_len)
        return _tensor_loader(tokens, targets, batch_size)

    def val_metrics(self, nll_sum: float, n_scored: int, n_correct: int) -> dict[str, float]:
        out = super().val_metrics(nll_sum, n_scored, n_correct)
        out[R.VAL_BPC] = out[R.VAL_LOSS] / math.log(2)
        return out

    def describe(self) -> dict[str, Any]:
        c = self.corpus()
        return {
            "data.train_bytes": int(c["train"].numel()), "data.val_bytes": int(c["val"].numel()),
            "data.train_files": len(c["paths"]["train"]), "data.val_files": len(c["paths"]["val"]),
            "data.python_version": sys.version.split()[0], "data.stdlib": str(self.stdlib),
        }


# ----------------------------------------------------------------------------- fidelity


def uniform_average(v_BHTK: torch.Tensor, causal: bool) -> torch.Tensor:
    """What attention with all-equal weights outputs: the mean of v over the keys each query may
    see (the running mean when causal). (B, H, T, K)."""
    if not causal:
        return v_BHTK.mean(dim=2, keepdim=True).expand_as(v_BHTK)
    T = v_BHTK.shape[2]
    counts_T1 = torch.arange(1, T + 1, device=v_BHTK.device, dtype=v_BHTK.dtype)[:, None]
    return v_BHTK.cumsum(dim=2) / counts_T1


def effective_keys(q_BHTK: torch.Tensor, k_BHTK: torch.Tensor, causal: bool, chunk: int = 1024) -> float:
    """Mean over queries of 1 / sum_j p_ij^2, the number of keys a query's softmax is spread over
    (n for uniform weights, 1 for one-hot). Computed in query chunks so it never holds T x T."""
    B, H, T, K = q_BHTK.shape
    total = 0.0
    for s in range(0, T, chunk):
        q_BHCK = q_BHTK[:, :, s : s + chunk]
        s_BHCT = (q_BHCK @ k_BHTK.transpose(-2, -1)) / math.sqrt(K)
        if causal:
            qi_C1 = torch.arange(s, s + q_BHCK.shape[2], device=q_BHTK.device)[:, None]
            s_BHCT = s_BHCT.masked_fill(torch.arange(T, device=q_BHTK.device)[None, :] > qi_C1, float("-inf"))
        p = s_BHCT.softmax(dim=-1)
        total += float((1.0 / (p * p).sum(dim=-1)).sum())
    return total / (B * H * T)


class Fidelity(Task):
    """How far a mixer's output is from exact attention with the same weights on the same input.

    No training. The reference is the model config named by `reference` (the exact,
    score-materialising one); the variant under test gets the reference's parameters copied in
    by name (the Q/K/V and output projections), so only the mixing differs.

    Inputs: x ~ N(0, s^2) per entry, with s chosen so that the attention scores q.k/sqrt(K) have
    standard deviation `score_std`. The scale matters: with a default-initialised projection and
    unit inputs the scores have std ~0.1, the softmax is nearly uniform, and every approximation
    (and the plain mean of v) looks exact. For one query with Gaussian scores of std sigma, a
    softmax over n keys spreads over about n * exp(-sigma^2) of them (participation ratio);
    averaged over queries, whose norms differ, the spread is wider. The achieved figure is logged
    as `quality/attn_eff_keys` (tiny backbone, sigma = 2: ~40 of 1024 keys on average). The keys
    a query prefers are random here, not local: a window sees only part of them, which is what a
    long-range pattern costs a local approximation. Large scores are also where positive random
    features are noisy (their mean squared error grows like exp(|q + k|^2); Choromanski et al.
    2021, "Rethinking Attention with Performers"), so this is a hard setting for them; lower
    `score_std` to see the near-uniform regime.

    `quality/rel_err_uniform_mean` is the error of outputting the (running) mean of v, i.e.
    attention with equal weights: an approximation is only useful well below it.
    """

    name = "fidelity"
    trains = False

    def __init__(self, reference: str = "vanilla", score_std: float = 2.0, vocab_size: int = 256,
                 calib_tokens: int = 1024, **common):
        super().__init__(**common)
        if score_std <= 0:
            raise ValueError(f"task.score_std must be positive, got {score_std}")
        self.reference, self.score_std = reference, score_std
        self.vocab_size = vocab_size  # tokens for the inference timing (random ids)
        self.calib_tokens = calib_tokens

    def inputs(self, reference, batch: int, seq_len: int, seed: int, device) -> torch.Tensor:
        """x_BTD with the score standard deviation calibrated on the reference's projections."""
        g = torch.Generator().manual_seed(_stream_seed(seed, "fidelity"))
        x_BTD = torch.randn(batch, seq_len, reference.d_model, generator=g).to(device)
        with torch.no_grad():
            q_BHTK, k_BHTK, _ = reference.split_heads(x_BTD[:, : self.calib_tokens])
            std0 = float((q_BHTK @ k_BHTK.transpose(-2, -1)).std() / math.sqrt(reference.head_dim))
        # scores are bilinear in x (the projections have no bias by default), so scaling x by s
        # scales them by s^2
        return x_BTD * math.sqrt(self.score_std / std0)

    def evaluate(self, reference, variant, x_BTD: torch.Tensor) -> dict[str, float]:
        """Metrics of `variant` against `reference` (already holding the same weights) on x."""
        with torch.no_grad():
            y_ref = reference(x_BTD)
            y = variant(x_BTD)
            q_BHTK, k_BHTK, v_BHTK = reference.split_heads(x_BTD)
            y_uni = reference.merge_heads(uniform_average(v_BHTK, reference.causal))
            ref_norm = y_ref.norm()
            return {
                R.QUALITY_REL_ERR_VS_EXACT: float((y - y_ref).norm() / ref_norm),
                R.QUALITY_REL_ERR_UNIFORM_MEAN: float((y_uni - y_ref).norm() / ref_norm),
                R.QUALITY_ATTN_EFF_KEYS: effective_keys(q_BHTK, k_BHTK, reference.causal),
                R.QUALITY_SCORE_STD: float(
                    (q_BHTK[..., : self.calib_tokens, :] @ k_BHTK[..., : self.calib_tokens, :].transpose(-2, -1)).std()
                    / math.sqrt(reference.head_dim)
                ),
            }


def copy_shared_weights(src: torch.nn.Module, dst: torch.nn.Module) -> list[str]:
    """Copy every parameter of `src` into the same-named, same-shaped one of `dst`. Raises when
    `dst` lacks one: a fidelity figure on weights that differ would be meaningless."""
    dst_state = dst.state_dict()
    missing = [k for k, v in src.state_dict().items() if k not in dst_state or dst_state[k].shape != v.shape]
    if missing:
        raise ValueError(
            f"{type(dst).__name__} has no parameter matching {missing} of {type(src).__name__}; "
            "fidelity needs the reference's Q/K/V/output projections under the same names"
        )
    dst.load_state_dict(src.state_dict(), strict=False)
    return list(src.state_dict())


# ----------------------------------------------------------------------------- construction

TASKS: dict[str, type[Task]] = {cls.name: cls for cls in (MQAR, CodeLM, Fidelity)}


def build_task(task_cfg: Mapping[str, Any]) -> Task:
    """The task a conf/task yaml describes: `name` picks the class, the other keys are its knobs."""
    from omegaconf import DictConfig, OmegaConf

    d = OmegaConf.to_container(task_cfg, resolve=True) if isinstance(task_cfg, DictConfig) else dict(task_cfg)
    name = d.pop("name", None)
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {sorted(TASKS)}")
    return TASKS[name](**d)
