"""The package map holds: no import cycles between files (lazy imports included; type-only imports under
``if TYPE_CHECKING:`` never run and are left out), nothing under ``fedlowrank/`` imports the Flower app shims
(``server/``, ``clients/``) or another module's private names, the simulation path never imports
``fedlowrank.deploy``, library functions stay within 60 lines and files within 400."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import fed_run

from fedlowrank.federated.run_config import compose_cfg

ROOT = Path(__file__).resolve().parents[1]
APPS = ("server", "clients")


def _modules(root: Path) -> dict[str, tuple[Path, str]]:
    """Module name -> (file, package it resolves relative imports against)."""
    mods = {}
    for p in sorted(root.glob("fedlowrank/**/*.py")):
        parts = list(p.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
            mods[".".join(parts)] = (p, ".".join(parts))
        else:
            mods[".".join(parts)] = (p, ".".join(parts[:-1]))
    return mods


def _type_only(tree: ast.AST) -> set[int]:
    """ids of import nodes inside ``if TYPE_CHECKING:`` blocks."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING":
            out |= {id(n) for b in node.body for n in ast.walk(b)}
    return out


def import_graph(root: Path) -> tuple[dict[str, set[str]], list[tuple[str, str]], list[tuple[str, str]]]:
    """(edges between library modules, library -> app imports, imports of private names)."""
    mods = _modules(root)
    edges: dict[str, set[str]] = {}
    apps, private = [], []
    for mod, (path, pkg) in mods.items():
        tree = ast.parse(path.read_text())
        skip, out = _type_only(tree), set()
        for node in ast.walk(tree):
            if id(node) in skip or not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            if isinstance(node, ast.Import):
                targets = [(a.name, None) for a in node.names]
            else:
                base = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)] if node.level else []
                target = ".".join(base + [node.module] if node.module else base) if node.level else node.module or ""
                targets = [(target, a.name) for a in node.names]
            for target, name in targets:
                if target.split(".")[0] in APPS:
                    apps.append((mod, target))
                full = f"{target}.{name}" if name else target
                if full in mods:
                    out.add(full)
                elif target in mods:
                    out.add(target)
                    if name and name.startswith("_") and not name.startswith("__"):
                        private.append((mod, f"{target}.{name}"))
        own = {".".join(mod.split(".")[:i]) for i in range(1, len(mod.split(".")) + 1)}
        # importing a.b.c first runs the packages a.b and a: an edge to each (but the importer's own ancestors,
        # already being imported); this is how config.store -> central.sample -> central/__init__ -> config closes
        out |= {anc for t in out for i in range(2, len(t.split("."))) if (anc := ".".join(t.split(".")[:i])) in mods}
        edges[mod] = out - own
    return edges, apps, private


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack, on, found = [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in edges:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles_no_app_imports_no_private_names():
    edges, apps, private = import_graph(ROOT)
    assert len(edges) > 60  # the walk saw the whole package
    assert cycles(edges) == []
    assert apps == []
    assert private == []


def test_the_checks_fail_on_a_planted_cycle_app_import_and_private_name(tmp_path):
    """Each check can fail: a copy of a tiny package with each fault is caught."""
    pkg = tmp_path / "fedlowrank"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from fedlowrank import b  # lazy, still an import\n")
    (pkg / "b.py").write_text("from .a import f\nfrom fedlowrank.c import _hidden\nimport server.server_app\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from fedlowrank import b\n"
                              "_hidden = 1\n")
    edges, apps, private = import_graph(tmp_path)
    assert cycles(edges) == [["fedlowrank.a", "fedlowrank.b"]]  # c -> b is type-only
    assert apps == [("fedlowrank.b", "server.server_app")]
    assert private == [("fedlowrank.b", "fedlowrank.c._hidden")]


def test_a_cycle_through_a_packages_init_is_caught(tmp_path):
    """Importing ``fedlowrank.p.m`` runs ``fedlowrank/p/__init__.py`` first: a module that imports ``p.m`` while
    ``p/__init__`` imports that module back is a cycle, though no two plain modules import each other."""
    pkg = tmp_path / "fedlowrank"
    (pkg / "p").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "p" / "__init__.py").write_text("from fedlowrank import q\n")
    (pkg / "p" / "m.py").write_text("X = 1\n")
    (pkg / "q.py").write_text("def f():\n    from fedlowrank.p.m import X\n")
    edges, _, _ = import_graph(tmp_path)
    assert cycles(edges) == [["fedlowrank.p", "fedlowrank.q"]]


