"""Build step (everything else is in pyproject.toml): a wheel carries the bundled rule set with the seeds and
fixtures it cites (the repository's top-level rules/, seeds/ and fhir_fixtures/) as package data under
nudges/_bundled/, where nudges.settings.BUNDLED_RULES finds them when nudges is installed rather than cloned."""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
BUNDLED = ("rules", "seeds", "fhir_fixtures")  # siblings, so ruleset.yaml's relative seeds:/fixtures: still hold


class BuildWithRules(build_py):
    def run(self) -> None:
        super().run()
        target = Path(self.build_lib) / "nudges" / "_bundled"
        shutil.rmtree(target, ignore_errors=True)  # a file removed from the repository must not linger in the wheel
        for name in BUNDLED:
            if (ROOT / name).is_dir():
                shutil.copytree(ROOT / name, target / name, dirs_exist_ok=True,
                                ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


setup(cmdclass={"build_py": BuildWithRules})
