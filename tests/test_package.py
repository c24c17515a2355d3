"""The package: the four import names work installed and from a plain checkout, and the layers stay one way
(runtime never imports torch or the torch core; core never imports export or cli; export never imports cli)."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("evim3", "evim3.export", "evim3.runtime", "evim3.cli")
FOLDER = {"evim3": "evim3", "evim3.export": "export", "evim3.runtime": "runtime", "evim3.cli": "cli"}

# Drops the editable install's import hooks, so only sys.path (here: the current directory) can find evim3.
WITHOUT_INSTALL = """
import sys
sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
sys.path_hooks[:] = [h for h in sys.path_hooks if not getattr(h, "__module__", "").startswith("__editable__")]
sys.path[:] = [p for p in sys.path if "__editable__" not in p]
sys.path_importer_cache.clear()
"""

BLOCK_TORCH = "import sys\nsys.modules['torch'] = None  # any import of torch now raises ImportError\n"


def run_python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, capture_output=True, text=True,
                          check=False)
    assert done.returncode == 0, done.stderr
    return done


def locations(cwd: Path, prelude: str = "") -> dict[str, str]:
    code = prelude + "import importlib\n" + "".join(
        f"print({name!r}, importlib.import_module({name!r}).__file__)\n" for name in PACKAGES
    )
    return dict(line.split(" ", 1) for line in run_python(code, cwd).stdout.splitlines())


def test_without_install_prelude_hides_the_install(tmp_path: Path) -> None:
    """Self-check: outside the checkout, with the install's hooks dropped, evim3 is not found."""
    done = subprocess.run([sys.executable, "-c", WITHOUT_INSTALL + "import evim3\n"], cwd=tmp_path,
                          capture_output=True, text=True, check=False)
    assert done.returncode != 0 and "No module named 'evim3'" in done.stderr


@pytest.mark.parametrize("where", ["installed", "repo-root", "repo-root-without-install"])
def test_all_four_packages_import(where: str, tmp_path: Path) -> None:
    cwd = tmp_path if where == "installed" else ROOT
    found = locations(cwd, WITHOUT_INSTALL if where == "repo-root-without-install" else "")
    for name in PACKAGES:
        assert Path(found[name]) == ROOT / FOLDER[name] / "__init__.py", name


@pytest.mark.parametrize(
    "modules",
    [
        ["evim3"],
        ["evim3.runtime", "evim3.runtime.meta", "evim3.runtime.errors", "evim3.runtime.atomic"],
        # What the CLI reads at start-up (`evim3 train`'s flags) or runs without torch (`evim3 data check`).
        ["evim3.train.recipe", "evim3.data.check"],
        # `evim3 data synth` (its per-frame LV truth included) and the tracing masks.
        ["evim3.data.synth", "evim3.data.tracings"],
    ],
    ids=["evim3", "runtime-core", "cli-startup", "synth-and-tracings"],
)
def test_import_without_torch(modules: list[str], tmp_path: Path) -> None:
    imports = "".join(f"import {m}\n" for m in modules)
    run_python(imports + "import sys\nassert 'torch' not in sys.modules, 'torch was imported'\n", tmp_path)
    run_python(BLOCK_TORCH + imports, tmp_path)  # and they work where torch is not installed


def runtime_modules() -> list[str]:
    return sorted(f"evim3.runtime.{p.stem}" for p in (ROOT / "runtime").glob("*.py") if p.stem != "__init__")


@pytest.mark.parametrize("module", runtime_modules())
def test_every_runtime_module_imports_without_torch(module: str, tmp_path: Path) -> None:
    run_python(BLOCK_TORCH + f"import {module}\n", tmp_path)


def test_cli_entry_point_imports_without_torch(tmp_path: Path) -> None:
    """Commands import torch lazily: `evim3 infer` must start on an edge box without torch."""
    run_python(BLOCK_TORCH + "import evim3.cli.main\n", tmp_path)


def imported_names(path: Path) -> list[str]:
    """Every module an import statement in `path` names (anywhere: top level or inside functions);
    relative imports are resolved against the package the folder installs as."""
    package = "evim3." + path.parent.name if path.parent.name != "evim3" else "evim3"
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                names.append(f"{base}.{node.module}" if node.module else base)
            else:
                names.append(node.module)
    return names


def forbidden_imports(folder: str, forbidden: tuple[str, ...], allowed: tuple[str, ...] = ()) -> list[str]:
    bad = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        for name in imported_names(path):
            if name.startswith(allowed):
                continue
            if any(name == f or name.startswith(f + ".") for f in forbidden):
                bad.append(f"{path.relative_to(ROOT)}: {name}")
    return bad


CORE_MODULES = ("evim3.ops", "evim3.modules", "evim3.models", "evim3.data", "evim3.tasks", "evim3.train",
                "evim3.checkpoint", "evim3.config", "evim3.convert")


def test_runtime_never_imports_torch_or_the_core() -> None:
    assert forbidden_imports("runtime", ("torch", "safetensors", "evim3.export", "evim3.cli") + CORE_MODULES) == []


def test_core_never_imports_export_or_cli() -> None:
    assert forbidden_imports("evim3", ("evim3.export", "evim3.cli")) == []


def test_export_never_imports_cli() -> None:
    assert forbidden_imports("export", ("evim3.cli",)) == []


def test_wheel_carries_the_kernel_sources(tmp_path: Path) -> None:
    """The C++ sources compiled on first use (the torch extension and the runtime's fused scan op) are in the
    wheel, where the code looks for them (the shared scan kernels in evim3/runtime/csrc)."""
    import shutil
    import zipfile

    # From a copy: a build/ folder left in the checkout would be packed again, hiding a missing package-data rule.
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", "build", "*.egg-info", "__pycache__", "runs"))
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path)], cwd=source, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    (wheel,) = tmp_path.glob("evim3-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for source in ("evim3/runtime/csrc/selective_scan_kernel.h", "evim3/ops/csrc/selective_scan_cpu.cpp",
                   "evim3/runtime/csrc/selective_scan_op.cpp"):
        assert source in names, source
