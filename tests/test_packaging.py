"""Each library builds alone and works in a clean virtual environment with only what it declares.

For each package: ``uv build --package``, a fresh venv, its wheel (plus the wheels of the Forge
siblings it declares) installed with versions pinned to ``uv.lock``, then it must import, its
undeclared siblings must be absent, and a small program using it must run. forge-kernels then
runs its own test suite there (with pytest added), outside the repository, less its sm90
compile checks, which test the locked Triton compiler, not the install. Slow (a venv with torch
each; the uv cache makes it seconds, not downloads): marked ``packaging``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ALL_IMPORTS = [
    "forge_core",
    "forge_kernels",
    "forge_parallel",
    "forge_models",
    "forge_data",
    "forge_ckpt",
    "forge_xpu",
]

# distribution -> (Forge wheels to install, import name, a program that must run there)
# Packages whose own tests run in their clean venv: extra requirements and pytest arguments.
OWN_TESTS = {
    # The sm90 compile checks (~40 s) run in the workspace suite only: they exercise Triton's
    # compiler, the same locked version here, not what the clean venv installs.
    "forge-kernels": (["pytest"], ["-m", "not gpu and not sm90_compile"]),
}
# forge-ml-core's own suite is not rerun in its clean venv (it was ~50 s of CI): the workspace
# suite runs it, CI runs it again on the oldest supported torch, and the import and the program
# below show the wheel works without its undeclared siblings.
# Extras installed with a package's own wheel (so the program can use them).
EXTRAS = {"forge-data": "[video]"}
PACKAGE_FOLDERS = {"forge-kernels": "forge-kernels"}
PYTEST_INI = """[pytest]
addopts = -p no:cacheprovider --import-mode=importlib
markers =
    gpu: needs a CUDA device
    multiprocess: uses the worker pool
    packaging: builds wheels
    sm90_compile: compiles Triton kernels for Hopper without a GPU
