"""Scaling out: central training on two torchrun "nodes" (c10d rendezvous on the loopback) gives the same weights
as one node with two processes."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedlowrank.central.dist import free_port
from fedlowrank.runtime.reaper import stop_trees

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ["main.py", "experiment=gpt2_inrank", "trainer.device=cpu", "trainer.max_steps=8", "method.stage1_steps=4",
         "method.check_interval=2", "method.init_rank=1", "method.buffer=1", "trainer.progress=false",
         "trainer.block_size=32", "trainer.batch_size=4", "data.max_chars=50000"]


def _weights(out: Path) -> dict[str, torch.Tensor]:
    steps = sorted((out / "checkpoints").glob("step-*"))
    return load_file(str(steps[-1] / "model.safetensors"))


def _kill_matching(marker: str) -> None:
    """SIGKILL every process (not this one) whose command line contains ``marker``."""
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and int(d.name) != os.getpid() and marker in (d / "cmdline").read_bytes().decode():
                os.kill(int(d.name), signal.SIGKILL)
        except (OSError, UnicodeDecodeError):
            pass


def _communicate_or_kill(procs: list[subprocess.Popen], timeout: float, marker: str) -> list[str]:
    """Every process's output; past ``timeout`` (all together) each process tree (agent and worker) is stopped, and
    any process whose command line holds ``marker``, and the test fails with the tail of every node's log, so a hang
    shows which node stopped where."""
    deadline, logs = time.monotonic() + timeout, []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
    except subprocess.TimeoutExpired:
        stop_trees([p.pid for p in procs], grace=10)  # each agent and its workers (in sessions of their own)
        _kill_matching(marker)  # workers an agent started after that snapshot, orphaned when it died
        logs += [p.communicate()[0] for p in procs[len(logs):]]
        tails = [f"--- node {r} (exit {p.returncode}):\n{log[-2500:]}" for r, (p, log) in enumerate(zip(procs, logs))]
        pytest.fail(f"the two torchrun nodes did not finish within {timeout:.0f} s\n" + "\n".join(tails))
    return logs


@pytest.mark.timeout(300)
def test_two_nodes_of_one_process_equal_one_node_of_two(tmp_path):
    """``torchrun --nnodes 2 --node-rank {0,1} --rdzv-backend c10d --rdzv-endpoint 127.0.0.1:<port>`` (as on two
    machines, here both on the loopback) trains the same weights, bit for bit, as ``--nproc-per-node 2``."""
    run = [sys.executable, "-m", "torch.distributed.run"]
    # torchrun sets OMP_NUM_THREADS=1 only with more than one process per node; a CPU matmul's rounding depends on
    # its thread count, so both layouts get one thread per process
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one = tmp_path / "one"
    proc = subprocess.run([*run, "--nproc-per-node", "2", "--master-port", str(free_port()), *TRAIN, f"out_dir={one}",
                           f"hydra.run.dir={one}/hydra"], cwd=ROOT, capture_output=True, text=True, timeout=240,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two, port = tmp_path / "two", free_port()
    nodes = [subprocess.Popen([*run, "--nnodes", "2", "--node-rank", str(r), "--nproc-per-node", "1",
                               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "t2",
                               *TRAIN, f"out_dir={two}", f"hydra.run.dir={two}/hydra{r}"],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in (0, 1)]
    logs = _communicate_or_kill(nodes, 120, marker=f"out_dir={two}")
    assert [p.returncode for p in nodes] == [0, 0], logs[0][-2000:] + logs[1][-2000:]
    a, b = _weights(one), _weights(two)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _client_actor_nodes(address: str) -> set[str]:
    """Node ids of every Flower ClientAppActor the cluster has run (alive or dead), from Ray's GCS."""
    import ray

    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, logging_level="ERROR")
    actors = ray._private.state.actors()  # the GCS actor table (no dashboard needed)
    return {a["Address"]["NodeID"] for a in actors.values() if a["ActorClassName"].endswith("ClientAppActor")}


@pytest.mark.slow  # a two-node Ray cluster and two federated runs: about a minute on 2 cores
@pytest.mark.timeout(400)
def test_federated_simulation_on_an_existing_two_node_ray_cluster(tmp_path):
    """``fed.ray_address``: a head and a second node (one CPU each, started here on the loopback) host the clients'
    actors, on both nodes, and the run trains the same model bit for bit as the local runtime."""
    import ray
    from ray.cluster_utils import Cluster

    from fedlowrank.federated.run_config import compose_cfg
    from fedlowrank.runtime.runner import run as fed_run

    common = ["mode=federated", "fed.num_clients=4", "fed.rounds=2", "fed.local_steps=3"]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        on_ray = fed_run(compose_cfg([*common, "fed.runtime=simulation", f"fed.ray_address={cluster.address}",
                                      f"out_dir={tmp_path / 'ray'}"]))
        assert len(_client_actor_nodes(cluster.address)) == 2  # clients ran on both nodes
    finally:
        ray.shutdown()
        cluster.shutdown()
    local = fed_run(compose_cfg([*common, "fed.runtime=local", f"out_dir={tmp_path / 'local'}"]))
    a = load_file(str(tmp_path / "ray" / "checkpoints" / "last.safetensors"))
    b = load_file(str(tmp_path / "local" / "checkpoints" / "last.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert on_ray["final"]["global_accuracy"] == local["final"]["global_accuracy"]


@pytest.mark.parametrize("extra", ["fed.runtime=superlink", "fed.runtime=local", "fed.isolation=netns"])
def test_ray_address_is_refused_where_it_cannot_work(tmp_path, extra):
    """On the default runtime the ClientApps on a cluster's other nodes could not read the run's trusted config;
    the local runtime has no Ray; a private network cannot reach a cluster: exit-2 errors before any work."""
    from fedlowrank.config import ConfigError, federated_run_from_cfg
    from fedlowrank.federated.run_config import compose_cfg

    base = ["mode=federated", f"out_dir={tmp_path}", "fed.ray_address=127.0.0.1:6379"]
    runtime = [] if extra.startswith("fed.runtime") else ["fed.runtime=simulation"]
    with pytest.raises(ConfigError, match="fed.ray_address needs fed.runtime=simulation"):
        federated_run_from_cfg(compose_cfg([*base, *runtime, extra]))
    federated_run_from_cfg(compose_cfg([*base, "fed.runtime=simulation"]))  # the supported combination
