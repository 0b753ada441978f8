"""Config parsing, device defaults, derived batch numbers and option errors."""
import json

import pytest

from koen_sllm.config import (COMPILE_MODES, ConfigError, RunConfig, apply_device_defaults, derive_batch_plan,
                              parse_args, repo_root, resolve_weights, resolved_compile_mode, validate)


def test_defaults_follow_reference_table():
    cfg, _ = parse_args([])
    assert cfg.train.mode == "test"
    assert cfg.train.batch_size == 4
    assert cfg.optim.learning_rate == pytest.approx(1e-4)
    assert cfg.ckpt.save_steps == 500
    assert cfg.ckpt.save_initial is True


def test_cpu_defaults_shrink_the_test_run():
    cfg, _ = parse_args(["--test"])
    notes = apply_device_defaults(cfg, has_cuda=False)
    assert (cfg.train.model_size, cfg.train.max_seq_length, cfg.train.precision) == ("tiny", 128, "fp32")
    assert cfg.train.compile is False and cfg.train.max_steps == 10 and cfg.ckpt.resume == "none"
    assert any("tiny" in n for n in notes)


def test_gpu_defaults_and_explicit_options_win():
    cfg, _ = parse_args(["--train", "--model-size", "350m", "--max-seq-length", "1024", "--no-compile"])
    apply_device_defaults(cfg, has_cuda=True)
    assert (cfg.train.model_size, cfg.train.max_seq_length) == ("350m", 1024)
    assert cfg.train.precision == "bf16" and cfg.train.compile is False
    assert cfg.ckpt.resume == "auto" and cfg.train.max_steps is None


@pytest.mark.parametrize("argv, fragment", [
    (["--batch-size", "0"], "--batch-size must be a positive"),
    (["--batch-size", "abc"], "invalid int value"),
    (["--max-steps", "-3"], "--max-steps must be a positive"),
    (["--learning-rate", "0"], "--learning-rate must be a positive"),
    (["--fp16", "--fp32"], "not allowed with argument"),
    (["--test", "--train"], "not allowed with argument"),
    (["--model-size", "7b"], "invalid choice"),
    (["--no-such-option"], "unrecognized arguments"),
    (["--vocab-size", "100"], "too small"),
    (["--min-lr-ratio", "2"], "must lie in [0, 1]"),
    (["--ddp-bucket-mb", "0.5"], "--ddp-bucket-mb must be at least 1 (DDP's first bucket is 1 MB), got 0.5"),
])
def test_bad_options_raise_clear_errors(argv, fragment):
    with pytest.raises(ConfigError) as err:
        parse_args(argv)
    assert fragment in str(err.value)


FLOAT_FLAGS = ("--learning-rate", "--min-lr-ratio", "--weight-decay", "--beta1", "--beta2", "--grad-clip",
               "--num-epochs", "--val-fraction", "--ddp-bucket-mb")
INT_FLAGS = ("--batch-size", "--max-steps", "--grad-accum", "--global-batch-size", "--max-seq-length", "--save-steps",
             "--save-total-limit", "--eval-steps", "--eval-batches", "--log-steps", "--max-bad-steps", "--vocab-size",
             "--num-proc", "--seed", "--warmup-steps", "--ce-chunk-tokens", "--debug-kill-step")


@pytest.mark.parametrize("flag", FLOAT_FLAGS)
@pytest.mark.parametrize("text, shown", [("1e999", "inf"), ("-1e999", "-inf"), ("nan", "nan"), ("inf", "inf")])
def test_float_options_must_be_finite(flag, text, shown):
    with pytest.raises(ConfigError) as err:
        parse_args([f"{flag}={text}"])
    msg = str(err.value)
    assert msg.startswith(f"{flag} {shown} is not a finite number"), msg
    assert f"; pass a finite one, e.g. {flag} " in msg and "(the default)" in msg and "\n" not in msg
    assert ("overflows to inf" in msg) == (shown != "nan")


