# shellcheck shell=bash
# Helpers for scripts/train.sbatch: quoting, timestamps and log rotation, the same
# as the launcher's (koen_sllm/launcher/files.py) so both leave the same files.
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
