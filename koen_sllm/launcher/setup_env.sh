# shellcheck shell=bash
# Finds (or creates) the Python environment for this checkout and makes sure
# the dependencies import. Sourced, not executed:
#
#   source koen_sllm/launcher/setup_env.sh
#   koen_setup_env              # every dependency
#   koen_setup_env dev          # plus the "dev" extra (pytest, matplotlib)
#   koen_setup_env "" train     # only what the trainer imports (run_h100_dual.sh)
#   PYTHONPATH="$KOEN_PYTHONPATH" "$KOEN_PYTHON" -m pytest
#
# Which Python: the active virtualenv ($VIRTUAL_ENV), else the active conda env
# ($CONDA_PREFIX), else <repo>/.venv when it exists, else `python3` on PATH as it
# is when it already passes the check (a container image with torch preinstalled
# must not download torch again into a venv), else a new <repo>/.venv created
# with `python3 -m venv` (a venv because system Pythons often refuse pip
# installs, PEP 668). The chosen Python is never required to have koen_sllm
# installed: the check runs it with this checkout first on PYTHONPATH, and
# callers run it with KOEN_PYTHONPATH, so a stale or missing install of the
# package never matters.
#
# When something is missing it runs `python -m pip install -e "<repo>[extras]"`
# into that environment (never into a bare python3: that one is only used as it
# is); pip keeps an installed torch that satisfies the range in pyproject.toml.
# KOEN_NO_INSTALL=1 turns installing and venv creation off: then a missing
# package is an error naming it and the command that fixes it. KOEN_PIP_ARGS
# adds pip options, e.g.
# KOEN_PIP_ARGS="--extra-index-url https://download.pytorch.org/whl/cpu".
#
# Exports KOEN_PYTHON and KOEN_PYTHONPATH (the checkout, then any PYTHONPATH the
# caller had: the value for children's PYTHONPATH); sets KOEN_ENV_PROBE (the
# check's output: torch, CUDA and GPU lines, see below). Returns non-zero (never
# exits: it runs inside the caller's shell) with one line on stderr saying what
# to do.

_KOEN_SETUP_ENV_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

# The check reads the requirements from pyproject.toml, so the ranges live in one
# place. Arguments: <repo> <extras> <scope>. Scope "train" narrows the check to
# the `dependencies` entries named in [tool.koen-sllm] train-requires (ranges
# still from `dependencies`); an empty scope checks every dependency plus the
# extras. Extras are validated in both scopes, as they are installed in both.
# Its last line is "ok <python> <torch>", "missing <item> <item> ...",
# "unknown-extra <name>" or "no-train-requires"; before "ok" come
# "cuda <count> <cuda version>" and "gpu <index> <name>" lines, kept in
# KOEN_ENV_PROBE so the launcher need not import torch a second time.
# A regex reads the arrays because tomllib needs Python 3.11 and we support 3.10.
# requires-python is checked too: python3 on PATH may be older than the code.
# shellcheck disable=SC2016  # Python source: nothing in it is for the shell to expand
_KOEN_CHECK_PY='
import importlib, importlib.metadata as md, pathlib, platform, re, sys
root, extras, scope = pathlib.Path(sys.argv[1]).resolve(), [e for e in sys.argv[2].split(",") if e], sys.argv[3]
text = (root / "pyproject.toml").read_text(encoding="utf-8")
def strings(block):
    return re.findall(r"\"([^\"]+)\"", re.sub(r"#[^\n]*", "", block))
def table(name):
    return re.search(r"(?ms)^\[" + re.escape(name) + r"\]\s*$(.*?)(^\[|\Z)", text)
def key(name):
    return re.sub(r"[-_.]+", "-", name).lower()
def name_of(req):
    return re.match(r"\s*([A-Za-z0-9_.\-]+)", req).group(1)
reqs = strings(re.search(r"(?ms)^dependencies\s*=\s*\[(.*?)\]", text).group(1))
opt = table("project.optional-dependencies")
for extra in extras:
    m = opt and re.search(r"(?ms)^" + re.escape(extra) + r"\s*=\s*\[(.*?)\]", opt.group(1))
    if m is None:
        print("unknown-extra " + extra); sys.exit(0)
    if scope != "train":
        reqs += strings(m.group(1))
