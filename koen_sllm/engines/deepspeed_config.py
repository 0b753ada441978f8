"""The DeepSpeed JSON and the run's options, merged into one consistent configuration.

Kept apart from engines/deepspeed.py (the engine) because this part needs neither
deepspeed nor a process group: it is pure dictionary work, cheap to test.

Precedence, per value (docs/deepspeed.md has the table):
1. an option given on the command line;
2. the value in the DeepSpeed JSON (the user's file or the shipped one);
3. the option's default.
A user's JSON that disagrees with an option given explicitly is an error naming
both values: silently preferring either would train something the user did not
ask for. The shipped file only supplies defaults, so explicit options override it.
Values the JSON decides are written back into the RunConfig, so the config that
is printed and saved in every checkpoint is the one that trained.
"""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

from ..config import MAX_LEARNING_RATE, BatchPlan, ConfigError, RunConfig, derive_batch_plan, resolve_residual

SHIPPED_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "ds_config.json"
ENGINE_OPTIMIZERS = ("AdamW",)
SCHEDULER = "WarmupCosineLR"
SCHEDULER_KEYS = ("total_num_steps", "warmup_min_ratio", "warmup_num_steps", "cos_min_ratio", "warmup_type")
ZERO_STAGES = (0, 1, 2, 3)
DEFAULT_ZERO_STAGE = 2  # what the engine runs when the JSON names no stage
OFFLOAD_DEVICES = ("none", "cpu", "nvme")
OFFLOAD_KEYS = ("offload_optimizer", "offload_param")
# DeepSpeed's own activation-checkpointing switches act on deepspeed.checkpointing, which the model
# does not use; their being on would promise something that does not happen.
UNSUPPORTED_CHECKPOINTING = ("partition_activations", "cpu_checkpointing", "contiguous_memory_optimization",
                             "synchronize_checkpoint_boundary")
_MISSING = object()


class DeepSpeedConfigError(ConfigError):
    """The DeepSpeed JSON is unreadable, invalid, or disagrees with an explicit option."""


# ---------------------------------------------------------------- reading the JSON


def ds_config_path(spec: Optional[str]) -> tuple[Path, bool]:
    """(path, is_shipped) for ``--deepspeed`` with no value ("" or None) or a path."""
    if not spec:
        return SHIPPED_CONFIG, True
    path = Path(spec).expanduser()
    return (path if path.is_absolute() else Path.cwd() / path), False


def load_ds_json(spec: Optional[str]) -> tuple[dict, Path, bool]:
    """The JSON object named by ``--deepspeed``; one-line errors naming the file."""
    path, shipped = ds_config_path(spec)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        fix = "reinstall the checkout" if shipped else "pass an existing ds_config.json, or --deepspeed alone for the shipped one"
        raise DeepSpeedConfigError(f"--deepspeed {path}: file not found; {fix}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DeepSpeedConfigError(f"--deepspeed {path}: cannot read it ({exc}); fix its permissions or encoding") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DeepSpeedConfigError(f"--deepspeed {path}: invalid JSON at line {exc.lineno} column {exc.colno} "
                                   f"({exc.msg}); fix the file (comments and trailing commas are not JSON)") from None
    if not isinstance(data, dict):
        raise DeepSpeedConfigError(f"--deepspeed {path}: the top level must be a JSON object, got {type(data).__name__}")
    return data, path, shipped


def _get(d: dict, keys: tuple[str, ...]) -> Any:
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return _MISSING
        d = d[k]
    return d


def _section(ds: dict, key: str, where: Path) -> dict:
    value = ds.get(key, {})
    if not isinstance(value, dict):
        raise DeepSpeedConfigError(f"--deepspeed {where}: '{key}' must be a JSON object, got {value!r}")
    return value


# ---------------------------------------------------------------- value checks


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _non_negative(v: Any) -> bool:
    return _number(v) and v >= 0


def _positive(v: Any) -> bool:
    return _number(v) and v > 0


def _ratio(v: Any) -> bool:
    return _number(v) and 0 <= v <= 1


def _learning_rate(v: Any) -> bool:
    return _positive(v) and v <= MAX_LEARNING_RATE


def _betas(v: Any) -> bool:
    return isinstance(v, (list, tuple)) and len(v) == 2 and all(_number(b) and 0 < b < 1 for b in v)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if _number(a) and _number(b):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)
    return a == b


