"""DDP across two Ray nodes: a head and a second node on this machine, one Train worker on each.

Both nodes run on loopback (Ray may rewrite 127.0.0.1 to the eth0 address; the traffic stays on this host), each
advertises its own custom resource and 1 CPU, and the trainer asks for a STRICT_SPREAD placement, so the two
ranks cannot share a node. Each rank sees different data; after one DDP step the gradient on every rank must equal
the mean of both ranks' local gradients (computed independently here), and the parameters must be identical.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from orchestrator.cluster.ray_cluster import LocalRayNode

pytestmark = [pytest.mark.ray, pytest.mark.slow]

# Auth is pinned off in every process so that a ~/.ray/auth_token left by another ray.init() on this machine
# (which turns token auth on for clusters started afterwards) cannot make this test depend on that file.
NO_AUTH = {"RAY_AUTH_MODE": "disabled", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25"}

DRIVER = textwrap.dedent(
    """
    import json, os, sys
    import ray, torch, torch.distributed as dist
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    out_dir = sys.argv[2]

    def batch(rank):  # each rank's own data, reproducible by both ranks
        g = torch.Generator().manual_seed(100 + rank)
        return torch.randn(8, 4, generator=g), torch.randn(8, 1, generator=g)

    def local_grad(model, rank):
        model.zero_grad()
        x, y = batch(rank)
        torch.nn.functional.mse_loss(model(x), y).backward()
        return [p.grad.clone() for p in model.parameters()]

    def train_fn(config):
        ctx = ray.train.get_context()
        rank = ctx.get_world_rank()
        torch.manual_seed(0)
        ref = torch.nn.Linear(4, 1)
        expected = [(a + b) / 2 for a, b in zip(local_grad(ref, 0), local_grad(ref, 1))]
        mine = local_grad(ref, rank)
        torch.manual_seed(0)
        model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 1))
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        x, y = batch(rank)
        torch.nn.functional.mse_loss(model(x), y).backward()
        grads = [p.grad.clone() for p in model.parameters()]
        opt.step()
        record = {
            "rank": rank, "world_size": ctx.get_world_size(), "backend": dist.get_backend(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "node_tag": [k for n in ray.nodes() if n["NodeID"] == ray.get_runtime_context().get_node_id()
                         for k in n["Resources"] if k in ("node_a", "node_b")],
            "grad_matches_mean": all(torch.allclose(g, e, atol=1e-6) for g, e in zip(grads, expected)),
            "grad_differs_from_local": any(not torch.allclose(g, m, atol=1e-6) for g, m in zip(grads, mine)),
            "params": [v for p in model.parameters() for v in p.detach().flatten().tolist()],
        }
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(record, f)
        ray.train.report({"done": 1})

    ray.init(address=sys.argv[1])
    trainer = TorchTrainer(
        train_fn,
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 1},
                                     placement_strategy="STRICT_SPREAD"),
        run_config=RunConfig(name="ddp-two-nodes", storage_path=os.path.join(out_dir, "storage")),
    )
    result = trainer.fit()
    print("FIT_DONE", result.metrics)
    """
)


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # pytest then runs the finalisers below even when it is terminated


@pytest.fixture(scope="module")
def two_nodes():
    previous = signal.signal(signal.SIGTERM, _interrupt)
    head = LocalRayNode.start(num_cpus=1, resources={"node_a": 1}, env=NO_AUTH)
    worker = None
    try:
        head.wait_for_nodes(1, timeout=120)
        worker = LocalRayNode.start(head_address=head.gcs_address, num_cpus=1, resources={"node_b": 1}, env=NO_AUTH)
        head.wait_for_nodes(2, timeout=120)
        yield head
    finally:
        if worker is not None:
            worker.stop()
        head.stop()
        signal.signal(signal.SIGTERM, previous)


def test_ddp_trial_spans_two_nodes(two_nodes, tmp_path):
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    env = {**os.environ, **NO_AUTH, "RAY_USAGE_STATS_ENABLED": "0"}
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, str(script), two_nodes.gcs_address, str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"driver failed ({time.monotonic() - t0:.0f}s):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    assert "FIT_DONE" in proc.stdout

    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["rank"] for r in records] == [0, 1]
    assert all(r["world_size"] == 2 and r["backend"] == "gloo" for r in records)
    # one rank per node: distinct Ray node ids
    assert records[0]["node_id"] != records[1]["node_id"]
    assert sorted(tag for r in records for tag in r["node_tag"]) == ["node_a", "node_b"]
    # gradients were all-reduced: each rank's gradient is the mean over both ranks' data, not its own
    assert all(r["grad_matches_mean"] for r in records)
    assert all(r["grad_differs_from_local"] for r in records)
    # and the step left identical parameters on both ranks
    assert records[0]["params"] == pytest.approx(records[1]["params"], abs=1e-7)
