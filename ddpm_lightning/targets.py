"""The keyword arguments a Hydra ``_target_`` takes, read from its source with :mod:`ast`, without importing it.

The command-line check (:func:`ddpm_lightning.config.compose_config`) names real options that the YAML does not list
(``trainer.max_time``: an argument of ``lightning.Trainer``). Importing the targets to ask ``inspect.signature`` would
cost Lightning's, torch's and deepinv's import time (10 s on a 2-core CPU) on every misspelt key; reading the
source files takes milliseconds. The module files are located with ``importlib.util.find_spec`` of the top-level
package (which imports nothing) and the package folders; re-exports (``from lightning.pytorch.trainer import
Trainer``) are followed, and so are base classes and dataclass fields. Where the source cannot say (a compiled
module, a ``*`` import, a signature made at run time), the answer is empty: no option is offered, none is refused
for it. ``tests/test_bad_input.py`` checks the answers against ``inspect.signature`` for every target of the configs.

No Lightning or Hydra import here.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
from pathlib import Path

_DEPTH = 12  #: re-exports and base classes followed at most
#: Bases whose ``__init__`` takes no arguments of its own (``abc`` is a frozen module: it has no source to read).
_NO_ARGUMENTS = {"object", "ABC", "abc.ABC", "Generic", "typing.Generic", "Protocol", "typing.Protocol"}


def _source_file(module: str) -> Path | None:
    """The ``.py`` file of ``module`` (a package's ``__init__.py``), found without importing anything."""
    parts = module.split(".")
    try:
        spec = importlib.util.find_spec(parts[0])
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if len(parts) == 1:
        return Path(spec.origin) if spec.origin and spec.origin.endswith(".py") else None
    locations = [Path(p) for p in (spec.submodule_search_locations or []) if Path(p).is_dir()]
    for i, part in enumerate(parts[1:], start=2):
        last = i == len(parts)
        packages = [loc / part for loc in locations if (loc / part).is_dir()]
        if last:
            for loc in locations:  # the first location that has it, as the import system picks
                if (loc / part / "__init__.py").is_file():
                    return loc / part / "__init__.py"
                if (loc / f"{part}.py").is_file():
                    return loc / f"{part}.py"
            return None
        locations = packages
    return None  # pragma: no cover - the loop returns


@functools.cache
def _tree(path: Path) -> ast.Module | None:
    try:
        return ast.parse(path.read_text(encoding="utf-8"))
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
        return None


def _statements(body: list[ast.stmt]) -> list[ast.stmt]:
    """Top-level statements, with those inside ``if``/``try`` blocks (``if TYPE_CHECKING:``, version switches)."""
    out: list[ast.stmt] = []
    for node in body:
        if isinstance(node, ast.If):
            out += _statements(node.body) + _statements(node.orelse)
        elif isinstance(node, ast.Try):
            out += _statements(node.body) + _statements(node.orelse)
        else:
            out.append(node)
    return out


def _absolute(module: str, is_package: bool, level: int, name: str | None) -> str:
    """The module of ``from <level dots><name> import ...`` inside ``module``."""
    if level == 0:
        return name or ""
    package = module if is_package else module.rpartition(".")[0]
    for _ in range(level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{name}" if name else package


def _definition(module: str, name: str, depth: int = 0) -> tuple[str, ast.ClassDef | ast.FunctionDef] | None:
    """``(module, node)`` where ``name`` as seen from ``module`` is defined, following ``from x import name``."""
    path = _source_file(module)
    tree = _tree(path) if path is not None and depth < _DEPTH else None
    if tree is None:
        return None
    found = None
    for node in _statements(tree.body):  # the last binding wins, as at run time
        if isinstance(node, (ast.ClassDef, ast.FunctionDef)) and node.name == name:
            found = (module, node)
        elif isinstance(node, ast.ImportFrom):
            for alias in node.names:
                if (alias.asname or alias.name) == name and alias.name != "*":
                    source = _absolute(module, path.name == "__init__.py", node.level, node.module)
                    found = ("import", source, alias.name)
    if found and found[0] == "import":
        _, source, original = found
        return _definition(source, original, depth + 1)
    return found


def _resolve(target: str) -> tuple[str, ast.ClassDef | ast.FunctionDef] | None:
    """The definition of a dotted ``target`` (``lightning.Trainer``, ``torch.optim.lr_scheduler.OneCycleLR``)."""
    parts = target.split(".")
    for i in range(len(parts) - 1, 0, -1):
        module, rest = ".".join(parts[:i]), parts[i:]
        if _source_file(module) is None:
            continue
        if len(rest) == 1:
            return _definition(module, rest[0])
        found = _definition(module, rest[0])  # a nested class: Outer.Inner
        for name in rest[1:]:
            if found is None or not isinstance(found[1], ast.ClassDef):
                return None
            defined = (ast.ClassDef, ast.FunctionDef)
            inner = next((n for n in found[1].body if isinstance(n, defined) and n.name == name), None)
            found = (found[0], inner) if inner is not None else None
        return found
    return None


def _with_defaults(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
    """The arguments of ``fn`` that can be given by keyword and have a default."""
    args = fn.args
    positional = args.posonlyargs + args.args
    # defaults cover the last len(defaults) positional parameters; positional-only ones cannot be given by keyword
    with_default = positional[len(positional) - len(args.defaults) :] if args.defaults else []
    keyword = [a.arg for a in with_default if any(a is b for b in args.args)]
    keyword_only = zip(args.kwonlyargs, args.kw_defaults, strict=True)
    return keyword + [a.arg for a, default in keyword_only if default is not None]


def _is_dataclass(cls: ast.ClassDef) -> bool:
    names = [d.func if isinstance(d, ast.Call) else d for d in cls.decorator_list]
    return any(
        (isinstance(n, ast.Name) and n.id == "dataclass") or (isinstance(n, ast.Attribute) and n.attr == "dataclass")
        for n in names
    )


def _base_name(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        inner = _base_name(node.value)
        return f"{inner}.{node.attr}" if inner else None
    if isinstance(node, ast.Subscript):  # Generic[T]
        return _base_name(node.value)
    return None


def _class_arguments(module: str, cls: ast.ClassDef, depth: int) -> list[str] | None:
    functions = (ast.FunctionDef, ast.AsyncFunctionDef)
    init = next((n for n in cls.body if isinstance(n, functions) and n.name == "__init__"), None)
    if init is not None:
        return _with_defaults(init)
    fields = []
    if _is_dataclass(cls):  # every field is an argument; those without a default are required
        fields = [
            n.target.id
            for n in cls.body
            if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name) and n.value is not None
        ]
    for base in cls.bases:
        name = _base_name(base)
        if name is None or name in _NO_ARGUMENTS or depth >= _DEPTH:
            continue
        head, _, tail = name.partition(".")
        found = _definition(module, head) if not tail else _resolve(f"{_import_of(module, head)}.{tail}")
        if found is None or not isinstance(found[1], ast.ClassDef):
            return None if not _is_dataclass(cls) else fields  # a base outside reach: say nothing
        inherited = _class_arguments(found[0], found[1], depth + 1)
        if inherited is None:
            return None
        fields = inherited + [f for f in fields if f not in inherited]
        if not _is_dataclass(cls):
            return fields  # the first base with an __init__ decides (the MRO's usual case)
    return fields


def _import_of(module: str, name: str) -> str:
    """The module that ``import x as name`` / ``import name`` binds in ``module`` (for ``name.Class`` bases)."""
    path = _source_file(module)
    tree = _tree(path) if path is not None else None
    for node in _statements(tree.body if tree else []):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if (alias.asname or alias.name.partition(".")[0]) == name:
                    return alias.name if alias.asname else name
    return name


@functools.cache
def keyword_arguments(target: str) -> tuple[str, ...] | None:
    """The keyword arguments with a default of the class or function ``target`` (a dotted name, as in ``_target_``),
    read from its source; None when the source cannot say.

    Example: ``keyword_arguments("lightning.Trainer")`` holds ``"max_time"``, ``"max_steps"``, ...
    """
    found = _resolve(target)
    if found is None:
        return None
    module, node = found
    if isinstance(node, ast.ClassDef):
        names = _class_arguments(module, node, 0)
    else:
        names = _with_defaults(node)
    return tuple(dict.fromkeys(names)) if names is not None else None