def json_precision(ds: dict) -> Optional[str]:
    """"bf16" / "fp16" / "fp32" as the JSON states it, or None when it says nothing."""
    bf16 = ds.get("bf16", ds.get("bfloat16", _MISSING))
    fp16 = ds.get("fp16", _MISSING)
    if bf16 is _MISSING and fp16 is _MISSING:
        return None
    on = [name for name, sec in (("bf16", bf16), ("fp16", fp16))
          if isinstance(sec, dict) and sec.get("enabled", False) is True]
    if len(on) == 2:
        raise DeepSpeedConfigError("the DeepSpeed JSON enables both bf16 and fp16; enable one of them")
    return on[0] if on else "fp32"


# ---------------------------------------------------------------- phase 1: JSON -> options


class _Merger:
    def __init__(self, cfg: RunConfig, explicit: Iterable[str], src: str, shipped: bool):
        self.cfg, self.explicit, self.src, self.shipped = cfg, set(explicit), src, shipped
        self.notes: list[str] = []

    def take(self, key: str, value: Any, dests: tuple[str, ...], flag: str, current: Any,
             setter: Callable[[Any], None], ok: Callable[[Any], bool], want: str) -> None:
        """Fold one JSON value into the options, or raise when it contradicts an explicit one."""
        if value is _MISSING:
            return
        if not ok(value):
            raise DeepSpeedConfigError(f"{key} = {json.dumps(value)} in {self.src} is invalid: it must be {want}")
        if _same(value, current):
            return
        if self.explicit & set(dests):
            if self.shipped:
                return  # the shipped file only supplies defaults
            raise DeepSpeedConfigError(
                f"{flag} {_show(current)} conflicts with {key} = {json.dumps(value)} in {self.src}; "
                f"give the value in one place only (drop {flag.split()[0]} or edit the file)")
        setter(value)
        self.notes.append(f"{key} = {json.dumps(value)} from {self.src} (instead of the default {flag} {_show(current)})")


def _show(v: Any) -> str:
    if v is None:
        return "(unset)"
    return " ".join(str(x) for x in v) if isinstance(v, (list, tuple)) else str(v)


def apply_ds_options(cfg: RunConfig, explicit: Iterable[str], world_size: int) -> list[str]:
    """Fold the DeepSpeed JSON's values into ``cfg`` where no option was given; return notes.

    Call it before :func:`koen_sllm.config.derive_batch_plan`, because the JSON
    may set the micro-batch and the accumulation. ``explicit`` holds destination
    names as :func:`config.explicit_options` returns them. Idempotent.
    """
    ds, path, shipped = load_ds_json(cfg.train.deepspeed)
    check_zero_section(ds, path)  # here, so --dry-run refuses what the engine would refuse at start
    src = "the shipped configs/ds_config.json" if shipped else str(path)
    t, o = cfg.train, cfg.optim
    m = _Merger(cfg, explicit, src, shipped)
    m.take("train_micro_batch_size_per_gpu", ds.get("train_micro_batch_size_per_gpu", _MISSING), ("batch_size",),
           "--batch-size", t.batch_size, lambda v: setattr(t, "batch_size", v), _positive_int, "a positive integer")
    _take_accumulation(m, ds, world_size)
    opt = _section(ds, "optimizer", path)
    params = opt.get("params", {}) if isinstance(opt.get("params", {}), dict) else {}
    m.take("optimizer.params.lr", params.get("lr", _MISSING), ("learning_rate",), "--learning-rate",
           o.learning_rate, lambda v: setattr(o, "learning_rate", float(v)), _learning_rate,
           f"a positive number no larger than {MAX_LEARNING_RATE:g} (AdamW peak rates are about 1e-4 to 1e-2)")
    m.take("optimizer.params.betas", params.get("betas", _MISSING), ("beta1", "beta2"), "--beta1/--beta2",
           (o.beta1, o.beta2), lambda v: (setattr(o, "beta1", float(v[0])), setattr(o, "beta2", float(v[1]))),
           _betas, "two numbers strictly between 0 and 1")
    m.take("optimizer.params.eps", params.get("eps", _MISSING), ("eps",), "eps", o.eps,
           lambda v: setattr(o, "eps", float(v)), _positive, "a positive number")
    m.take("optimizer.params.weight_decay", params.get("weight_decay", _MISSING), ("weight_decay",),
           "--weight-decay", o.weight_decay, lambda v: setattr(o, "weight_decay", float(v)), _non_negative,
           "zero or a positive number")
    sched = _section(ds, "scheduler", path)
    sp = sched.get("params", {}) if isinstance(sched.get("params", {}), dict) else {}
    if sched.get("type", SCHEDULER) == SCHEDULER:
        m.take("scheduler.params.warmup_num_steps", sp.get("warmup_num_steps", _MISSING), ("warmup_steps",),
               "--warmup-steps", o.warmup_steps, lambda v: setattr(o, "warmup_steps", v), _positive_int,
               "a positive integer")
        m.take("scheduler.params.cos_min_ratio", sp.get("cos_min_ratio", _MISSING), ("min_lr_ratio",),
               "--min-lr-ratio", o.min_lr_ratio, lambda v: setattr(o, "min_lr_ratio", float(v)), _ratio,
               "a number in [0, 1]")
    m.take("gradient_clipping", ds.get("gradient_clipping", _MISSING), ("grad_clip",), "--grad-clip",
           o.grad_clip, lambda v: setattr(o, "grad_clip", float(v)), _non_negative, "zero (off) or a positive number")
    # The JSON's activation_checkpointing section (DeepSpeed's name for it) means the model's own
    # per-layer recomputation: the option cannot be turned off on the command line, so no conflict.
    m.take("activation_checkpointing", True if isinstance(ds.get("activation_checkpointing"), dict) else _MISSING,
           ("activation_checkpointing",), "--activation-checkpointing", t.activation_checkpointing,
           lambda v: setattr(t, "activation_checkpointing", True), lambda v: v is True, "an object")
    m.take("bf16/fp16.enabled", json_precision(ds) or _MISSING, ("precision",), f"--{t.precision}", t.precision,
           lambda v: setattr(t, "precision", v), lambda v: v in ("bf16", "fp16", "fp32"), "bf16, fp16 or fp32")
    resolve_residual(t)  # the precision is final only now
    return m.notes


