"""``moe train`` under the deepspeed launcher: the runner's command line (one machine, or several
named by a hostfile), and staying with the launched ranks until they exit.

One machine: ``--nproc N`` ranks started by ``python -m deepspeed.launcher.runner --num_gpus N``.
Several: ``--hostfile FILE`` (MPI style, one ``HOST slots=N`` line per machine) hands the runner
``--hostfile``, ``--num_nodes`` (the first N hosts), ``--num_gpus`` (``--nproc``, ranks per
machine) and ``--master_addr``. The runner reaches the hosts with pdsh (passwordless ssh from this
machine to every host) and starts ``deepspeed.launcher.launch`` on each, which gives every rank
the ``RANK``/``LOCAL_RANK``/``WORLD_SIZE`` environment the job reads. (The runner's MPI and Slurm
backends start ranks without that environment, and its Slurm backend cannot start a module: they
are not offered.) Every rank, wherever it runs, executes ``python -m launch.train``
(:mod:`launch.train.job`).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections import OrderedDict
from pathlib import Path
from typing import Optional, Sequence

from moe.errors import UserError

MULTI_NODE_PORT = 29500
"""The rendezvous port when several machines take part and none is given (torch's default): a port
found free here says nothing about the first host."""
_HOST_LINE = re.compile(r"(\S+)\s+slots=(\d+)(?:\s.*)?")  # what the runner accepts


def read_hostfile(path: str | os.PathLike) -> "OrderedDict[str, int]":
    """The hosts of an MPI-style hostfile (``HOST slots=N`` per line; blank lines and ``#`` comments
    ignored), in order, with their slots. A missing, empty or malformed file is one
    :class:`UserError` naming the file and the line (the deepspeed runner itself would quietly
    train on this machine alone when the file is missing)."""
    path = Path(path).expanduser()
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise UserError(f"--hostfile {str(path)!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"--hostfile {str(path)!r} is unreadable: {err}") from None
    hosts: OrderedDict[str, int] = OrderedDict()
    for number, raw in enumerate(lines, 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = _HOST_LINE.fullmatch(line)
        if match is None:
            raise UserError(f"--hostfile {str(path)!r}, line {number}: {raw.strip()!r} is not 'HOST slots=N'")
        host, slots = match.group(1), int(match.group(2))
        if host in hosts:
            raise UserError(f"--hostfile {str(path)!r}, line {number}: host {host!r} is listed twice")
        if slots < 1:
            raise UserError(f"--hostfile {str(path)!r}, line {number}: host {host!r} has slots={slots}; expected >= 1")
        hosts[host] = slots
    if not hosts:
        raise UserError(f"--hostfile {str(path)!r} lists no host (expected lines such as 'worker-1 slots=8')")
    return hosts


def multi_node_world_size(hosts: "OrderedDict[str, int]", num_nodes: Optional[int], nproc: Optional[int]) -> int:
    """The number of ranks the runner will start on the first ``num_nodes`` hosts (all without it):
    ``nproc`` on each, or each host's slots without it. Asking for more nodes than the hostfile
    lists, or more ranks on a host than its slots, is a :class:`UserError`."""
    if num_nodes is not None and not 1 <= num_nodes <= len(hosts):
        raise UserError(f"--num-nodes {num_nodes} is invalid: the hostfile lists {len(hosts)} host(s)")
    used = list(hosts.items())[: num_nodes or len(hosts)]
    if nproc is None:
        return sum(slots for _, slots in used)
    if nproc < 1:
        raise UserError(f"--nproc must be >= 1, got {nproc}")
    short = [f"{host} (slots={slots})" for host, slots in used if slots < nproc]
    if short:
        raise UserError(f"--nproc {nproc} ranks per node is more than the hostfile gives {', '.join(short)}")
    return nproc * len(used)


def launcher_command(config: str, overrides: Sequence[str], *, nproc: Optional[int], master_port: int,
                     hostfile: Optional[str] = None, num_nodes: Optional[int] = None,
                     master_addr: Optional[str] = None,
                     resume_tag: Optional[str] = None, until_step: Optional[int] = None,
                     python: str = sys.executable) -> list[str]:
    """The deepspeed runner's command line that starts the ranks of ``moe train``: ``nproc`` ranks on
    this machine, or with ``hostfile``, ``nproc`` (default: each host's slots) on each of the first
    ``num_nodes`` hosts. Every rank runs ``python -m launch.train --config CONFIG`` with the
    overrides, and the checkpoint to resume (already verified by ``moe train``) or the step to stop at."""
    command = [python, "-m", "deepspeed.launcher.runner"]
    if hostfile is not None:
        command += ["--hostfile", str(Path(hostfile).expanduser().resolve())]
        if num_nodes is not None:
            command += ["--num_nodes", str(num_nodes)]
        if master_addr is not None:
            command += ["--master_addr", master_addr]
    if nproc is not None:
        command += ["--num_gpus", str(nproc)]
    command += ["--master_port", str(master_port), "--module", "launch.train", "--config", str(config)]
    for assignment in overrides:
        command += ["--set", assignment]
    if resume_tag is not None:
        command += ["--resume-from", resume_tag]  # already verified by `moe train`: the ranks check sizes only
    if until_step is not None:
        command += ["--until-step", str(until_step)]
    return command


def run_launcher(command: list[str], stop_timeout: float, multi_node: bool = False) -> int:
    """Run the deepspeed runner's ``command`` in a process group of its own, and stay with it until
    it exits; returns its exit status (128 + signal when stopped by one).

    SIGINT or SIGTERM to this process goes to the ranks on this machine (which save a checkpoint at
    the end of the step and stop); this process then waits up to ``stop_timeout`` seconds and exits
    128 + signal. Ranks still running then, or after a second signal, are terminated (SIGTERM, then
    SIGKILL). With several machines the signal goes to the runner, which stops the ranks on every
    host the way its launcher does (pdsh: a kill on each host, which the ranks take as the stop
    request). Whatever way the launcher ends, nothing of its process group outlives this process
    (unless this process itself is killed by SIGKILL, which it cannot see)."""
    from launch.joblock import HOLDER_ENV

    env = dict(os.environ, **{HOLDER_ENV: str(os.getpid())})
    import torch

    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
    # Its own session: a terminal's Ctrl-C reaches this process alone, which decides what the ranks get.
    process = subprocess.Popen(command, env=env, start_new_session=True)
    group = process.pid
    stops: list[int] = []
    deadline = [None]

    def on_signal(signum, frame) -> None:
        if stops:  # a second signal: no more waiting
            _stderr(f"moe train: {signal.Signals(signum).name} again: terminating the ranks")
            deadline[0] = time.monotonic()
            return
        stops.append(signum)
        deadline[0] = time.monotonic() + stop_timeout
        ranks = _rank_processes(process.pid)
        _stderr(f"moe train: {signal.Signals(signum).name}: the ranks save a checkpoint at the end of this step and "
                f"stop (up to {stop_timeout:g} s; a second signal terminates them now)")
        if ranks:
            for rank in ranks:
                _send(rank, signum)
        elif multi_node:
            _send_pid(process.pid, signum)  # the runner reaches the other hosts
        else:  # still starting: there is nothing to save yet
            _signal_group(group, signal.SIGTERM)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while True:
            try:
                code = process.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                if deadline[0] is not None and time.monotonic() >= deadline[0]:
                    _stderr("moe train: the ranks did not stop in time; terminating them")
                    _terminate_group(group)
                    deadline[0] = None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if process.poll() is None:
            _terminate_group(group)
            process.wait()
        _terminate_group(group)  # ranks the launcher left behind, if any
    return 128 + stops[0] if stops else code


def _stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _rank_processes(launcher_pid: int) -> list:
    """The rank processes under the launcher: its descendants that the deepspeed launcher gave a
    ``LOCAL_RANK``."""
    import psutil

    try:
        descendants = psutil.Process(launcher_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    ranks = []
    for proc in descendants:
        try:
            if "LOCAL_RANK" in proc.environ():
                ranks.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return ranks


def _send(proc, signum: int) -> None:
    import psutil

    try:
        proc.send_signal(signum)
    except psutil.NoSuchProcess:
        pass


def _send_pid(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _signal_group(group: int, signum: int) -> bool:
    """Signal every process of a process group; False when none is left."""
    try:
        os.killpg(group, signum)
        return True
    except ProcessLookupError:
        return False


def _terminate_group(group: int, grace: float = 10.0) -> None:
    """SIGTERM to the process group, SIGKILL to whatever is left after ``grace`` seconds."""
    if not _signal_group(group, signal.SIGTERM):
        return
    end = time.monotonic() + grace
    while time.monotonic() < end:
        if not _signal_group(group, 0):
            return
        time.sleep(0.1)
    _signal_group(group, signal.SIGKILL)