def test_learning_rate_1e999_names_the_overflow_and_the_default():
    with pytest.raises(ConfigError) as err:
        parse_args(["--learning-rate", "1e999"])
    assert str(err.value) == ("--learning-rate inf is not a finite number (a number as large as 1e999 overflows to "
                              "inf); pass a finite one, e.g. --learning-rate 0.0001 (the default)")


def test_eps_without_a_flag_must_be_finite_too():
    cfg = RunConfig()
    cfg.optim.eps = float("nan")
    with pytest.raises(ConfigError, match=r"^eps \(AdamW epsilon\) nan is not a finite number; pass a finite one, "
                                          r"e\.g\. eps 1e-08 \(the default\)$"):
        validate(cfg)


@pytest.mark.parametrize("value", ["1.5", "3", "100", "1e4"])
def test_absurd_learning_rate_is_refused(value):
    with pytest.raises(ConfigError) as err:
        parse_args(["--learning-rate", value])
    assert str(err.value) == (f"--learning-rate {float(value):g} is above 1; AdamW peak rates for these models are "
                              "about 1e-4 to 1e-2: pass e.g. --learning-rate 3e-4")


@pytest.mark.parametrize("value", ["1", "1e-2", "3e-4", "1e-6"])
def test_learning_rates_up_to_one_are_accepted(value):
    cfg, _ = parse_args(["--learning-rate", value])
    assert cfg.optim.learning_rate == float(value)


@pytest.mark.parametrize("flag", INT_FLAGS)
@pytest.mark.parametrize("value, bound", [
    ("18446744073709551617", "at most 9223372036854775807"),  # 2**64 + 1: would wrap to 1 in a uint64
    ("9223372036854775808", "at most 9223372036854775807"),  # 2**63
    ("-9223372036854775809", "at least -9223372036854775808"),
])
def test_int_options_must_fit_int64(flag, value, bound):
    with pytest.raises(ConfigError) as err:
        parse_args([f"{flag}={value}"])
    assert str(err.value) == (f"{flag} {value} does not fit a signed 64-bit integer; pass a number {bound} "
                              "(realistic values are far smaller)")


def test_every_int_and_float_field_is_checked():
    """A new numeric option must join the tables that validate walks."""
    import dataclasses

    from koen_sllm.config import _FLOAT_OPTIONS, _INT_OPTIONS, CheckpointConfig, DataConfig, OptimConfig, TrainConfig

    checked = {(sec, name) for sec, name, _ in _FLOAT_OPTIONS + _INT_OPTIONS}
    for sec, klass in (("train", TrainConfig), ("data", DataConfig), ("optim", OptimConfig),
                       ("ckpt", CheckpointConfig)):
        for f in dataclasses.fields(klass):
            if f.type in ("int", "float", "Optional[int]", "Optional[float]"):
                assert (sec, f.name) in checked, f"{sec}.{f.name}"


def test_int64_limits_are_accepted_where_the_range_allows():
    cfg, _ = parse_args(["--max-steps", str(2**63 - 1), "--seed", str(2**63 - 1)])
    assert cfg.train.max_steps == 2**63 - 1 and cfg.train.seed == 2**63 - 1
    with pytest.raises(ConfigError, match=r"^--debug-nan-steps 18446744073709551617 does not fit"):
        parse_args(["--debug-nan-steps", "3,18446744073709551617"])


def test_negative_seed_is_refused():
    # numpy's generators, which shuffle the data, refuse negative seeds; torch would take them
    with pytest.raises(ConfigError, match=r"^--seed must be zero or positive, got -1$"):
        parse_args(["--seed=-1"])


def test_fp16_on_cpu_is_refused():
    cfg, _ = parse_args(["--fp16"])
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        apply_device_defaults(cfg, has_cuda=False)


def test_bf16_residual_needs_bf16():
    cfg, _ = parse_args(["--bf16-residual"])
    with pytest.raises(ConfigError, match="--bf16-residual needs bf16 precision, but this run uses fp32"):
        apply_device_defaults(cfg, has_cuda=False)  # CPU default precision: fp32
    cfg, _ = parse_args(["--bf16-residual", "--bf16"])
    apply_device_defaults(cfg, has_cuda=False)
    assert cfg.train.bf16_residual and cfg.train.precision == "bf16"
    cfg, _ = parse_args(["--bf16-residual"])
    apply_device_defaults(cfg, has_cuda=True)
    assert cfg.train.bf16_residual and cfg.train.precision == "bf16"


