# shellcheck shell=bash
# Helpers shared by scripts/run_h100_dual.sh and scripts/train.sbatch: quoting,
# timestamps, log rotation, the PID file and reading the progress line.
# Sourced; defines functions only. The file names match koen_sllm/logs.py.

KOEN_LOG_KEEP=5  # rotated copies kept: .1 (newest) .. .5 (oldest); koen_sllm/logs.py keeps the same

koen_ts() { date '+%Y-%m-%d %H:%M:%S'; }

# Appends "[time] [launcher] message" to a log file (the launcher's own lines in
# the console log carry timestamps like the trainer's).
koen_log_line() {
  local file="$1"; shift
  printf '[%s] [launcher] %s\n' "$(koen_ts)" "$*" >>"$file"
}

# Joins its arguments into one line a shell reads back as the same words:
# plain words stay as they are, everything else is single-quoted.
koen_shquote() {
  local out="" word
  for word in "$@"; do
    if [[ -n "$word" && "$word" =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
      out+="$word "
    else
      out+="'${word//\'/\'\\\'\'}' "
    fi
  done
  printf '%s' "${out% }"
}

# path -> path.1 -> ... -> path.5; the oldest copy is dropped, nothing is overwritten.
# Empty files are left alone (the trainer's rotation does the same).
koen_rotate_file() {
  local path="$1" keep="${2:-$KOEN_LOG_KEEP}" i
  [[ -s "$path" ]] || return 0
  rm -f -- "$path.$keep"
  for ((i = keep - 1; i >= 1; i--)); do
    if [[ -e "$path.$i" ]]; then mv -f -- "$path.$i" "$path.$((i + 1))"; fi
  done
  mv -f -- "$path" "$path.1"
}

# Rotates an earlier run's console and per-rank logs in a logs directory.
koen_rotate_logs() {
  local dir="$1" f rotated=0
  shopt -s nullglob
  for f in "$dir/training_console.log" "$dir"/training_rank_*.log "$dir"/training_detail_rank_*.log; do
    if [[ -s "$f" ]]; then koen_rotate_file "$f"; rotated=$((rotated + 1)); fi
  done
  shopt -u nullglob
  printf '%d\n' "$rotated"
}

# True while a process runs. A zombie counts as gone: an orphaned torchrun whose
# new parent never reaps it (some container init processes) stays a zombie.
koen_pid_alive() {
  local state=""
  if [[ -d "/proc/$1" ]]; then
    # /proc also sees another user's process, where kill -0 would say "not permitted".
    state="$(awk '/^State:/ { print $2; exit }' "/proc/$1/status" 2>/dev/null)" || return 1
    [[ -n "$state" && "$state" != Z* ]]
    return
  fi
  kill -0 "$1" 2>/dev/null || return 1  # no /proc (macOS): assume a live process is not a zombie
  state="$(ps -o stat= -p "$1" 2>/dev/null)" || return 0
  [[ "$state" != Z* ]]
}

# Prints the PID recorded in a PID file when that process is alive; returns 1
# (printing nothing) when the file is missing, empty, garbage or stale.
koen_live_pid() {
  local file="$1" pid
  [[ -f "$file" ]] || return 1
  pid="$(head -n 1 -- "$file" 2>/dev/null | tr -d '[:space:]')"
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  koen_pid_alive "$pid" || return 1
  printf '%s\n' "$pid"
}

# The worker processes of a torchrun: its direct children. They get the stop
# signal themselves because torchrun, when signalled, kills its workers 30 s
# later, which can cut a checkpoint save short.
koen_worker_pids() {
  local pid="$1"
  if command -v pgrep >/dev/null 2>&1; then
    pgrep -P "$pid" 2>/dev/null | tr '\n' ' ' | sed 's/ *$//'
  else
    ps -o pid= --ppid "$pid" 2>/dev/null | tr -s ' \n' ' ' | sed 's/^ *//; s/ *$//'
  fi
}

# The newest progress line of a console log (format in docs/architecture.md),
# searched in the last 2 MB so --status stays fast on long runs.
koen_last_progress() {
  local log="$1"
  [[ -f "$log" ]] || return 1
  tail -c 2000000 -- "$log" | grep -E 'step [0-9]+/[0-9]+ \| loss ' | tail -n 1
}

# "step 10/100 | loss 5.1234 | ... tok/s 12,345 | ... | eta 0:12:34" -> a short summary.
koen_progress_summary() {
  local line="$1" out=""
  local re_step='step ([0-9]+)/([0-9]+)' re_loss='\| loss ([^ |]+)' re_tok='\| tok/s ([0-9][0-9,.]*|n/a) ' re_eta='\| eta ([^ |]+)'
  local re_ts='^\[([0-9]{4}-[0-9]{2}-[0-9]{2} [0-9:]{8})\]'
  [[ "$line" =~ $re_step ]] && out+="step ${BASH_REMATCH[1]}/${BASH_REMATCH[2]}"
  [[ "$line" =~ $re_loss ]] && out+=" | loss ${BASH_REMATCH[1]}"
  [[ "$line" =~ $re_tok ]] && out+=" | tok/s ${BASH_REMATCH[1]}"
  [[ "$line" =~ $re_eta ]] && out+=" | ETA ${BASH_REMATCH[1]}"
  [[ "$line" =~ $re_ts ]] && out+="  (${BASH_REMATCH[1]})"
  printf '%s\n' "$out"
}

# ---------------------------------------------------------------- a running job: --status and --stop
# These read PID_FILE, CONSOLE_LOG, STOPPING_FILE and LOGS_DIR, set by koen_job_files.

koen_job_files() {
  LOGS_DIR="$1"
  PID_FILE="$LOGS_DIR/training.pid"
  CONSOLE_LOG="$LOGS_DIR/training_console.log"
  STOPPING_FILE="$LOGS_DIR/training.stopping"  # holds the time --stop asked the run to stop
}

koen_clean_stale_pid() {
  if [[ -f "$PID_FILE" ]] && ! koen_live_pid "$PID_FILE" >/dev/null; then
    printf '🧹 오래된 PID 파일 정리 / removed a stale PID file: %s (PID %s is not running)\n' \
      "$PID_FILE" "$(head -c 20 -- "$PID_FILE" | tr -d '[:space:]')"
    rm -f -- "$PID_FILE" "$STOPPING_FILE"
  fi
}

koen_show_last_lines() {
  [[ -f "$CONSOLE_LOG" ]] || return 0
  printf '📋 마지막 로그 / last lines of %s:\n----------------------------------------\n' "$CONSOLE_LOG"
  tail -n "${1:-12}" -- "$CONSOLE_LOG"
  printf -- '----------------------------------------\n'
}

koen_status() {
  local pid line
  if pid="$(koen_live_pid "$PID_FILE")"; then
    printf '🟢 학습 실행 중 / training is running: PID %s, elapsed %s, workers: %s\n' \
      "$pid" "$(ps -o etime= -p "$pid" 2>/dev/null | tr -d ' ')" "$(koen_worker_pids "$pid")"
    [[ -f "$STOPPING_FILE" ]] && printf '⏹  중단 요청됨 / stop requested at %s: saving a checkpoint\n' "$(cat -- "$STOPPING_FILE")"
    if line="$(koen_last_progress "$CONSOLE_LOG")"; then
      printf '📈 %s\n' "$(koen_progress_summary "$line")"
    else
      printf '📈 아직 진행 기록 없음 / no progress line yet (starting up)\n'
    fi
    printf '📋 실시간 로그 / live log: tail -f %s\n' "$(koen_shquote "$CONSOLE_LOG")"
    return 0
  fi
  koen_clean_stale_pid
  printf '⚪ 실행 중인 학습이 없습니다 / no training is running (logs: %s)\n' "$LOGS_DIR"
  if line="$(koen_last_progress "$CONSOLE_LOG")"; then
    printf '📈 마지막 진행 / last progress: %s\n' "$(koen_progress_summary "$line")"
  fi
  if [[ -f "$CONSOLE_LOG" ]]; then
    line="$(tail -c 200000 -- "$CONSOLE_LOG" | grep -E 'Training (complete|stopped)|❌' | tail -n 1 || true)"
    [[ -n "$line" ]] && printf '🏁 %s\n' "$line"
  fi
  return 3
}

# Asks the workers to save and stop, then waits for the whole run to end.
koen_stop() {  # $1: the launcher command, for the advice on timeout
  local launcher="$1" pid workers timeout waited=0
  if ! pid="$(koen_live_pid "$PID_FILE")"; then
    koen_clean_stale_pid
    printf '⚪ 실행 중인 학습이 없습니다 / no training is running (nothing to stop)\n'
    return 0
  fi
  timeout="${KOEN_STOP_TIMEOUT:-600}"
  if ! [[ "$timeout" =~ ^0*[1-9][0-9]*$ ]]; then
    printf '❌ KOEN_STOP_TIMEOUT 에는 양의 정수가 필요합니다 / KOEN_STOP_TIMEOUT needs a positive integer (seconds), got %s\n' "'$timeout'" >&2
    return 2
  fi
  if [[ -f "$STOPPING_FILE" ]]; then
    # A second SIGTERM makes the trainer exit without saving: only wait again.
    printf '⏹  이미 중단 요청됨 / a stop was already requested at %s; waiting (force: kill %s)\n' "$(cat -- "$STOPPING_FILE")" "$pid"
  else
    workers="$(koen_worker_pids "$pid")"
    [[ -n "$workers" ]] || workers="$pid"
    printf '⏹  학습 중단 요청 / asking the run to stop: SIGTERM to workers %s (torchrun PID %s); they save a checkpoint first\n' "$workers" "$pid"
    koen_log_line "$CONSOLE_LOG" "--stop: SIGTERM to workers $workers (torchrun PID $pid)"
    koen_ts >"$STOPPING_FILE"
    # shellcheck disable=SC2086  # one word per PID
    kill -TERM $workers 2>/dev/null || true
  fi
  printf '⏳ 종료 대기 중 / waiting for the run to end (up to %s s)' "$timeout"
  while koen_pid_alive "$pid"; do
    if ((waited >= timeout * 2)); then
      printf '\n⚠️  %s초 안에 끝나지 않았습니다 / still running after %s s (a checkpoint save may be slow).\n' "$timeout" "$timeout"
      printf '   기다리기 / keep waiting: %s --stop   (tail -f %s)\n' "$launcher" "$(koen_shquote "$CONSOLE_LOG")"
      printf '   강제 종료 / force (no new checkpoint; the last saved one stays): kill %s\n' "$pid"
      return 1
    fi
    sleep 0.5; waited=$((waited + 1))
    ((waited % 10 == 0)) && printf '.'
  done
  printf '\n✅ 학습이 종료되었습니다 / the run has ended (after %s s)\n' "$((waited / 2))"
  koen_log_line "$CONSOLE_LOG" "--stop: the run ended"
  rm -f -- "$PID_FILE" "$STOPPING_FILE"
  koen_show_last_lines 15
}
