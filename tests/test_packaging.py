"""A packaged install (`pip install .`, not editable, outside the clone) finds its bundled rules, with the
seeds and fixtures they need, its migrations and its /docs assets.

The wheel is built once for the module, without build isolation (setuptools and wheel come with the test
extra, so nothing is downloaded), and installed without dependencies into a fresh virtual environment
that borrows this one's site-packages through a .pth line (which, unlike a site folder, does not run this
environment's editable-install hook, so `import nudges` can only find the installed copy)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import venv
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from helpers import wait_ready

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.packaging


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    source = tmp_path_factory.mktemp("source") / "nudges"  # a copy: the build leaves nothing in the clone
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", "*.db"))
    env = {**os.environ, "PIP_NO_INPUT": "1"}
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                    "--wheel-dir", str(out), str(source)], check=True, cwd=source, env=env, timeout=300)
    (found,) = out.glob("nudges-*.whl")
    return found


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The python of a fresh environment holding only the wheel (dependencies borrowed, see above)."""
    home = tmp_path_factory.mktemp("venv")
    venv.EnvBuilder(with_pip=False).create(home)
    python = home / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "borrowed-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--quiet",
                    "--no-index", str(wheel)], check=True, timeout=300)
    yield python


def run(python: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("NUDGES_RULES", "PYTHONPATH")}
    return subprocess.run([str(python), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_the_wheel_carries_rules_seeds_fixtures_migrations_and_docs(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in ("nudges/_bundled/rules/ruleset.yaml", "nudges/_bundled/seeds/evidence.yaml",
                   "nudges/_bundled/rules/cardiology/troponin-without-cath-plan.cases.yaml",
                   "nudges/_bundled/fhir_fixtures/calls/patient-view-troponin.json",
                   "nudges/migrations/versions/0001_initial.py", "nudges/api/static/swagger-ui/swagger-ui-bundle.js",
                   "nudges/api/static/swagger-ui/LICENSE"):
        assert needed in names, needed
    shipped = {p.relative_to(ROOT).as_posix() for folder in ("rules", "seeds", "fhir_fixtures")
               for p in (ROOT / folder).rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    assert {f"nudges/_bundled/{name}" for name in shipped} <= names  # every file, none forgotten


def test_an_installed_copy_finds_and_passes_its_bundled_rules(installed: Path, tmp_path: Path) -> None:
    where = run(installed, "-c", "import nudges, nudges.settings as s; print(nudges.__file__); "
                                 "print(s.BUNDLED_RULES)", cwd=tmp_path)
    package, rules = where.stdout.split()
    assert not Path(package).is_relative_to(ROOT), "imported the clone, not the installed copy"
    assert Path(rules) == Path(package).parent / "_bundled" / "rules"
    lint = run(installed, "-m", "nudges", "lint", cwd=tmp_path)
    assert lint.returncode == 0 and lint.stdout.splitlines()[-1].startswith("ok: "), lint.stdout + lint.stderr
    test = run(installed, "-m", "nudges", "test", cwd=tmp_path)
    assert test.returncode == 0 and ", 0 failed" in test.stdout.splitlines()[-1], test.stdout[-2000:] + test.stderr


def test_an_installed_copy_serves_its_rules_migrations_and_docs(installed: Path, tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("NUDGES_RULES", "PYTHONPATH")}
    env["NUDGES_NOW"] = "2026-03-02T12:00:00Z"
    server = subprocess.Popen([str(installed), "-m", "nudges", "serve", "--port", str(port)], cwd=tmp_path, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, server)
        call = (ROOT / "fhir_fixtures" / "calls" / "patient-view-troponin.json").read_bytes()
        cards = httpx.post(f"{base}/cds-services/nudges-patient-view", content=call,
                           headers={"Content-Type": "application/json"}).json()["cards"]
        assert any("14 h ago" in card["summary"] for card in cards)
        assert httpx.get(f"{base}/docs/assets/swagger-ui.css").status_code == 200
        assert (tmp_path / "nudges.db").is_file()  # migrated from the installed migrations
    finally:
        server.terminate()
        server.communicate(timeout=30)
