"""The project's import graph, read from the import statements (no module is executed to find it).

``import_closure(m)``: every project module ``m`` reaches, directly or through other project modules,
function-local imports included, and the third-party names they import. The cache key of a stage is
built from it (``clip_fp8.caching``), and so is ``preload``, which resolves a stage's imports one thread
at a time before the stage runs beside others.
"""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.util
import sys
import threading
from pathlib import Path
from typing import Mapping

PROJECT = "clip_fp8"
# CPython before 3.11.8 keeps the AST builder's recursion depth in interpreter-wide state (gh-106905): a
# parse in one thread while another thread parses or compiles (torch.jit.script, the ONNX exporter) can
# fail with "SystemError: AST constructor recursion depth mismatch" (seen in CI: the stage's key was lost
# and its result not cached). The flow therefore parses everything it needs before stages run
# (``flows.stage_task.warm_keys``); the lock and the retry cover a parse that still meets the race.
_PARSE_LOCK = threading.Lock()
_PARSE_ATTEMPTS = 5


def _parse(source: str) -> ast.Module:
    with _PARSE_LOCK:
        for attempt in range(_PARSE_ATTEMPTS):
            try:
                return ast.parse(source)
            except SystemError as exc:  # the race above; the builder resets its counter on every parse
                if "recursion depth mismatch" not in str(exc) or attempt == _PARSE_ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")


@functools.cache
def module_source(module: str) -> str:
    """A project module's source, read from its file (the module is not executed)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        raise ImportError(f"no Python source for project module {module}")
    return Path(spec.origin).read_text()


def _is_submodule(package: str, name: str) -> bool:
    """Whether ``package.name`` is a module, decided from the files: ``find_spec`` of a dotted name would
    import ``package``, and a project module may import torch at its top."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return False
    locations = (spec.submodule_search_locations or []) if spec else []
    return any((Path(loc) / f"{name}.py").is_file() or (Path(loc) / name / "__init__.py").is_file()
               for loc in locations)


def imported_names(module: str, source: str) -> tuple[set[str], set[str]]:
    """(project modules, top-level third-party import names) named by ``source``'s import statements,
    wherever they stand (module level or inside functions)."""
    project, external = set(), set()
    spec = importlib.util.find_spec(module)
    package = module if spec is not None and spec.submodule_search_locations else module.rpartition(".")[0]
    for node in ast.walk(_parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import: resolve against this module's package
                base = importlib.util.resolve_name("." * node.level + base, package)
            # `from pkg import sub` names the submodule when there is one, else an attribute of pkg.
            names = [f"{base}.{a.name}" if base.startswith(PROJECT) and _is_submodule(base, a.name) else base
                     for a in node.names]
        else:
            continue
        for name in names:
            top = name.split(".")[0]
            if top == PROJECT:
                project.add(name)
            elif top not in sys.stdlib_module_names and top != "__future__":
                external.add(top)
    return project, external


@functools.cache
def _imported_names_of_file(module: str) -> tuple[set[str], set[str]]:
    return imported_names(module, module_source(module))


def import_closure(module: str, sources: Mapping[str, str] | None = None) -> tuple[dict[str, str], set[str]]:
    """Every project module ``module`` reaches through import statements (itself included), with its
    source, and every third-party top-level name they import. ``sources`` overrides files (tests)."""
    sources = sources or {}
    seen: dict[str, str] = {}
    external: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        if name in sources:
            seen[name] = sources[name]
            project, ext = imported_names(name, seen[name])
        else:
            seen[name] = module_source(name)
            project, ext = _imported_names_of_file(name)
        external |= ext
        todo.extend(project - seen.keys())
    return dict(sorted(seen.items())), external


def parse_closure(module: str) -> None:
    """Parse ``module``'s import closure now (both caches above), so that no later call parses."""
    _statements(module)


@functools.cache
def _statements(module: str) -> tuple[tuple[str, str | None], ...]:
    """(module, attribute or None) for every import statement in the module's closure."""
    modules, _ = import_closure(module)
    found = []
    for name, source in modules.items():
        spec = importlib.util.find_spec(name)
        package = name if spec is not None and spec.submodule_search_locations else name.rpartition(".")[0]
        for node in ast.walk(_parse(source)):
            if isinstance(node, ast.Import):
                found += [(alias.name, None) for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module != "__future__":
                base = importlib.util.resolve_name("." * node.level + (node.module or ""), package) if node.level \
                    else node.module
                found += [(base, alias.name) for alias in node.names if alias.name != "*"]
    return tuple(dict.fromkeys(found))


_PRELOAD_LOCK = threading.Lock()


def preload(module: str) -> None:
    """Import everything ``module``'s closure imports, one thread at a time.

    Lazy packages (transformers resolves ``from transformers import CLIPModel`` on first access) are not
    safe to resolve from two threads at once: the loser sees a half-initialised module ("cannot import
    name 'CLIPModel'"). Stages run in threads side by side, so each resolves its imports here first.
    Optional imports that fail (TensorRT where it is absent) are left for the stage to report.
    """
    with _PRELOAD_LOCK:
        for base, attribute in _statements(module):
            try:
                loaded = importlib.import_module(base)
                if attribute is not None and not hasattr(loaded, attribute):
                    importlib.import_module(f"{base}.{attribute}")
            except Exception:  # noqa: BLE001 - the stage's own import raises it where it matters
                continue
