"""The package's import graph: one way only, each layer importing only the layers below it.

docs/architecture.md shows the graph this file draws (``python tests/unit/test_architecture.py``
prints it); a test keeps the two equal.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "koen_sllm"

# Lowest first. A module may import modules of its own layer or below, never above.
LAYERS = [
    ("foundation", {"errors", "config", "checkpoint.atomic_io", "logs", "stop", "parent_watch", "run_lock", "metrics"}),
    ("kernels", {"kernels"}),
    ("data", {"tokenizer", "data"}),
    ("model", {"attention", "rotary", "losses", "model", "master_adamw", "optim", "fp8"}),
    ("storage", {"checkpoint", "distributed"}),
    ("hf", {"hf"}),
    ("engines", {"engines"}),
    ("run", {"run_state", "run_record", "trainer"}),
    ("entry", {"cli"}),
    ("launcher", {"launcher"}),
]
# The modules of the launcher's own process run before any environment exists: no torch.
LAUNCHER_PROCESS_EXCEPTIONS = {"launcher.resolve", "launcher.torchrun"}
THIRD_PARTY_HEAVY = {"torch", "numpy", "sentencepiece", "safetensors", "triton", "transformers", "deepspeed"}


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join(parts) or "__init__"


def imports(path: Path) -> list[tuple[str, bool]]:
    """(imported module, at module level) for each import in ``path``: koen_sllm modules by their
    name inside the package, others by their top-level name."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    me = module_name(path).split(".") if PACKAGE in path.parents else [path.stem]
    package = me if path.name == "__init__.py" else me[:-1]
    top_level = {id(n) for n in tree.body} | {id(n) for s in tree.body if isinstance(s, ast.If) for n in s.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                name = alias.name
                found.append((name[len("koen_sllm."):] if name.startswith("koen_sllm.") else name.split(".")[0],
                              id(node) in top_level))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                names = [target] if node.module else [".".join(base + [a.name]) for a in node.names]
            elif (node.module or "").startswith("koen_sllm"):
                rest = node.module[len("koen_sllm"):].lstrip(".")
                names = [rest] if rest else [a.name for a in node.names]
            else:
                names = [(node.module or "").split(".")[0]]
            found += [(n, id(node) in top_level) for n in names]
    return found


def graph(module_level_only: bool = False) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        me = module_name(path)
        deps = set()
        for name, top in imports(path):
            if module_level_only and not top:
                continue
            if name in _internal():
                deps.add(name)
        deps.discard(me)
        out[me] = deps
    return out


def _internal() -> set[str]:
    return {module_name(p) for p in PACKAGE.rglob("*.py")}


def layer_of(module: str) -> int:
    head = module.split(".")[0]
    for i, (_, members) in enumerate(LAYERS):
        if head in members or module in members:
            return i
    raise AssertionError(f"{module} belongs to no layer: add it to LAYERS in {__file__}")


def render() -> str:
    """The graph as docs/architecture.md shows it: per layer, each module and what it imports."""
    g = graph()
    lines = []
    for i, (name, _) in enumerate(LAYERS):
        mods = sorted(m for m in g if m != "__init__" and layer_of(m) == i)
        lines.append(f"{name}:")
        for m in mods:
            deps = ", ".join(sorted(g[m])) or "-"
            lines.append(f"  {m:28s} -> {deps}")
    return "\n".join(lines)


def test_every_import_points_down_or_sideways():
    wrong = [(m, d) for m, deps in graph().items() if m != "__init__" for d in deps
             if d != "__init__" and layer_of(d) > layer_of(m)]
    assert not wrong, "imports from a lower layer to a higher one: " + ", ".join(f"{m} -> {d}" for m, d in wrong)


def test_no_import_circle():
    g = graph(module_level_only=True)
    seen, stack, cycles = set(), [], []

    def visit(m):
        if m in stack:
            cycles.append(stack[stack.index(m):] + [m])
            return
        if m in seen:
            return
        seen.add(m)
        stack.append(m)
        for d in sorted(g.get(m, ())):
            visit(d)
        stack.pop()

    for m in sorted(g):
        visit(m)
    assert not cycles, "import circles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_model_knows_nothing_of_distribution_or_runs():
    banned = {"distributed", "engines", "trainer", "cli", "run_state", "checkpoint", "launcher"}
    g = graph()
    for m in ("model", "attention", "rotary", "losses", "fp8"):
        assert not {d.split(".")[0] for d in g[m]} & banned, f"{m} imports {g[m] & banned}"


def test_the_launcher_process_needs_no_third_party_package():
    for path in sorted((PACKAGE / "launcher").glob("*.py")):
        me = module_name(path)
        if me in LAUNCHER_PROCESS_EXCEPTIONS:
            continue
        heavy = {n for n, _ in imports(path)} & THIRD_PARTY_HEAVY
        assert not heavy, f"{me} imports {heavy}"
    for dep in ("errors", "config", "run_record", "run_lock", "logs"):  # what the launcher's process imports
        heavy = {n for n, top in imports(PACKAGE / f"{dep}.py") if top} & THIRD_PARTY_HEAVY
        assert not heavy, f"{dep} imports {heavy} at module level"


def test_nothing_outside_the_tests_imports_a_test():
    for path in list((ROOT / "scripts").glob("*.py")) + list(PACKAGE.rglob("*.py")):
        names = {n for n, _ in imports(path)}
        assert not any(n.startswith("test_") or n == "tests" for n in names), f"{path} imports a test module"


def test_every_user_facing_error_is_a_koen_error_with_its_exit_code():
    """cli and the launcher map one base type to exit codes: 2 for what the user asked (nothing
    started), 1 for a run-time failure."""
    from koen_sllm.attention import AttentionBackendError
    from koen_sllm.checkpoint.store import CheckpointError
    from koen_sllm.config import ConfigError
    from koen_sllm.data import DataError
    from koen_sllm.engines.deepspeed import DeepSpeedBackendError, DeepSpeedUnavailable
    from koen_sllm.errors import KoenError
    from koen_sllm.fp8 import Fp8Unavailable
    from koen_sllm.run_lock import FolderBusy
    from koen_sllm.run_record import RunMismatch
    from koen_sllm.run_state import RunSetupError
    from koen_sllm.tokenizer import TokenizerError

    codes = {ConfigError: 2, RunMismatch: 2, AttentionBackendError: 2, DeepSpeedUnavailable: 2,
             CheckpointError: 1, RunSetupError: 1, DeepSpeedBackendError: 1, DataError: 1, TokenizerError: 1,
             FolderBusy: 1, Fp8Unavailable: 2}
    for kind, code in codes.items():
        assert issubclass(kind, KoenError) and kind.exit_code == code, kind


def test_docs_show_the_graph_as_it_is():
    doc = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    assert render() in doc, "docs/architecture.md's import graph is out of date: paste `python tests/unit/test_architecture.py`"


if __name__ == "__main__":
    sys.stdout.write(render() + "\n")
