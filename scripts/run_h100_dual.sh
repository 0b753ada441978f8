#!/usr/bin/env bash
# Korean/English sLLM training launcher (one host, DDP over 1-8 GPUs; CPU processes without a GPU).
#
#   ./run_h100_dual.sh                       # test mode: 10 steps, in the background
#   ./run_h100_dual.sh --train               # full training run, in the background
#   ./run_h100_dual.sh --status | --stop     # watch / stop it (the stop saves a checkpoint)
#   ./run_h100_dual.sh --dry-run --train     # print the command and the resolved configuration
#   ./run_h100_dual.sh --train -- --warmup-steps 200   # trainer options after --
#
# Options: --help, or docs/launcher.md. Exit codes: 0 ok, 1 a run-time failure,
# 2 a bad option (one line, before anything starts), 3 --status: not running.
set -euo pipefail
ORIG_ARGS=("$@")

SCRIPT_DIR="$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")" && pwd)"
ROOT="$(cd "$SCRIPT_DIR/.." && pwd)"
TRAINER="$SCRIPT_DIR/train_h100_dual.py"
# shellcheck source=scripts/launcher_lib.sh
source "$SCRIPT_DIR/launcher_lib.sh"
# shellcheck source=scripts/setup_env.sh
source "$SCRIPT_DIR/setup_env.sh"

# Keep in sync with koen_sllm.config (tests/test_launcher.py checks it).
MODEL_SIZES="tiny 125m 350m 0.6b 1.3b"
DEFAULT_BATCH=4 DEFAULT_LR=1e-4 DEFAULT_SAVE_STEPS=500 DEFAULT_TEST_STEPS=10 DEFAULT_NUM_GPUS=2
GPU_SEQ_LEN=2048 CPU_SEQ_LEN=128 GPU_MODEL=0.6b CPU_MODEL=tiny

