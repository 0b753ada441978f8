"""The training loop's bookkeeping in one CPU process, with the step itself scripted."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from e2e_support import write_corpus
from koen_sllm import distributed as D
from koen_sllm.config import apply_device_defaults, parse_args
from koen_sllm.logs import close_handlers, setup_logging
from koen_sllm.optim import build_scheduler, merge_split_projections, param_group_names, param_groups
from koen_sllm.trainer import Trainer
from koen_sllm.hf import mapping as HF


def make_trainer(tmp_path: Path, name: str, *extra: str) -> Trainer:
    data = tmp_path / "data"
    if not data.exists():
        data.mkdir()
        write_corpus(data)
    cfg, _ = parse_args(["--train", "--model-size", "tiny", "--max-seq-length", "32", "--batch-size", "2",
                         "--max-steps", "40", "--log-steps", "5", "--vocab-size", "400", "--num-proc", "1",
                         "--dataset-path", str(data), "--output-dir", str(tmp_path / name / "out"),
                         "--logs-dir", str(tmp_path / name / "logs"), "--no-save-initial", "--no-save-final",
                         "--save-steps", "1000", "--eval-batches", "1", *extra])
    apply_device_defaults(cfg, False)
    setup_logging(cfg.logs_dir, 0)
    tr = Trainer(cfg, D.init_distributed())
    tr.setup()
    return tr


@pytest.fixture
def trainer(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    yield make_trainer(tmp_path, "run")
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


def fused_adamw(tr: Trainer) -> None:
    """The optimizer the GPU path uses (fused AdamW), here on CPU, with a fresh schedule; the
    engine's levers are decided again for it."""
    o, engine = tr.cfg.optim, tr.engine
    engine.optimizer = torch.optim.AdamW(param_groups(tr.raw_model, o.weight_decay), lr=o.learning_rate,
                                         betas=(o.beta1, o.beta2), eps=o.eps, fused=True)
    engine.scheduler = build_scheduler(engine.optimizer, o, tr.max_steps)
    engine.decide_levers()


def test_update_launched_before_the_vote_equals_the_classic_order(tmp_path, monkeypatch):
    """Skipping a bad update inside the fused kernel (found_inf) leaves the same weights and
    optimizer state as not calling the optimizer at all, good steps included."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    runs = {}
    try:
        for name, early in (("classic", False), ("early", True)):
            tr = make_trainer(tmp_path, name, "--debug-nan-steps", "1,4")
            fused_adamw(tr)
            tr.engine.levers.early_update, tr.engine.levers.clip_in_update = early, False
            flags = [tr.train_step()[2] for _ in range(7)]
            runs[name] = (flags, tr.raw_model.state_dict(), tr.engine.optimizer.state_dict(), tr.lr)
    finally:
        close_handlers()
    (flags_a, weights_a, opt_a, lr_a), (flags_b, weights_b, opt_b, lr_b) = runs["classic"], runs["early"]
    assert flags_a == flags_b == [False, True, True, False, True, True, True]
    assert lr_a == lr_b
    for key, value in weights_a.items():
        assert torch.equal(value, weights_b[key]), key
    for pid, state in opt_a["state"].items():
        for key, value in state.items():
            assert torch.equal(value, opt_b["state"][pid][key]), (pid, key)
    assert opt_a["state"][0]["step"].item() == 5  # two of the seven attempts were skipped


def test_clipping_inside_the_fused_update_matches_clip_grad_norm(tmp_path, monkeypatch):
    """Dividing the gradients inside fused AdamW (its grad_scale) gives clip_grad_norm_'s weights to
    rounding and the same reported norm; a bad step is still skipped. The clip is tight enough
    to act on every step, and a run without it ends elsewhere, so the comparison can fail."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    runs = {}
    try:
        for name, clip, inside in (("separate", "0.05", False), ("inside", "0.05", True), ("unclipped", "0", False)):
            tr = make_trainer(tmp_path, name, "--debug-nan-steps", "3", "--grad-clip", clip)
            fused_adamw(tr)
            tr.engine.levers.early_update, tr.engine.levers.clip_in_update = True, inside
            out = [tr.train_step() for _ in range(5)]
            runs[name] = ([float(n) for _, n, _ in out], [ok for *_, ok in out], tr.raw_model.state_dict())
    finally:
        close_handlers()
    (norms_s, flags_s, w_s), (norms_i, flags_i, w_i), (_, _, w_u) = runs["separate"], runs["inside"], runs["unclipped"]
    assert flags_s == flags_i == [True, True, False, True, True]
    assert norms_i[0] == norms_s[0] > 0.05 * 4  # the same first norm, well above the clip
    good = [0, 1, 3, 4]
    assert [norms_i[i] for i in good] == pytest.approx([norms_s[i] for i in good], rel=1e-4)
    for key, value in w_s.items():
        torch.testing.assert_close(w_i[key], value, rtol=1e-5, atol=1e-6, msg=key)
    assert any(not torch.allclose(w_u[key], value, rtol=1e-3, atol=1e-5) for key, value in w_s.items())