if scope == "train":
    tool = table("tool.koen-sllm")
    m = tool and re.search(r"(?ms)^train-requires\s*=\s*\[(.*?)\]", tool.group(1))
    if m is None:
        print("no-train-requires"); sys.exit(0)
    wanted = dict((key(n), n) for n in strings(m.group(1)))
    reqs = [r for r in reqs if key(name_of(r)) in wanted]
    # A name only in train-requires is still checked, at any version.
    reqs += [n for k, n in wanted.items() if k not in set(key(name_of(r)) for r in reqs)]
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
m = re.search(r"(?m)^requires-python\s*=\s*\"([^\"]+)\"", text)
if m and not satisfied(platform.python_version(), m.group(1)):
    missing.append("python" + m.group(1) + "(found:" + platform.python_version() + ")")
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

# _koen_probe PYTHON ROOT EXTRAS SCOPE PYTHONPATH: runs the check; sets KOEN_ENV_PROBE.
# PYTHONPATH puts the checkout's koen_sllm ahead of site-packages and of any
# editable install's finder, so the package need not be installed, and an install
# pointing at another checkout is never what gets imported.
_koen_probe() {
  local rc=0
  # cd / keeps a koen_sllm folder in the caller's directory from shadowing the checkout's.
  KOEN_ENV_PROBE="$(cd / && PYTHONPATH="$5" "$1" -c "$_KOEN_CHECK_PY" "$2" "$3" "$4" 2>&1)" || rc=$?
  [[ -n "$KOEN_ENV_PROBE" ]] || KOEN_ENV_PROBE="no output (exit $rc)"
}

# _koen_config_error RESULT ROOT: for an answer about pyproject.toml or the
# arguments rather than about the Python, prints the error and returns 0.
_koen_config_error() {
  case "$1" in
    unknown-extra\ *)
      _koen_env_err "알 수 없는 extra / unknown extra '${1#unknown-extra }': see [project.optional-dependencies] in $(_koen_env_quote "$2/pyproject.toml")" ;;
    no-train-requires)
      _koen_env_err "train 범위 정의 없음 / scope 'train' needs train-requires in [tool.koen-sllm] of $(_koen_env_quote "$2/pyproject.toml")" ;;
    *) return 1 ;;
  esac
}

# _koen_make_venv PYTHON3 VENV: creates VENV; on failure one line (with the apt
# hint when the venv module is missing) and non-zero.
_koen_make_venv() {
  local base="$1" venv="$2" out
  printf '🐍 가상환경 생성 중 / creating %s with %s\n' "$venv" "$base" >&2
  if ! out="$("$base" -m venv "$venv" 2>&1)"; then
    rm -rf "$venv"
    if grep -qiE 'ensurepip|No module named venv' <<<"$out"; then
      _koen_env_err "python3 의 venv 모듈이 없습니다 / $(_koen_env_quote "$base") -m venv failed (venv/ensurepip missing): sudo apt install python3-venv"
    else
      _koen_env_err "가상환경 생성 실패 / $(_koen_env_quote "$base") -m venv $(_koen_env_quote "$venv") failed: $(tail -n 1 <<<"$out")"
    fi
    return 1
  fi
}

