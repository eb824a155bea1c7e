"""deploy/kubernetes/multi-node.yaml is valid Kubernetes (the API's own schemas, strict), and every pod's
environment is a configuration the launcher accepts: node 0 runs the router behind the probes, the
workers are nodes 1, 2, ... of the same deployment."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from tgi_launcher import cli

kubernetes_validate = pytest.importorskip("kubernetes_validate")

ROOT = Path(__file__).resolve().parents[2]
MANIFEST = ROOT / "deploy" / "kubernetes" / "multi-node.yaml"


def documents() -> list[dict]:
    return [document for document in yaml.safe_load_all(MANIFEST.read_text()) if document]


def image_env() -> dict[str, str]:
    """The ENV of the Dockerfile the pods run (PORT=8080, HF_HOME, ...)."""
    line = next(line for line in (ROOT / "Dockerfile").read_text().splitlines() if line.startswith("ENV "))
    return dict(re.findall(r"(\w+)=(\S+)", line.replace("${DOCKER_LABEL}", "")))


def pod_env(container: dict, pod_index: int) -> dict[str, str]:
    """The container's environment in pod `pod_index`: values, secrets (a stand-in), the downward API's
    pod index, and what its shell command sets before it execs the launcher."""
    env = image_env()
    for item in container["env"]:
        source = item.get("valueFrom", {})
        if "secretKeyRef" in source:
            env[item["name"]] = "stand-in"
        elif source.get("fieldRef", {}).get("fieldPath") == "metadata.labels['apps.kubernetes.io/pod-index']":
            env[item["name"]] = str(pod_index)
        else:
            env[item["name"]] = item["value"]
    command = container.get("command")
    if command:
        assert command[:2] == ["/bin/sh", "-c"] and command[2].endswith("exec text-generation-launcher")
        script = command[2].removesuffix("exec text-generation-launcher") + "env"
        printed = subprocess.run(["/bin/sh", "-c", script], env=env, capture_output=True, text=True, check=True).stdout
        env = dict(line.split("=", 1) for line in printed.splitlines() if "=" in line)
    return env


def launcher_config(container: dict, pod_index: int, monkeypatch):
    """What the launcher of pod `pod_index` runs, on a node with the GPUs the container asks for."""
    configs = []
    monkeypatch.setattr(cli, "run", lambda config: configs.append(config) or 0)
    num_gpus = int(container["resources"]["limits"]["nvidia.com/gpu"])
    env = {**pod_env(container, pod_index), "CUDA_VISIBLE_DEVICES": ",".join(map(str, range(num_gpus)))}
    result = CliRunner().invoke(cli.app, [], env=env)
    assert result.exit_code == 0, result.output
    return configs[-1]


def test_every_resource_passes_kubernetes_strict_schema_validation():
    for document in documents():
        kubernetes_validate.validate(document, kubernetes_validate.latest_version(), strict=True)


def test_the_leader_is_node_0_with_the_router_behind_its_probes_and_the_workers_are_the_other_nodes(monkeypatch):
    sets = {document["metadata"]["name"]: document for document in documents() if document["kind"] == "StatefulSet"}
    leader, worker = sets["tgi-leader"]["spec"], sets["tgi-worker"]["spec"]
    [leader_container] = leader["template"]["spec"]["containers"]
    [worker_container] = worker["template"]["spec"]["containers"]
    node0 = launcher_config(leader_container, 0, monkeypatch)
    workers = [launcher_config(worker_container, index, monkeypatch) for index in range(worker["replicas"])]
    assert node0.node_rank == 0 and [config.node_rank for config in workers] == list(range(1, len(workers) + 1))
    assert {config.shard.nnodes for config in [node0, *workers]} == {leader["replicas"] + worker["replicas"]}
    assert len({(config.shard.master_addr, config.shard.master_port, config.num_shard, config.shard.pipeline_parallel_size)
                for config in [node0, *workers]}) == 1
    assert node0.shard.pipeline_parallel_size in (1, node0.nnodes)  # one stage, or a stage per node
    assert all(config.shard.num_local_shards == int(container["resources"]["limits"]["nvidia.com/gpu"])
               for config, container in ((node0, leader_container), (workers[0], worker_container)))
    assert node0.shard.master_addr.startswith(f"tgi-leader-0.{leader['serviceName']}")
    [port] = leader_container["ports"]
    assert port["containerPort"] == node0.router.port
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert leader_container[probe]["httpGet"] == {"path": "/health", "port": port["name"]}
    headless = next(document for document in documents() if document["metadata"]["name"] == leader["serviceName"])
    assert {item["port"] for item in headless["spec"]["ports"]} == {node0.shard.master_port, node0.shard.master_port + 1}
