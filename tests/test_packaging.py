"""The distributions as users get them.

`python -m build` makes the sdist from a copy of the source tree and the wheel from that
sdist. The tests check what each holds and that the version has one source, then install
the wheel into a clean virtual environment (no system site packages, dependencies from
the package index as pip is configured here) and, from outside the repository, run the
README's quickstart and a typed user program, and type-check that program with
`mypy --strict` against the installed package (which proves py.typed and the typed
generated stubs ship).
"""

from __future__ import annotations

import email.parser
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import tomllib
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import poolkit

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

# What a clone has that a build should not see: caches, environments, earlier builds.
NOT_SOURCE = shutil.ignore_patterns(
    ".git", ".venv", "venv", "__pycache__", "*.py[cod]", "*.egg-info", "build", "dist", ".*_cache", ".hypothesis"
)
# A user of the typed API installs the stubs of the libraries it exposes, as here.
TYPING_STUBS = ["grpc-stubs", "types-protobuf"]


def _readme_quickstart() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.partition("\n## Quickstart\n")[2].partition("\n## ")[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)


QUICKSTARTS = {f"README-quickstart-{n}": code for n, code in enumerate(_readme_quickstart(), 1)} | {
    f"examples/{path.name}": path.read_text(encoding="utf-8")
    for path in sorted((ROOT / "examples").glob("quickstart_*.py"))
}


@dataclass(frozen=True)
class Built:
    source: Path  # the copy of the source tree the sdist was built from
    sdist: Path
    wheel: Path


@dataclass(frozen=True)
class Installed:
    python: Path  # the clean environment's interpreter
    prefix: Path
    workdir: Path  # outside the repository, so `import poolkit` finds the installed wheel
    env: dict[str, str]


def _run(*args: str | Path, cwd: Path, env: dict[str, str] | None = None, timeout: float = 180) -> str:
    result = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert result.returncode == 0, f"{args}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    """One directory for the module's builds and environment, removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="poolkit-packaging-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def built(scratch: Path) -> Built:
    source = scratch / "source"
    shutil.copytree(ROOT, source, ignore=NOT_SOURCE)
    _run(sys.executable, "-m", "build", "--outdir", scratch / "dist", source, cwd=scratch)
    (sdist,) = (scratch / "dist").glob("*.tar.gz")
    (wheel,) = (scratch / "dist").glob("*.whl")
    return Built(source=source, sdist=sdist, wheel=wheel)


@pytest.fixture(scope="module")
def installed(scratch: Path, built: Built) -> Installed:
    prefix = scratch / "venv"
    _run(sys.executable, "-m", "venv", prefix, cwd=scratch)
    python = prefix / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"}}
    started = time.perf_counter()
    _run(python, "-m", "pip", "install", "--quiet", built.wheel, *TYPING_STUBS, cwd=scratch, env=env, timeout=240)
    print(f"pip install of the wheel and its dependencies: {time.perf_counter() - started:.1f} s")
    workdir = scratch / "work"
    workdir.mkdir()
    return Installed(python=python, prefix=prefix, workdir=workdir, env=env)


def _package_files(source: Path) -> set[str]:
    """The files under src/ the wheel must carry: modules, stubs, py.typed."""
    src = source / "src"
    return {
        path.relative_to(src).as_posix()
        for path in (src / "poolkit").rglob("*")
        if path.suffix in {".py", ".pyi", ".typed"} and "__pycache__" not in path.parts
    }


def test_wheel_holds_the_package_and_nothing_else(built: Built) -> None:
    names = set(zipfile.ZipFile(built.wheel).namelist())
    package = {n for n in names if not n.startswith("poolkit-")}
    assert package == _package_files(built.source)
    assert {
        "poolkit/py.typed",
        "poolkit/_proto/__init__.py",
        "poolkit/_proto/echo_pb2.py",
        "poolkit/_proto/echo_pb2.pyi",
        "poolkit/_proto/echo_pb2_grpc.py",
        "poolkit/_proto/echo_pb2_grpc.pyi",
    } <= package
    info = {n.split("/", 1)[1] for n in names - package}
    assert {"METADATA", "WHEEL", "RECORD", "entry_points.txt"} <= info
    licenses = {p.name for p in built.source.glob("LICEN[CS]E*")}
    assert licenses == {"LICENSE"}  # Apache-2.0, as pyproject's license says
    assert {f"licenses/{name}" for name in licenses} <= info


