"""The dependency graph of ../shared/ARCHITECTURE.md, enforced on every import of every package.

For each package and app, three checks:

1. Its ``pyproject.toml`` declares exactly the Forge siblings the architecture allows
   (required ones as dependencies, optional ones as extras).
2. Every ``import`` in its source (including those inside functions) names the standard library,
   the package itself, or a distribution its ``pyproject.toml`` declares.
3. Module-level imports name only *required* dependencies: optional extras (flash-attn, vendor
   runtimes, forge-core for forge-data/forge-ckpt) must be imported lazily, inside the function
   that needs them or under ``try/except ImportError`` / ``if TYPE_CHECKING``.
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# ARCHITECTURE.md "Dependency graph": allowed Forge siblings, required and optional.
GRAPH: dict[str, tuple[set[str], set[str]]] = {
    "forge-kernels": (set(), set()),
    "forge-ml-core": (set(), set()),
    "forge-parallel": ({"forge-ml-core"}, set()),
    "forge-models": ({"forge-ml-core", "forge-kernels", "forge-ckpt"}, set()),
    "forge-data": (set(), {"forge-ml-core"}),
    "forge-ckpt": (set(), {"forge-ml-core"}),
    "forge-xpu": ({"forge-ml-core", "forge-kernels"}, set()),
}
FORGE_IMPORTS = {
    "forge_core": "forge-ml-core",
    "forge_kernels": "forge-kernels",
    "forge_parallel": "forge-parallel",
    "forge_models": "forge-models",
    "forge_data": "forge-data",
    "forge_ckpt": "forge-ckpt",
    "forge_xpu": "forge-xpu",
    "forge_train": "forge-train",
}
# Import names whose distribution name is not the import name with "_" -> "-".
IMPORT_ALIASES = {
    "yaml": "pyyaml",
    "transformer_engine": "transformer-engine-cu13",
    "megatron": "megatron-core",
    "PIL": "pillow",
    "google": "protobuf",
    "hydra": "hydra-core",
    "sklearn": "scikit-learn",
    "skimage": "scikit-image",
    "cv2": "opencv-python",
}
# Modules only ever imported by a host that provides the (declared, optional) dependency, so
# they may import it at module level: a pytest plugin is loaded by pytest.
HOSTED_MODULES = {
    "packages/forge-core/src/forge_core/testing/pytest_plugin.py": {"pytest"},
}


@dataclass(frozen=True)
class Project:
    folder: Path
    name: str
    required: set[str]
    optional: set[str]


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(spec: str) -> str:
    return _normalize(re.split(r"[\s<>=!~;\[(]", spec.strip(), maxsplit=1)[0])


def _projects() -> list[Project]:
    projects = []
    for pyproject in sorted(
        [*ROOT.glob("packages/*/pyproject.toml"), *ROOT.glob("apps/*/pyproject.toml")]
    ):
        data = tomllib.loads(pyproject.read_text())["project"]
        required = {_requirement_name(d) for d in data.get("dependencies", [])}
        optional = {
            _requirement_name(d)
            for deps in data.get("optional-dependencies", {}).values()
            for d in deps
        }
        projects.append(Project(pyproject.parent, _normalize(data["name"]), required, optional))
    return projects


PROJECTS = _projects()


def _is_lazy_context(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            return True
        if isinstance(node, ast.Try) and any(
            isinstance(h.type, ast.Name) and h.type.id in {"ImportError", "ModuleNotFoundError"}
            for h in node.handlers
        ):
            return True
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def _imports(path: Path) -> list[tuple[str, bool, int]]:
    """(top-level module name, imported lazily?, line) for every absolute import in ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            found.append((name.split(".")[0], _is_lazy_context(node, parents), node.lineno))
    return found


def _distribution_of(module: str) -> str | None:
    """The distribution providing ``module``, or None for the standard library."""
    if module in sys.stdlib_module_names or module == "__future__":
        return None
    if module in FORGE_IMPORTS:
        return FORGE_IMPORTS[module]
    return _normalize(IMPORT_ALIASES.get(module, module))


@pytest.mark.parametrize("project", [p for p in PROJECTS if p.name in GRAPH], ids=lambda p: p.name)
def test_declared_siblings_match_the_architecture(project):
    allowed_required, allowed_optional = GRAPH[project.name]
    forge = set(FORGE_IMPORTS.values())
    assert project.required & forge == allowed_required
    assert project.optional & forge <= allowed_optional


def test_every_package_is_in_the_graph():
    names = {p.name for p in PROJECTS if p.folder.parent.name == "packages"}
    assert names == set(GRAPH)


def test_no_library_depends_on_an_app():
    apps = {p.name for p in PROJECTS if p.folder.parent.name == "apps"}
    for project in PROJECTS:
        if project.folder.parent.name == "packages":
            assert not (project.required | project.optional) & apps, project.name


@pytest.mark.parametrize("project", PROJECTS, ids=lambda p: p.name)
def test_every_import_is_declared_and_optional_ones_are_lazy(project):
    own = {path.name for path in (project.folder / "src").iterdir() if path.is_dir()}
    problems = []
    for path in sorted((project.folder / "src").rglob("*.py")):
        relative = path.relative_to(ROOT).as_posix()
        hosted = HOSTED_MODULES.get(relative, set())
        for module, lazy, line in _imports(path):
            if module in own:
                continue
            dist = _distribution_of(module)
            if dist is None:
                continue
            where = f"{relative}:{line} imports {module}"
            if dist not in project.required | project.optional:
                problems.append(f"{where}, but {project.name} does not declare {dist}")
            elif dist not in project.required and not lazy and module not in hosted:
                problems.append(
                    f"{where} at module level, but {dist} is an optional extra: import it lazily"
                )
    assert not problems, "\n".join(problems)


def test_the_checker_catches_a_forbidden_import(tmp_path):
    """The check above must be able to fail: a forge-kernels file importing forge_core."""
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import torch\nfrom forge_core import collectives\n\ndef f():\n    import flash_attn\n"
    )
    imports = _imports(bad)
    kernels = next(p for p in PROJECTS if p.name == "forge-kernels")
    assert ("forge_core", False, 2) in imports
    assert ("flash_attn", True, 5) in imports
    assert _distribution_of("forge_core") not in kernels.required | kernels.optional
    assert _distribution_of("flash_attn") in kernels.optional
