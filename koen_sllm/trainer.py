"""The training loop: build, step, validate, log, save, stop.

It receives a validated RunConfig and a DistInfo; it parses no CLI. Every
collective below is reached by all ranks in the same order.

The step runs on an engine (engines/__init__.py): DDP (engines/ddp.py, the
default) or, with --deepspeed, the DeepSpeed runner. The engine owns the
optimizer, schedule, precision, clipping and the rank-agreed skip of a
non-finite step; the loader, votes' outcome, logs and checkpoint layout here
are the same for both.
"""
from __future__ import annotations

import dataclasses
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

import torch

from . import distributed as D
from .engines import deepspeed as DSB
from .checkpoint.store import CheckpointTarget, estimate_checkpoint_bytes
from .config import RunConfig, derive_batch_plan, resolve_weights
from .data.loader import TokenLoader, iter_eval_batches
from .engines.ddp import PRECISION_DTYPES, DDPEngine
from .fp8 import describe as describe_fp8
from .logs import get_logger, progress_bar
from .losses import fused_ce_offered
from .metrics import (MetricsSink, SpikeDetector, StepClock, Throughput, format_progress, mfu, peak_flops,
                      peak_memory_gib)
from .model import KoEnLM, model_config_from_preset
from .optim import restore_rng
from .data.prepare import ensure_training_data
from .run_state import (RunSetupError, check_output_dir_on_main, check_resume_backend,
                        git_commit, library_versions, load_resume_state, resolve_resume_on_main,
                        save_run_checkpoint)
from .stop import StopRequest
from .tokenizer import KoEnTokenizer
from .hf import mapping as HF

VOCAB_MULTIPLE = 64  # embedding rows padded so matmuls tile evenly on tensor cores
# the log's words for a compile mode ("off" when none); other modes are named as they are
COMPILE_LOG = {"default": "on", "reduce-overhead": "on (reduce-overhead: CUDA graphs)"}


@dataclass
class Summary:
    steps: int = 0
    final_loss: float = float("nan")
    bad_steps: int = 0
    loss_spikes: int = 0
    stopped_by_signal: bool = False
    last_checkpoint: Optional[Path] = None


