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
  kill -0 "$1" 2>/dev/null || return 1
  if [[ -r "/proc/$1/status" ]]; then
    state="$(awk '/^State:/ { print $2; exit }' "/proc/$1/status" 2>/dev/null)"
  else
    state="$(ps -o stat= -p "$1" 2>/dev/null)" || return 0
  fi
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
