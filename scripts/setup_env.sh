# shellcheck shell=bash
# Finds (or creates) the Python environment for this checkout and makes sure
# the project and its dependencies import. Sourced, not executed:
#
#   source scripts/setup_env.sh
#   koen_setup_env            # core dependencies
#   koen_setup_env dev        # plus the "dev" extra (pytest, matplotlib)
#   "$KOEN_PYTHON" -m pytest
#
# Which Python: the active virtualenv ($VIRTUAL_ENV), else the active conda env
# ($CONDA_PREFIX), else <repo>/.venv, created with `python3 -m venv` when
# missing (a venv because system Pythons often refuse pip installs, PEP 668).
#
# When something is missing it runs `python -m pip install -e "<repo>[extras]"`
# into that environment; pip keeps an installed torch that satisfies the range
# in pyproject.toml. KOEN_NO_INSTALL=1 turns installing off: then a missing
# package is an error naming the install command. KOEN_PIP_ARGS adds pip
# options, e.g. KOEN_PIP_ARGS="--extra-index-url https://download.pytorch.org/whl/cpu".
#
# Exports KOEN_PYTHON; sets KOEN_ENV_PROBE (the check's output: torch, CUDA and
# GPU lines, see below). Returns non-zero (never exits: it runs inside the
# caller's shell) with one line on stderr saying what to do.

_KOEN_SETUP_ENV_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

# The check reads the requirements from pyproject.toml, so the ranges live in one
# place. Its last line is "ok <python> <torch>" or "missing <item> <item> ...";
# before "ok" come "cuda <count> <cuda version>" and "gpu <index> <name>" lines,
# kept in KOEN_ENV_PROBE so the launcher need not import torch a second time.
# A regex reads the two arrays because tomllib needs Python 3.11 and we support 3.10.
# shellcheck disable=SC2016  # Python source: nothing in it is for the shell to expand
_KOEN_CHECK_PY='
import importlib, importlib.metadata as md, pathlib, re, sys
root, extras = pathlib.Path(sys.argv[1]).resolve(), [e for e in sys.argv[2].split(",") if e]
text = (root / "pyproject.toml").read_text(encoding="utf-8")
def strings(block):
    return re.findall(r"\"([^\"]+)\"", re.sub(r"#[^\n]*", "", block))
reqs = strings(re.search(r"(?ms)^dependencies\s*=\s*\[(.*?)\]", text).group(1))
opt = re.search(r"(?ms)^\[project\.optional-dependencies\]\s*$(.*?)(^\[|\Z)", text)
for extra in extras:
    m = opt and re.search(r"(?ms)^" + re.escape(extra) + r"\s*=\s*\[(.*?)\]", opt.group(1))
    if m is None:
        print("unknown-extra " + extra); sys.exit(0)
    reqs += strings(m.group(1))
try:
    from packaging.specifiers import SpecifierSet
except ImportError:
    SpecifierSet = None
def release(v):
    return tuple(int(x) for x in re.findall(r"\d+", v.split("+")[0])[:3])
def satisfied(version, spec):
    if SpecifierSet is not None:
        return SpecifierSet(spec).contains(version, prereleases=True)
    ops = {">=": lambda a, b: a >= b, "<": lambda a, b: a < b, "<=": lambda a, b: a <= b,
           ">": lambda a, b: a > b, "==": lambda a, b: a == b, "!=": lambda a, b: a != b}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        op = re.match(r"[<>=!]+", part).group(0)
        if not ops[op](release(version), release(part[len(op):])):
            return False
    return True
missing = []
try:
    import koen_sllm
    where = pathlib.Path(koen_sllm.__file__).resolve().parent.parent
    if where != root:
        missing.append("koen_sllm(imports-from:" + str(where) + ")")
except Exception:
    missing.append("koen_sllm")
def applies(marker):
    try:
        from packaging.markers import Marker
    except ImportError:
        return True
    return Marker(marker).evaluate()
for req in reqs:
    req, _, marker = req.partition(";")
    if marker.strip() and not applies(marker.strip()):
        continue
    name, spec = re.match(r"([A-Za-z0-9_.\-]+)\s*(.*)", req.strip()).groups()
    try:
        importlib.import_module(name.replace("-", "_"))
        version = md.version(name)
    except Exception:
        missing.append(name); continue
    if spec and not satisfied(version, spec):
        missing.append(name + spec + "(found:" + version + ")")
if missing:
    print("missing " + " ".join(missing)); sys.exit(0)
import torch
cuda = torch.cuda.is_available()
n = torch.cuda.device_count() if cuda else 0
print("cuda %d %s" % (n, torch.version.cuda or "none"))
for i in range(n):
    p = torch.cuda.get_device_properties(i)
    print("gpu %d %s (%.0f GiB)" % (i, p.name, p.total_memory / 2**30))
print("ok %d.%d.%d %s" % (sys.version_info[:3] + (torch.__version__,)))
'

_koen_env_err() { printf '❌ %s\n' "$*" >&2; }
# One word, quoted so it can be pasted into a shell: 'it'\''s' style.
_koen_env_quote() { printf "'%s'" "${1//\'/\'\\\'\'}"; }

