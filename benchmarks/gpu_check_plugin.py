"""The pytest plugin of gpu-check's parity part (``pytest -p benchmarks.gpu_check_plugin
-m gpu_check``): the tests marked ``gpu_check(rank)`` run lowest rank first, and after every test
the controlling process (not an xdist worker) rewrites the JSON file named by
``OMNIFAST_GPU_CHECK_PARITY`` with every result so far, so a run cut short keeps what finished."""

from __future__ import annotations

import json
import os
import time
from typing import Dict

import pytest

PARITY_VARIABLE = "OMNIFAST_GPU_CHECK_PARITY"
_state: Dict[str, object] = {}


def rank(item) -> int:
    marker = item.get_closest_marker("gpu_check")
    return marker.args[0] if marker is not None and marker.args else 99


def pytest_configure(config):
    _state.update(config=config, tests={}, started=time.monotonic(), collected=None, specialisations=set())


def pytest_collection_modifyitems(session, config, items):
    items.sort(key=rank)  # stable: the file order within a rank


def pytest_collection_finish(session):
    _state["collected"] = len(session.items)


def _launched() -> set:
    """The Triton specialisations this process launched (``tests/conftest.py`` records them)."""
    from omnifast.kernels import _launch

    return {json.dumps(spec, sort_keys=True) for spec in _launch.recorded()}


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):  # an xdist worker finished: its launches join the count
    _state["specialisations"] |= set(getattr(node, "workeroutput", {}).get("specialisations", ()))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_node_collection_finished(node, ids):  # the controller of an xdist run collects nothing itself
    _state["collected"] = len(ids)


def _controller() -> bool:
    return not hasattr(_state.get("config"), "workerinput")


def _write(extra=None) -> None:
    target = os.environ.get(PARITY_VARIABLE)
    if not target or not _controller():
        return
    from ._harness import write_json

    payload = {
        "tests": _state["tests"],
        "collected": _state["collected"],
        "specialisations": len(_state["specialisations"] | _launched()),
        "seconds": time.monotonic() - _state["started"],
        **(extra or {}),
    }
    write_json(target, payload, default=str)


def pytest_runtest_logreport(report) -> None:
    if report.when != "call" and report.passed:
        return
    entry = _state["tests"].setdefault(
        report.nodeid.split("[")[0], {"passed": 0, "failed": 0, "skipped": 0, "seconds": 0.0, "failures": []}
    )
    entry["seconds"] += report.duration
    entry[report.outcome] += 1
    if report.failed:
        entry["failures"].append(f"{report.nodeid.split('::')[-1]} ({report.when}): {str(report.longrepr)[-400:]}")
    _write()


def pytest_sessionfinish(session, exitstatus):
    if not _controller():
        session.config.workeroutput["specialisations"] = sorted(_launched())
        return
    _write({"pytest_returncode": int(exitstatus)})
    specs = os.environ.get("OMNIFAST_GPU_CHECK_SPECS")  # gpu_check_specialisations.py asks for the list
    if specs:
        with open(specs, "w") as handle:
            json.dump([json.loads(key) for key in sorted(_state["specialisations"] | _launched())], handle)