@pytest.mark.parametrize("argv, has_cuda, expected", [
    ([], True, True),                              # GPU default: bf16, so the stream is bf16 too
    (["--fp32-residual"], True, False),            # the transformers stream, asked for
    ([], False, False),                            # CPU default: fp32
    (["--bf16"], False, True),                     # bf16 on CPU follows bf16
    (["--fp16"], True, False),                     # fp16 keeps the fp32 stream
    (["--fp32"], True, False),
    (["--bf16-residual"], True, True),
])
def test_residual_stream_follows_the_precision(argv, has_cuda, expected):
    cfg, _ = parse_args(argv)
    apply_device_defaults(cfg, has_cuda=has_cuda)
    assert cfg.train.bf16_residual is expected


def test_residual_options_exclude_each_other_and_survive_json():
    with pytest.raises(ConfigError, match="--fp32-residual: not allowed with argument --bf16-residual"):
        parse_args(["--bf16-residual", "--fp32-residual"])
    cfg, _ = parse_args(["--fp32-residual"])
    assert cfg.train.bf16_residual is False
    apply_device_defaults(cfg, has_cuda=True)
    assert RunConfig.from_dict(json.loads(cfg.to_json())).train.bf16_residual is False


@pytest.mark.parametrize("argv, has_cuda, accum, weights, moments", [
    ([], True, 1, True, True),              # bf16 on a GPU, no accumulation: bf16 weights + fp32 masters, bf16 moments
    ([], True, 2, False, False),            # accumulation would sum bf16 gradients
    ([], False, 1, False, False),           # CPU default: fp32
    (["--bf16"], False, 1, False, False),   # bf16 on CPU: the default stays with fp32 weights
    (["--bf16", "--bf16-weights"], False, 1, True, True),
    (["--fp16"], True, 1, False, False),
    (["--fp32-weights"], True, 1, False, False),
    (["--bf16-moments"], True, 1, True, True),
    (["--beta2", "0.99"], True, 1, True, False),  # a beta2 bf16 cannot follow: fp32 moments
    (["--bf16", "--bf16-weights", "--bf16-moments"], False, 1, True, True),
    (["--fp32-moments"], True, 1, True, False),
])
def test_bf16_weights_and_moments_default_where_measured_and_exact(argv, has_cuda, accum, weights, moments):
    cfg, _ = parse_args(argv)
    apply_device_defaults(cfg, has_cuda=has_cuda)
    resolve_weights(cfg.train, accum, has_cuda, beta2=cfg.optim.beta2)
    assert (cfg.train.bf16_weights, cfg.train.bf16_moments) == (weights, moments)
    resolve_weights(cfg.train, accum, has_cuda, beta2=cfg.optim.beta2)  # idempotent
    assert (cfg.train.bf16_weights, cfg.train.bf16_moments) == (weights, moments)
    again = RunConfig.from_dict(json.loads(cfg.to_json())).train
    assert (again.bf16_weights, again.bf16_moments) == (weights, moments)


@pytest.mark.parametrize("argv, accum, fragment", [
    (["--bf16-weights", "--fp32"], 1, "--bf16-weights needs bf16 precision, but this run uses fp32"),
    (["--bf16-weights", "--deepspeed", ""], 1, "--bf16-weights is for the DDP path"),
    (["--bf16-weights"], 2, "accumulating 2 micro-batches would round their sum"),
])
def test_bf16_weights_refused_where_they_cannot_work(argv, accum, fragment):
    cfg, _ = parse_args(argv)
    with pytest.raises(ConfigError) as err:
        apply_device_defaults(cfg, has_cuda=True)
        resolve_weights(cfg.train, accum, has_cuda=True, beta2=cfg.optim.beta2)
    assert fragment in str(err.value)
    with pytest.raises(ConfigError, match="not allowed with argument"):
        parse_args(["--bf16-weights", "--fp32-weights"])