# Echoes the python of the environment to use, creating <repo>/.venv when needed.
_koen_pick_python() {
  local root="$1" no_install="$2"
  if [[ -n "${VIRTUAL_ENV:-}" && -x "$VIRTUAL_ENV/bin/python" ]]; then
    printf '%s\n' "$VIRTUAL_ENV/bin/python"; return 0
  fi
  if [[ -n "${CONDA_PREFIX:-}" && -x "$CONDA_PREFIX/bin/python" ]]; then
    printf '%s\n' "$CONDA_PREFIX/bin/python"; return 0
  fi
  local venv="$root/.venv"
  if [[ -x "$venv/bin/python" ]]; then
    printf '%s\n' "$venv/bin/python"; return 0
  fi
  if [[ "$no_install" == 1 ]]; then
    _koen_env_err "Python 환경이 없습니다 / no Python environment: activate one, or create it: python3 -m venv '$venv' && '$venv/bin/python' -m pip install -e '$root'"
    return 1
  fi
  local base
  base="$(command -v python3 || true)"
  if [[ -z "$base" ]]; then
    _koen_env_err "python3 를 찾을 수 없습니다 / python3 not found: install Python >= 3.10 (e.g. sudo apt install python3 python3-venv)"
    return 1
  fi
  printf '🐍 가상환경 생성 중 / creating %s with %s\n' "$venv" "$base" >&2
  local out
  if ! out="$("$base" -m venv "$venv" 2>&1)"; then
    rm -rf "$venv"
    if grep -qiE 'ensurepip|No module named venv' <<<"$out"; then
      _koen_env_err "python3 의 venv 모듈이 없습니다 / '$base -m venv' failed (venv/ensurepip missing): sudo apt install python3-venv"
    else
      _koen_env_err "가상환경 생성 실패 / '$base -m venv $venv' failed: $(tail -n 1 <<<"$out")"
    fi
    return 1
  fi
  printf '%s\n' "$venv/bin/python"
}

# koen_setup_env [extras]   extras: comma-separated, e.g. "dev" or "dev,tensorboard"
koen_setup_env() {
  local extras="${1:-}" root no_install py result
  root="$(cd "$_KOEN_SETUP_ENV_DIR/.." && pwd)"
  no_install=0
  [[ "${KOEN_NO_INSTALL:-0}" != 0 && -n "${KOEN_NO_INSTALL:-}" ]] && no_install=1
  py="$(_koen_pick_python "$root" "$no_install")" || return 1

  local target="$root"
  [[ -n "$extras" ]] && target="${root}[${extras}]"
  local install_cmd
  install_cmd="$(_koen_env_quote "$py") -m pip install -e $(_koen_env_quote "$target")"

  # cd / keeps a koen_sllm folder in the caller's directory from shadowing the install.
  KOEN_ENV_PROBE="$(cd / && "$py" -c "$_KOEN_CHECK_PY" "$root" "$extras" 2>&1)"
  result="$(tail -n 1 <<<"$KOEN_ENV_PROBE")"
  case "$result" in
    ok\ *) ;;
    unknown-extra\ *)
      _koen_env_err "알 수 없는 extra / unknown extra '${result#unknown-extra }': see [project.optional-dependencies] in $root/pyproject.toml"
      return 1 ;;
    missing\ *)
      local what="${result#missing }"
      if [[ "$no_install" == 1 ]]; then
        _koen_env_err "패키지 없음 / missing in $py: $what — install: $install_cmd (or drop --no-install / KOEN_NO_INSTALL)"
        return 1
      fi
      printf '📦 설치 필요 / missing: %s\n📦 설치 중 / installing: %s\n' "$what" "$install_cmd" >&2
      local pip_args=()
      # Word splitting is the point: KOEN_PIP_ARGS holds several options.
      # shellcheck disable=SC2206
      [[ -n "${KOEN_PIP_ARGS:-}" ]] && pip_args=(${KOEN_PIP_ARGS})
      if ! "$py" -m pip install "${pip_args[@]}" -e "$target" >&2; then
        _koen_env_err "설치 실패 / install failed: $install_cmd (see pip's message above)"
        return 1
      fi
      KOEN_ENV_PROBE="$(cd / && "$py" -c "$_KOEN_CHECK_PY" "$root" "$extras" 2>&1)"
      result="$(tail -n 1 <<<"$KOEN_ENV_PROBE")"
      if [[ "$result" != ok\ * ]]; then
        _koen_env_err "설치 후에도 문제 / still missing after install: ${result#missing } — check $install_cmd"
        return 1
      fi ;;
    *)
      _koen_env_err "환경 확인 실패 / environment check failed with $py: $result"
      return 1 ;;
  esac
  local fields
  read -r -a fields <<<"$result"
  export KOEN_PYTHON="$py"
  printf '✅ Python 환경 / environment: %s (Python %s, torch %s)\n' "$py" "${fields[1]}" "${fields[2]}"
}
