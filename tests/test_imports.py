"""The package's import structure: no cycles, and light processes stay light.

Static: every `import`/`from ... import` between embedrpc's own modules (lazy ones in
functions and TYPE_CHECKING ones included: a cycle through them is still a cycle a
reader has to untangle) forms a graph; it must have no cycle. Dynamic: a
worker process imports its entry module without loading grpc, prometheus or the
HTTP server (each cost every worker start time), and the CLI parses `serve --help`
without importing the server.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Import package → source folder (pyproject.toml's package-dir).
PACKAGES = {"embedrpc": ROOT / "src" / "embedrpc", "embedrpc.server": ROOT / "server",
            "embedrpc.client": ROOT / "client"}


def _modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([package, *parts])
            if name.startswith("embedrpc.v1"):
                continue  # generated stubs
            found[name] = path
    return found


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    is_package = path.name == "__init__.py"
    deps = set()
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                deps.add(target)
    return deps


def test_no_import_cycles() -> None:
    modules = _modules()
    graph = {name: _imports(name, path, set(modules))
             for name, path in modules.items()}
    # A package importing its own submodules (re-exports) is not a cycle of concern.
    for name in graph:
        graph[name] = {d for d in graph[name] if not (d.startswith(name + ".")
                                                      and modules[name].name == "__init__.py")}
    visiting, done, cycles = [], set(), []

    def visit(node: str) -> None:
        if node in done:
            return
        if node in visiting:
            cycles.append([*visiting[visiting.index(node):], node])
            return
        visiting.append(node)
        for dep in sorted(graph.get(node, ())):
            visit(dep)
        visiting.pop()
        done.add(node)

    for name in sorted(graph):
        visit(name)
    assert not cycles, "import cycles: " + "; ".join(" → ".join(c) for c in cycles)


def _imported_by(code: str) -> set[str]:
    probe = (f"import sys\n{code}\n"
             "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            timeout=120, check=True)
    return set(result.stdout.split())


def test_a_worker_process_does_not_load_the_front_ends() -> None:
    loaded = _imported_by("import embedrpc.server.worker.process")
    assert not loaded & {"grpc", "prometheus_client", "aiohttp", "google"}, loaded


def test_the_cli_parses_serve_options_without_the_server() -> None:
    loaded = _imported_by("from embedrpc.cli import build_parser\nbuild_parser()")
    assert "grpc" not in loaded and "prometheus_client" not in loaded, loaded