def split_projections(saved: dict, model) -> dict:
    """An optimizer state in the layout of checkpoints saved while q/k/v were separate matrices:
    the fused matrix's moments cut into its blocks, the parameters renumbered."""
    state, groups, old, new = {}, [], 0, 0
    for group, names in zip(saved["param_groups"], param_group_names(model)):
        ids = []
        for name in names:
            entry = saved["state"][old]
            old += 1
            rows = [r for _, r in HF.fused_blocks(model, name) or []]
            pieces = [entry] if not rows else [
                {**entry, "exp_avg": m.clone(), "exp_avg_sq": v.clone()}
                for m, v in zip(entry["exp_avg"].split(rows), entry["exp_avg_sq"].split(rows))]
            for piece in pieces:
                state[new] = piece
                ids.append(new)
                new += 1
        groups.append({**group, "params": ids})
    return {"state": state, "param_groups": groups}


def test_a_checkpoint_from_before_the_fused_projections_resumes_exactly(tmp_path, monkeypatch):
    """Its optimizer state holds the q, k and v moments per matrix; resuming stacks them into the
    fused matrix's moments, and the next step equals the uninterrupted run's."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    try:
        a = make_trainer(tmp_path, "a")
        for _ in range(3):
            a.train_step()
            a.step += 1
        path = a.save_checkpoint("checkpoint-3")
        state_file = path / "trainer_state.pt"
        state = torch.load(state_file, weights_only=True)
        assert len(state["optimizer"]["state"]) == len(list(a.raw_model.parameters()))
        state["optimizer"] = split_projections(state["optimizer"], a.raw_model)
        assert len(state["optimizer"]["state"]) == len(list(a.raw_model.parameters())) + 2 * a.model_cfg.num_layers
        torch.save(state, state_file)
        b = make_trainer(tmp_path, "b")
        b.resume_from(path)
        want, got = a.engine.optimizer.state_dict(), b.engine.optimizer.state_dict()
        assert got["param_groups"] == want["param_groups"]
        for pid, entry in want["state"].items():
            for key, value in entry.items():
                assert torch.equal(got["state"][pid][key], value), (pid, key)
        a.train_step()
        b.train_step()
        for key, value in a.raw_model.state_dict().items():
            assert torch.equal(b.raw_model.state_dict()[key], value), key
    finally:
        close_handlers()


def test_an_optimizer_state_of_another_model_is_left_to_torch_to_refuse(trainer):
    saved = trainer.engine.optimizer.state_dict()
    names = param_group_names(trainer.raw_model)
    fewer = [group[:-1] for group in names]
    assert merge_split_projections(saved, fewer, lambda name: 1) is saved  # fits neither layout
    assert merge_split_projections(saved, names, lambda name: 1) is saved  # today's layout


def test_clipping_rides_inside_the_update_only_with_a_fused_optimizer(trainer):
    assert trainer.engine.levers.clip_in_update is False  # CPU: AdamW is not fused, so clip_grad_norm_ clips
    fused_adamw(trainer)
    assert trainer.engine.levers.clip_in_update is (hasattr(torch.nn.utils, "get_total_norm"))
    trainer.cfg.optim.grad_clip = 0.0
    trainer.engine.decide_levers()
    assert trainer.engine.levers.clip_in_update is False  # nothing to clip


def test_the_early_update_is_used_exactly_with_a_fused_optimizer(trainer):
    assert trainer.engine.levers.early_update is False  # CPU: AdamW is not fused there, so the classic order
    fused_adamw(trainer)
    assert trainer.engine.levers.early_update is True


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: pinned copies and events")
def test_host_copy_of_the_vote_waits_for_the_copy_only():
    from koen_sllm.engines import start_host_copy

    votes = torch.tensor([2.5, 0.0, 1.0], device="cuda")
    read = start_host_copy(votes)
    big = torch.randn(4096, 4096, device="cuda")
    for _ in range(5):
        big = big @ big.T / 4096  # work queued after the copy
    assert read() == [2.5, 0.0, 1.0]


def test_compile_wraps_ddp_not_the_other_way_round(tmp_path, monkeypatch):
    """torch.compile must see DDP (its DDPOptimizer then splits the graph at gradient buckets so
    all-reduces overlap the backward); compiled inside DDP, every gradient would arrive at once."""
    calls = []

    class FakeDDP(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, *a):
            return self.module(*a)

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(D, "wrap_model", lambda m, info, mb: calls.append(("wrap", m)) or FakeDDP(m))
    monkeypatch.setattr(torch, "compile", lambda m, **kw: calls.append(("compile", m)) or m)
    try:
        tr = make_trainer(tmp_path, "run", "--compile")
    finally:
        close_handlers()
    assert [name for name, _ in calls] == ["wrap", "compile"]
    assert calls[0][1] is tr.raw_model and isinstance(calls[1][1], FakeDDP) and tr.engine.model is calls[1][1]