"""
CASES = {
    "forge-kernels": (
        ["forge-kernels"],
        "forge_kernels",
        """
        import torch, forge_kernels
        from forge_kernels import registry
        assert registry.list_ops(), "no kernel ops registered"
        print("ops:", ", ".join(registry.list_ops()))
        """,
    ),
    "forge-ml-core": (
        ["forge-ml-core"],
        "forge_core",
        """
        import torch
        from forge_core import ParallelDims, init_distributed, shutdown_distributed
        from forge_core.collectives import all_reduce
        env = init_distributed()
        mesh = ParallelDims(world_size=1).build_mesh()
        x = torch.ones(3, requires_grad=True)
        all_reduce(x, group=mesh["dp"]).sum().backward()
        assert x.grad.tolist() == [1.0, 1.0, 1.0]
        shutdown_distributed()
        print("forge_core ok")
        """,
    ),
    "forge-parallel": (
        ["forge-parallel", "forge-ml-core"],
        "forge_parallel",
        """
        import forge_parallel, forge_core
        print("forge_parallel ok")
        """,
    ),
    "forge-data": (
        ["forge-data"],
        "forge_data",
        """
        import io
        import av, numpy as np
        from forge_data import balance_step_documents, decode_video
        buf = io.BytesIO()
        with av.open(buf, "w", format="mp4") as out:
            s = out.add_stream("libx264", rate=6)
            s.width, s.height, s.pix_fmt = 16, 16, "yuv420p"
            for i in range(12):
                frame = np.full((16, 16, 3), 20 * i, np.uint8)
                out.mux(s.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            out.mux(s.encode())
        video = decode_video(buf.getvalue())  # 2 of the 6 frames per second
        assert video.indices.tolist() == [0, 3, 6, 9], video.indices
        lengths = np.random.default_rng(0).integers(1, 128, 256)  # 4 per row of 512
        rows, layout, report = balance_step_documents(
            np.arange(256) // 4, lengths, lengths + 50.0 * (lengths < 16), n_rows=64,
            seq_len=512, dp_size=8, micro_batches=2,
        )
        assert report.balanced <= report.naive
        print("forge_data ok", report)
        """,
    ),
}


def _uv() -> str:
    uv = shutil.which("uv")
    if uv is None:
        pytest.skip("uv is not on PATH")
    return uv


def _run(*cmd: str, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900, **kwargs)
    assert result.returncode == 0, (
        f"{' '.join(cmd)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    )
    return result


def _pip_install(python: Path, constraints: Path, *requirements: str) -> None:
    """Install into the venv of ``python`` with versions pinned to the lock."""
    _run(
        _uv(),
        "pip",
        "install",
        "--quiet",
        "--python",
        str(python),
        "--constraint",
        str(constraints),
        *requirements,
    )


@pytest.fixture(scope="module")
def built_wheels(tmp_path_factory) -> dict[str, Path]:
    uv = _uv()
    out = tmp_path_factory.mktemp("wheels")
    names = sorted({dist for wheels, _, _ in CASES.values() for dist in wheels})
    wheels = {}
    for name in names:
        _run(uv, "build", "--package", name, "--wheel", "--out-dir", str(out / name), cwd=ROOT)
        (wheel,) = (out / name).glob("*.whl")
        wheels[name] = wheel
    return wheels


@pytest.fixture(scope="module")
def lock_constraints(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("constraints") / "constraints.txt"
    result = _run(
        _uv(), "export", "--frozen", "--no-hashes", "--no-emit-workspace", "--no-dev", cwd=ROOT
    )
    path.write_text(result.stdout)
    return path


@pytest.mark.packaging
@pytest.mark.parametrize("dist_name", list(CASES))
def test_wheel_installs_and_imports_alone(dist_name, built_wheels, lock_constraints, tmp_path):
    wheels, import_name, program = CASES[dist_name]
    uv = _uv()
    venv = tmp_path / "venv"
    _run(uv, "venv", "--quiet", "--python", sys.executable, str(venv))
    python = venv / "bin" / "python"
    _pip_install(
        python,
        lock_constraints,
        *[str(built_wheels[w]) + (EXTRAS.get(w, "") if w == dist_name else "") for w in wheels],
    )
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "VIRTUAL_ENV"}}
    installed = {w.replace("forge-ml-core", "forge_core").replace("-", "_") for w in wheels}
    absent = [m for m in ALL_IMPORTS if m not in installed]
    check = (
        "import importlib.util, sys\n"
        f"present = [m for m in {absent!r} if importlib.util.find_spec(m) is not None]\n"
        "assert not present, f'undeclared siblings importable: {present}'\n"
        f"import {import_name}\n"
        f"assert {import_name}.__file__.startswith({str(venv)!r}), {import_name}.__file__\n"
    )
    imported = _run(str(python), "-c", check, env=env, cwd=tmp_path)
    assert "Warning" not in imported.stderr, f"importing {import_name} warns:\n{imported.stderr}"
    result = _run(str(python), "-c", textwrap.dedent(program), env=env, cwd=tmp_path)
    assert result.stdout.strip()
    if dist_name in OWN_TESTS:
        requirements, pytest_args = OWN_TESTS[dist_name]
        _pip_install(python, lock_constraints, *requirements)
        suite = tmp_path / "suite"
        package = ROOT / "packages" / PACKAGE_FOLDERS[dist_name]
        shutil.copytree(package / "tests", suite / "tests")
        shutil.copy(
            package / "pyproject.toml", suite / "pyproject.toml"
        )  # the version test reads it
        (suite / "pytest.ini").write_text(PYTEST_INI)
        env["TRITON_INTERPRET"] = "1"  # no GPU here: the Triton kernels run interpreted
        tests = _run(str(python), "-m", "pytest", "-q", "tests", *pytest_args, env=env, cwd=suite)
        assert " passed" in tests.stdout
