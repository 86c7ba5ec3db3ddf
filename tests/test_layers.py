"""Imports go one way: every module of `sidecar/` imports only from its own layer or the
layers below it, in the order `sidecar/__init__.py`'s docstring declares (read from there,
so the order is written once). Every import counts: at module level, inside a function,
or under `TYPE_CHECKING`."""

from __future__ import annotations

import ast
import re
from collections.abc import Mapping
from pathlib import Path

import sidecar

PACKAGE = Path(sidecar.__file__).parent
ROOT = "sidecar"
_LAYER_LINE = re.compile(r"    ([\w.]+(?:, [\w.]+)*): ")


def declared_layers(docstring: str) -> list[list[str]]:
    """The layers the docstring lists, lowest first: the module names of each."""
    return [
        match.group(1).split(", ")
        for match in map(_LAYER_LINE.match, docstring.splitlines())
        if match is not None
    ]


def layer_of(module: str, layers: list[list[str]]) -> int | None:
    """The layer of `module` (dotted, with the `sidecar.` prefix): that of the longest
    declared name it is or is inside of; None when no name covers it."""
    best: tuple[int, int] | None = None
    for index, names in enumerate(layers):
        for name in names:
            full = f"{ROOT}.{name}"
            if (module == full or module.startswith(full + ".")) and (
                best is None or len(full) > best[1]
            ):
                best = (index, len(full))
    return None if best is None else best[0]


def imported(module: str, source: str, modules: set[str]) -> list[tuple[int, str]]:
    """(line, module) for every `sidecar` module that `source` (module `module`) imports:
    `from sidecar.x import y` imports `sidecar.x.y` when that is a module, else `sidecar.x`."""
    is_package = module in {m.rpartition(".")[0] for m in modules}
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = module.split(".")[: len(module.split(".")) - node.level + is_package]
                base = ".".join([*parts, *([base] if base else [])])
            for alias in node.names:
                target = f"{base}.{alias.name}"
                found.append((node.lineno, target if target in modules else base))
    return [(line, name) for line, name in found if name == ROOT or name.startswith(ROOT + ".")]


def violations(sources: Mapping[str, str], layers: list[list[str]]) -> list[str]:
    """What goes against `layers` in `sources` (dotted module name -> its source)."""
    modules = set(sources)
    problems = []
    for module, source in sorted(sources.items()):
        if module == ROOT:
            continue  # the package itself: its version and this docstring
        own = layer_of(module, layers)
        if own is None:
            problems.append(f"{module}: in no layer of sidecar/__init__.py")
            continue
        for line, target in imported(module, source, modules):
            if target == ROOT:
                continue
            theirs = layer_of(target, layers)
            if theirs is None or theirs > own:
                where = "no layer" if theirs is None else f"layer {', '.join(layers[theirs])}"
                source_layer = ", ".join(layers[own])
                problems.append(
                    f"{module}:{line} imports {target} ({where}) from layer {source_layer}"
                )
    return problems


def package_sources() -> dict[str, str]:
    sources = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        sources[name] = path.read_text("utf-8")
    return sources


def test_the_docstring_declares_the_layers() -> None:
    layers = declared_layers(sidecar.__doc__ or "")
    names = [name for layer in layers for name in layer]
    assert names[:3] == ["errors", "logs", "protocol"]
    assert names.index("store") < names.index("hub") < names.index("stream") < names.index("app")
    assert len(names) == len(set(names))


def test_every_import_follows_the_layers() -> None:
    assert violations(package_sources(), declared_layers(sidecar.__doc__ or "")) == []


def test_the_package_root_imports_nothing_of_the_package() -> None:
    sources = package_sources()
    assert imported(ROOT, sources[ROOT], set(sources)) == []


def test_an_import_against_the_order_is_found() -> None:
    """The check itself, on a made-up package: upward imports, however written, are found;
    downward and same-layer ones are not; a module outside every layer is named."""
    layers = [["protocol"], ["config", "identity"], ["store"], ["http"]]
    sources = {
        "sidecar": "",
        "sidecar.protocol": "",
        "sidecar.protocol.token": "from sidecar.store import base\n",
        "sidecar.config": "from sidecar.identity import Mode\nfrom sidecar.protocol import token\n",
        "sidecar.identity": (
            "from typing import TYPE_CHECKING\n"
            "if TYPE_CHECKING:\n    from sidecar.config import Settings\n"
        ),
        "sidecar.store": "def f():\n    import sidecar.http.send\n",
        "sidecar.store.base": "from . import sqlite\nfrom ..http import send\n",
        "sidecar.store.sqlite": "",
        "sidecar.http": "",
        "sidecar.http.send": "import sidecar.store.base, sidecar\n",
        "sidecar.extra": "",
    }
    assert violations(sources, layers) == [
        "sidecar.extra: in no layer of sidecar/__init__.py",
        "sidecar.protocol.token:1 imports sidecar.store.base (layer store) from layer protocol",
        "sidecar.store:2 imports sidecar.http.send (layer http) from layer store",
        "sidecar.store.base:2 imports sidecar.http.send (layer http) from layer store",
    ]
