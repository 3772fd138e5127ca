"""The import graph: acyclic and layered (DESIGN.md: nothing reaches back up).

Imports are read from the source (every ``import`` statement, at module level or inside a
function, since a lazy import is still a dependency), and checked in a fresh interpreter where
what matters is what actually gets imported: opening a checkpoint of any layout, and the CLI's
``--help``, load neither torch nor MLX nor any backend (``voxlive.backends.torch`` or ``.mlx``; the
runtime contract in ``voxlive.backends.runtime`` is plain Python and numpy, shared by both).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("voxlive", "voxlive_bench")


def _modules() -> dict[str, tuple[Path, bool]]:
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            out[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return out


def imports_of(path: Path, module: str, is_package: bool, known) -> set[str]:
    """Every module ``path`` imports (absolute names; a name imported from a package counts as the
    submodule when it is one, as ``from . import layouts`` imports voxlive.layouts, not voxlive)."""
    package = module if is_package else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            subs = {f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in known}
            found.update(subs if len(subs) == len(node.names) else subs | {target})
    return found - {module}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: imports_of(path, m, is_package, modules) for m, (path, is_package) in modules.items()}


def _reaches(deps: set[str], prefixes: tuple[str, ...]) -> set[str]:
    return {d for d in deps if any(d == p or d.startswith(p + ".") for p in prefixes)}


def test_import_graph_is_acyclic(graph):
    internal = {m: {d for d in deps if d in graph} for m, deps in graph.items()}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(internal[m]):
            if state.get(d) == 1:
                pytest.fail("import cycle: " + " -> ".join(path[path.index(d):] + [m, d]))
            if d not in state:
                visit(d, path + [m])
        state[m] = 2

    for m in sorted(internal):
        if m not in state:
            visit(m, [])


def test_engine_imports_no_measuring_tool(graph):
    # The command line alone reaches the tools, to run `voxlive bench`.
    offenders = {m: _reaches(deps, ("voxlive_bench",)) for m, deps in graph.items()
                 if m.startswith("voxlive.") and m != "voxlive.cli"}
    assert not {m: d for m, d in offenders.items() if d}
    assert _reaches(graph["voxlive"], ("voxlive_bench",)) == set()


def test_checkpoints_and_layouts_import_no_backend(graph):
    low = [m for m in graph if m in ("voxlive.checkpoint", "voxlive.tensorfile", "voxlive.config")
           or m.startswith("voxlive.layouts")]
    assert "voxlive.layouts.mlx_audio" in low
    for m in low:
        assert not _reaches(graph[m], ("torch", "mlx", "voxlive.backends", "voxlive.model")), m


def test_backends_reach_nothing_above_them(graph):
    above = ("voxlive.session", "voxlive.model", "voxlive.server", "voxlive.cli", "voxlive.microphone",
             "voxlive_bench")
    offenders = {m: _reaches(deps, above) for m, deps in graph.items() if m.startswith("voxlive.backends")}
    assert not {m: d for m, d in offenders.items() if d}


_NO_BACKEND = """
import sys
{body}
loaded = sorted({{m.split('.')[0] for m in sys.modules}} & {{'torch', 'mlx', 'transformers'}}
                | {{m for m in sys.modules if m.startswith(('voxlive.backends.torch', 'voxlive.backends.mlx'))}})
assert not loaded, f"imported {{loaded}}"
print("ok")
"""


def _run_clean(body: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _NO_BACKEND.format(body=body)], capture_output=True, text=True,
                          timeout=120)


@pytest.fixture(scope="module")
def layout_dirs(tiny_dir, tmp_path_factory) -> dict[str, Path]:
    """A tiny checkpoint in every layout this environment can write."""
    from voxlive.backends.torch.convert import write_quantized
    from voxlive.checkpoint import open_checkpoint

    base = tmp_path_factory.mktemp("layouts")
    dirs = {"native": tiny_dir, "torch-quantized": write_quantized(open_checkpoint(tiny_dir), base / "tq", "int8")}
    try:
        import mlx.core  # noqa: F401
    except ImportError:
        return dirs
    from test_layouts import write_mlx_audio

    from voxlive.backends.mlx.convert import convert

    dirs["voxmlx"] = convert(tiny_dir, base / "voxmlx", quantize="int4", dtype="float32")
    dirs["mlx-audio"] = write_mlx_audio(tiny_dir, base / "mlx-audio", bits=4)
    return dirs


def test_opening_a_checkpoint_of_any_layout_imports_no_backend(layout_dirs):
    paths = json.dumps({name: str(path) for name, path in layout_dirs.items()})
    r = _run_clean(f"""
import json
from voxlive.checkpoint import open_checkpoint
for name, path in json.loads({paths!r}).items():
    assert open_checkpoint(path).layout == name, name
""")
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_cli_help_imports_no_backend():
    r = _run_clean("""
from voxlive.cli import main
for argv in (["--help"], ["transcribe", "--help"], ["serve", "--help"], ["bench", "--help"], ["convert", "--help"]):
    try:
        main(argv)
    except SystemExit as e:
        assert e.code == 0, argv
""")
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr
    assert "--reference" in r.stdout and "--streams" in r.stdout  # bench's options are all still there