class Trainer:
    def __init__(self, cfg: RunConfig, info: D.DistInfo, explicit: Iterable[str] = ()):
        """``explicit``: the options typed on the command line (config.explicit_options); --deepspeed
        needs them to tell a default (the JSON may replace it) from a choice (the JSON may not contradict it)."""
        self.cfg, self.info, self.log = cfg, info, get_logger()
        self.t, self.device = cfg.train, info.device
        self.explicit = set(explicit)
        self.stop = StopRequest()
        self.engine: Any = None  # DDPEngine, or the DeepSpeed runner once started (engines/__init__.py)

    # ------------------------------------------------------------ setup
    def setup(self) -> None:
        """Data, model, optimizer (or engine), resume or initial save, then compile and wrap."""
        cfg, info, log = self.cfg, self.info, self.log
        self.stop.install()  # a preemption during setup must not kill the run mid-write
        self.plan = self._batch_plan()
        self.data = self._prepare_data()
        self.tokenizer = KoEnTokenizer.load(self.data.tokenizer_dir)
        loader = TokenLoader(self.data.train_file, self.plan.seq_len, self.plan.micro_batch,
                             info.rank, info.world_size, self.t.seed)
        vocab = math.ceil(self.tokenizer.vocab_size / VOCAB_MULTIPLE) * VOCAB_MULTIPLE
        self.build(vocab, loader)
        per_checkpoint = (DSB.estimate_ds_checkpoint_bytes(self.num_params, DSB.zero_stage(self.ds_config))
                          if self.ds_config else
                          estimate_checkpoint_bytes(self.num_params, moment_bytes=2 if self.t.bf16_moments else 4))
        check_output_dir_on_main(cfg, info, 2 * per_checkpoint, per_checkpoint)  # every rank learns the verdict
        self.last_checkpoint = None
        resume_dir = resolve_resume_on_main(cfg, info)
        if self.ds_config is not None:  # the engine holds the weights from here on (partitioned under ZeRO-3)
            if resume_dir is not None:
                check_resume_backend("deepspeed", resume_dir)  # cheap, and before the engine's slow start
            self.engine = DSB.DeepSpeedRunner(self.raw_model, self.ds_config, compile=bool(self.t.compile))
        if resume_dir is None and cfg.ckpt.save_initial:
            self.last_checkpoint = self.save_checkpoint("initial_model", update_latest=False, with_state=False)
        if resume_dir is not None:
            st = self.resume_from(resume_dir)
            log.info("resumed from %s at step %d (%s tokens seen)", resume_dir, st["step"], f"{st['tokens_seen']:,}")
        self.finalize()
        log.info("model: %s preset, %s parameters, vocab %d (tokenizer %d), %.3g GFLOPs/token",
                 self.t.model_size, f"{self.num_params:,}", vocab, self.tokenizer.vocab_size,
                 self.flops_per_token / 1e9)
        log.info("batch: %s", self.plan.describe())
        log.info("backend: %s", DSB.describe(self.ds_config) if self.ds_config
                 else f"DDP, {self.t.ddp_bucket_mb:g} MB gradient buckets" if info.is_distributed else "one process")
        mode = self.engine.compile_mode  # the engine settled --compile-mode auto for this run
        compiled = "off" if mode is None else COMPILE_LOG.get(mode, f"on ({mode})")
        log.info("steps: %d (%.3f epochs of %s training sequences); precision %s; compile %s; attention %s",
                 self.max_steps, self.max_steps * self.plan.sequences_per_step / max(1, self.loader.num_samples),
                 f"{self.loader.num_samples:,}", self.t.precision, compiled, self.attention)
        if self.model_cfg.ce_chunk_tokens:
            log.info("output layer + cross-entropy in chunks of %d tokens", self.model_cfg.ce_chunk_tokens)
        elif fused_ce_offered(self.device.type == "cuda", PRECISION_DTYPES.get(self.t.precision), self.t.loss_kernel):
            log.info("loss: cross-entropy and its gradient in one Triton pass over the logits")
        if self.model_cfg.residual_dtype:
            log.info("residual stream in %s", self.model_cfg.residual_dtype)
        if self.t.bf16_weights:
            log.info("weights in bf16, fp32 master weights in the optimizer (--fp32-weights turns this off); "
                     "AdamW's moments in %s", "bf16 (--fp32-moments turns this off)" if self.t.bf16_moments else "fp32")
        if self.t.fp8 != "off":
            log.info("%s", describe_fp8(self.raw_model, self.t.fp8))

    def build(self, vocab: int, loader) -> None:
        """Model, optimizer, schedule (or the DeepSpeed config) and loader; also used by the throughput benchmark."""
        self.plan = getattr(self, "plan", None) or self._batch_plan()
        resolve_weights(self.t, self.plan.grad_accum, self.device.type == "cuda", beta2=self.cfg.optim.beta2)
        torch.manual_seed(self.t.seed)  # identical initial weights on every rank
        mcfg = model_config_from_preset(self.t.model_size, vocab, self.plan.seq_len, attn_backend=self.t.attn,
                                       ce_chunk_tokens=self.t.ce_chunk_tokens,
                                       residual_dtype="bfloat16" if self.t.bf16_residual else None,
                                       loss_kernel=self.t.loss_kernel, rope_kernel=self.t.rope_kernel,
                                       cudnn_grouped_kv=self.t.cudnn_grouped_kv)
        self.max_steps = self.t.max_steps or max(
            1, math.ceil(self.t.num_epochs * loader.num_samples / self.plan.sequences_per_step))
        self.ds_config: Optional[dict] = None
        if self.t.deepspeed is not None:  # the engine builds optimizer and schedule; setup() starts it
            self.ds_config = DSB.build_ds_config(self.cfg, self.plan, self.max_steps, self.explicit)
        if self.ds_config is not None and DSB.zero_stage(self.ds_config) == 3:
            # Partitioned while it is built, so no rank holds the whole model (engines/deepspeed.py).
            model = DSB.build_partitioned_model(lambda init: KoEnLM(mcfg, init_weights=init), self.ds_config,
                                                self.device)
        else:
            model = KoEnLM(mcfg).to(self.device)
        if self.t.activation_checkpointing:
            model.set_activation_checkpointing(True)
        self.model_cfg, self.raw_model, self.loader = mcfg, model, loader
        with torch.device("meta"):  # counted on a weightless copy: ZeRO-3 leaves placeholders in the module
            shape = KoEnLM(dataclasses.replace(mcfg), init_weights=False)
        self.num_params = shape.num_params()
        self.flops_per_token = shape.flops_per_token(self.plan.seq_len)
        if self.ds_config is not None:
            self.engine = None  # setup() starts the DeepSpeed engine
        else:
            self.engine = DDPEngine(model, self.cfg, self.info, self.plan.grad_accum, self.max_steps)
        self.step, self.tokens_seen, self.elapsed_before = 0, 0, 0.0
        self._started_at: Optional[float] = None  # when train() began, for the elapsed time saved
        self.attempts = 0  # optimizer-step attempts in this process, skipped ones included
        self.data_wait_s, self._window_s = 0.0, 0.0  # for data_wait_frac, per log window
        self.data_wait_total_s, self.step_time_total_s = 0.0, 0.0
        self.last_val: dict[str, float] = {}

    def finalize(self) -> None:
        """Compile and wrap after any weights are loaded (the engine's prepare); the raw module stays for saving."""
        # A bad --attn fails here, not in step 1; auto settles its kernel for this GPU.
        self.attention = self.raw_model.check_attention(self.device, PRECISION_DTYPES[self.t.precision])
        self.engine.prepare()
        self.peak = peak_flops(torch.cuda.get_device_name(self.device), self.t.precision) \
            if self.device.type == "cuda" else None

    def _batch_plan(self):
        """The batch plan, after the DeepSpeed JSON (which may set the micro-batch) is merged in."""
        if self.t.deepspeed is not None:
            for note in DSB.apply_ds_options(self.cfg, self.explicit, self.info.world_size):
                self.log.info("note: %s", note)
        return derive_batch_plan(self.cfg, self.info.world_size)

    @property
    def lr(self) -> float:
        """The learning rate of the next optimizer step (the one logged and saved)."""
        return self.engine.lr

    def _prepare_data(self):
        """Rank 0 prepares (or finds cached) data; the others wait and receive the result."""
        cfg, info = self.cfg, self.info
        result: Any = None
        if info.is_main:
            try:
                result = ensure_training_data(
                    cfg.dataset_path, mode=self.t.mode, vocab_size=cfg.data.vocab_size,
                    val_fraction=cfg.data.val_fraction, num_proc=cfg.data.num_proc, strict=cfg.data.strict,
                    tokenizer_path=Path(cfg.data.tokenizer_path) if cfg.data.tokenizer_path else None,
                    work_dir=cfg.output_dir, log=self.log.info,
                )
            except Exception as exc:  # every rank must learn of it, or they hang at the broadcast
                result = RunSetupError(f"{type(exc).__name__}: {exc}")
        result = D.broadcast_object(result)
        if isinstance(result, RunSetupError):
            raise result
        return result

    # ------------------------------------------------------------ one optimizer step
    def _fetch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next micro-batch on the device; host time spent here is time the GPU may wait
        for data (the per-step vote syncs, so the next step's fetch is not hidden behind compute)."""
        t0 = time.perf_counter()
        x, y = self.loader.next_batch()
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        waited = time.perf_counter() - t0
        self.data_wait_s += waited
        self.data_wait_total_s += waited
        return x, y

    def train_step(self) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """One optimizer step on whichever engine: (mean loss over ranks, grad norm, step applied)."""
        engine, accum = self.engine, self.plan.grad_accum
        nan = self.attempts + 1 in self.t.debug_nan_steps
        engine.begin_step()
        loss_sum = torch.zeros((), device=self.device)
        for micro in range(accum):
            x, y = self._fetch()
            loss_sum += engine.forward_backward(x, y, micro == accum - 1, nan_loss=nan).float()
        self.attempts += 1
        outcome = engine.step(loss_sum / accum, self.stop.requested)
        if outcome.stop:
            self.stop.agreed = True
        return outcome.loss, outcome.grad_norm, outcome.applied

    # ------------------------------------------------------------ state, as data for the checkpoint layer
    def state_dict(self) -> dict[str, Any]:
        """What the trainer itself must restore to continue exactly (the engine saves the rest)."""
        return {
            "step": self.step, "tokens_seen": self.tokens_seen, "elapsed_s": self.elapsed_s(),
            "loader": self.loader.state_dict(), "sequences_per_step": self.plan.sequences_per_step,
            "seq_len": self.plan.seq_len, "world_size": self.info.world_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state["loader"])
        self.step, self.tokens_seen = int(state["step"]), int(state["tokens_seen"])
        self.elapsed_before = float(state.get("elapsed_s", 0.0))
        rng = state.get("rng_per_rank") or []
        if self.info.rank < len(rng):
            restore_rng(rng[self.info.rank])
        if state.get("world_size") != self.info.world_size:
            self.log.warning("resuming %d-process state with %d processes: same global batch, data continues at "
                             "the same token position", state.get("world_size"), self.info.world_size)

    def elapsed_s(self) -> float:
        started = self._started_at if self._started_at is not None else time.time()
        return round(self.elapsed_before + (time.time() - started), 1)

    def training_info(self, last_loss: Optional[float]) -> dict[str, Any]:
        """The metadata every checkpoint carries (training_info.json)."""
        plan = self.plan
        info = {
            "step": self.step, "tokens_seen": self.tokens_seen, "train_loss": last_loss,
            "val": dict(self.last_val), "lr": self.lr if self.step else 0.0, "elapsed_s": self.elapsed_s(),
            "world_size": self.info.world_size, "batch_plan": {
                "micro_batch": plan.micro_batch, "seq_len": plan.seq_len, "world_size": plan.world_size,
                "grad_accum": plan.grad_accum, "tokens_per_step": plan.tokens_per_step},
            "max_steps": self.max_steps, "model": dataclasses.asdict(self.model_cfg),
            "num_params": self.num_params, "config": self.cfg.to_dict(), "backend": self.engine.name,
            "data": {k: self.data.meta.get(k) for k in ("input_hash", "tokenizer_hash") if k in self.data.meta},
            "used_dummy_data": bool(self.data.used_dummy), "versions": library_versions(),
            "git_commit": git_commit(), "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        if self.ds_config is not None:
            info["deepspeed_config"] = self.ds_config  # the complete engine config that trained
        return info

    def save_checkpoint(self, name: str, *, update_latest: bool = True, with_state: bool = True,
                        last_loss: Optional[float] = None) -> Path:
        """Every rank calls it; returns the checkpoint path on every rank."""
        main = self.info.is_main
        target = CheckpointTarget(
            output_dir=self.cfg.output_dir, tokenizer_dir=self.data.tokenizer_dir, keep_last=self.cfg.ckpt.save_total_limit,
            hf_config=HF.hf_config(self.raw_model, self.tokenizer.bos_id, self.tokenizer.eos_id, self.tokenizer.pad_id))
        return save_run_checkpoint(
            self.engine, target, name, update_latest=update_latest, log=self.log,
            training_info=self.training_info(last_loss) if main else None,
            trainer_state=(self.state_dict() if main else {}) if with_state else None)

    def resume_from(self, path: Path) -> dict[str, Any]:
        """Weights, optimizer and schedule into the engine; step, data position and RNG into the trainer."""
        state = load_resume_state(self.engine, path, self.plan)
        self.load_state_dict(state)
        self.last_checkpoint = path
        return state

    # ------------------------------------------------------------ validation
    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        self.engine.eval()
        out: dict[str, float] = {}
        totals = [0.0, 0.0]
        for lang, path in sorted(self.data.val_files.items()):
            acc = torch.zeros(2, device=self.device, dtype=torch.float64)
            for x, y in iter_eval_batches(path, self.plan.seq_len, self.plan.micro_batch, self.info.rank,
                                          self.info.world_size, self.t.eval_batches):
                loss = self.engine.eval_loss(x.to(self.device), y.to(self.device))
                acc += torch.stack([loss.double() * y.numel(), torch.tensor(float(y.numel()), device=self.device,
                                                                            dtype=torch.float64)])
            acc = D.all_reduce_sum(acc)
            if acc[1] <= 0:
                continue
            loss_v = (acc[0] / acc[1]).item()
            split = self.data.meta.get("splits", {}).get(f"val_{lang}", {})
            out[f"val_loss_{lang}"] = loss_v
            if split.get("bytes") and split.get("tokens"):
                # bits per byte: comparable across tokenizers (nats/token -> bits/byte)
                out[f"val_bpb_{lang}"] = loss_v / math.log(2) * split["tokens"] / split["bytes"]
            totals[0] += acc[0].item()
            totals[1] += acc[1].item()
        if totals[1]:
            out["val_loss"] = totals[0] / totals[1]
        self.engine.train()
        return out

    # ------------------------------------------------------------ the loop
    def train(self) -> Summary:
        cfg, t, info, log = self.cfg, self.t, self.info, self.log
        summary = Summary(last_checkpoint=getattr(self, "last_checkpoint", None))
        sink = MetricsSink(cfg.logs_dir / "metrics.jsonl", cfg.logs_dir / "tensorboard") if info.is_main else None
        meter = Throughput(warmup_steps=2 if t.compile else 1)
        spikes = SpikeDetector()
        clock = StepClock()
        bar = progress_bar(self.max_steps, self.step, info.is_main)
        self.engine.train()
        start, consecutive_bad, last_loss = time.time(), 0, float("nan")
        self._started_at = start
        log.info("training starts / 학습 시작: step %d -> %d", self.step, self.max_steps)
        # Only the voted flag ends the loop: a signal landing between one rank's vote and its
        # loop test must not let that rank leave while the others start another step.
        while self.step < self.max_steps and not self.stop.agreed:
            if t.debug_kill_step == self.step + 1 and info.is_main:
                os.kill(os.getpid(), signal.SIGKILL)  # crash-consistency tests: die like a lost node
            loss, grad_norm, applied = self.train_step()
            dt = clock.lap()
            self._window_s += dt
            self.step_time_total_s += dt
            if not applied:
                consecutive_bad += 1
                summary.bad_steps += 1
                # Every rank took the same vote; one console line is enough.
                (log.warning if info.is_main else log.info)(
                    "non-finite loss or gradient at step %d: update skipped (%d in a row, limit %d)",
                    self.step + 1, consecutive_bad, t.max_bad_steps)
                if consecutive_bad >= t.max_bad_steps:
                    raise RunSetupError(
                        f"stopped after {consecutive_bad} consecutive non-finite steps at step {self.step + 1}; "
                        f"the last good checkpoint is intact ({summary.last_checkpoint or 'none saved yet'}); "
                        f"lower --learning-rate or check the data, then resume with --resume auto")
                continue
            consecutive_bad = 0
            self.step += 1
            self.tokens_seen += self.plan.tokens_per_step
            last_loss = loss.item()
            base = spikes.check(last_loss)
            if base is not None:
                summary.loss_spikes += 1
                (log.warning if info.is_main else log.info)(
                    "loss spike at step %d: %.4f against a recent median of %.4f; a single one is usually noise, "
                    "repeated ones call for a lower --learning-rate (or --attn flash, see docs/model.md)",
                    self.step, last_loss, base)
                if sink:
                    sink.write({"type": "spike", "step": self.step, "loss": last_loss, "recent_median": base})
            meter.update(self.plan.tokens_per_step, dt)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{last_loss:.4f}")
            if t.log_steps and (self.step % t.log_steps == 0 or self.step == self.max_steps):
                self._log_step(sink, meter, last_loss, grad_norm, start)
            if t.eval_steps and self.step % t.eval_steps == 0 and self.step < self.max_steps:
                with clock.paused():
                    self._eval_and_log(sink)
            if self.step % cfg.ckpt.save_steps == 0 and self.step < self.max_steps:
                with clock.paused():
                    summary.last_checkpoint = self.save_checkpoint(f"checkpoint-{self.step}", last_loss=last_loss)
        if bar is not None:
            bar.close()
        self.stop.report(log, info.is_main)
        if self.step_time_total_s > 0:
            log.info("data loading took %.2f%% of step time", 100 * self.data_wait_total_s / self.step_time_total_s)
        summary.stopped_by_signal = self.stop.agreed
        if self.data.val_files and not summary.stopped_by_signal:  # a preempted run saves first, evaluates never
            self._eval_and_log(sink)
        final_wanted = cfg.ckpt.save_final or summary.stopped_by_signal
        if final_wanted and self.step > 0 and (summary.last_checkpoint is None
                                               or summary.last_checkpoint.name != f"checkpoint-{self.step}"):
            summary.last_checkpoint = self.save_checkpoint(f"checkpoint-{self.step}", last_loss=last_loss)
        self.elapsed_before += time.time() - start
        summary.steps, summary.final_loss = self.step, last_loss
        if sink:
            sink.close()
        return summary

    def _log_step(self, sink, meter: Throughput, loss: float, grad_norm: torch.Tensor, start: float) -> None:
        rate = meter.window_rate()
        per_gpu = rate / self.info.world_size if rate else None
        step_time = meter.mean_step_time() or (time.time() - start) / max(1, self.step)
        rec = {
            "type": "train", "step": self.step, "loss": loss, "lr": self.lr,
            "grad_norm": float(grad_norm), "tokens_per_s": rate, "tokens_per_s_per_gpu": per_gpu,
            "mfu": mfu(per_gpu or 0.0, self.flops_per_token, self.peak),
            "mem_gib": peak_memory_gib(self.device), "tokens_seen": self.tokens_seen,
            "elapsed_s": self.elapsed_before + time.time() - start,
            "eta_s": step_time * (self.max_steps - self.step), "epoch": self.loader.epoch,
            "data_wait_frac": self.data_wait_s / self._window_s if self._window_s > 0 else None,
        }
        self.data_wait_s, self._window_s = 0.0, 0.0
        self.log.info(format_progress(rec, self.max_steps))
        if sink:
            sink.write(rec)

    def _eval_and_log(self, sink) -> None:
        res = self.validate()
        if not res:
            return
        self.last_val = res
        parts = [f"{k} {v:.4f}" for k, v in sorted(res.items())]
        self.log.info("validation at step %d | %s", self.step, " | ".join(parts))
        if sink:
            sink.write({"type": "eval", "step": self.step, **res})
