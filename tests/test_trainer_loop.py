"""The training loop's bookkeeping in one CPU process, with the step itself scripted."""
from __future__ import annotations

import json

import pytest
import torch

from e2e_support import write_corpus
from koen_sllm import distributed as D
from koen_sllm.config import apply_device_defaults, parse_args
from koen_sllm.logs import close_handlers, setup_logging
from koen_sllm.trainer import Trainer


@pytest.fixture
def trainer(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    (tmp_path / "data").mkdir()
    write_corpus(tmp_path / "data")
    cfg, _ = parse_args(["--train", "--model-size", "tiny", "--max-seq-length", "32", "--batch-size", "2",
                         "--max-steps", "40", "--log-steps", "5", "--vocab-size", "400", "--num-proc", "1",
                         "--dataset-path", str(tmp_path / "data"), "--output-dir", str(tmp_path / "out"),
                         "--logs-dir", str(tmp_path / "logs"), "--no-save-initial", "--no-save-final",
                         "--save-steps", "1000", "--eval-batches", "1"])
    apply_device_defaults(cfg, False)
    setup_logging(cfg.logs_dir, 0)
    tr = Trainer(cfg, D.init_distributed())
    tr.setup()
    yield tr
    close_handlers()


def test_a_loss_spike_is_warned_about_and_recorded(trainer, caplog):
    scripted = [6.0 - 0.01 * i for i in range(40)]
    scripted[29] = 9.5  # step 30
    steps = iter(scripted)
    trainer.train_step = lambda: (torch.tensor(next(steps)), torch.tensor(1.0), True)
    summary = trainer.train()
    assert summary.steps == 40 and summary.loss_spikes == 1
    records = [json.loads(line) for line in (trainer.cfg.logs_dir / "metrics.jsonl").read_text().splitlines()]
    spikes = [r for r in records if r["type"] == "spike"]
    assert len(spikes) == 1 and spikes[0]["step"] == 30 and spikes[0]["loss"] == pytest.approx(9.5)
    assert 5.7 < spikes[0]["recent_median"] < 5.9
    console = (trainer.cfg.logs_dir / "training_rank_0.log").read_text()
    assert "loss spike at step 30: 9.5000" in console
