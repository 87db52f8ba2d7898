"""Adapters at the edges: telethon only in doppelbot/telegram, ML libraries only in the
model/training/knowledge/speech modules, and a CLI that starts without either."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "doppelbot"
ML = {
    "torch",
    "transformers",
    "peft",
    "bitsandbytes",
    "sentence_transformers",
    "ctranslate2",
    "accelerate",
    "tokenizers",
    "safetensors",
    "onnxruntime",
    "trl",
    "faster_whisper",
    "av",
}
ML_ALLOWED = ("model", "knowledge", "training", "speech")


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def _modules() -> list[tuple[Path, set[str]]]:
    return [(p, _imports(p)) for p in sorted(PKG.rglob("*.py"))]


def test_telethon_only_in_telegram_adapter() -> None:
    offenders = [
        str(p.relative_to(PKG))
        for p, names in _modules()
        if "telethon" in names and p.relative_to(PKG).parts[0] != "telegram"
    ]
    assert offenders == []


def test_ml_libraries_only_in_model_modules() -> None:
    offenders = [
        f"{p.relative_to(PKG)}: {sorted(names & ML)}"
        for p, names in _modules()
        if names & ML and p.relative_to(PKG).parts[0] not in ML_ALLOWED
    ]
    assert offenders == []


def test_cli_import_is_light() -> None:
    code = (
        "import sys, doppelbot.cli, doppelbot.__main__;"
        "heavy = sorted(m for m in ('torch','transformers','telethon','peft',"
        "'sentence_transformers','bitsandbytes','faster_whisper','ctranslate2','av')"
        " if m in sys.modules);"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_help_does_not_import_torch() -> None:
    code = (
        "import sys\n"
        "from doppelbot.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print('TORCH' if 'torch' in sys.modules else 'CLEAN')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().endswith("CLEAN")


def test_no_environ_reads_outside_config() -> None:
    offenders = []
    for p in PKG.rglob("*.py"):
        text = p.read_text(encoding="utf-8")
        if ("os.environ" in text or "os.getenv" in text) and p.name != "config.py":
            offenders.append(str(p.relative_to(PKG)))
    assert offenders == []


# --- import cycles: no module imports itself through others -----------------------------------


def _module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(body: list[ast.stmt], *, in_functions: bool) -> list[ast.Import | ast.ImportFrom]:
    """The import statements of a module: the ones run at import time (in ``try``/``if``/class
    bodies too) and those under ``if TYPE_CHECKING`` (a cycle of types is still a cycle); with
    ``in_functions``, also the ones inside functions."""
    found: list[ast.Import | ast.ImportFrom] = []
    for node in body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and not in_functions:
            continue
        else:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.stmt):
                    found += _import_nodes([child], in_functions=in_functions)
                elif isinstance(child, ast.excepthandler):
                    found += _import_nodes(child.body, in_functions=in_functions)
    return found


def _import_graph(*, in_functions: bool) -> dict[str, set[str]]:
    """doppelbot module → the doppelbot modules it imports. ``from a.b import c`` points at the
    module ``a.b.c`` when there is one, else at ``a.b``; parent packages a module is imported
    through are not counted (their ``__init__`` files import nothing of their children's)."""
    paths = {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        tree = ast.parse(path.read_text(encoding="utf-8"))
        targets: set[str] = set()
        for node in _import_nodes(tree.body, in_functions=in_functions):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names if a.name in paths}
                continue
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            for alias in node.names:
                if f"{base}.{alias.name}" in paths:
                    targets.add(f"{base}.{alias.name}")
                elif base in paths:
                    targets.add(base)
        graph[name] = targets - {name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module."""

    def reachable(start: str) -> set[str]:
        seen: set[str] = set()
        todo = list(graph[start])
        while todo:
            module = todo.pop()
            if module not in seen:
                seen.add(module)
                todo += graph[module]
        return seen

    reach = {module: reachable(module) for module in graph}
    components = {
        frozenset({module, *(other for other in reach[module] if module in reach[other])})
        for module in graph
    }
    return sorted(sorted(c) for c in components if len(c) > 1)


def test_import_graph_sees_every_kind_of_import() -> None:
    graph = _import_graph(in_functions=True)
    assert (
        "doppelbot.training.checkpoint" in graph["doppelbot.training.trainer"]
    )  # from pkg import mod
    assert (
        "doppelbot.training.types" in graph["doppelbot.training.methods.sft"]
    )  # from mod import name
    assert "doppelbot.training.methods" in graph["doppelbot.training.plan"]  # a package
    assert "doppelbot.training.service" in graph["doppelbot.cli.train_cmd"]  # inside a function
    assert (
        "doppelbot.training.service"
        not in _import_graph(in_functions=False)["doppelbot.cli.train_cmd"]
    )
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_imports_itself_through_others() -> None:
    assert _cycles(_import_graph(in_functions=False)) == []


def test_no_cycle_hides_behind_an_import_inside_a_function() -> None:
    assert _cycles(_import_graph(in_functions=True)) == []


# --- SQL: every statement lives in doppelbot/store/ --------------------------------------------
_SQL = re.compile(
    r"\bSELECT\b[\s\S]*\bFROM\b|\bINSERT\s+INTO\b|\bUPDATE\s+\w+\s+SET\b|\bDELETE\s+FROM\b"
    r"|\bCREATE\s+(?:TABLE|INDEX)\b|\bON\s+CONFLICT\b|\bPRAGMA\s+\w+",
    re.IGNORECASE,
)


def _string_constants(tree: ast.AST) -> list[tuple[int, str]]:
    """Every string literal of a module, f-strings by their literal parts."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            found.append((node.lineno, node.value))
        elif isinstance(node, ast.JoinedStr):
            parts = [v.value for v in node.values if isinstance(v, ast.Constant)]
            found.append((node.lineno, "".join(str(p) for p in parts)))
    return found


def test_sql_only_in_the_store() -> None:
    offenders = []
    for path in sorted(PKG.rglob("*.py")):
        if path.relative_to(PKG).parts[0] == "store":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for line, text in _string_constants(tree):
            if _SQL.search(text) and not _is_docstring(tree, line):
                offenders.append(f"{path.relative_to(PKG)}:{line}: {text[:60]!r}")
    assert offenders == []


def _is_docstring(tree: ast.AST, line: int) -> bool:
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
            value = body[0].value
            if isinstance(value, ast.Constant) and value.lineno == line:
                return True
    return False


def test_the_sql_check_finds_sql() -> None:
    tree = ast.parse('x = "SELECT a FROM b"\ny = f"UPDATE t SET a = {1}"\nz = "select me"\n')
    assert sorted({line for line, text in _string_constants(tree) if _SQL.search(text)}) == [1, 2]


#: The running bot's services: built by the composition root only (``doppelbot/app.py``).
SERVICES = {
    "Responder",
    "LiveBot",
    "DraftDesk",
    "OwnerNotes",
    "FeedbackCapture",
    "MessageWriter",
    "TelethonTransport",
    "TelethonSavedMessages",
    "Watchdog",
    "LoopLagMonitor",
}
#: Outside the running bot, a command builds what it needs itself (``doppelbot ssa`` posts
#: its cards through the same Saved Messages adapter).
SERVICE_BUILDERS_ELSEWHERE = {("cli/ssa_cmd.py", "TelethonSavedMessages")}


def _constructed(tree: ast.AST) -> set[str]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
            if name in SERVICES:
                out.add(name)
    return out


def test_bot_services_are_built_only_in_the_composition_root() -> None:
    offenders = []
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG).as_posix()
        if rel == "app.py":
            continue
        for name in _constructed(ast.parse(path.read_text(encoding="utf-8"))):
            if (rel, name) not in SERVICE_BUILDERS_ELSEWHERE:
                offenders.append(f"{rel}: {name}(...)")
    assert offenders == []
    built = _constructed(ast.parse((PKG / "app.py").read_text(encoding="utf-8")))
    assert built == SERVICES


def test_nothing_is_rewired_after_construction() -> None:
    """No module sets or extends another object's collaborators (``x.responder = ...``,
    ``x.listeners.append(...)``): they are passed in once, by the composition root."""
    wiring = {
        "responder",
        "drafts",
        "listeners",
        "reaction_listeners",
        "on_sent",
        "on_owner_message",
        "transport",
        "generator",
        "approver",
        "saved",
    }
    offenders = []
    for path in sorted(PKG.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            targets: list[ast.expr] = []
            if isinstance(node, ast.Assign):
                targets = list(node.targets)
            elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
                targets = [node.target]
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("append", "extend", "insert")
            ):
                targets = [node.func.value]
            for target in targets:
                if (
                    isinstance(target, ast.Attribute)
                    and target.attr in wiring
                    and not (isinstance(target.value, ast.Name) and target.value.id == "self")
                ):
                    offenders.append(f"{path.relative_to(PKG)}:{node.lineno}: .{target.attr}")
    assert offenders == []


# --- lazy imports: a function imports late only what is heavy to load ------------------------
#: What a function may import when it needs it: libraries that take seconds or gigabytes to
#: load and that most commands never touch.
LAZY = ML | {"telethon", "huggingface_hub", "numpy", "matplotlib"}


def _libraries_at_import(path: Path) -> set[str]:
    """The top-level names of the libraries a module imports when it is imported."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in _import_nodes(tree.body, in_functions=False):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def _heavy_modules() -> set[str]:
    """The doppelbot modules whose import loads a ``LAZY`` library, directly or through the
    doppelbot modules they import."""
    paths = {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}
    graph = _import_graph(in_functions=False)
    direct = {name for name, path in paths.items() if _libraries_at_import(path) & LAZY}
    heavy: set[str] = set()
    for name in paths:
        seen, todo = set(), [name]
        while todo:
            module = todo.pop()
            if module not in seen:
                seen.add(module)
                todo += graph[module]
        if seen & direct:
            heavy.add(name)
    return heavy


def _late_imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    return [
        node
        for function in ast.walk(tree)
        if isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef)
        for node in ast.walk(function)
        if isinstance(node, ast.Import | ast.ImportFrom)
    ]


def _needless_late_imports(tree: ast.AST, heavy: set[str], where: str) -> list[str]:
    """Imports inside functions of anything but a ``LAZY`` library or a doppelbot module that
    loads one: those belong at the top of the module, where a reader sees what it uses."""
    found = set()
    for node in _late_imports(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            base = node.module or ""
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        if any(t.split(".")[0] in LAZY or t in heavy for t in targets):
            continue
        found.add(f"{where}:{node.lineno}: {ast.unparse(node)}")
    return sorted(found)


def test_imports_inside_functions_are_only_for_heavy_libraries() -> None:
    heavy = _heavy_modules()
    offenders = []
    for path in sorted(PKG.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        offenders += _needless_late_imports(tree, heavy, str(path.relative_to(PKG)))
    assert offenders == []


def test_the_late_import_check_finds_a_needless_one() -> None:
    heavy = _heavy_modules()
    assert "doppelbot.training.service" in heavy and "doppelbot.core.errors" not in heavy
    tree = ast.parse(
        "def f():\n"
        "    import torch\n"
        "    from doppelbot.training.service import train\n"
        "    from doppelbot.core.errors import ConfigError\n"
        "    import json\n"
    )
    found = _needless_late_imports(tree, heavy, "m.py")
    assert found == [
        "m.py:4: from doppelbot.core.errors import ConfigError",
        "m.py:5: import json",
    ]


def test_the_core_needs_nothing_but_the_standard_library() -> None:
    """``doppelbot/core`` is what every layer may use: it depends on no other doppelbot package
    but the settings' option types, and on no third-party library."""
    offenders = []
    for path in sorted((PKG / "core").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                internal = name.startswith("doppelbot.core") or name == "doppelbot.config"
                if not (internal or (top in sys.stdlib_module_names and top != "doppelbot")):
                    offenders.append(f"core/{path.name}:{node.lineno}: {name}")
    assert offenders == []
