"""Each DVC stage's ``deps`` cover every ``meduet`` module its code imports.

DVC reruns a stage only when one of its ``deps`` (or params) changed. A module the stage
imports but does not list is invisible to DVC: edit it and ``dvc repro`` silently keeps
the outputs of the old code. So for every stage in ``dvc.yaml`` the import closure of its
code (the ``meduet`` CLI entry plus the stage module, found statically with ``ast``,
lazy imports inside functions included) must lie inside its ``deps``. Importing
``meduet.stages`` alone is cheap; the stage modules (torch, Ray, ...) are never imported.
"""

from __future__ import annotations

import ast
import shlex
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from meduet.stages import STAGES

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "meduet"
PACKAGE_DIR = REPO_ROOT / PACKAGE
CLI_MODULE = "meduet.cli"  # the `meduet` console script: loads the config and the stage registry
DVC_STAGES: dict[str, dict[str, Any]] = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]


def _module_file(package_dir: Path, name: str) -> Path | None:
    """The file of module ``name`` (``pkg/x/y.py`` or ``pkg/x/y/__init__.py``), if it is one."""
    parts = name.split(".")[1:]
    candidates = [package_dir.joinpath(*parts) / "__init__.py"]
    if parts:
        candidates.insert(0, package_dir.joinpath(*parts[:-1], f"{parts[-1]}.py"))
    return next((path for path in candidates if path.is_file()), None)


def _imported_names(source: Path, module: str) -> Iterator[str]:
    """Absolute names of everything ``source`` imports, anywhere in the file.

    For ``from a import b`` both ``a`` and ``a.b`` are yielded: ``b`` may be a submodule.
    """
    package = module if source.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source.read_text(), filename=str(source))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: level 1 is the current package, 2 its parent, ...
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            yield target
            yield from (f"{target}.{alias.name}" for alias in node.names if alias.name != "*")


def import_closure(roots: Iterable[str], package_dir: Path, package: str) -> set[str]:
    """Files of the ``package`` modules that importing ``roots`` executes, transitively.

    Parent packages count (importing ``pkg.a.b`` runs ``pkg/__init__.py`` and
    ``pkg/a/__init__.py``). Returns POSIX paths relative to ``package_dir.parent``,
    e.g. ``"pkg/a/b.py"``.
    """
    roots = list(roots)
    unknown = [root for root in roots if _module_file(package_dir, root) is None]
    if unknown:
        raise ValueError(f"no module file for {unknown} under {package_dir}")
    files: dict[str, Path] = {}  # module name -> file, for modules already scanned
    seen: set[str] = set()
    todo = roots
    while todo:
        name = todo.pop()
        if name in seen or not (name == package or name.startswith(f"{package}.")):
            continue
        seen.add(name)
        parts = name.split(".")
        for prefix in (".".join(parts[:i]) for i in range(1, len(parts) + 1)):
            if prefix in files:
                continue
            path = _module_file(package_dir, prefix)
            if path is None:  # a name defined inside a module, not a module
                break
            files[prefix] = path
            todo.extend(_imported_names(path, prefix))
    return {path.relative_to(package_dir.parent).as_posix() for path in files.values()}


def _covered(path: str, deps: Iterable[str]) -> bool:
    return any(path == dep or path.startswith(f"{dep}/") for dep in deps)


@pytest.mark.parametrize("stage", list(DVC_STAGES))
def test_stage_deps_cover_the_code_it_imports(stage: str) -> None:
    spec = DVC_STAGES[stage]
    command = shlex.split(spec["cmd"])
    assert command[0] == "meduet" and command[1] in STAGES, f"{stage}: unexpected cmd {spec['cmd']!r}"
    deps = [str(dep).rstrip("/") for dep in spec.get("deps", [])]
    closure = import_closure([CLI_MODULE, STAGES[command[1]].module], PACKAGE_DIR, PACKAGE)
    missing = sorted(path for path in closure if not _covered(path, deps))
    if missing:
        listing = "\n".join(f"      - {path}" for path in missing)
        pytest.fail(f"dvc.yaml stage {stage!r} imports modules missing from its deps:\n{listing}", pytrace=False)


def test_import_closure_of_a_real_stage() -> None:
    closure = import_closure(["meduet.stages.harmonize"], PACKAGE_DIR, PACKAGE)
    assert {"meduet/__init__.py", "meduet/stages/__init__.py", "meduet/stages/harmonize.py",
            "meduet/config.py", "meduet/harmonize/__init__.py", "meduet/harmonize/case.py",
            "meduet/harmonize/qa.py"} <= closure
    assert "meduet/stages/pretrain.py" not in closure


def test_import_closure_follows_lazy_relative_and_parent_imports(tmp_path: Path) -> None:
    sources = {
        "pkg/__init__.py": "",
        "pkg/a.py": "import os\nfrom . import b\n\ndef later():\n    import pkg.sub.deep\n",
        "pkg/b.py": "from pkgx import nothing  # another package with a common prefix\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/deep.py": "from ..c import thing\n",
        "pkg/c.py": "thing = 1\n",
        "pkg/unused.py": "",
    }
    for rel, text in sources.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    assert import_closure(["pkg.a"], tmp_path / "pkg", "pkg") == {
        "pkg/__init__.py", "pkg/a.py", "pkg/b.py", "pkg/sub/__init__.py", "pkg/sub/deep.py", "pkg/c.py"}
    with pytest.raises(ValueError, match="no module file"):
        import_closure(["pkg.missing"], tmp_path / "pkg", "pkg")