def test_library_functions_and_files_stay_short():
    long_bodies, long_files = [], []
    for path in sorted(ROOT.glob("fedlowrank/**/*.py")):
        src = path.read_text()
        if len(src.splitlines()) > 400:
            long_files.append(str(path.relative_to(ROOT)))
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                long_bodies.append(f"{path.relative_to(ROOT)}:{node.name}")
    assert long_bodies == [] and long_files == []


def test_app_shims_are_thin():
    for shim in ("server/server_app.py", "clients/client_app.py"):
        assert len((ROOT / shim).read_text().splitlines()) <= 60


def _loaded_after(imports: str, which: str) -> str:
    """``sorted(which)`` printed by a fresh interpreter (checkout on its path, bare environment) after ``imports``."""
    code = f"import sys; sys.path.insert(0, {str(ROOT)!r})\n{imports}\nprint(sorted({which}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=110, cwd=ROOT,
                         env={"PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.mark.timeout(120)
def test_the_simulation_path_never_imports_deploy():
    """Importing everything a simulation runs (runtimes, apps, in-process loop) loads no fedlowrank.deploy
    module; the deployment extras are only imported where they are used."""
    loaded = _loaded_after("import fedlowrank.runtime.runner, fedlowrank.runtime.superlink, fedlowrank.runtime.inprocess\n"
                           "import fedlowrank.federated.apps, server.server_app, clients.client_app",
                           "[m for m in sys.modules if m.startswith('fedlowrank.deploy')]")
    assert loaded == "[]"


@pytest.mark.timeout(120)
def test_the_default_runtimes_launcher_in_the_private_network_imports_no_torch():
    """The first process inside the private network (``python -m fedlowrank.runtime.isolated superlink ...``) only
    starts the SuperLink and ``flwr run``: its imports load neither torch nor the config schema (main.py validated
    the run), so it holds ~15 MB instead of ~350 MB for the length of the run."""
    loaded = _loaded_after("import fedlowrank.runtime.isolated, fedlowrank.runtime.superlink\n"
                           "from fedlowrank.runtime.superlink import launch",
                           "[m for m in ('torch', 'numpy', 'fedlowrank.config', 'flwr') if m in sys.modules]")
    assert loaded == "[]"


def test_the_default_runtime_runs_the_torch_free_launcher_in_the_private_network(tmp_path, monkeypatch):
    """runner.run_isolated hands the superlink runtime to ``isolated superlink <spec>`` (prepared by main.py), any
    other runtime to ``isolated runner <config>``."""
    from fedlowrank.runtime import runner

    seen = []

    class Stop(Exception):
        pass

    def popen(cmd, **kw):
        seen.append(cmd)
        raise Stop

    monkeypatch.setattr(runner.subprocess, "Popen", popen)
    for rt in ("superlink", "simulation"):
        cfg = compose_cfg(["mode=federated", f"out_dir={tmp_path / rt}", f"fed.runtime={rt}", "fed.num_clients=5"])
        with pytest.raises(Stop):
            runner.run_isolated(fed_run(tmp_path / rt, f"fed.runtime={rt}"), cfg)
    i = seen[0].index("fedlowrank.runtime.isolated")
    assert seen[0][i + 1] == "superlink" and seen[0][i + 2].endswith("isolated_spec.json")
    spec = json.loads(Path(seen[0][i + 2]).read_text())
    assert Path(spec["conf"]).is_file() and "num-supernodes=5" in spec["federation"]
    j = seen[1].index("fedlowrank.runtime.isolated")
    assert seen[1][j + 1] == "runner" and seen[1][j + 2].endswith("isolated_config.yaml")
