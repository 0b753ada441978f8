"""What the launcher prints before a run: the title, the environment check and the run information.

The run information is rendered from the configuration the trainer will use
(resolve.py), never from the launcher's own idea of the defaults, so the
banner cannot disagree with the run.
"""
from __future__ import annotations

from typing import Any

TITLE = """========================================================
     한국어 sLLM H100 듀얼 GPU 학습 실행기
     Korean sLLM H100 Dual GPU Training Launcher
     🚀 H100 최적화 + 분산 학습 지원
========================================================
"""


def _bool(v: Any) -> str:
    return "true" if v else "false"


def run_information(cfg: dict, *, nproc: int, device: str, notes: list[str], foreground: bool,
                    passed: str = "") -> str:
    t, o, c, d = cfg["train"], cfg["optim"], cfg["ckpt"], cfg["data"]
    if t["mode"] == "test":
        mode = f"테스트 모드 ({t['max_steps']}스텝) / test ({t['max_steps']} steps)"
    elif t.get("max_steps"):
        mode = f"실제 학습 모드 ({t['max_steps']} 스텝) / train ({t['max_steps']} steps)"
    else:
        mode = f"실제 학습 모드 ({t['num_epochs']:g} 에포크) / train ({_epochs(t['num_epochs'])})"
    accum = t.get("grad_accum")
    if t.get("global_batch_size"):
        accum = t["global_batch_size"] // max(1, t["batch_size"] * nproc)
    backend = "DDP (gloo, CPU)" if device == "cpu" else "DDP (NCCL)"
    if t.get("deepspeed") is not None:
        backend = f"DeepSpeed ZeRO ({t['deepspeed'] or 'configs/ds_config.json'})"
    opt = t["precision"].upper() + (" + torch.compile" if t.get("compile") else "")
    weights = "bf16 + fp32 master" if t.get("bf16_weights") else "fp32"
    lines = [
        "📋 학습 정보 / run information",
        "=================================",
        f"🎯 모드 / mode: {mode}",
        f"🧠 모델 / model: {t['model_size']}",
        "🔧 하이퍼파라미터 / hyperparameters:",
        f"   • 배치 크기 / batch size: {t['batch_size']} (GPU당 / per process) x {accum or 1} 누적 / accumulation"
        f" x {nproc} = {t['batch_size'] * (accum or 1) * nproc} 시퀀스/스텝 / sequences per step",
        f"   • 학습률 / learning rate: {o['learning_rate']:g} (warm-up {_show(o.get('warmup_steps'), '1% of steps')}, "
        f"cosine to {o['min_lr_ratio']:g}x)",
        f"   • 최대 시퀀스 길이 / max sequence length: {t['max_seq_length']}",
        f"   • Mixed Precision: {t['precision']} (weights {weights})"
        + (f", FP8 matmuls ({t['fp8']})" if t.get("fp8", "off") != "off" else ""),
        f"   • 모델 컴파일 / torch.compile: {_bool(t.get('compile'))}",
        "📁 경로 / paths:",
        f"   • 데이터셋 / dataset: {d.get('dataset_path') or 'datasets/'}",
        f"   • 출력 / output: {c['output_dir']}",
        f"   • 로그 / logs: {t['logs_dir']}",
        "💾 저장 설정 / saving:",
        f"   • 저장 간격 / save every: {c['save_steps']} 스텝 / steps",
        f"   • 초기 모델 저장 / save initial model: {_bool(c['save_initial'])}",
        f"   • 이어서 학습 / resume: {c['resume']}",
        f"   • 백그라운드 실행 / background: {_bool(not foreground)}",
        "🚀 분산 설정 / distributed:",
        f"   • {'GPU 수 / GPUs' if device == 'gpu' else 'CPU 프로세스 수 / CPU processes'}: {nproc}",
        f"   • 분산 학습 / backend: {backend}",
        f"   • 최적화 / optimizations: {opt}",
    ]
    if passed:
        lines.append(f"   • 학습 옵션 / trainer options: {passed}")
    for note in notes:
        lines.append(f"📝 {note}")
    return "\n".join(lines) + "\n"


def _epochs(n: float) -> str:
    return "one epoch" if n == 1 else f"{n:g} epochs"


def _show(v: Any, default: str) -> str:
    return default if v is None else str(v)
