"""The import layers hold: imports run one way (design.md), http reaches the actors through one
module, the actors import at module top, and the prefix cache's old leaks stay gone.

Layers, top to bottom (a module may import its own layer and any layer below it):

    cli -> distributed.launch -> serve -> http -> actors, distributed -> scheduling -> models
        -> memory, tokenize, sampling, config -> grammar, faults, paths, blas (and the package)

- `scheduling` is the scheduler's sync core (no trio): below the actors that wrap it, above
  models/ whose step data it fills.
- `distributed` runs beside the actors (its executor is one, and its codec carries their step
  messages), except `distributed.launch`, which starts serve in each rank's process (the one
  intentional import of serve from inside the package; cli picks it for --tensor-parallel).
"""

from __future__ import annotations

import ast
import pathlib
import re

SRC = pathlib.Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "kvgrove"

LAYERS = [  # top first; a prefix names a package, a whole name a module
    ("kvgrove.cli",),
    ("kvgrove.distributed.launch",),
    ("kvgrove.serve",),
    ("kvgrove.http",),
    ("kvgrove.actors", "kvgrove.distributed"),
    ("kvgrove.scheduling",),
    ("kvgrove.models",),
    ("kvgrove.memory", "kvgrove.tokenize", "kvgrove.sampling", "kvgrove.config"),
    ("kvgrove.grammar", "kvgrove.faults", "kvgrove.paths", "kvgrove.blas", "kvgrove"),
]


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    """The index in LAYERS of the most specific entry naming `module` (0 = top)."""
    best, best_len = None, -1
    for i, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and len(name) > best_len:
                best, best_len = i, len(name)
    assert best is not None, f"{module} is in no layer: add it to LAYERS"
    return best


def imports(path: pathlib.Path) -> list[tuple[str, ast.stmt, bool]]:
    """(kvgrove module imported, the statement, whether it is at module level) per import."""
    tree = ast.parse(path.read_text(), filename=str(path))
    top = set(map(id, tree.body))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from kvgrove import serve` imports the module kvgrove.serve.
            if node.module == "kvgrove":
                names = [f"kvgrove.{a.name}" for a in node.names]
            else:
                names = [node.module]
        else:
            continue
        out += [(n, node, id(node) in top) for n in names if n.split(".")[0] == "kvgrove"]
    return out


def modules() -> list[pathlib.Path]:
    found = sorted(PACKAGE.rglob("*.py"))
    assert len(found) > 50, "the source tree was not found"
    return found


def test_imports_run_one_way():
    upward = []
    for path in modules():
        here = module_name(path)
        for name, node, _ in imports(path):
            if layer_of(name) < layer_of(here):
                upward.append(f"{here}:{node.lineno} imports {name}")
    assert not upward, "imports that run up the layers:\n" + "\n".join(upward)


def test_http_reaches_the_actors_only_through_their_api():
    found = []
    for path in (PACKAGE / "http").rglob("*.py"):
        for name, node, _ in imports(path):
            if name.startswith("kvgrove.actors") and name != "kvgrove.actors.api":
                found.append(f"{module_name(path)}:{node.lineno} imports {name}")
    assert not found, "\n".join(found)


def test_the_actors_and_the_sync_cores_import_at_module_top():
    local = []
    for folder in ("actors", "scheduling"):
        for path in (PACKAGE / folder).rglob("*.py"):
            tree = ast.parse(path.read_text())
            top = set(map(id, tree.body))
            for node in ast.walk(tree):
                if isinstance(node, ast.Import | ast.ImportFrom) and id(node) not in top:
                    local.append(f"{module_name(path)}:{node.lineno}")
    assert not local, "function-local imports: " + ", ".join(local)


def test_the_sync_cores_import_no_trio():
    cores = [*(PACKAGE / "scheduling").rglob("*.py"), *(PACKAGE / "memory").rglob("*.py")]
    cores += [PACKAGE / "models" / name for name in ("runner.py", "steps.py", "prefixes.py")]
    with_trio = [
        module_name(p)
        for p in cores
        if re.search(r"^\s*(import trio|from trio\b)", p.read_text(), flags=re.M)
    ]
    assert not with_trio, with_trio


def test_no_prefix_cache_lending_and_no_hasattr_on_caches():
    lent, probed = [], []
    for path in modules():
        for i, line in enumerate(path.read_text().splitlines(), 1):
            where = f"{module_name(path)}:{i}"
            if "UsePrefixCache" in line:
                lent.append(where)
            if "hasattr(" in line and "cache" in line.lower():
                probed.append(f"{where}: {line.strip()}")
    assert not lent and not probed, (lent, probed)