def _take_accumulation(m: _Merger, ds: dict, world_size: int) -> None:
    """gradient_accumulation_steps and train_batch_size against --grad-accum / --global-batch-size."""
    t = m.cfg.train
    ga = ds.get("gradient_accumulation_steps", _MISSING)
    tbs = ds.get("train_batch_size", _MISSING)
    for key, v in (("gradient_accumulation_steps", ga), ("train_batch_size", tbs)):
        if v is not _MISSING and not _positive_int(v):
            raise DeepSpeedConfigError(f"{key} = {json.dumps(v)} in {m.src} is invalid: it must be a positive integer")
    per_pass = t.batch_size * world_size
    if ga is _MISSING and tbs is not _MISSING:
        if tbs % per_pass:
            raise DeepSpeedConfigError(
                f"train_batch_size = {tbs} in {m.src} is not a multiple of micro-batch {t.batch_size} x "
                f"{world_size} processes = {per_pass}; remove it (it is derived) or use a multiple of {per_pass}")
        ga = tbs // per_pass
    if ga is _MISSING:
        return
    if tbs is not _MISSING and tbs != ga * per_pass:
        raise DeepSpeedConfigError(
            f"train_batch_size = {tbs} in {m.src} disagrees with micro-batch {t.batch_size} x "
            f"gradient_accumulation_steps {ga} x {world_size} processes = {ga * per_pass}; "
            "remove train_batch_size (it is derived)")
    given = m.explicit & {"grad_accum", "global_batch_size"}
    if given:
        accum = derive_batch_plan(m.cfg, world_size).grad_accum
        if accum != ga and not m.shipped:
            flag = (f"--global-batch-size {t.global_batch_size} (= {accum} accumulation steps at {world_size} "
                    f"processes x --batch-size {t.batch_size})" if "global_batch_size" in given
                    else f"--grad-accum {t.grad_accum}")
            raise DeepSpeedConfigError(
                f"{flag} conflicts with {ga} accumulation steps in {m.src} (gradient_accumulation_steps/"
                "train_batch_size); give the batch in one place only")
        return
    if derive_batch_plan(m.cfg, world_size).grad_accum != ga:
        m.notes.append(f"gradient accumulation {ga} from {m.src} (instead of the default)")
        t.grad_accum, t.global_batch_size = ga, None


# ---------------------------------------------------------------- phase 2: options -> JSON


