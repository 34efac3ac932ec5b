"""One tensor-parallel group across two nodes (stage 07 on: ``--nnodes``, ``--node-rank``,
``--dist-init-addr``), two processes on this machine standing in for two machines.

The oracle: tensor parallelism on one node. The same code serves every stage from 07 on: the tokens
are checked on the stage that brings it, a node's death on the newest (each run starts two nodes).
"""

import contextlib
import importlib
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, STAGES, stage_has

MULTI_NODE_STAGES = [s for s in STAGES if stage_has(s, "nnodes")]
MULTI_NODE_STAGES = sorted({MULTI_NODE_STAGES[0], MULTI_NODE_STAGES[-1]})
ASK = dict(max_tokens=8, temperature=0)


def engine_of(stage: str):
    parallel = importlib.import_module(f"{stage}.parallel")
    return importlib.import_module(stage).Engine, parallel.WorkerFailure


def free_port() -> int:
    """A port free now: node 0 binds the given --dist-init-addr, as an operator would pick one."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_node_1(stage: str, model: str, address: str, log: Path) -> subprocess.Popen:
    """The second machine's command, in a session of its own (so a test can end it, workers and all).
    Its output goes to a file: an unread pipe would stop a node that prints more than the pipe holds."""
    with log.open("wb") as out:
        return subprocess.Popen([sys.executable, "-m", stage, "--model-path", model, "--device", "cpu",
                                 "--tp-size", "2", "--nnodes", "2", "--node-rank", "1", "--dist-init-addr", address],
                                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def end(node: subprocess.Popen) -> None:
    """Kill a node's launcher and the workers it started (its session), if any are left."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(node.pid, signal.SIGKILL)
    node.wait(timeout=30)


@pytest.mark.distributed
@pytest.mark.parametrize("stage", MULTI_NODE_STAGES[:1])
def test_two_nodes_give_the_tokens_of_two_ranks_on_one(stage, checkpoints, tmp_path):
    engine_class, _ = engine_of(stage)
    model = str(checkpoints["dense"])
    prompts = [[5, 6, 7, 8], [300, 301]]
    with engine_class(model_path=model, device="cpu", tp_size=2) as one_node:
        expected = [o.token_ids for o in one_node.generate_batch(prompts, **ASK)]
    address = f"127.0.0.1:{free_port()}"
    node1 = start_node_1(stage, model, address, tmp_path / "node1.log")
    try:
        with engine_class(model_path=model, device="cpu", tp_size=2, nnodes=2, node_rank=0, dist_init_addr=address) as node0:
            assert node0.workers.processes == []  # rank 1 runs on the other node
            got = [o.token_ids for o in node0.generate_batch(prompts, **ASK)]
        assert node1.wait(timeout=60) == 0, (tmp_path / "node1.log").read_text()[-2000:]  # node 0 ended the group
    finally:
        end(node1)
    assert got == expected


@pytest.mark.distributed
@pytest.mark.parametrize("stage", MULTI_NODE_STAGES[-1:])
def test_a_node_that_dies_ends_the_group_with_a_clear_error(stage, checkpoints, tmp_path):
    engine_class, worker_failure = engine_of(stage)
    model, address = str(checkpoints["dense"]), f"127.0.0.1:{free_port()}"
    node1 = start_node_1(stage, model, address, tmp_path / "node1.log")
    try:
        with engine_class(model_path=model, device="cpu", tp_size=2, nnodes=2, node_rank=0, dist_init_addr=address) as node0:
            node0.generate([5, 6, 7], **ASK)
            end(node1)  # the other machine goes away, workers and all
            with pytest.raises(worker_failure, match="another node"):
                node0.generate([5, 6, 7], **ASK)
            with pytest.raises(worker_failure):  # and it stays failed, as stage 07's engine does
                node0.generate([8], **ASK)
    finally:
        end(node1)