def test_sdist_holds_the_source(built: Built) -> None:
    with tarfile.open(built.sdist) as sdist:
        top = sdist.getnames()[0].split("/")[0]
        names = {n.partition("/")[2] for n in sdist.getnames()}
    wanted = {
        "PKG-INFO",
        "pyproject.toml",
        "README.md",
        "CHANGELOG.md",
        "MANIFEST.in",
        "protos/echo.proto",
        "scripts/gen_protos.py",
        "tests/conftest.py",
        "tests/typing_user_program.py",
        "examples/quickstart_sync.py",
        "benchmarks/bench.py",
        *(p.name for p in built.source.glob("LICEN[CS]E*")),
        *(f"src/{name}" for name in _package_files(built.source)),
    }
    assert wanted <= names, sorted(wanted - names)
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc") or n.startswith((".git", ".venv"))]
    assert top == f"poolkit-{poolkit.__version__}"


def test_version_has_one_source(built: Built) -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert "version" in project["project"]["dynamic"]
    assert "version" not in project["project"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "poolkit._version.__version__"}

    version = poolkit.__version__
    with zipfile.ZipFile(built.wheel) as wheel:
        metadata = email.parser.Parser().parsestr(wheel.read(f"poolkit-{version}.dist-info/METADATA").decode())
    with tarfile.open(built.sdist) as sdist:
        member = sdist.extractfile(f"poolkit-{version}/PKG-INFO")
        assert member is not None
        pkg_info = email.parser.Parser().parsestr(member.read().decode())
    assert metadata["Version"] == pkg_info["Version"] == version
    assert built.wheel.name == f"poolkit-{version}-py3-none-any.whl"


def test_installed_wheel_is_what_imports(installed: Installed) -> None:
    probe = (
        "import json, poolkit, poolkit.aio, poolkit.testing; print(json.dumps([poolkit.__file__, poolkit.__version__]))"
    )
    location, version = json.loads(_run(installed.python, "-c", probe, cwd=installed.workdir, env=installed.env))
    assert Path(location).is_relative_to(installed.prefix), location
    assert version == poolkit.__version__
    command = _run(installed.prefix / "bin" / "poolkit", "--version", cwd=installed.workdir, env=installed.env)
    assert command.strip() == f"poolkit {poolkit.__version__}"


def test_readme_has_a_quickstart() -> None:
    assert any(name.startswith("README") for name in QUICKSTARTS), "no ```python block under '## Quickstart'"


@pytest.mark.parametrize("name", sorted(QUICKSTARTS))
def test_quickstart_runs_on_the_installed_wheel(installed: Installed, name: str) -> None:
    script = installed.workdir / f"{name.replace('/', '_').removesuffix('.py')}.py"
    script.write_text(QUICKSTARTS[name], encoding="utf-8")
    assert _run(installed.python, script, cwd=installed.workdir, env=installed.env, timeout=60).strip()


# Types that must not pass: if poolkit were untyped (Any) to mypy, they would.
MISUSE = """\
import poolkit

poolkit.PoolConfig(connections_per_endpoint="2")
poolkit.insecure_channel(50051)
"""


def test_user_program_type_checks_strictly_against_the_installed_wheel(installed: Installed) -> None:
    program = shutil.copy(ROOT / "tests" / "typing_user_program.py", installed.workdir)
    misuse = installed.workdir / "misuse.py"
    misuse.write_text(MISUSE, encoding="utf-8")
    config = installed.workdir / "mypy.ini"
    config.write_text("[mypy]\n", encoding="utf-8")  # not the repository's, nor one above /tmp
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--config-file",
            str(config),
            "--cache-dir",
            str(installed.workdir / ".mypy_cache"),
            "--python-executable",
            str(installed.python),
            str(program),
            str(misuse),
        ],
        cwd=installed.workdir,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    errors = [line for line in result.stdout.splitlines() if ": error:" in line]
    assert {line.split(":")[0] for line in errors} == {"misuse.py"}, result.stdout + result.stderr
    assert {line.split(":")[1] for line in errors} == {"3", "4"}, result.stdout


def test_user_program_runs_on_the_installed_wheel(installed: Installed) -> None:
    program = shutil.copy(ROOT / "tests" / "typing_user_program.py", installed.workdir)
    output = _run(installed.python, program, cwd=installed.workdir, env=installed.env, timeout=60)
    assert f"from {installed.prefix}" in output, output
    assert "refused: connections_per_endpoint" in output, output
    assert "after close(): UNAVAILABLE from poolkit" in output, output
    assert "with no endpoint: UNAVAILABLE from poolkit" in output, output
