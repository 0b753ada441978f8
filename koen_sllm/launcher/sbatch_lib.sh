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

# ---------------------------------------------------------------- cluster jobs
# Shared by scripts/train.sbatch and scripts/train_pyxis_singlenode.sh.

# koen_trainer_args ROOT ARG...: the trainer options of a cluster job. Sets
#   KOEN_ARGS        the options, with --train added when no mode is given and
#                    --resume auto when no --resume is (a resubmitted job continues)
#   KOEN_LOGS_DIR    --logs-dir, else ROOT/logs (where rank 0's console log goes)
#   KOEN_OUTPUT_DIR  --output-dir, else ROOT/outputs (ROOT/outputs/test with --test)
#   KOEN_INPUTS      the paths the options read (data, tokenizer, DeepSpeed config, resume
#                    checkpoint) and KOEN_OUTPUTS the folders the run writes (output, logs):
#                    a container must see them all
koen_trainer_args() {
  local root="$1" i arg next has_mode=0 has_resume=0 test_mode=0 output=""
  shift
  KOEN_ARGS=("$@") KOEN_LOGS_DIR="$root/logs" KOEN_INPUTS=()
  for ((i = 0; i < ${#KOEN_ARGS[@]}; i++)); do
    arg="${KOEN_ARGS[i]}" next="${KOEN_ARGS[i + 1]:-}"
    case "$arg" in
      --test) has_mode=1 test_mode=1 ;;
      --train) has_mode=1 ;;
      --resume)
        has_resume=1
        [[ "$next" == */* ]] && KOEN_INPUTS+=("$next") ;;  # a path, not auto/none/a checkpoint name
      --resume=*)
        has_resume=1
        [[ "${arg#*=}" == */* ]] && KOEN_INPUTS+=("${arg#*=}") ;;
      --logs-dir) KOEN_LOGS_DIR="${next:-$KOEN_LOGS_DIR}" ;;
      --logs-dir=*) KOEN_LOGS_DIR="${arg#*=}" ;;
      --output-dir) output="$next" ;;
      --output-dir=*) output="${arg#*=}" ;;
      --dataset-path | --tokenizer-path)
        [[ -n "$next" ]] && KOEN_INPUTS+=("$next") ;;
      --dataset-path=* | --tokenizer-path=*) KOEN_INPUTS+=("${arg#*=}") ;;
      --deepspeed)  # its file is optional: a following option is not one
        [[ -n "$next" && "$next" != -* ]] && KOEN_INPUTS+=("$next") ;;
      --deepspeed=*) KOEN_INPUTS+=("${arg#*=}") ;;
    esac
  done
  if [[ -n "$output" ]]; then
    KOEN_OUTPUT_DIR="$output"
  elif ((test_mode)); then
    KOEN_OUTPUT_DIR="$root/outputs/test"
  else
    KOEN_OUTPUT_DIR="$root/outputs"
  fi
  KOEN_OUTPUTS=("$KOEN_OUTPUT_DIR" "$KOEN_LOGS_DIR")
  ((has_mode)) || KOEN_ARGS=(--train "${KOEN_ARGS[@]}")
  ((has_resume)) || KOEN_ARGS+=(--resume auto)
  return 0
}

# koen_recorded_paths OUTPUT_DIR: the data, tokenizer and logs paths that OUTPUT_DIR/run.json
# recorded (a resumed run keeps using them without their options being typed again), one per
# line: "in PATH" for what the run reads, "out PATH" for its logs folder. Nothing when there is
# no record or no python3 on this host to read it.
koen_recorded_paths() {
  local record="$1/run.json" py
  [[ -f "$record" ]] || return 0
  py="$(command -v python3 || true)"
  [[ -n "$py" ]] || return 0
  "$py" - "$record" <<'PY' 2>/dev/null || true
import json, sys
config = json.load(open(sys.argv[1], encoding="utf-8")).get("config") or {}
for section, key, kind in (("data", "dataset_path", "in"), ("data", "tokenizer_path", "in"),
                           ("train", "logs_dir", "out")):
    value = (config.get(section) or {}).get(key)
    if isinstance(value, str) and value.strip() == value and value and "\n" not in value:
        print(kind, value)
PY
}