usage() {
  cat <<EOF
한국어 sLLM 학습 실행기 / Korean sLLM training launcher
Usage: ${0##*/} [options] [-- trainer options]

실행 모드 / mode
  --test                  테스트 모드: ${DEFAULT_TEST_STEPS}스텝 빠른 검증 / quick check (default)
  --train                 실제 학습 모드 / full training run
  --max-steps N           최대 스텝 / optimizer steps (test: ${DEFAULT_TEST_STEPS}; train: one epoch)
  --model-size NAME       모델 크기 / model preset: ${MODEL_SIZES// /, } (GPU: ${GPU_MODEL}, CPU: ${CPU_MODEL})
데이터 및 출력 / data and output
  --dataset-path PATH     데이터셋 파일 또는 폴더 / JSONL/txt file or folder (default: datasets/)
  --output-dir PATH       체크포인트 / checkpoints (default: outputs/)
  --logs-dir PATH         로그, PID 파일, metrics.jsonl / logs (default: logs/)
학습 하이퍼파라미터 / hyperparameters
  --batch-size N          GPU(프로세스)당 배치 / micro-batch per GPU (default: ${DEFAULT_BATCH})
  --grad-accum N          그래디언트 누적 / micro-batches per optimizer step (default: 1)
  --learning-rate LR      학습률 / peak learning rate (default: ${DEFAULT_LR})
  --max-seq-length N      최대 시퀀스 길이 / tokens per sequence (GPU: ${GPU_SEQ_LEN}, CPU: ${CPU_SEQ_LEN})
  --save-steps N          저장 간격 / checkpoint every N steps (default: ${DEFAULT_SAVE_STEPS})
  --resume [auto|none|PATH]  이어서 학습 / resume (train: auto, test: none; bare --resume = auto)
정밀도와 속도 / precision and speed
  --fp16                  FP16 mixed precision (GPU only; default: bf16 on GPU, fp32 on CPU)
  --fp32                  FP32 precision
  --no-compile            torch.compile 끄기 / disable torch.compile (default: on for GPU)
  --num-gpus N            사용할 GPU 수 / GPUs to use (default: ${DEFAULT_NUM_GPUS}; CPU processes without a GPU)
  --deepspeed [CONFIG]    DeepSpeed ZeRO (default config: the shipped one)
실행 제어 / control
  --foreground            포그라운드 실행 / stay attached (default: background with nohup)
  --no-save-initial       초기 모델 저장 안 함 / skip outputs/initial_model
  --dry-run               명령어와 설정만 출력 / print the command and configuration, start nothing
  --verbose               상세 로그 / debug-level logs
  --status                실행 상태 / running?, step, loss, tok/s, ETA
  --stop                  체크포인트 저장 후 중단 / stop (workers save a checkpoint first)
  --no-install            패키지 자동 설치 안 함 / never pip install (same as KOEN_NO_INSTALL=1)
  -h, --help              도움말 / this help
  -- ARGS                 나머지는 학습 스크립트로 / pass the rest to train_h100_dual.py

Environment: KOEN_STOP_TIMEOUT (--stop wait, default 600 s), KOEN_LOG_PREVIEW_SECONDS (default 5),
KOEN_NO_INSTALL, KOEN_PIP_ARGS. More: docs/launcher.md
EOF
}

# ---------------------------------------------------------------- errors

# One line, bilingual, exit 2: nothing has started yet.
die2() { printf '❌ %s\n' "$*" >&2; exit 2; }
die1() { printf '❌ %s\n' "$*" >&2; exit 1; }

is_pos_int() { [[ "$1" =~ ^0*[1-9][0-9]*$ ]]; }
is_pos_float() {
  [[ "$1" =~ ^([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?$ ]] && awk -v x="$1" 'BEGIN { exit !(x + 0 > 0) }'
}
abspath() { if [[ "$1" == /* ]]; then printf '%s\n' "$1"; else printf '%s\n' "$PWD/$1"; fi; }

# ---------------------------------------------------------------- options

MODE="" MAX_STEPS="" MODEL_SIZE="" DATASET="" OUTPUT_DIR="" LOGS_DIR="" BATCH="" ACCUM="" LR=""
SEQ="" SAVE_STEPS="" RESUME="" PRECISION="" NO_COMPILE=0 NUM_GPUS="" DEEPSPEED_SET=0 DEEPSPEED=""
FOREGROUND=0 NO_SAVE_INITIAL=0 DRY_RUN=0 VERBOSE=0 ACTION="" NO_INSTALL=0
TRAIN_OPTS=()  # options that make no sense with --status/--stop
PASS=()

# Option helpers; they read $opt/$inline/$has_inline of the option being parsed.
take_value() {  # the value, from --opt=value or the next word
  consumed=0
  if ((has_inline)); then value="$inline"; return; fi
  if (($# == 0)) || [[ "$1" == --* ]]; then die2 "$opt 에 값이 필요합니다 / $opt needs a value"; fi
  value="$1" consumed=1
}
take_optional() {  # an optional value: only a next word that is not an option
  value="" consumed=0
  if ((has_inline)); then value="$inline"; return; fi
  if (($#)) && [[ "$1" != -* ]]; then value="$1" consumed=1; fi
}
no_value() { if ((has_inline)); then die2 "$opt 옵션은 값을 받지 않습니다 / $opt takes no value, got '$inline'"; fi; }

while (($#)); do
  word="$1" opt="$1" inline="" has_inline=0 value="" consumed=0
  if [[ "$opt" == --*=* ]]; then inline="${opt#*=}" opt="${opt%%=*}" has_inline=1; fi
  shift
  case "$opt" in
    -h|--help) usage; exit 0 ;;
    --test|--train)
      no_value; m="${opt#--}"
      [[ -n "$MODE" && "$MODE" != "$m" ]] && die2 "--test 와 --train 옵션은 함께 쓸 수 없습니다 / --test and --train cannot be combined"
      MODE="$m"; TRAIN_OPTS+=("$opt") ;;
    --max-steps|--batch-size|--grad-accum|--max-seq-length|--save-steps|--num-gpus)
      take_value "$@"
      is_pos_int "$value" || die2 "$opt 에는 양의 정수가 필요합니다 / $opt needs a positive integer, got '$value'"
      value=$((10#$value))
      case "$opt" in
        --max-steps) MAX_STEPS="$value" ;; --batch-size) BATCH="$value" ;; --grad-accum) ACCUM="$value" ;;
        --max-seq-length) SEQ="$value" ;; --save-steps) SAVE_STEPS="$value" ;; --num-gpus) NUM_GPUS="$value" ;;
      esac
      TRAIN_OPTS+=("$opt") ;;
    --learning-rate)
      take_value "$@"
      is_pos_float "$value" || die2 "$opt 에는 양수가 필요합니다 / $opt needs a positive number, got '$value'"
      LR="$value"; TRAIN_OPTS+=("$opt") ;;
    --model-size)
      take_value "$@"
      [[ " $MODEL_SIZES " == *" $value "* ]] || die2 "알 수 없는 모델 크기 / unknown --model-size '$value': choose one of ${MODEL_SIZES// /, }"
      MODEL_SIZE="$value"; TRAIN_OPTS+=("$opt") ;;
    --dataset-path|--output-dir|--logs-dir)
      take_value "$@"
      [[ -n "$value" ]] || die2 "$opt 에 경로가 필요합니다 / $opt needs a path"
      case "$opt" in
        --dataset-path) DATASET="$(abspath "$value")"; TRAIN_OPTS+=("$opt") ;;
        --output-dir) OUTPUT_DIR="$(abspath "$value")" ;;
        --logs-dir) LOGS_DIR="$(abspath "$value")" ;;
      esac ;;
    --resume)
      take_optional "$@"; RESUME="${value:-auto}"; TRAIN_OPTS+=("$opt") ;;
    --deepspeed)
      take_optional "$@"; DEEPSPEED_SET=1; DEEPSPEED="$value"; TRAIN_OPTS+=("$opt") ;;
    --fp16|--fp32)
      no_value; p="${opt#--}"
      [[ -n "$PRECISION" && "$PRECISION" != "$p" ]] && die2 "--fp16 과 --fp32 옵션은 함께 쓸 수 없습니다 / --fp16 and --fp32 cannot be combined"
      PRECISION="$p"; TRAIN_OPTS+=("$opt") ;;
    --no-compile) no_value; NO_COMPILE=1; TRAIN_OPTS+=("$opt") ;;
    --foreground) no_value; FOREGROUND=1; TRAIN_OPTS+=("$opt") ;;
    --no-save-initial) no_value; NO_SAVE_INITIAL=1; TRAIN_OPTS+=("$opt") ;;
    --dry-run) no_value; DRY_RUN=1; TRAIN_OPTS+=("$opt") ;;
    --verbose) no_value; VERBOSE=1 ;;
    --no-install) no_value; NO_INSTALL=1 ;;
    --status|--stop)
      no_value; a="${opt#--}"
      [[ -n "$ACTION" && "$ACTION" != "$a" ]] && die2 "--status 와 --stop 옵션은 함께 쓸 수 없습니다 / --status and --stop cannot be combined"
      ACTION="$a" ;;
    --) PASS=("$@"); TRAIN_OPTS+=("--"); set -- ;;
    *) die2 "알 수 없는 옵션 / unknown option '$word': see --help" ;;
  esac
  if ((consumed)); then shift; fi
done

# ---------------------------------------------------------------- checks that need no Python

LOGS_DIR="${LOGS_DIR:-$ROOT/logs}"
OUTPUT_DIR="${OUTPUT_DIR:-$ROOT/outputs}"
koen_job_files "$LOGS_DIR"  # PID_FILE, CONSOLE_LOG, STOPPING_FILE

if [[ -n "$ACTION" ]]; then
  ((${#TRAIN_OPTS[@]} == 0)) ||
    die2 "--$ACTION 옵션은 학습 옵션과 함께 쓸 수 없습니다 / --$ACTION cannot be combined with ${TRAIN_OPTS[0]}"
fi
MODE="${MODE:-test}"
((NO_INSTALL)) && export KOEN_NO_INSTALL=1

# Counts .jsonl/.txt inputs in a file or folder. Like the data reader, a folder
# is read one level deep (mixed_pretraining.jsonl, else every *.jsonl / *.txt).
count_data_files() {
  local p="$1"
  if [[ -f "$p" ]]; then echo 1; return; fi
  [[ -d "$p" ]] || { echo 0; return; }
  find "$p" -maxdepth 1 -type f \( -name '*.jsonl' -o -name '*.txt' \) 2>/dev/null | wc -l | tr -d ' '
}

if [[ -z "$ACTION" ]]; then
  DATASET_SHOWN="${DATASET:-$ROOT/datasets}"
  if [[ -n "$DATASET" && ! -e "$DATASET" ]]; then
    die2 "데이터셋 경로가 없습니다 / --dataset-path '$DATASET' does not exist"
  fi
  DATA_FILES="$(count_data_files "$DATASET_SHOWN")"
  if [[ "$MODE" == train && "$DATA_FILES" == 0 ]]; then
    die2 "학습 데이터가 없습니다 / no .jsonl/.txt training data in '$DATASET_SHOWN': run scripts/run_preprocessing.sh --recipe1, or pass --dataset-path"
  fi
  if ((DEEPSPEED_SET)) && [[ -n "$DEEPSPEED" ]]; then
    DEEPSPEED="$(abspath "$DEEPSPEED")"
    [[ -f "$DEEPSPEED" ]] || die2 "DeepSpeed 설정 파일이 없습니다 / --deepspeed config '$DEEPSPEED' not found"
  fi
  if [[ -n "$RESUME" && "$RESUME" != auto && "$RESUME" != none ]]; then
    # A bare name such as checkpoint-500 means the one under --output-dir (as in the trainer).
    if [[ "$RESUME" != /* && ! -e "$RESUME" && -e "$OUTPUT_DIR/$RESUME" ]]; then RESUME="$OUTPUT_DIR/$RESUME"; fi
    RESUME="$(abspath "$RESUME")"
    [[ -e "$RESUME" ]] || die2 "체크포인트가 없습니다 / --resume '$RESUME' does not exist (use auto, none, a checkpoint path or a checkpoint name in --output-dir)"
  fi
  # Two runs would share GPUs, logs and checkpoints: refuse before anything else.
  if ((!DRY_RUN)) && running="$(koen_live_pid "$PID_FILE")"; then
    die1 "이미 학습이 실행 중입니다 / a run is already going: PID $running ($(ps -o args= -p "$running" 2>/dev/null | cut -c 1-60)) in $PID_FILE; see --status, stop it with --stop, or use another --logs-dir"
  fi
fi

# ---------------------------------------------------------------- --status / --stop

case "$ACTION" in
  status) set +e; koen_status; exit $? ;;
  stop) set +e; koen_stop "$0"; exit $? ;;
esac

# ---------------------------------------------------------------- banner and environment

cat <<'EOF_BANNER'
========================================================
     한국어 sLLM H100 듀얼 GPU 학습 실행기
     Korean sLLM H100 Dual GPU Training Launcher
     🚀 H100 최적화 + 분산 학습 지원
========================================================

EOF_BANNER
printf '🔍 학습 환경 확인 중... / checking the training environment...\n'
koen_setup_env "" || exit 1
PY="$KOEN_PYTHON"

# koen_setup_env already asked torch about the device (KOEN_ENV_PROBE).
TORCH_VERSION="" CUDA_VERSION="" GPU_COUNT=0 GPU_LINES=()
while read -r key a b; do
  case "$key" in
    ok) TORCH_VERSION="$b" ;;
    cuda) GPU_COUNT="$a" CUDA_VERSION="$b" ;;
    gpu) GPU_LINES+=("  GPU $a: $b") ;;
  esac
done <<<"$KOEN_ENV_PROBE"
# Lets tests exercise the GPU-count rules on machines without GPUs.
if [[ -n "${KOEN_TEST_GPU_COUNT:-}" ]]; then GPU_COUNT="$KOEN_TEST_GPU_COUNT"; fi

if ((GPU_COUNT > 0)); then
  printf '✅ PyTorch %s, CUDA %s 확인 완료 / PyTorch and CUDA ok\n' "$TORCH_VERSION" "$CUDA_VERSION"
  if [[ -n "$NUM_GPUS" ]] && ((NUM_GPUS > GPU_COUNT)); then
    die2 "--num-gpus $NUM_GPUS: GPU가 ${GPU_COUNT}개뿐입니다 / only $GPU_COUNT GPU(s) present; use --num-gpus $GPU_COUNT or less"
  fi
  NPROC="${NUM_GPUS:-$DEFAULT_NUM_GPUS}"
  printf '✅ GPU 확인 완료: %s개 사용 가능 / %s GPU(s) available\n' "$GPU_COUNT" "$GPU_COUNT"
  ((${#GPU_LINES[@]})) && printf '%s\n' "${GPU_LINES[@]}"
  if ((NPROC > GPU_COUNT)); then
    printf '⚠️  GPU가 %s개뿐이라 %s개로 실행합니다 / only %s GPU(s): using %s (default is %s)\n' \
      "$GPU_COUNT" "$GPU_COUNT" "$GPU_COUNT" "$GPU_COUNT" "$DEFAULT_NUM_GPUS"
    NPROC="$GPU_COUNT"
  fi
  DEVICE=gpu
else
  printf '✅ PyTorch %s 확인 완료 / PyTorch ok (CPU build or no CUDA device)\n' "$TORCH_VERSION"
  NPROC="${NUM_GPUS:-$DEFAULT_NUM_GPUS}"
  printf '⚠️  GPU 없음: CPU 프로세스 %s개(gloo)로 실행합니다 — 검증용이며 실제 학습용이 아닙니다\n' "$NPROC"
  printf '⚠️  no CUDA GPU: running %s CPU processes (gloo) — for checking the pipeline, not for real training\n' "$NPROC"
  [[ "$PRECISION" == fp16 ]] && die2 "--fp16 은 CUDA GPU가 필요합니다 / --fp16 needs a CUDA GPU; use --fp32 (or the default) on CPU"
  DEVICE=cpu
fi

if [[ "$DATA_FILES" -gt 0 ]]; then
  printf '✅ 데이터셋 확인 완료: %s개 파일 / dataset: %s file(s) in %s\n' "$DATA_FILES" "$DATA_FILES" "$DATASET_SHOWN"
else
  printf '⚠️  데이터셋 없음: 테스트 모드는 더미 데이터를 씁니다 / no data in %s: test mode uses a generated dummy corpus\n' "$DATASET_SHOWN"
  printf '   실제 데이터 / real data: scripts/run_preprocessing.sh --recipe1\n'
fi

# Free space where the checkpoints go (its nearest existing parent).
disk_dir="$OUTPUT_DIR"
while [[ ! -d "$disk_dir" && "$disk_dir" != / ]]; do disk_dir="$(dirname "$disk_dir")"; done
free_kb="$(df -Pk "$disk_dir" 2>/dev/null | awk 'NR == 2 { print $4 }')"
if [[ "$free_kb" =~ ^[0-9]+$ ]]; then
  free_gib=$((free_kb / 1048576)) need_gib=1
  [[ "$MODE" == train ]] && need_gib=20
  if ((free_gib >= need_gib)); then
    printf '✅ 디스크 여유 공간 / free disk: %s GiB (%s)\n' "$free_gib" "$disk_dir"
  else
    printf '⚠️  디스크 여유 공간 부족 / low free disk: %s GiB in %s (checkpoints need several GiB each): free space or use --output-dir elsewhere\n' "$free_gib" "$disk_dir"
  fi
fi
if [[ ! -f "$TRAINER" ]]; then die1 "학습 스크립트가 없습니다 / trainer not found: $TRAINER"; fi
printf '✅ 모든 요구사항 충족 / all requirements met\n\n'

# ---------------------------------------------------------------- the command

TARGS=("--$MODE")
[[ -n "$MODEL_SIZE" ]] && TARGS+=(--model-size "$MODEL_SIZE")
[[ -n "$MAX_STEPS" ]] && TARGS+=(--max-steps "$MAX_STEPS")
[[ -n "$DATASET" ]] && TARGS+=(--dataset-path "$DATASET")
TARGS+=(--output-dir "$OUTPUT_DIR" --logs-dir "$LOGS_DIR")
[[ -n "$BATCH" ]] && TARGS+=(--batch-size "$BATCH")
[[ -n "$ACCUM" ]] && TARGS+=(--grad-accum "$ACCUM")
[[ -n "$LR" ]] && TARGS+=(--learning-rate "$LR")
[[ -n "$SEQ" ]] && TARGS+=(--max-seq-length "$SEQ")
[[ -n "$SAVE_STEPS" ]] && TARGS+=(--save-steps "$SAVE_STEPS")
[[ -n "$PRECISION" ]] && TARGS+=("--$PRECISION")
((NO_COMPILE)) && TARGS+=(--no-compile)
((NO_SAVE_INITIAL)) && TARGS+=(--no-save-initial)
[[ -n "$RESUME" ]] && TARGS+=(--resume "$RESUME")
if ((DEEPSPEED_SET)); then
  if [[ -n "$DEEPSPEED" ]]; then TARGS+=(--deepspeed "$DEEPSPEED"); else TARGS+=(--deepspeed); fi
fi
((VERBOSE)) && TARGS+=(--verbose)
TARGS+=("${PASS[@]}")
CMD=("$PY" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" "$TRAINER" "${TARGS[@]}")
CMD_TEXT="$(koen_shquote "${CMD[@]}")"
((FOREGROUND)) && CMD_TEXT="KOEN_CONSOLE_LOG=$(koen_shquote "$CONSOLE_LOG") $CMD_TEXT"

# ---------------------------------------------------------------- 📋 run information

if [[ "$DEVICE" == gpu ]]; then
  d_seq="$GPU_SEQ_LEN" d_prec=bf16 d_compile=true d_model="$GPU_MODEL"
else
  d_seq="$CPU_SEQ_LEN" d_prec=fp32 d_compile=false d_model="$CPU_MODEL"
fi
compile_on="$d_compile"; ((NO_COMPILE)) && compile_on=false
prec="${PRECISION:-$d_prec}"
if [[ "$MODE" == test ]]; then
  mode_text="테스트 모드 (${MAX_STEPS:-$DEFAULT_TEST_STEPS}스텝) / test (${MAX_STEPS:-$DEFAULT_TEST_STEPS} steps)"
else
  if [ -n "$MAX_STEPS" ]; then
    mode_text="실제 학습 모드 ($MAX_STEPS 스텝) / train ($MAX_STEPS steps)"
  else
    mode_text="실제 학습 모드 (1 에포크) / train (one epoch)"
  fi
fi
backend="DDP (NCCL)"; [[ "$DEVICE" == cpu ]] && backend="DDP (gloo, CPU)"
((DEEPSPEED_SET)) && backend="DeepSpeed ZeRO${DEEPSPEED:+ ($DEEPSPEED)}"
opt_text="${prec^^}"; [[ "$compile_on" == true ]] && opt_text+=" + torch.compile"
lr_text="${LR:-$DEFAULT_LR}"
if ((DEEPSPEED_SET)); then
  # Options not typed come from the DeepSpeed JSON; the trainer's start-up lines name them.
  [[ -n "$LR" ]] || lr_text="DeepSpeed 설정 파일 값 / from the DeepSpeed config"
  [[ -n "$PRECISION" ]] || prec="DeepSpeed 설정 파일 값 / from the DeepSpeed config"
  opt_text="DeepSpeed"
fi
bool() { if (($1)); then echo true; else echo false; fi; }

cat <<EOF_INFO
📋 학습 정보 / run information
=================================
🎯 모드 / mode: $mode_text
🧠 모델 / model: ${MODEL_SIZE:-$d_model}
🔧 하이퍼파라미터 / hyperparameters:
   • 배치 크기 / batch size: ${BATCH:-$DEFAULT_BATCH} (GPU당 / per process) x ${ACCUM:-1} 누적 / accumulation
   • 학습률 / learning rate: $lr_text
   • 최대 시퀀스 길이 / max sequence length: ${SEQ:-$d_seq}
   • Mixed Precision: $prec
   • 모델 컴파일 / torch.compile: $compile_on
📁 경로 / paths:
   • 데이터셋 / dataset: $DATASET_SHOWN
   • 출력 / output: $OUTPUT_DIR
   • 로그 / logs: $LOGS_DIR
💾 저장 설정 / saving:
   • 저장 간격 / save every: ${SAVE_STEPS:-$DEFAULT_SAVE_STEPS} 스텝 / steps
   • 초기 모델 저장 / save initial model: $(bool $((!NO_SAVE_INITIAL)))
   • 이어서 학습 / resume: ${RESUME:-$([[ "$MODE" == train ]] && echo auto || echo none)}
   • 백그라운드 실행 / background: $(bool $((!FOREGROUND)))
🚀 분산 설정 / distributed:
   • $([[ "$DEVICE" == gpu ]] && echo "GPU 수 / GPUs" || echo "CPU 프로세스 수 / CPU processes"): $NPROC
   • 분산 학습 / backend: $backend
   • 최적화 / optimizations: $opt_text
EOF_INFO
((${#PASS[@]})) && printf '   • 추가 학습 옵션 / passed through: %s\n' "$(koen_shquote "${PASS[@]}")"
((VERBOSE)) && printf '🧾 명령 / command: %s\n' "$CMD_TEXT"
echo

if ((DRY_RUN)); then
  printf '🧪 Dry run: 아무것도 실행하지 않습니다 / nothing is started\n'
  printf '📋 실행할 명령 / command:\n%s\n\n' "$CMD_TEXT"
  printf '📋 확정된 설정 / resolved configuration (train_h100_dual.py --dry-run):\n'
  rc=0
  "$PY" "$TRAINER" "${TARGS[@]}" --dry-run || rc=$?
  exit "$rc"
fi

# ---------------------------------------------------------------- start

mkdir -p -- "$LOGS_DIR" || die1 "로그 폴더를 만들 수 없습니다 / cannot create the logs folder $LOGS_DIR"
koen_clean_stale_pid
rotated="$(koen_rotate_logs "$LOGS_DIR")"
((rotated > 0)) && printf '🗂  이전 로그 %s개를 .1 로 보관 / kept %s earlier log file(s) as *.1 (up to .%s)\n' "$rotated" "$rotated" "$KOEN_LOG_KEEP"
rm -f -- "$STOPPING_FILE"
git_rev="$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo none)"
[[ -n "$(git -C "$ROOT" status --porcelain --untracked-files=no 2>/dev/null | head -n 1)" ]] && git_rev+="+dirty"
koen_log_line "$CONSOLE_LOG" "run_h100_dual.sh $(koen_shquote "${ORIG_ARGS[@]}")"
koen_log_line "$CONSOLE_LOG" "mode $MODE | $NPROC process(es) on $DEVICE | torch $TORCH_VERSION | git $git_rev | host $(hostname)"
koen_log_line "$CONSOLE_LOG" "command: $CMD_TEXT"

# The run gets its own session (setsid): the terminal's Ctrl-C then reaches only
# this script, which forwards a stop to the workers. Signalled directly,
# torchrun would kill its workers 30 s later, possibly in the middle of a save.
SETSID=()
command -v setsid >/dev/null 2>&1 && SETSID=(setsid)
LAUNCHER_CMD="$(koen_shquote "$0")"
[[ "$LOGS_DIR" != "$ROOT/logs" ]] && LAUNCHER_CMD+=" --logs-dir $(koen_shquote "$LOGS_DIR")"

write_pid() { printf '%s\n' "$1" >"$PID_FILE.tmp" && mv -f -- "$PID_FILE.tmp" "$PID_FILE"; }

# Foreground Ctrl-C (or SIGTERM/SIGHUP to this script): the first asks the workers to
# save and stop, a later one makes them stop at once.
STOPS=0
# shellcheck disable=SC2317  # called through trap
on_signal() {
  local workers
  if [[ -z "${PID:-}" ]]; then  # before the run started: remember it, act once it has a PID
    STOPS=$((STOPS + 1))
    return
  fi
  workers="$(koen_worker_pids "$PID")"
  [[ -n "$workers" ]] || workers="$PID"
  if ((STOPS == 0)); then
    printf '\n⏹  중단 요청: 체크포인트 저장 후 종료합니다 (한 번 더: 즉시 종료) / stopping after a checkpoint save (again: stop now)\n' >&2
  else
    printf '\n⏹  즉시 종료 / stopping now\n' >&2
  fi
  STOPS=$((STOPS + 1))
  koen_log_line "$CONSOLE_LOG" "signal: SIGTERM to workers $workers (request $STOPS)"
  # shellcheck disable=SC2086  # one word per PID
  kill -TERM $workers 2>/dev/null || true
}
printf '🎯 학습 시작! / starting the run\n'
if ((FOREGROUND)); then
  printf '🖥  포그라운드 모드로 실행됩니다 / running in the foreground (Ctrl-C: save a checkpoint and stop; twice: stop now)\n'
  printf '📋 로그 파일 / console log: %s\n\n' "$CONSOLE_LOG"
  # The trap is in place before the run starts, so no signal can fall between the two.
  PID=""
  trap on_signal INT TERM HUP
  KOEN_CONSOLE_LOG="$CONSOLE_LOG" "${SETSID[@]}" "${CMD[@]}" </dev/null &
  PID=$!
  write_pid "$PID"
  koen_log_line "$CONSOLE_LOG" "started in the foreground, PID $PID"
  if ((STOPS > 0)); then STOPS=0; on_signal; fi
  rc=0
  while :; do
    set +e; wait "$PID"; rc=$?; set -e
    kill -0 "$PID" 2>/dev/null || break
  done
  if ((rc > 128)); then  # the wait may have been cut by our own trap just as the run ended
    set +e; wait "$PID"; r2=$?; set -e
    ((r2 != 127)) && rc=$r2
  fi
  trap - INT TERM HUP
  [[ "$(head -n 1 -- "$PID_FILE" 2>/dev/null)" == "$PID" ]] && rm -f -- "$PID_FILE"
  koen_log_line "$CONSOLE_LOG" "the run exited with code $rc"
  if ((rc == 0)); then
    printf '\n✅ 학습 종료 / the run finished (exit 0). 로그 / logs: %s\n' "$LOGS_DIR"
  else
    printf '\n❌ 학습이 실패했습니다 / the run failed with exit code %s: see %s and %s/training_detail_rank_0.log\n' "$rc" "$CONSOLE_LOG" "$LOGS_DIR" >&2
  fi
  exit "$rc"
fi

printf '🔄 백그라운드 모드로 실행됩니다 / running in the background\n'
printf '📋 로그 파일 / console log: %s\n' "$CONSOLE_LOG"
printf '📋 실시간 로그 확인 / follow it: tail -f %s\n\n' "$(koen_shquote "$CONSOLE_LOG")"
offset="$(wc -c <"$CONSOLE_LOG" | tr -d ' ')"
env -u KOEN_CONSOLE_LOG "${SETSID[@]}" nohup "${CMD[@]}" >>"$CONSOLE_LOG" 2>&1 </dev/null &
PID=$!
write_pid "$PID"
koen_log_line "$CONSOLE_LOG" "started in the background, PID $PID"

printf '✅ 백그라운드 학습 시작됨! / started in the background\n'
printf '🔢 프로세스 ID / PID: %s\n' "$PID"
printf '📄 PID 파일 / PID file: %s\n\n' "$PID_FILE"
printf '🔍 학습 상태 확인 명령어 / commands to watch it:\n'
printf '  %-44s # %s\n' \
  "tail -f $(koen_shquote "$CONSOLE_LOG")" "실시간 로그 / live log" \
  "ps -p $PID" "프로세스 상태 / process status" \
  "$LAUNCHER_CMD --status" "진행 상황 / step, loss, tok/s, ETA" \
  "$LAUNCHER_CMD --stop" "체크포인트 저장 후 중단 / save a checkpoint, then stop" \
  "kill $PID" "학습 중단 / stop (torchrun allows the workers 30 s)"

preview="${KOEN_LOG_PREVIEW_SECONDS:-5}"
[[ "$preview" =~ ^[0-9]+$ ]] || preview=5
printf '\n📋 초기 로그 출력 (%s초간) / first %s seconds of the log:\n----------------------------------------\n' "$preview" "$preview"
for ((i = 0; i < preview * 4; i++)); do
  koen_pid_alive "$PID" || break
  sleep 0.25
done
tail -c "+$((offset + 1))" -- "$CONSOLE_LOG" | grep -v '^\[[^]]*\] \[launcher\]' | head -n 40 || true
printf -- '----------------------------------------\n'
if koen_pid_alive "$PID"; then
  printf '백그라운드에서 계속 실행 중... / still running in the background\n'
  exit 0
fi
set +e; wait "$PID"; rc=$?; set -e
rm -f -- "$PID_FILE"
koen_log_line "$CONSOLE_LOG" "the run exited with code $rc"
if ((rc == 0)); then
  printf '✅ 이미 끝났습니다 / the run already finished (exit 0)\n'
  exit 0
fi
die1 "학습 프로세스가 바로 종료되었습니다 / the run exited within ${preview} s with code $rc: see $CONSOLE_LOG"
