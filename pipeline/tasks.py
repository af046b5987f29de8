"""The quality tasks (conf/task/): their data, their metric, and how a trained model is scored.

- `mqar`: multi-query associative recall (Arora et al. 2023, "Zoology: Measuring and Improving
  Recall in Efficient Language Models"), generated in-process from a seed; `val/acc` on the
  query positions.
- `code_lm`: byte-level language modelling on this Python's standard-library sources;
  `val/bpc` against the unigram entropy of the same validation bytes.
- `fidelity` (pipeline/fidelity.py): no training; one mixer's output against exact attention on
  the same weights and inputs, `quality/rel_err_vs_exact` against the uniform-average baseline.

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


# ----------------------------------------------------------------------------- construction


def task_classes() -> dict[str, type[Task]]:
    """Every task by name (fidelity's module builds on Task, so it is imported here)."""
    from pipeline.fidelity import Fidelity

    return {cls.name: cls for cls in (MQAR, CodeLM, Fidelity)}


def build_task(task_cfg: Mapping[str, Any]) -> Task:
    """The task a conf/task yaml describes: `name` picks the class, the other keys are its knobs."""
    from omegaconf import DictConfig, OmegaConf

    d = OmegaConf.to_container(task_cfg, resolve=True) if isinstance(task_cfg, DictConfig) else dict(task_cfg)
    name = d.pop("name", None)
    tasks = task_classes()
    if name not in tasks:
        raise ValueError(f"unknown task {name!r}; choose one of {sorted(tasks)}")
    return tasks[name](**d)