# koen_container_image VALUE: srun's --container-image value for KOEN_CONTAINER_IMAGE. A file
# (a path starting with / or ., or a name ending in .sqsh/.squashfs) must exist and becomes
# absolute (relative to the current folder); anything else is a registry image that pyxis
# pulls itself (e.g. nvcr.io#nvidia/pytorch:25.01-py3). Prints it, or one line and returns 1.
koen_container_image() {
  local image="$1" abs
  case "$image" in
    /* | ./* | ../* | *.sqsh | *.squashfs)
      abs="$(realpath -m -s -- "$image")"
      if [[ ! -f "$abs" ]]; then
        printf '❌ 컨테이너 이미지 파일이 없습니다 / KOEN_CONTAINER_IMAGE %s does not exist: build it with scripts/setup_pyxis.sh, or name an existing .sqsh file\n' \
          "$(koen_shquote "$abs")" >&2
        return 1
      fi
      printf '%s' "$abs" ;;
    *) printf '%s' "$image" ;;
  esac
}

# koen_container_mounts ROOT PATH...: sets KOEN_MOUNTS, the SRC:DST entries of srun's
# --container-mounts. The checkout is mounted at its own path (so every path means the same
# inside the container), writable (checkpoints and logs go to outputs/ and logs/ in it by
# default). Each PATH (relative to the current folder; a file stands for its folder) that this
# mount does not already carry is added at its own path: one outside the checkout, or one
# inside it that is a symlink to elsewhere (at the path it resolves to, where the symlink
# points). Mounts are writable: the trainer writes checkpoints, logs and prepared data.
# A path with ',' or ':' cannot be written in --container-mounts: one line, returns 1.
koen_container_mounts() {
  local root="$1" rroot path abs real dir entry have
  shift
  rroot="$(realpath -m -- "$root")"
  KOEN_MOUNTS=()
  for path in "$root" "$@"; do
    [[ -n "$path" ]] || continue
    abs="$(realpath -m -s -- "$path")"
    if [[ -f "$abs" ]]; then abs="$(dirname -- "$abs")"; fi
    real="$(realpath -m -- "$abs")"
    if [[ "$path" == "$root" ]]; then
      dir="$abs"
    elif [[ "$abs" == "$root" || "$abs" == "$root"/* ]]; then
      [[ "$real" == "$rroot" || "$real" == "$rroot"/* ]] && continue  # inside the checkout's mount
      dir="$real"
    else
      dir="$abs"
    fi
    if [[ "$dir" == *[,:]* ]]; then
      printf "❌ 컨테이너에 마운트할 수 없는 경로 / %s contains ',' or ':', which srun --container-mounts cannot express: rename it or link it from a plain path\n" \
        "$(koen_shquote "$dir")" >&2
      return 1
    fi
    entry="$dir:$dir"
    for have in "${KOEN_MOUNTS[@]}"; do [[ "$have" == "$entry" ]] && continue 2; done
    KOEN_MOUNTS+=("$entry")
  done
}

# koen_container_srun_args IMAGE WORKDIR EXTRA_MOUNTS: sets KOEN_CONTAINER_SRUN, the pyxis
# options of srun for KOEN_MOUNTS (plus EXTRA_MOUNTS, a --container-mounts list as given, e.g.
# KOEN_CONTAINER_MOUNTS="/fsx:/fsx") and then KOEN_CONTAINER_ARGS (extra srun options, split
# on spaces, e.g. "--no-container-mount-home"). The image's entrypoint (the launcher) is not
# run: the job runs its own command in the container.
koen_container_srun_args() {
  local image="$1" workdir="$2" extra="$3" mounts extra_args=()
  mounts="$(IFS=,; printf '%s' "${KOEN_MOUNTS[*]}")"
  # Word splitting is the point: KOEN_CONTAINER_ARGS holds several options.
  # shellcheck disable=SC2206
  [[ -n "${KOEN_CONTAINER_ARGS:-}" ]] && extra_args=(${KOEN_CONTAINER_ARGS})
  # shellcheck disable=SC2034  # read by the scripts that source this file
  KOEN_CONTAINER_SRUN=("--container-image=$image" "--container-mounts=$mounts${extra:+,$extra}"
    "--container-workdir=$workdir" --no-container-entrypoint "${extra_args[@]}")
}

# koen_container_setup ROOT IMAGE: the container part of a job, after koen_trainer_args. Checks
# IMAGE (koen_container_image) and that every path the run reads exists (pyxis cannot mount a
# missing one), adds the paths recorded in the output folder's run.json, and sets KOEN_IMAGE,
# KOEN_MOUNTS, KOEN_CONTAINER_SRUN (see above) and KOEN_CREATE, the folders to create before
# srun (a mount's source must exist). Reads KOEN_CONTAINER_MOUNTS and KOEN_CONTAINER_ARGS.
# On a problem: one line, returns 1.
koen_container_setup() {
  local root="$1" inputs outputs kind path
  KOEN_IMAGE="$(koen_container_image "$2")" || return 1
  inputs=("${KOEN_INPUTS[@]}") outputs=("${KOEN_OUTPUTS[@]}")
  while read -r kind path; do
    case "$kind" in
      in) [[ -e "$path" ]] && inputs+=("$path") ;;  # gone: the trainer says so itself
      out) outputs+=("$path") ;;
    esac
  done < <(koen_recorded_paths "$KOEN_OUTPUT_DIR")
  for path in "${KOEN_INPUTS[@]}"; do
    if [[ ! -e "$path" ]]; then
      printf '❌ 경로가 없습니다 / %s does not exist: the container cannot mount it (check the option that names it)\n' \
        "$(koen_shquote "$(realpath -m -s -- "$path")")" >&2
      return 1
    fi
  done
  koen_container_mounts "$root" "${inputs[@]}" "${outputs[@]}" || return 1
  koen_container_srun_args "$KOEN_IMAGE" "$root" "${KOEN_CONTAINER_MOUNTS:-}"
  # shellcheck disable=SC2034  # read by the scripts that source this file
  KOEN_CREATE=("${outputs[@]}")
}