# koen_setup_env [extras] [scope]
#   extras: comma-separated, e.g. "dev" or "dev,tensorboard"; part of any install.
#   scope:  empty: check every dependency plus the extras; "train": check only the
#           dependencies named in [tool.koen-sllm] train-requires of pyproject.toml.
#           Either way an install is the full `pip install -e "<repo>[extras]"`.
koen_setup_env() {
  local extras="${1:-}" scope="${2:-}" root no_install py="" as_is="" result
  root="$(cd "$_KOEN_SETUP_ENV_DIR/../.." && pwd)"
  case "$scope" in
    "" | train) ;;
    *) _koen_env_err "알 수 없는 범위 / unknown scope '$scope': use '' (everything) or 'train'"; return 1 ;;
  esac
  no_install=0
  [[ "${KOEN_NO_INSTALL:-0}" != 0 && -n "${KOEN_NO_INSTALL:-}" ]] && no_install=1
  local pythonpath="$root${PYTHONPATH:+:$PYTHONPATH}"
  local venv="$root/.venv" target="$root"
  [[ -n "$extras" ]] && target="${root}[${extras}]"

  if [[ -n "${VIRTUAL_ENV:-}" && -x "$VIRTUAL_ENV/bin/python" ]]; then
    py="$VIRTUAL_ENV/bin/python"
  elif [[ -n "${CONDA_PREFIX:-}" && -x "$CONDA_PREFIX/bin/python" ]]; then
    py="$CONDA_PREFIX/bin/python"
  elif [[ -x "$venv/bin/python" ]]; then
    py="$venv/bin/python"
  else
    # No environment: python3 as it is, if it passes; else a new .venv.
    local base lacks=""
    base="$(command -v python3 || true)"
    if [[ -n "$base" ]]; then
      _koen_probe "$base" "$root" "$extras" "$scope" "$pythonpath"
      result="$(tail -n 1 <<<"$KOEN_ENV_PROBE")"
      _koen_config_error "$result" "$root" && return 1
      case "$result" in
        ok\ *) py="$base" as_is=1 ;;
        missing\ *) lacks="lacks ${result#missing }" ;;
        *) lacks="failed the check: $result" ;;
      esac
    fi
    if [[ -z "$py" ]]; then
      local fix
      fix="python3 -m venv $(_koen_env_quote "$venv") && $(_koen_env_quote "$venv/bin/python") -m pip install -e $(_koen_env_quote "$target")"
      if [[ -z "$base" ]]; then
        if [[ "$no_install" == 1 ]]; then
          _koen_env_err "Python 환경이 없습니다 / no Python environment: no active virtualenv or conda env, no $(_koen_env_quote "$venv"), no python3 on PATH — install Python >= 3.10, then: $fix"
        else
          _koen_env_err "python3 를 찾을 수 없습니다 / python3 not found: install Python >= 3.10 (e.g. sudo apt install python3 python3-venv)"
        fi
        return 1
      fi
      if [[ "$no_install" == 1 ]]; then
        _koen_env_err "Python 환경이 없습니다 / no Python environment: python3 ($base) $lacks — fix: activate an environment that has them, or create one: $fix"
        return 1
      fi
      printf '🐍 python3 (%s) 사용 불가 / cannot be used as is: %s\n' "$base" "$lacks" >&2
      _koen_make_venv "$base" "$venv" || return 1
      py="$venv/bin/python"
    fi
  fi

  if [[ -z "$as_is" ]]; then
    local install_cmd
    install_cmd="$(_koen_env_quote "$py") -m pip install -e $(_koen_env_quote "$target")"
    _koen_probe "$py" "$root" "$extras" "$scope" "$pythonpath"
    result="$(tail -n 1 <<<"$KOEN_ENV_PROBE")"
    _koen_config_error "$result" "$root" && return 1
    case "$result" in
      ok\ *) ;;
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
        _koen_probe "$py" "$root" "$extras" "$scope" "$pythonpath"
        result="$(tail -n 1 <<<"$KOEN_ENV_PROBE")"
        if [[ "$result" != ok\ * ]]; then
          _koen_env_err "설치 후에도 문제 / still missing after install: ${result#missing } — check $install_cmd"
          return 1
        fi ;;
      *)
        _koen_env_err "환경 확인 실패 / environment check failed with $py: $result"
        return 1 ;;
    esac
  fi
  local fields
  read -r -a fields <<<"$result"
  export KOEN_PYTHON="$py" KOEN_PYTHONPATH="$pythonpath"
  printf '✅ Python 환경 / environment: %s (Python %s, torch %s%s)\n' "$py" "${fields[1]}" "${fields[2]}" \
    "${as_is:+; 그대로 사용 / used as is}"
}
