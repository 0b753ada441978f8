"""Resumable, rank-sharded batches from a flat token file.

The file is cut into non-overlapping windows of ``seq_len + 1`` tokens
(sample ``i`` starts at ``i * seq_len``; x is the window without its last
token, y without its first). Each epoch visits the samples in a permutation
fixed by ``(seed, epoch)``.

The position is a single *global* sample cursor. One call of ``next_batch``
on every rank consumes ``micro_batch x world_size`` consecutive entries of the
permuted order; rank r takes the r-th block of ``micro_batch``. So two ranks
together see exactly what one rank with twice the micro-batch sees, and a
resumed run continues at the same token position at any world size that keeps
the global batch (micro_batch x world_size x grad_accum) the same.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterator, Optional, Union

import numpy as np
import torch

from koen_sllm.data import DataError
from koen_sllm.data.pack import open_tokens


def _dataset_id(path: Path) -> Optional[str]:
    meta = path.parent / "meta.json"
    if meta.is_file():
        return json.loads(meta.read_text(encoding="utf-8")).get("fingerprint")
    return None


def _windows(data: np.ndarray, samples: list[int], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    batch = np.stack([np.asarray(data[i * seq_len:i * seq_len + seq_len + 1]) for i in samples]).astype(np.int64)
    return torch.from_numpy(batch[:, :-1].copy()), torch.from_numpy(batch[:, 1:].copy())


class TokenLoader:
    def __init__(self, path: Union[str, Path], seq_len: int, micro_batch: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.path = Path(path)
        self.data = open_tokens(self.path)
        self.seq_len, self.micro_batch, self.rank, self.world_size, self.seed = seq_len, micro_batch, rank, world_size, seed
        self.num_samples = (len(self.data) - 1) // seq_len if len(self.data) else 0
        if self.num_samples < 1:
            raise DataError(f"{self.path} holds {len(self.data):,} tokens, fewer than one sequence of "
                            f"{seq_len + 1}; add data or lower --max-seq-length")
        self.dataset_id = _dataset_id(self.path)
        self.cursor = 0  # global samples consumed, across epochs
        self._perms: dict[int, np.ndarray] = {}

    @property
    def epoch(self) -> float:
        return self.cursor / self.num_samples

    @property
    def tokens_per_epoch(self) -> int:
        return self.num_samples * self.seq_len

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) >= 2:  # a batch spans at most two epochs
                self._perms.pop(min(self._perms))
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
        return self._perms[epoch]

    def _sample(self, position: int) -> int:
        epoch, index = divmod(position, self.num_samples)
        return int(self._permutation(epoch)[index])

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) int64 ``[micro_batch, seq_len]``; every rank must call it the same number of times."""
        start = self.cursor + self.rank * self.micro_batch
        samples = [self._sample(start + j) for j in range(self.micro_batch)]
        self.cursor += self.micro_batch * self.world_size
        return _windows(self.data, samples, self.seq_len)

    def state_dict(self) -> dict:
        return {"cursor": self.cursor, "seq_len": self.seq_len, "seed": self.seed,
                "num_samples": self.num_samples, "tokens": int(len(self.data)), "dataset_id": self.dataset_id,
                "micro_batch": self.micro_batch, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state``; refuses a different dataset, sequence length or seed."""
        mine = self.state_dict()
        for key, what in (("dataset_id", "dataset"), ("tokens", "dataset"), ("seq_len", "--max-seq-length"),
                          ("seed", "--seed")):
            if state.get(key) != mine[key]:
                raise DataError(f"the saved data position belongs to another {what} ({key} {state.get(key)!r}, "
                                f"now {mine[key]!r}); resume with the same data and {what}, or start a fresh run")
        self.cursor = int(state["cursor"])


def iter_eval_batches(path: Union[str, Path], seq_len: int, micro_batch: int, rank: int = 0, world_size: int = 1,
                      max_batches: Optional[int] = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Deterministic validation batches in file order, sharded like ``TokenLoader``.

    Every rank yields the same number of full batches (collectives stay in
    lockstep): the last global batch wraps to the file's start when the split
    does not divide evenly. A file shorter than one sequence yields nothing.
    """
    data = open_tokens(Path(path))
    num_samples = (len(data) - 1) // seq_len if len(data) else 0
    if num_samples < 1:
        return
    per_step = micro_batch * world_size
    batches = math.ceil(num_samples / per_step)
    if max_batches is not None:
        batches = min(batches, max_batches)
    for b in range(batches):
        start = b * per_step + rank * micro_batch
        yield _windows(data, [(start + j) % num_samples for j in range(micro_batch)], seq_len)
