"""Guards for behaviours whose breakage left every other test green.

Each test pins one promise of the trainer through what a user can see: the checkpoint files,
logs/metrics.jsonl, the learning rate of the next step, the random state a resumed process
continues with, and (for DDP) how often gradients cross the wire. The runs are tiny CPU runs
on one shared prepared corpus; the two-process ones use gloo under torchrun.
"""
from __future__ import annotations

import json
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from e2e_support import cpu_env, write_corpus
from koen_sllm import distributed as D
from koen_sllm.checkpoint.store import CheckpointError, resolve_resume
from koen_sllm.config import apply_device_defaults, parse_args, repo_root
from koen_sllm.logs import close_handlers, setup_logging
from koen_sllm.model import KoEnLM, ModelConfig
from koen_sllm.optim import default_warmup, lr_factor
from koen_sllm.run_state import RunSetupError
from koen_sllm.trainer import Trainer

PEAK_LR, MIN_RATIO = 2e-3, 0.1
SEQ, MICRO = 64, 2
TOKENS_PER_STEP = SEQ * MICRO  # one process, no accumulation


@pytest.fixture(scope="module", autouse=True)
def one_process_and_rng_kept():
    """The in-process runs are worlds of one, whatever launched pytest; and the global generators,
    which the resume tests scramble on purpose, are handed back to the session as they were."""
    saved = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    with pytest.MonkeyPatch.context() as mp:
        for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            mp.delenv(name, raising=False)
        yield
    random.setstate(saved[0])
    np.random.set_state(saved[1])
    torch.set_rng_state(saved[2])


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """One corpus for every run here; its prepared tokenizer and token files land beside it
    on the first run and are reused by the others."""
    return write_corpus(tmp_path_factory.mktemp("data"))


def _cfg(dataset: Path, run_dir: Path, *extra: str):
    cfg, _ = parse_args(["--train", "--model-size", "tiny", "--max-seq-length", str(SEQ), "--vocab-size", "400",
                         "--num-proc", "1", "--batch-size", str(MICRO), "--learning-rate", str(PEAK_LR),
                         "--min-lr-ratio", str(MIN_RATIO), "--log-steps", "1", "--eval-batches", "1",
                         "--no-save-initial", "--save-total-limit", "10", "--resume", "none",
                         "--dataset-path", str(dataset), "--output-dir", str(run_dir / "out"),
                         "--logs-dir", str(run_dir / "logs"), *extra])
    apply_device_defaults(cfg, False)
    return cfg


def _trainer(dataset: Path, run_dir: Path, *extra: str) -> Trainer:
    cfg = _cfg(dataset, run_dir, *extra)
    setup_logging(cfg.logs_dir, 0)
    tr = Trainer(cfg, D.init_distributed())
    tr.setup()
    return tr


def _train_records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "logs" / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["type"] == "train"]


def _rng_states() -> tuple:
    """Every generator capture_rng saves (CUDA's only where a GPU exists), in comparable form."""
    np_state = np.random.get_state()
    cuda = torch.cuda.get_rng_state().tolist() if torch.cuda.is_available() else None
    return (torch.get_rng_state().tolist(), random.getstate(), (np_state[0], np_state[1].tolist(), *np_state[2:]),
            cuda)


