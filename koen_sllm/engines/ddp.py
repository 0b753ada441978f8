"""The DDP engine: optimizer, schedule, loss scaler, master weights, clipping and the step's vote.

The trainer drives every backend with the same verbs (engines/__init__.py):
``begin_step()``, ``forward_backward(x, y, sync)`` per micro-batch, then
``step(mean_loss, stop_requested)``. Everything DDP-specific that makes a step
fast lives here, each lever decided once in :meth:`prepare` and named in
:class:`Levers`.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Optional

import torch

from pathlib import Path

from .. import distributed as D
from ..checkpoint.store import CheckpointError, CheckpointTarget, load_model_state, save_checkpoint
from ..config import RunConfig, resolved_compile_mode
from ..fp8 import convert_to_fp8
from ..hf import mapping as HF
from ..master_adamw import MasterWeightAdamW, full_precision_state
from ..optim import (CAN_CLIP_IN_FUSED_UPDATE, build_optimizer, build_scheduler, clip_divisor, grad_norm_reader,
                     merge_split_projections, param_group_names, updates_on_device)
from . import StepOutcome, start_host_copy

PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class Levers:
    """The DDP step's performance switches, decided once from the optimizer and the options.

    early_update: launch the update before the host reads the vote; the fused kernel skips it
        (and its step count) on the device when any rank voted "bad". Only where the optimizer
        honours ``found_inf`` and no loss scaler decides about the step.
    clip_in_update: divide the gradients inside that early update (its ``grad_scale``) instead of
        a separate clipping pass.
    cudagraphs: the compiled step replays as CUDA graphs (--compile-mode reduce-overhead). Its
        micro-batches accumulate into gradients that live in the graphs' memory pool: safe because
        ``begin_step`` starts one new generation of graphs per step (not per micro-batch) and
        :meth:`DDPEngine.step` sets every gradient to None, so none outlives its step (one that
        did would be overwritten by the next step's replays, pytorch#169545).
    """
    early_update: bool = False
    clip_in_update: bool = False
    cudagraphs: bool = False


class DDPEngine:
    """The model (DDP-wrapped and compiled once prepared), its optimizer, schedule and scaler."""

    name = "ddp"

    def __init__(self, raw_model: torch.nn.Module, cfg: RunConfig, info: D.DistInfo, grad_accum: int,
                 max_steps: int):
        t = cfg.train
        self.cfg, self.info, self.raw_model, self.grad_accum = cfg, info, raw_model, grad_accum
        self.device = info.device
        self.optimizer = build_optimizer(raw_model, cfg.optim, self.device, bf16_weights=bool(t.bf16_weights),
                                         bf16_moments=bool(t.bf16_moments))
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, max_steps)
        self.scaler = torch.amp.GradScaler("cuda") if t.precision == "fp16" else None
        self.model: torch.nn.Module = raw_model
        self.levers = Levers()
        # The torch.compile mode, --compile-mode with "auto" settled for this run (None: not compiled).
        self.compile_mode: Optional[str] = (resolved_compile_mode(t, info.world_size, self.device.type == "cuda")
                                            if t.compile else None)
        self.fp8_layers: list[str] = []  # the layers converted by --fp8, once prepared
        self.grad_norm = None
        self.autocast: Any = nullcontext()

    # ------------------------------------------------------------ set-up, after any state is loaded
    def prepare(self) -> None:
        """Wrap and compile after any weights are loaded (the raw module stays for saving), then
        decide the levers."""
        t = self.cfg.train
        if isinstance(self.optimizer, MasterWeightAdamW):  # after loading fp32 weights, before DDP's broadcast
            self.optimizer.take_master_weights()
        if t.fp8 != "off":
            # Once, before DDP and compile, which must see the FP8 layers. Each keeps its weight
            # parameter, so the optimizer (masters included) and the state dict stay as they are.
            self.fp8_layers = convert_to_fp8(self.raw_model, t.fp8, self.device)
        # DDP first, then compile: Dynamo's DDPOptimizer splits the compiled graph at DDP's
        # gradient buckets, so a bucket's all-reduce starts while the rest of the backward
        # runs. Compiled inside DDP, one compiled backward would hand DDP every gradient at
        # once, at its end, and the all-reduce would never overlap compute.
        wrapped = D.wrap_model(self.raw_model, self.info, t.ddp_bucket_mb)
        mode = None if self.compile_mode == "default" else self.compile_mode
        self.model = torch.compile(wrapped, mode=mode) if t.compile else wrapped
        self.autocast = self._autocast()
        self.decide_levers()

    def decide_levers(self) -> None:
        """The levers for the optimizer in place now (tests swap in a fused AdamW on CPU)."""
        early = self.scaler is None and updates_on_device(self.optimizer)
        self.levers = Levers(
            early_update=early,
            clip_in_update=early and self.cfg.optim.grad_clip > 0 and CAN_CLIP_IN_FUSED_UPDATE,
            cudagraphs=self.compile_mode == "reduce-overhead",
        )
        self.grad_norm = grad_norm_reader(self.raw_model, self.optimizer)

    def _autocast(self):
        if self.cfg.train.precision == "fp32":
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=PRECISION_DTYPES[self.cfg.train.precision])

    # ------------------------------------------------------------ the step
    @property
    def lr(self) -> float:
        """The learning rate of the next optimizer step (the one logged and saved)."""
        return self.scheduler.get_last_lr()[0]

    def train(self) -> None:
        self.model.train()

    def eval(self) -> None:
        self.model.eval()

    def begin_step(self) -> None:
        if self.levers.cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()  # a new step: last step's graph outputs may be reused

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor, sync: bool, *, nan_loss: bool = False) -> torch.Tensor:
        """One micro-batch; gradients are all-reduced only with ``sync`` (the step's last one).
        Returns the detached, unscaled loss. ``nan_loss`` is the test hook behind --debug-nan-steps."""
        with D.grad_sync(self.model, sync):
            with self.autocast:
                loss = self.model(x, y)
            if nan_loss:
                loss = loss * float("nan")
            scaled = loss / self.grad_accum  # gradients average over the whole step, not each micro-batch
            (self.scaler.scale(scaled) if self.scaler else scaled).backward()
        return loss.detach()

    def step(self, mean_loss: torch.Tensor, stop_requested: bool) -> StepOutcome:
        """Clip, vote, update (or skip on every rank alike) and advance the schedule."""
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        clip = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else float("inf")
        if self.levers.clip_in_update:
            norm = self.grad_norm()  # the update below divides the gradients by clip_divisor
        else:
            norm = torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), clip)
        # One small all-reduce carries the loss, the "bad step" vote and the stop vote,
        # so every rank takes the same decision without extra round trips.
        grad_bad = (~torch.isfinite(norm)) if self.scaler is None else torch.zeros((), dtype=torch.bool, device=self.device)
        bad = (~torch.isfinite(mean_loss)) | grad_bad
        # torch.full writes the flag with a kernel; torch.tensor(..., device=cuda) would copy it from
        # pageable host memory, which can make the host wait for the queued work.
        stop = torch.full((), float(stop_requested), device=self.device)
        votes = torch.stack([mean_loss, bad.float(), stop])
        votes = D.all_reduce_sum(votes)
        read_votes = start_host_copy(votes)
        early = self.levers.early_update
        if early:
            # The wait below is for the vote's copy only; the update is already queued.
            self.optimizer.found_inf = (votes[1] > 0).float()
            if self.levers.clip_in_update:
                self.optimizer.grad_scale = clip_divisor(norm, clip)
            self.optimizer.step()
            self.optimizer.found_inf = self.optimizer.grad_scale = None
            # The gradients are spent whatever the vote says: release them while the update runs,
            # not after the wait, when the host's work delays the next step's first kernels.
            self.optimizer.zero_grad(set_to_none=True)
        votes = read_votes()
        loss, any_bad, any_stop = votes[0] / self.info.world_size, votes[1] > 0, votes[2] > 0
        if any_bad:
            if not early:  # else released above
                self.optimizer.zero_grad(set_to_none=True)
            if self.scaler:
                self.scaler.update()
            return StepOutcome(torch.tensor(loss), norm, False, any_stop)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        elif not early:
            self.optimizer.step()
        self.scheduler.step()
        if not early:
            self.optimizer.zero_grad(set_to_none=True)
        return StepOutcome(torch.tensor(loss), norm, True, any_stop)

    def eval_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with self.autocast:
            return self.raw_model(x, y)

    # ------------------------------------------------------------ checkpoints
    def save_checkpoint(self, target: CheckpointTarget, name: str, *, training_info: Optional[dict],
                        trainer_state: Optional[dict], update_latest: bool = True) -> Path:
        """Rank 0 writes the whole checkpoint; every rank returns its path or raises the same
        CheckpointError, so none is left waiting at a collective."""
        result: Any = None
        if D.rank() == 0:
            state = None if trainer_state is None else {**trainer_state, **self.state_dict()}
            try:
                # The fp32 masters, where the model runs on bf16 copies of them (substituted under the
                # model's own names, before the fused projections are split into transformers' ones).
                result = save_checkpoint(
                    target.output_dir, name, model_state=HF.hf_state_dict(self.raw_model, self.weights_for_saving()),
                    hf_config=target.hf_config, tokenizer_dir=target.tokenizer_dir, training_info=training_info,
                    trainer_state=state, update_latest=update_latest, keep_last=target.keep_last)
            except CheckpointError as exc:
                result = str(exc)
        result = D.broadcast_object(result)
        if isinstance(result, str):
            raise CheckpointError(result)
        return result

    def load_checkpoint(self, path: Path, trainer_state: dict[str, Any]) -> None:
        """Weights from model.safetensors; optimizer, schedule and scaler from trainer_state."""
        model = self.raw_model
        HF.load_hf_state_dict(model, load_model_state(path))
        # Checkpoints saved before q/k/v were fused hold their moments per matrix.
        self.load_state_dict(trainer_state, optimizer_state=merge_split_projections(
            trainer_state["optimizer"], param_group_names(model),
            lambda name: len(HF.fused_blocks(model, name) or [name])))

    # ------------------------------------------------------------ state
    def weights_for_saving(self) -> dict[str, torch.Tensor]:
        """The model's own state with the fp32 masters where the model runs on bf16 copies of them."""
        return full_precision_state(self.optimizer, self.raw_model.state_dict())

    def state_dict(self) -> dict[str, Any]:
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any], optimizer_state: Optional[dict] = None) -> None:
        """``optimizer_state`` replaces ``state["optimizer"]`` (already converted to today's layout)."""
        self.optimizer.load_state_dict(optimizer_state if optimizer_state is not None else state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
