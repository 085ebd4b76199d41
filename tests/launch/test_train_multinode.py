"""`moe train --hostfile`: the deepspeed runner's command line for several machines, checked by the
runner's own argument parser and resource logic (nothing is launched), and one clear error for a
missing or malformed hostfile or flags that do not fit it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from launch.cli import main as moe_main
from launch.train.launcher import MULTI_NODE_PORT, launcher_command, multi_node_world_size, read_hostfile
from moe.errors import UserError
from tests.runs import TINY, set_args

HOSTS = """\
# two GPU machines and a spare
node-a slots=8
node-b   slots=8   # comment after an entry

node-c slots=4
"""


def _hostfile(tmp_path: Path, text: str = HOSTS) -> Path:
    path = tmp_path / "hostfile"
    path.write_text(text)
    return path


def _runner_view(command: list[str]):
    """What the deepspeed runner makes of ``command``: its parsed arguments and the hosts and slots
    it would start ranks on (its own hostfile parser and --num_nodes/--num_gpus logic)."""
    from deepspeed.launcher import runner

    assert command[:3] == [sys.executable, "-m", "deepspeed.launcher.runner"]
    args = runner.parse_args(command[3:])
    resources = runner.fetch_hostfile(args.hostfile)
    active = {host: list(range(slots)) for host, slots in resources.items()}
    return args, runner.apply_num_nodes_and_gpus(active, args.num_nodes, args.num_gpus)


def test_the_runner_gets_the_hostfile_nodes_ranks_per_node_and_master(tmp_path):
    hostfile = _hostfile(tmp_path)
    command = launcher_command("configs/tiny.yaml", ["train.steps=10", "out_dir=/shared/run"], nproc=4,
                               master_port=MULTI_NODE_PORT, hostfile=str(hostfile), num_nodes=2,
                               master_addr="10.0.0.1", resume_tag="step00000005", until_step=8)
    args, active = _runner_view(command)
    assert args.hostfile == str(hostfile.resolve()) and args.num_nodes == 2 and args.num_gpus == 4
    assert args.master_addr == "10.0.0.1" and args.master_port == MULTI_NODE_PORT
    assert args.module and args.user_script == "launch.train"
    assert args.user_args == ["--config", "configs/tiny.yaml", "--set", "train.steps=10",
                              "--set", "out_dir=/shared/run", "--resume-from", "step00000005", "--until-step", "8"]
    assert active == {"node-a": [0, 1, 2, 3], "node-b": [0, 1, 2, 3]}  # the first 2 hosts, 4 ranks each
    assert sum(map(len, active.values())) == multi_node_world_size(read_hostfile(hostfile), 2, 4) == 8


def test_without_nproc_or_num_nodes_every_host_and_slot_is_used(tmp_path):
    hostfile = _hostfile(tmp_path)
    command = launcher_command("c.yaml", [], nproc=None, master_port=MULTI_NODE_PORT, hostfile=str(hostfile))
    args, active = _runner_view(command)
    assert args.num_nodes == -1 and args.num_gpus == -1 and args.master_addr == ""  # the runner's defaults
    assert {host: len(slots) for host, slots in active.items()} == {"node-a": 8, "node-b": 8, "node-c": 4}
    assert multi_node_world_size(read_hostfile(hostfile), None, None) == 20


def test_one_machine_is_the_launcher_command_as_before():
    command = launcher_command("configs/tiny.yaml", ["a.b=1"], nproc=2, master_port=12345)
    assert command[3:] == ["--num_gpus", "2", "--master_port", "12345", "--module", "launch.train",
                           "--config", "configs/tiny.yaml", "--set", "a.b=1"]


@pytest.mark.parametrize("text, message", [
    ("", "lists no host"),
    ("# nothing but a comment\n\n", "lists no host"),
    ("node-a slots=8\nnode-b\n", "line 2: 'node-b' is not 'HOST slots=N'"),
    ("node-a slots=eight\n", "line 1: 'node-a slots=eight' is not 'HOST slots=N'"),
    ("node-a slots=8\nnode-a slots=4\n", "line 2: host 'node-a' is listed twice"),
    ("node-a slots=0\n", "host 'node-a' has slots=0"),
])
def test_a_malformed_hostfile_is_one_clear_error(tmp_path, text, message):
    with pytest.raises(UserError, match="--hostfile") as caught:
        read_hostfile(_hostfile(tmp_path, text))
    assert message in str(caught.value)


def test_more_nodes_or_ranks_than_the_hostfile_gives_are_refused(tmp_path):
    hosts = read_hostfile(_hostfile(tmp_path))
    with pytest.raises(UserError, match=r"--num-nodes 4 is invalid: the hostfile lists 3 host\(s\)"):
        multi_node_world_size(hosts, 4, None)
    with pytest.raises(UserError, match=r"--nproc 6 ranks per node is more than the hostfile gives node-c \(slots=4\)"):
        multi_node_world_size(hosts, None, 6)
    assert multi_node_world_size(hosts, 2, 6) == 12  # the first two hosts have 8 slots


def _moe_train(tmp_path, cache, *flags):
    return moe_main(["train", "--config", str(TINY), *flags,
                     *set_args([f"out_dir={tmp_path / 'run'}", f"data.cache_dir={cache}", "train.steps=4"])])


@pytest.mark.parametrize("flags, message", [
    (["--hostfile", "{tmp}/missing"], "--hostfile '{tmp}/missing' does not exist"),
    (["--hostfile", "{tmp}/hostfile", "--num-nodes", "9"], "--num-nodes 9 is invalid"),
    (["--num-nodes", "2"], "--num-nodes is for training on several machines: give their --hostfile too"),
    (["--master-addr", "10.0.0.1"], "--master-addr is for training on several machines"),
    (["--hostfile", "{tmp}/hostfile", "--nproc", "3", "--set", "parallel.expert_parallel_size=2", "--num-nodes", "1"],
     "parallel.expert_parallel_size=2 is invalid: it must divide the number of ranks (3 ranks from --hostfile"),
])
def test_moe_train_refuses_bad_multi_node_flags_in_one_line(tmp_path, cache, capsys, flags, message):
    _hostfile(tmp_path)
    code = _moe_train(tmp_path, cache, *[flag.format(tmp=tmp_path) for flag in flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message.format(tmp=tmp_path) in err[0], err
    assert not (tmp_path / "run").exists()


def test_moe_train_hands_the_hostfile_to_the_runner(tmp_path, cache, monkeypatch):
    """`moe train --hostfile` builds the runner's command and stays with it (here: the command is
    recorded instead of run)."""
    import launch.train.launcher as launcher

    started = []
    monkeypatch.setattr(launcher, "run_launcher",
                        lambda command, stop_timeout, multi_node=False: started.append((command, multi_node)) or 0)
    hostfile = _hostfile(tmp_path)
    code = _moe_train(tmp_path, cache, "--hostfile", str(hostfile), "--num-nodes", "2", "--nproc", "2",
                      "--master-addr", "10.0.0.1")
    assert code == 0 and len(started) == 1
    command, multi_node = started[0]
    args, active = _runner_view(command)
    assert multi_node and args.master_port == MULTI_NODE_PORT and args.master_addr == "10.0.0.1"
    assert active == {"node-a": [0, 1], "node-b": [0, 1]}
    assert args.user_script == "launch.train" and f"out_dir={tmp_path / 'run'}" in args.user_args