def _scramble_rngs(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---------------------------------------------------------------- resume (one process)

RESUME_ARGS = ("--max-steps", "7", "--save-steps", "3")  # checkpoint-3 mid-run, then 4 more steps


@pytest.fixture(scope="module")
def resumed(dataset, tmp_path_factory):
    """An uninterrupted 7-step run and a second run resumed from its checkpoint-3 in another folder.

    Both the random state the first run held when checkpoint-3 was written and the one the
    resumed run holds once setup() returns are kept. The generators are scrambled before the
    first run trains, so its saved state is not the one the model's seeded initialisation
    leaves behind, and again before the resumed run, as a fresh process would have them: only
    a restore can make the two agree.
    """
    base = tmp_path_factory.mktemp("resume")
    out = {}
    try:
        full = _trainer(dataset, base / "full", *RESUME_ARGS)
        _scramble_rngs(1234)
        step = full.train_step

        def recording_step():
            if full.step == 3:  # checkpoint-3 has just been written; nothing has drawn since
                out["rng_at_save"] = _rng_states()
            return step()

        full.train_step = recording_step
        full.train()
        close_handlers()
        _scramble_rngs(987)
        ckpt = base / "full" / "out" / "checkpoint-3"
        again = _trainer(dataset, base / "resumed", *RESUME_ARGS, "--resume", str(ckpt))
        out["rng_after_resume"] = _rng_states()
        out["resumed_at"] = again.step
        again.train()
    finally:
        close_handlers()
    out["full"], out["resumed"] = base / "full", base / "resumed"
    return out


def test_resume_restores_the_random_state_saved_with_the_checkpoint(resumed):
    assert resumed["resumed_at"] == 3
    torch_s, py_s, np_s, cuda_s = resumed["rng_after_resume"]
    want_torch, want_py, want_np, want_cuda = resumed["rng_at_save"]
    assert torch_s == want_torch, "torch's CPU generator was not restored"
    assert py_s == want_py, "python's random was not restored"
    assert np_s == want_np, "numpy's global generator was not restored"
    assert cuda_s == want_cuda


def test_resume_continues_the_token_count(resumed):
    """tokens_seen counts from the start of the run, not from the resume."""
    for record in _train_records(resumed["resumed"]):
        assert record["tokens_seen"] == record["step"] * TOKENS_PER_STEP, record
    steps = [r["step"] for r in _train_records(resumed["resumed"])]
    assert steps == [4, 5, 6, 7]
    info = json.loads((resumed["resumed"] / "out" / "checkpoint-7" / "training_info.json").read_text())
    assert info["step"] == 7 and info["tokens_seen"] == 7 * TOKENS_PER_STEP
    full = json.loads((resumed["full"] / "out" / "checkpoint-7" / "training_info.json").read_text())
    assert info["tokens_seen"] == full["tokens_seen"]


def test_resume_continues_the_learning_rate_schedule_for_every_step(resumed):
    """Each logged lr (the next step's) after the resume equals the uninterrupted run's and the
    schedule's own value; a schedule restarted at the resume would give the warm-up's values."""
    full = {r["step"]: r["lr"] for r in _train_records(resumed["full"])}
    after = {r["step"]: r["lr"] for r in _train_records(resumed["resumed"])}
    assert sorted(after) == [4, 5, 6, 7]
    warmup = default_warmup(7)
    for step, lr in after.items():
        assert lr == full[step], step
        assert lr == pytest.approx(PEAK_LR * lr_factor(step, 7, warmup, MIN_RATIO), rel=1e-12), step
    assert len(set(after.values())) == len(after)  # a cosine, so a shifted schedule cannot match by chance


# ---------------------------------------------------------------- skipped steps and the schedule


def test_a_skipped_step_advances_neither_the_schedule_nor_the_step_count(dataset, tmp_path):
    """docs/architecture.md: a non-finite step is skipped without a schedule step. The lr logged
    after each applied step is computed here from lr_factor, not taken from another run (which
    would share any fault of this one)."""
    max_steps, warmup = 6, 3
    try:
        tr = _trainer(dataset, tmp_path / "nan", "--max-steps", str(max_steps), "--warmup-steps", str(warmup),
                      "--save-steps", "1000", "--debug-nan-steps", "3")
        summary = tr.train()
    finally:
        close_handlers()
    assert summary.bad_steps == 1 and summary.steps == max_steps
    records = _train_records(tmp_path / "nan")
    assert [r["step"] for r in records] == list(range(1, max_steps + 1))
    for r in records:
        want = PEAK_LR * lr_factor(r["step"], max_steps, warmup, MIN_RATIO)
        assert r["lr"] == pytest.approx(want, rel=1e-12), r["step"]
        assert r["tokens_seen"] == r["step"] * TOKENS_PER_STEP
    info = json.loads((tmp_path / "nan" / "out" / f"checkpoint-{max_steps}" / "training_info.json").read_text())
    assert info["step"] == max_steps and info["tokens_seen"] == max_steps * TOKENS_PER_STEP


# ---------------------------------------------------------------- an explicit --resume and the manifest


def test_explicit_resume_refuses_a_same_size_file_with_one_flipped_byte(resumed, dataset, tmp_path):
    """The size check alone passes this file; only the manifest's sha256 sees the change."""
    import shutil

    ckpt = tmp_path / "out" / "checkpoint-3"
    shutil.copytree(resumed["full"] / "out" / "checkpoint-3", ckpt)
    assert resolve_resume(str(ckpt), tmp_path / "out") == ckpt  # intact, it is accepted
    weights = ckpt / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x10  # inside the last tensor's values: still a loadable file, silently wrong
    weights.write_bytes(bytes(data))
    assert weights.stat().st_size == len(data)
    with pytest.raises(CheckpointError, match="model.safetensors fails its sha256 check"):
        resolve_resume(str(ckpt), tmp_path / "out")
    try:
        with pytest.raises(RunSetupError, match="model.safetensors fails its sha256 check"):
            _trainer(dataset, tmp_path, "--max-steps", "7", "--resume", str(ckpt))
    finally:
        close_handlers()


# ---------------------------------------------------------------- the default warm-up


@pytest.mark.parametrize("max_steps,warmup", [
    (1, 1), (50, 1), (199, 1), (200, 2), (1000, 10), (12345, 123), (199999, 1999), (200000, 2000),
    (10**7, 2000),
])
def test_default_warmup_is_one_percent_at_least_one_at_most_2000(max_steps, warmup):
    assert default_warmup(max_steps) == warmup


def test_a_run_without_warmup_steps_uses_the_default_warmup(dataset, tmp_path):
    max_steps = 500  # a 5-step warm-up: its first step runs at a fifth of the peak
    try:
        tr = _trainer(dataset, tmp_path, "--max-steps", str(max_steps))
    finally:
        close_handlers()
    assert tr.cfg.optim.warmup_steps is None
    want = PEAK_LR * lr_factor(0, max_steps, default_warmup(max_steps), MIN_RATIO)
    assert want == pytest.approx(PEAK_LR / 5)
    assert tr.lr == pytest.approx(want, rel=1e-12)


# ---------------------------------------------------------------- two gloo processes: MFU and gradient syncs

# Run under torchrun: the trainer's own CLI, with two test-only hooks. A known peak stands in for
# the GPU table (CPU has none, so no MFU would be logged), and a DDP comm hook records which
# gradient bucket each all-reduce carries, per rank, then reduces as DDP itself would.
WRAPPER = textwrap.dedent("""
    import json, os, sys
    sys.path.insert(0, sys.argv.pop(1))
    out, peak = sys.argv.pop(1), float(sys.argv.pop(1))
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from koen_sllm import distributed as D
    from koen_sllm import trainer as T
    from koen_sllm.cli import train_main

    buckets = []
    wrap = D.wrap_model

    def counting_wrap(model, info, bucket_mb=25.0):
        ddp = wrap(model, info, bucket_mb)
        def hook(state, bucket):
            buckets.append(bucket.index())
            return default_hooks.allreduce_hook(state, bucket)
        ddp.register_comm_hook(None, hook)
        return ddp

    D.wrap_model = counting_wrap
    finalize = T.Trainer.finalize

    def with_peak(self):
        finalize(self)
        self.peak = peak

    T.Trainer.finalize = with_peak
    code = train_main()
    with open(os.path.join(out, f"buckets_rank{os.environ['RANK']}.json"), "w") as f:
        json.dump(buckets, f)
    sys.exit(code)
""")

DDP_STEPS, PEAK = 4, 1e11  # a made-up device peak, in FLOP/s


@pytest.fixture(scope="module")
def ddp_run(dataset, tmp_path_factory):
    run = tmp_path_factory.mktemp("ddp")
    script = run / "wrapper.py"
    script.write_text(WRAPPER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           str(repo_root()), str(run), str(PEAK),
           "--train", "--model-size", "tiny", "--max-seq-length", str(SEQ), "--vocab-size", "400", "--num-proc", "1",
           "--batch-size", str(MICRO), "--grad-accum", "2", "--max-steps", str(DDP_STEPS), "--log-steps", "1",
           "--no-save-initial", "--save-steps", "1000", "--eval-batches", "1",
           "--dataset-path", str(dataset), "--output-dir", str(run / "out"), "--logs-dir", str(run / "logs")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=cpu_env(), timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return run


def test_mfu_uses_the_per_gpu_rate(ddp_run):
    """MFU is each device's achieved FLOP/s over one device's peak, so the all-process rate is
    divided by the world size first."""
    info = json.loads((ddp_run / "out" / f"checkpoint-{DDP_STEPS}" / "training_info.json").read_text())
    flops_per_token = KoEnLM(ModelConfig(**info["model"])).flops_per_token(SEQ)
    measured = [r for r in _train_records(ddp_run) if r["tokens_per_s"]]
    assert measured, "no step had a throughput window"
    for r in measured:
        assert r["tokens_per_s_per_gpu"] == pytest.approx(r["tokens_per_s"] / 2, rel=1e-12)
        assert r["mfu"] == pytest.approx(r["tokens_per_s"] / 2 * flops_per_token / PEAK, rel=1e-9)


def test_ddp_all_reduces_gradients_once_per_optimizer_step(ddp_run):
    """With --grad-accum 2 the first micro-batch's backward runs under no_sync: every gradient
    bucket is all-reduced once per optimizer step, not once per micro-batch."""
    for rank in (0, 1):
        buckets = json.loads((ddp_run / f"buckets_rank{rank}.json").read_text())
        assert buckets, "the comm hook saw no all-reduce"
        count = {index: buckets.count(index) for index in set(buckets)}
        assert sorted(count) == list(range(len(count)))
        assert set(count.values()) == {DDP_STEPS}, count
