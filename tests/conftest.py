"""Suite-wide hooks: `gpu` tests skip without CUDA, and every test runs in its own copy of the process environment;
the `tiny_data` fixture.

A bare `pytest` (without `-m "not gpu"`) on a CPU machine must skip the GPU tests, not error in their first CUDA call.
In-process recipe runs call `init_distributed`, which writes RANK, WORLD_SIZE, MASTER_PORT, ... into os.environ and
leaves a process group behind; a later test that launches torchrun or a subprocess would inherit them and depend on the
test order. So each test gets the environment it started with back, and no process group outlives it.

Under pytest-xdist (`make test` runs `-n 2`): each worker and the processes its tests start use one thread (two workers
share the 2-core CI machine); `multiproc` tests take a lock shared by the workers, so two multi-process tests never run
at once and oversubscribe the cores (xdist's own `xdist_group` does not reach pytest 9's test ids); and the `slow` tests
start first, so none of them is the last thing left running on one worker while the other idles.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist


XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")  # set in xdist's worker processes only


def pytest_configure(config: pytest.Config) -> None:
    if XDIST_WORKER:
        torch.set_num_threads(1)
        os.environ["OMP_NUM_THREADS"] = "1"  # the scripts and torchrun launches the tests start inherit it


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if XDIST_WORKER:
        items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable: `slow` first, else as collected
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (marked gpu); run them on a GPU machine with `pytest -m gpu`")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def isolated_environment():
    saved = dict(os.environ)
    yield
    if dist.is_initialized():  # a run that raised mid-way leaves its group behind
        dist.destroy_process_group()
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(autouse=True)
def one_multiproc_test_at_a_time(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    if not XDIST_WORKER or request.node.get_closest_marker("multiproc") is None:
        yield
        return
    # Every worker's basetemp (pytest-N/popen-gwK) has the run's folder as its parent: one lock file per run.
    with open(tmp_path_factory.getbasetemp().parent / "multiproc.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        yield


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    """tools/make_tiny_data.py's dataset for the recipes' tiny overlay (tests/assets/tiny.toml), once per module."""
    out = tmp_path_factory.mktemp("tiny_data")
    tool = Path(__file__).resolve().parents[1] / "tools" / "make_tiny_data.py"
    subprocess.run([sys.executable, str(tool), "--out", str(out)], check=True, timeout=300)  # a script: run it
    return out
