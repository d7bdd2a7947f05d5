"""Every importable module lives under ``omnifast/``: a folder at the repository root with a
package's name would shadow that package (``kernels``, which transformers imports) whenever the
root is on ``sys.path``, as it is under ``python -m pytest`` or ``python -m omnifast.cli``."""
import importlib.util
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_the_only_packages_at_the_root_are_omnifast_and_tests():
    packages = {entry.name for entry in ROOT.iterdir() if (entry / "__init__.py").exists()}
    modules = {entry.name for entry in ROOT.glob("*.py")} - {"setup.py"}
    assert packages == {"omnifast", "tests"} and not modules, (packages, modules)


def test_kernels_is_the_installed_package_not_a_folder_here():
    spec = importlib.util.find_spec("kernels")
    if spec is None:
        pytest.skip("the kernels package is not installed (transformers before 5.25 does not need it)")
    site_packages = Path(sysconfig.get_path("purelib")).resolve()
    assert site_packages in Path(spec.origin).resolve().parents, spec.origin
