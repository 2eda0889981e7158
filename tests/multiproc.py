"""Run a function in N gloo processes on CPU and collect each rank's return value (tests only).

`fn(rank, world_size, *args)` must be a module-level function (spawned processes import it by name). The process
group is initialised before `fn` runs and destroyed after a final barrier. An exception in any rank is re-raised
here with that rank's traceback; a rank that does not finish within `timeout` seconds fails the test (the default leaves
room for a loaded 2-core machine, where two ranks' imports alone can take a minute).
"""

from __future__ import annotations

import os
import pickle
import queue
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from parallel.mesh import free_port


def _worker(fn: Callable[..., Any], rank: int, world_size: int, port: int, args: tuple, results: Any) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)  # 2 ranks on 2 cores
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        out = fn(rank, world_size, *args)
        dist.barrier()  # nobody tears down gloo while a peer is still communicating
        # Plain pickle bytes: tensors sent through a torch queue live in shared memory owned by this process.
        results.put((rank, True, pickle.dumps(out)))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_multiproc(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 240.0) -> list[Any]:
    """`[fn(0, world_size, *args), ..., fn(world_size - 1, ...)]`, each computed in its own process."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(fn, r, world_size, port, args, results)) for r in range(world_size)]
    for p in procs:
        p.start()
    outputs: dict[int, Any] = {}
    errors: list[str] = []
    try:
        for _ in range(world_size):
            try:
                rank, ok, value = results.get(timeout=timeout)
            except queue.Empty:
                missing = sorted(set(range(world_size)) - set(outputs))
                raise TimeoutError(f"rank(s) {missing} of {fn.__name__} did not finish in {timeout:.0f} s") from None
            if ok:
                outputs[rank] = pickle.loads(value)
            else:
                errors.append(f"--- rank {rank} ---\n{value}")
                break  # the peers are likely blocked in a collective; don't wait for them
    finally:
        for p in procs:
            p.join(timeout=5 if not errors else 0.5)
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        raise RuntimeError(f"{fn.__name__} failed:\n" + "\n".join(errors))
    return [outputs[r] for r in range(world_size)]