def build_ds_config(cfg: RunConfig, plan: BatchPlan, max_steps: int, explicit: Iterable[str] = ()) -> dict:
    """The complete DeepSpeed config for this run: the JSON, filled from the options, validated.

    ``cfg`` must already hold the merged values (:func:`apply_ds_options`) and
    ``plan`` must come from it; anything else would let the engine and the data
    loader disagree, so it is refused.
    """
    ds, path, shipped = load_ds_json(cfg.train.deepspeed)
    src = "the shipped configs/ds_config.json" if shipped else str(path)
    merged = copy.deepcopy(cfg)
    apply_ds_options(merged, explicit, plan.world_size)  # raises on conflicts and on a bad ZeRO section
    again = derive_batch_plan(merged, plan.world_size)
    if (merged.optim, merged.train.precision, again) != (cfg.optim, cfg.train.precision, plan):
        raise DeepSpeedConfigError(
            f"the run options differ from {src}; call apply_ds_options(cfg, ...) before derive_batch_plan")
    if not _positive_int(max_steps):
        raise DeepSpeedConfigError(f"max_steps must be a positive integer, got {max_steps!r}")
    out = {k: copy.deepcopy(v) for k, v in ds.items() if not k.startswith("_comment")}
    o = cfg.optim
    out["train_micro_batch_size_per_gpu"] = plan.micro_batch
    out["gradient_accumulation_steps"] = plan.grad_accum
    out["train_batch_size"] = plan.sequences_per_step
    out["gradient_clipping"] = o.grad_clip
    out.setdefault("steps_per_print", 10**9)  # progress lines are ours; DeepSpeed's would interleave
    out.setdefault("zero_optimization", {}).setdefault("stage", DEFAULT_ZERO_STAGE)
    offload = offload_device(out)
    opt = out.setdefault("optimizer", {"type": "AdamW"})
    if opt.get("type", "AdamW") not in ENGINE_OPTIMIZERS:
        raise DeepSpeedConfigError(f"optimizer.type = {json.dumps(opt.get('type'))} in {src} is not supported: "
                                   "the options fill AdamW; use \"AdamW\"")
    opt["type"] = "AdamW"
    params = opt.setdefault("params", {})
    params.update(lr=o.learning_rate, betas=[o.beta1, o.beta2], eps=o.eps, weight_decay=o.weight_decay)
    if offload == "none":
        # torch.optim.AdamW instead of FusedAdam: no JIT CUDA build at start-up. With CPU offload
        # the key stays unset, so DeepSpeed picks DeepSpeedCPUAdam (a JIT C++ build).
        params.setdefault("torch_adam", True)
    out["scheduler"] = _scheduler_section(out.get("scheduler"), cfg, max_steps, src)
    precision = cfg.train.precision or "fp32"
    bf16 = out.pop("bfloat16", {}) if isinstance(out.get("bfloat16"), dict) else {}
    out["bf16"] = {**bf16, **(out.get("bf16") or {}), "enabled": precision == "bf16"}
    out["fp16"] = {**(out.get("fp16") or {}), "enabled": precision == "fp16"}
    return out


def _scheduler_section(sched: Any, cfg: RunConfig, max_steps: int, src: str) -> dict:
    from ..optim import default_warmup

    sched = copy.deepcopy(sched) if isinstance(sched, dict) else {}
    if sched.get("type", SCHEDULER) != SCHEDULER:
        raise DeepSpeedConfigError(
            f"scheduler.type = {json.dumps(sched.get('type'))} in {src} is not supported: both backends run "
            f"{SCHEDULER} (linear warm-up, cosine decay to --min-lr-ratio); remove the block or use {SCHEDULER}")
    p = sched.get("params", {})
    unknown = sorted(set(p) - set(SCHEDULER_KEYS))
    if unknown:
        raise DeepSpeedConfigError(f"scheduler.params.{unknown[0]} in {src} is unknown; {SCHEDULER} takes "
                                   f"{', '.join(SCHEDULER_KEYS)}")
    if p.get("total_num_steps", max_steps) != max_steps:
        raise DeepSpeedConfigError(
            f"scheduler.params.total_num_steps = {p['total_num_steps']} in {src} disagrees with the run's "
            f"{max_steps} steps; remove it (it is filled in) or pass --max-steps {p['total_num_steps']}")
    if p.get("warmup_type", "linear") != "linear":
        raise DeepSpeedConfigError(f"scheduler.params.warmup_type = {json.dumps(p['warmup_type'])} in {src} is not "
                                   "supported; the warm-up is linear on both backends: remove it or use \"linear\"")
    if p.get("warmup_min_ratio", 0) not in (0, 0.0):
        raise DeepSpeedConfigError(f"scheduler.params.warmup_min_ratio = {p['warmup_min_ratio']} in {src} is not "
                                   "supported; the warm-up starts at lr/warmup_steps: remove it or use 0")
    o = cfg.optim
    warmup = o.warmup_steps if o.warmup_steps is not None else default_warmup(max_steps)
    sched["type"] = SCHEDULER
    sched["params"] = {"total_num_steps": max_steps, "warmup_num_steps": warmup, "warmup_min_ratio": 0.0,
                       "cos_min_ratio": o.min_lr_ratio, "warmup_type": "linear"}
    return sched


