"""Run a test module again in a child pytest process with TRITON_INTERPRET=1 (tests only).

TRITON_INTERPRET must be set before `triton.jit` decorates a kernel, i.e. before its module is first imported, and
other test modules import the kernels in the main pytest process. So a kernel test module holds, in the main
process, one test that calls `run_under_interpreter(__file__)`, and its kernel checks in the branch that the child
(TRITON_INTERPRET=1) collects.
"""

from __future__ import annotations

import os
import subprocess
import sys


def run_under_interpreter(test_file: str, timeout: float = 600, select: str | None = None) -> None:
    """Fail with the child's report unless every test of `test_file` (those matching the `-k` expression `select`)
    passes under the Triton interpreter."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file]
    cmd += ["-k", select] if select else []
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "failed" not in result.stdout
