"""The READMEs' code blocks stay true beyond the usage examples (``test_readme_examples.py``
runs those): every Python block parses, every name a block imports from a Forge package
exists, every link resolves, forge-train's preset table lists the presets the app ships, and
forge-core's test-harness example collects in a user's project under ``--strict-markers``.

All of it is static or one short collection run, so the file stays a few seconds; the blocks
with free variables (``model``, ``loader``) or real checkpoints are checked by name, not run.
"""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[1]
READMES = [
    ROOT / "README.md",
    *sorted(ROOT.glob("packages/*/README.md")),
    *sorted(ROOT.glob("apps/*/README.md")),
    ROOT / "tools/device/README.md",
]
FENCE = re.compile(r"^( *)```(\w*)\n(.*?)^\1```", flags=re.S | re.M)


def _blocks(readme: Path, lang: str) -> list[tuple[int, str]]:
    """(line number, code) of each fenced block of ``lang`` in ``readme``."""
    text = readme.read_text()
    return [
        (text[: m.start()].count("\n") + 1, m.group(3))
        for m in FENCE.finditer(text)
        if m.group(2) == lang
    ]


def _ids(path: Path) -> str:
    return str(path.relative_to(ROOT))


@pytest.mark.parametrize("readme", READMES, ids=_ids)
def test_python_blocks_parse_and_import_existing_names(readme):
    """A renamed or removed API shows up here before a user copies the block."""
    problems = []
    for line, code in _blocks(readme, "python"):
        try:
            tree = ast.parse(code)
        except SyntaxError as err:
            problems.append(f"line {line + (err.lineno or 0)}: {err.msg}")
            continue
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom) or not (node.module or "").startswith("forge_"):
                continue
            module = importlib.import_module(node.module)
            for alias in node.names:
                if hasattr(module, alias.name):
                    continue
                try:  # a submodule imported by name
                    importlib.import_module(f"{node.module}.{alias.name}")
                except ImportError:
                    problems.append(f"block at line {line}: {node.module} has no {alias.name!r}")
    assert not problems, f"{_ids(readme)}: " + "; ".join(problems)


@pytest.mark.parametrize("readme", READMES, ids=_ids)
def test_relative_links_resolve(readme):
    text = readme.read_text()
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    broken = [t for t in targets if "://" not in t and not (readme.parent / t).exists()]
    assert not broken, f"{_ids(readme)} links to missing files: {broken}"


def test_train_readme_lists_every_preset_it_ships():
    """The presets table of apps/train/README.md names every preset of every group (what
    ``forge-train --help`` prints), and the README's commands pick only presets that exist."""
    conf = ROOT / "apps/train/src/forge_train/conf"
    readme = (ROOT / "apps/train/README.md").read_text()
    table = {
        m.group(1): set(re.findall(r"`([^`]+)`", m.group(2)))
        for m in re.finditer(r"^\| `(\w+)` +\|(.*)\|$", readme, flags=re.M)
    }
    shipped = {d.name: {p.stem for p in d.glob("*.yaml")} for d in conf.iterdir() if d.is_dir()}
    for group in ("model", "parallel", "data", "optim", "recipe"):
        missing = shipped[group] - table.get(group, set())
        assert not missing, f"apps/train/README.md's `{group}` row lacks presets {sorted(missing)}"
    commands = "\n".join(code for _, code in _blocks(ROOT / "apps/train/README.md", "bash"))
    for readme_path in READMES:
        commands += "\n" + "\n".join(
            re.findall(r"`(uv run [^`]*forge.train[^`]*)`", readme_path.read_text())
        )
    used = re.findall(r"(?<![.\w])(model|parallel|data|optim|recipe)=([\w.-]+)", commands)
    unknown = sorted({f"{g}={p}" for g, p in used if p not in shipped[g]})
    assert not unknown, f"README commands pick presets that do not exist: {unknown}"


def test_core_harness_example_collects_under_strict_markers(pytester):
    """forge-core's README: a user's conftest enables the plugin and its example test uses
    ``dist_pool``; the plugin marks it ``multiprocess``, which must be registered, or a
    project with ``--strict-markers`` fails at collection (collect only: no pool starts)."""
    readme = ROOT / "packages/forge-core/README.md"
    blocks = [code for _, code in _blocks(readme, "python")]
    pytester.makeconftest(next(b for b in blocks if b.strip().startswith("pytest_plugins")))
    pytester.makepyfile(test_example=next(b for b in blocks if "dist_pool" in b))
    result = pytester.runpytest_inprocess(
        "--collect-only", "--strict-markers", "-p", "no:cacheprovider", "-m", "not multiprocess",
        "-W", "error::pytest.PytestUnknownMarkWarning",
    )  # fmt: skip
    assert result.ret in (0, 5), result.stdout.str()[-2000:]
    result.stdout.fnmatch_lines(["*1 deselected*"])
