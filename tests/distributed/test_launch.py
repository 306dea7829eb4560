"""The ``--nproc-per-node`` launcher: the torchrun command line it builds for one machine and for
several, the rank's own command line (the same config, no launcher options), and its refusals."""

import pytest

from polymodal.cli.main import build_parser
from polymodal.cli.train import worker_argv
from polymodal.distributed import launch
from polymodal.errors import ConfigError


def _args(*argv: str):
    return build_parser().parse_args(["train", *argv])


def test_one_machine_gets_a_private_rendezvous(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    args = _args("--nproc-per-node", "2", "--config", "tiny", "train.steps=3")
    assert launch.requested(args)
    assert launch.torchrun_argv(args, worker_argv(args)) == [
        "--nproc-per-node", "2", "--standalone", "--module", "polymodal", "train", "--config", "tiny", "train.steps=3",
    ]  # fmt: skip


def test_several_machines_meet_at_the_rendezvous_endpoint():
    args = _args("--nproc-per-node", "8", "--nnodes", "4", "--rdzv-endpoint", "node0:29400", "--rdzv-id", "77", "--resume")
    argv = launch.torchrun_argv(args, worker_argv(args))
    assert argv == [
        "--nproc-per-node", "8", "--nnodes", "4", "--rdzv-endpoint", "node0:29400", "--rdzv-id", "77",
        "--rdzv-backend", "c10d", "--module", "polymodal", "train", "--resume",
    ]  # fmt: skip


def test_a_static_rendezvous_passes_the_master_and_node_rank():
    args = _args("--nproc-per-node", "2", "--nnodes", "2", "--node-rank", "1", "--master-addr", "10.0.0.1", "--master-port", "29500")
    argv = launch.torchrun_argv(args, ["train"])
    assert argv[:10] == ["--nproc-per-node", "2", "--nnodes", "2", "--node-rank", "1", "--master-addr", "10.0.0.1",
                         "--master-port", "29500"]  # fmt: skip
    assert "--standalone" not in argv


def test_a_rank_started_by_torchrun_does_not_launch_again(monkeypatch):
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(name, value)
    assert not launch.requested(_args("--nproc-per-node", "2"))


def test_launcher_options_without_nproc_per_node_are_refused():
    assert not launch.requested(_args("train.steps=3"))
    with pytest.raises(ConfigError, match="--nnodes needs --nproc-per-node"):
        launch.requested(_args("--nnodes", "2"))
    with pytest.raises(ConfigError, match="at least 1"):
        launch.requested(_args("--nproc-per-node", "0"))


def test_the_verbose_flag_reaches_every_rank():
    args = build_parser().parse_args(["-v", "train", "--config", "a.yaml", "--config", "b.yaml", "x=1"])
    assert worker_argv(args) == ["-v", "train", "--config", "a.yaml", "--config", "b.yaml", "x=1"]
