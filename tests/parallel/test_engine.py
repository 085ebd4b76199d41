"""parallel.engine: process-group lifetime."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.runs import REPO, rank_env

CHILD = textwrap.dedent(
    """
    import atexit
    import torch.distributed as dist
    from parallel.engine import init_distributed

    # atexit runs handlers last-in first-out: this one runs after any init_distributed registers
    atexit.register(lambda: print("initialized at exit:", dist.is_initialized(), flush=True))
    rank, world = init_distributed()
    print("rank", rank, "of", world, "initialized:", dist.is_initialized(), flush=True)
    """
)


def test_the_process_group_is_destroyed_before_the_interpreter_exits():
    """A gloo group left to the C++ static destructors makes ranks abort at exit now and then
    (exit -6 after finishing their work); init_distributed destroys it in an atexit hook."""
    env = {k: v for k, v in rank_env().items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    result = subprocess.run([sys.executable, "-c", CHILD], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "rank 0 of 1 initialized: True" in result.stdout, result.stdout
    assert "initialized at exit: False" in result.stdout, result.stdout