@pytest.mark.parametrize("argv, has_cuda, accum", [
    (["--bf16-moments", "--fp32-weights"], True, 1),
    (["--bf16-moments"], True, 2),      # accumulation turns bf16 weights off by default
    (["--bf16-moments"], False, 1),     # CPU: fp32
])
def test_bf16_moments_need_the_master_weight_optimizer(argv, has_cuda, accum):
    cfg, _ = parse_args(argv)
    apply_device_defaults(cfg, has_cuda=has_cuda)
    with pytest.raises(ConfigError, match="--bf16-moments is a setting of the optimizer that keeps fp32 master"):
        resolve_weights(cfg.train, accum, has_cuda, beta2=cfg.optim.beta2)


def test_bf16_moments_refused_with_a_beta2_bf16_cannot_follow():
    cfg, _ = parse_args(["--bf16-moments", "--beta2", "0.999"])
    apply_device_defaults(cfg, has_cuda=True)
    with pytest.raises(ConfigError, match=r"--bf16-moments with --beta2 0.999: .*use --fp32-moments, or a --beta2 of at most 0.95"):
        resolve_weights(cfg.train, 1, True, beta2=cfg.optim.beta2)


def test_batch_plan_derives_accumulation():
    cfg, _ = parse_args(["--batch-size", "4", "--global-batch-size", "32", "--max-seq-length", "256"])
    plan = derive_batch_plan(cfg, world_size=2)
    assert plan.grad_accum == 4 and plan.tokens_per_step == 32 * 256
    assert "4 accum" in plan.describe() and "8,192 tokens" in plan.describe()


def test_batch_plan_rejects_indivisible_and_conflicting():
    cfg, _ = parse_args(["--batch-size", "4", "--global-batch-size", "30"])
    with pytest.raises(ConfigError, match="not a multiple"):
        derive_batch_plan(cfg, world_size=2)
    cfg, _ = parse_args(["--batch-size", "4", "--global-batch-size", "32", "--grad-accum", "2"])
    with pytest.raises(ConfigError, match="disagrees"):
        derive_batch_plan(cfg, world_size=2)


def test_config_round_trips_through_json():
    cfg, _ = parse_args(["--train", "--batch-size", "8", "--debug-nan-steps", "3,4"])
    again = RunConfig.from_dict(json.loads(cfg.to_json()))
    assert again == cfg


def test_default_paths_resolve_against_repo_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg, _ = parse_args(["--train"])
    assert cfg.output_dir == repo_root() / "outputs"
    assert cfg.logs_dir == repo_root() / "logs"
    cfg, _ = parse_args([])  # a test run never writes into a training run's folders
    assert cfg.output_dir == repo_root() / "outputs" / "test"
    assert cfg.logs_dir == repo_root() / "logs" / "test"
    cfg, _ = parse_args(["--output-dir", "my out"])
    assert cfg.output_dir == tmp_path / "my out"


# ---------------------------------------------------------------- torch.compile mode