def offload_device(ds: dict, key: str = "offload_optimizer") -> str:
    """Where the optimizer state (``key="offload_param"``: the ZeRO-3 weight partitions) lives:
    "none" (the GPU), "cpu" or "nvme"."""
    off = _get(ds, ("zero_optimization", key))
    if off is _MISSING or off is None:
        return "none"
    return str(off.get("device", "none")) if isinstance(off, dict) else repr(off)


def zero_stage(ds: dict) -> int:
    stage = _get(ds, ("zero_optimization", "stage"))
    return DEFAULT_ZERO_STAGE if stage is _MISSING else int(stage)


def check_zero_section(ds: dict, where: Path) -> None:
    """The ZeRO stage (an integer in ZERO_STAGES, not a bool) and the offload devices of the JSON
    read from ``where``; one line naming the file and the key. DeepSpeed itself would refuse these
    only once the engine starts, after the data is prepared and the model built."""
    zero = _section(ds, "zero_optimization", where)
    stage = zero.get("stage", DEFAULT_ZERO_STAGE)
    if not isinstance(stage, int) or isinstance(stage, bool) or stage not in ZERO_STAGES:
        raise DeepSpeedConfigError(f"--deepspeed {where}: zero_optimization.stage is {json.dumps(stage)}; "
                                   f"use {_one_of(ZERO_STAGES)}")
    for key in OFFLOAD_KEYS:
        off = zero.get(key)
        if off is None:
            continue
        if not isinstance(off, dict):
            raise DeepSpeedConfigError(f"--deepspeed {where}: zero_optimization.{key} is {json.dumps(off)}; "
                                       f"use an object such as {{\"device\": \"cpu\"}}, or remove it")
        device = off.get("device", "none")
        if device not in OFFLOAD_DEVICES:
            raise DeepSpeedConfigError(f"--deepspeed {where}: zero_optimization.{key}.device is "
                                       f"{json.dumps(device)}; use {_one_of(OFFLOAD_DEVICES)}")
        ratio = off.get("ratio", 1.0) if key == "offload_optimizer" else 1.0
        if ratio != 1.0 and (isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio <= 1
                             or device != "cpu" or stage != 3):
            raise DeepSpeedConfigError(
                f"--deepspeed {where}: zero_optimization.offload_optimizer.ratio is {json.dumps(ratio)} with device "
                f"{json.dumps(device)} and stage {stage}; use a number from 0 to 1 with \"device\": \"cpu\" and "
                "stage 3 (the share of the optimizer state in host memory, the rest on the GPU), or remove it")
        if key == "offload_param" and device != "none" and stage != 3:
            raise DeepSpeedConfigError(f"--deepspeed {where}: zero_optimization.offload_param needs stage 3 (only "
                                       f"ZeRO-3 partitions the weights), the file has stage {stage}; set \"stage\": 3 "
                                       "or remove offload_param")
    ckpt = ds.get("activation_checkpointing", _MISSING)
    if ckpt is not _MISSING:
        if not isinstance(ckpt, dict):
            raise DeepSpeedConfigError(f"--deepspeed {where}: activation_checkpointing is {json.dumps(ckpt)}; use an "
                                       "object ({} turns on --activation-checkpointing), or remove it")
        extras = sorted(k for k in UNSUPPORTED_CHECKPOINTING if ckpt.get(k))
        if extras:
            raise DeepSpeedConfigError(
                f"--deepspeed {where}: activation_checkpointing.{extras[0]} is not supported: the model recomputes "
                "each layer with torch.utils.checkpoint, whose activations stay on the GPU unpartitioned; "
                f"remove {', '.join(extras)} (an empty object turns recomputation on)")


def _one_of(choices: Sequence[Any]) -> str:
    names = [json.dumps(c) for c in choices]
    return f"{', '.join(names[:-1])} or {names[-1]}"


def describe(ds: dict) -> str:
    """One line for the start-up log."""
    prec = "bf16" if ds.get("bf16", {}).get("enabled") else "fp16" if ds.get("fp16", {}).get("enabled") else "fp32"
    params = f", parameter offload {offload_device(ds, 'offload_param')}" if zero_stage(ds) == 3 else ""
    ratio = _get(ds, ("zero_optimization", "offload_optimizer", "ratio"))
    share = f" ({ratio:.0%} of it, the rest on the GPU)" if ratio is not _MISSING and ratio != 1.0 else ""
    return (f"DeepSpeed ZeRO-{zero_stage(ds)}, {prec}, optimizer offload {offload_device(ds)}{share}{params}, "
            f"micro-batch {ds['train_micro_batch_size_per_gpu']} x accum {ds['gradient_accumulation_steps']} "
            f"= {ds['train_batch_size']} sequences per step, clip {ds['gradient_clipping']}")
