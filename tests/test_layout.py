"""The repository root holds the package ``omnifast``, the ``tests`` and the ``benchmarks``
scripts (a folder without ``__init__.py``, run from a checkout as ``python -m benchmarks.<op>``,
not installed). Nothing else there may look like a package: a folder at the root with a package's
name would shadow that package whenever the root is on ``sys.path`` (as under ``python -m
pytest``): a top-level ``kernels/`` did, hiding the ``kernels`` package transformers imports."""

import importlib.util
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_the_only_packages_at_the_root_are_omnifast_tests_and_the_benchmark_scripts():
    packages = {entry.name for entry in ROOT.iterdir() if (entry / "__init__.py").exists()}
    modules = {entry.name for entry in ROOT.glob("*.py")} - {"setup.py"}
    assert packages == {"omnifast", "tests"} and not modules, (packages, modules)
    scripts = {entry.name for entry in ROOT.iterdir() if entry.is_dir() and any(entry.glob("*.py"))}
    assert scripts == {"omnifast", "tests", "benchmarks"}, scripts
    assert not (ROOT / "benchmarks" / "__init__.py").exists()  # scripts, not a package of the wheel
    assert importlib.util.find_spec("benchmarks").origin is None  # a namespace: it shadows nothing installed


def test_kernels_is_the_installed_package_not_a_folder_here():
    spec = importlib.util.find_spec("kernels")
    if spec is None:
        pytest.skip("the kernels package is not installed (transformers before 5.25 does not need it)")
    site_packages = Path(sysconfig.get_path("purelib")).resolve()
    assert site_packages in Path(spec.origin).resolve().parents, spec.origin