def test_compile_mode_defaults_and_parses():
    cfg, _ = parse_args([])
    assert cfg.train.compile_mode == "auto"
    for mode in COMPILE_MODES:
        cfg, _ = parse_args(["--compile", "--compile-mode", mode])
        assert cfg.train.compile_mode == mode and cfg.train.compile is True
    assert COMPILE_MODES == ("auto", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def test_unknown_compile_mode_is_refused_by_the_parser():
    with pytest.raises(ConfigError, match=r"argument --compile-mode: invalid choice: 'turbo'"):
        parse_args(["--compile-mode", "turbo"])


@pytest.mark.parametrize("argv, has_cuda", [
    (["--compile-mode", "reduce-overhead"], False),  # CPU: compile off by default
    (["--compile-mode", "max-autotune"], False),
    (["--compile-mode", "reduce-overhead", "--no-compile"], True),
    (["--compile-mode", "max-autotune-no-cudagraphs", "--no-compile"], False),
])
def test_compile_mode_without_compile_is_refused(argv, has_cuda):
    cfg, _ = parse_args(argv)
    with pytest.raises(ConfigError) as err:
        apply_device_defaults(cfg, has_cuda=has_cuda)
    msg = str(err.value)
    assert msg.startswith(f"--compile-mode {cfg.train.compile_mode} needs torch.compile, which is off")
    assert "add --compile or drop --compile-mode" in msg


@pytest.mark.parametrize("argv", [["--no-compile"], [], ["--compile-mode", "default"], ["--compile-mode", "auto"]])
def test_default_compile_mode_never_needs_compile(argv):
    cfg, _ = parse_args(argv)
    apply_device_defaults(cfg, has_cuda=False)
    assert cfg.train.compile is False and cfg.train.compile_mode == (argv[-1] if len(argv) == 2 else "auto")


@pytest.mark.parametrize("argv, world_size, on_cuda, expected", [
    ([], 1, True, "reduce-overhead"),  # one GPU: CUDA graphs
    ([], 2, True, "default"),  # DDP: graphs not measured on two GPUs
    ([], 1, False, "default"),  # no graphs off the GPU
    (["--deepspeed"], 1, True, "default"),  # DeepSpeed compiles the model itself
    (["--compile-mode", "default"], 1, True, "default"),  # a named mode is kept
    (["--compile-mode", "reduce-overhead"], 2, True, "reduce-overhead"),
    (["--compile-mode", "max-autotune"], 1, True, "max-autotune"),
])
def test_auto_compile_mode_takes_cuda_graphs_on_one_gpu(argv, world_size, on_cuda, expected):
    cfg, _ = parse_args(argv)
    assert resolved_compile_mode(cfg.train, world_size, on_cuda) == expected


@pytest.mark.parametrize("argv", [
    ["--compile-mode", "reduce-overhead"],  # GPU: compile on by default
    ["--compile", "--compile-mode", "max-autotune"],
])
def test_compile_mode_with_compile_on_passes(argv):
    cfg, _ = parse_args(argv)
    apply_device_defaults(cfg, has_cuda=True)
    assert cfg.train.compile is True and cfg.train.compile_mode == argv[-1]


def test_compile_mode_with_explicit_compile_passes_on_cpu():
    cfg, _ = parse_args(["--compile", "--compile-mode", "reduce-overhead"])
    apply_device_defaults(cfg, has_cuda=False)
    assert cfg.train.compile is True and cfg.train.compile_mode == "reduce-overhead"


@pytest.mark.parametrize("argv, world_size", [
    (["--compile-mode", "reduce-overhead"], 1),
    (["--compile-mode", "reduce-overhead", "--grad-accum", "1"], 1),
    (["--compile-mode", "reduce-overhead", "--batch-size", "2", "--global-batch-size", "4"], 2),
])
def test_reduce_overhead_without_accumulation_is_accepted(argv, world_size):
    cfg, _ = parse_args(argv)
    apply_device_defaults(cfg, has_cuda=True)
    plan = derive_batch_plan(cfg, world_size=world_size)
    assert plan.grad_accum == 1 and plan.world_size == world_size


@pytest.mark.parametrize("mode", COMPILE_MODES)
@pytest.mark.parametrize("accum", [["--grad-accum", "2"], ["--global-batch-size", "4"]])
def test_every_compile_mode_accumulates(mode, accum):
    # CUDA graphs accumulate too: one generation of graphs per step keeps the first micro-batch's
    # gradients alive (tests/unit/test_cudagraph_accumulation.py).
    cfg, _ = parse_args(["--compile-mode", mode, "--batch-size", "2", *accum])
    apply_device_defaults(cfg, has_cuda=True)
    assert derive_batch_plan(cfg, world_size=1).grad_accum == 2


def test_compile_mode_with_deepspeed_is_refused():
    cfg, _ = parse_args(["--compile-mode", "reduce-overhead", "--deepspeed"])
    with pytest.raises(ConfigError, match="with --deepspeed the engine compiles the model itself: drop --compile-mode"):
        apply_device_defaults(cfg, has_cuda=True)
    cfg, _ = parse_args(["--deepspeed"])
    apply_device_defaults(cfg, has_cuda=True)  # the default mode is fine
