"""Ray clusters beyond one private node: ranks over simulated nodes, a real Ray Job, cluster files.

Each test that needs its own Ray runs it in a child process (one ray.init per process; the
session's `ray_cluster` lives in this one) and kills what it started by session id: `ray stop`
would also kill every other Ray cluster on the machine.
"""

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import torch
import yaml

import tpserve
from tpserve.errors import TpserveError

from test_peer_fixtures import FIXTURES

ROOT = Path(__file__).parent.parent
RAY_VERSION = "2.60.0"
RAY_CLI = str(Path(sys.executable).with_name("ray"))  # this interpreter's own `ray`


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def session_members(sid: int) -> list[int]:
    """Live processes of session sid (Ray's workers leave the process group, not the session)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[3]) == sid:
            pids.append(int(stat.parent.name))
    return pids


def end_session(proc: subprocess.Popen, grace_s: float = 3.0) -> list[int]:
    """SIGTERM, then SIGKILL, every process of proc's session; returns those still alive."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        for pid in session_members(proc.pid):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait_s
        while session_members(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
    if proc.poll() is None:
        proc.wait(5)
    return session_members(proc.pid)


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    return {**env, **extra}


# --- tp=4 over two simulated nodes -------------------------------------------------------------

NODES_CHILD = """
import json, sys, torch, tpserve
from ray.cluster_utils import Cluster
# Two nodes of 2 CPU slots: tp=4 with placement "pack" must spill over both.
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
cluster.add_node(num_cpus=2)
try:
    llm = tpserve.load(sys.argv[1], tp=4, backend="ray", dtype=torch.float32, placement="pack",
                       address=cluster.address)
    out = llm.generate(json.loads(sys.argv[2]), max_tokens=8, ignore_eos=True)
    print(json.dumps({"tokens": out, "nodes": [i["node_id"] for i in llm.executor.nodes],
                      "coordinator": llm.executor.coord.address}))
    llm.close()
finally:
    import ray
    ray.shutdown()
    cluster.shutdown()
"""


def run_ray_child(script: str, *args: str, timeout: float) -> dict:
    """Run `script` (which builds its own simulated Ray cluster) in a child process with its own
    RAY_TMPDIR; check it succeeded and left nothing running; return the JSON of its last line."""
    temp = tempfile.mkdtemp(prefix="tpray")  # its own /tmp/ray: `address="auto"` elsewhere unmoved
    proc = subprocess.Popen([sys.executable, "-c", script, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=clean_env(RAY_TMPDIR=temp), start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        left = end_session(proc)
        shutil.rmtree(temp, ignore_errors=True)
    assert proc.returncode == 0, err[-3000:]
    assert not left, f"processes left behind: {left}"
    return json.loads(out.strip().splitlines()[-1])


def test_tp4_over_two_simulated_nodes_matches_the_in_process_reference():
    path, ids = FIXTURES / "llama_g128_sym", [1, 17, 42, 99, 3, 250]
    got = run_ray_child(NODES_CHILD, str(path), json.dumps(ids), timeout=120)
    want = tpserve.load(path, tp=1, dtype=torch.float32).generate(ids, max_tokens=8,
                                                                  ignore_eos=True)
    # fp32 and rank-order fp32 sums: greedy tokens equal the unsharded model's exactly.
    assert got["tokens"] == want
    nodes = got["nodes"]
    assert len(set(nodes)) == 2, nodes
    assert nodes == sorted(nodes, key=nodes.index) and nodes.count(nodes[0]) == 2  # grouped by node
    # two ranks sit on a node other than the driver's: the coordinator listens on the node's Ray
    # IP over TCP (loopback/ipc only when every rank shares the driver's node)
    assert got["coordinator"].startswith("tcp://"), got["coordinator"]


# --- a placement that cannot be satisfied -------------------------------------------------------

def test_strict_pack_beyond_one_node_fails_within_the_timeout(ray_cluster):
    # 12 heads make tp=12 a valid shard plan; the session cluster's one node has 8 CPU slots.
    path = FIXTURES / "mistral_v2_asym_g128"
    t0 = time.monotonic()
    with pytest.raises(TpserveError) as e:
        tpserve.load(path, tp=12, backend="ray", placement="strict_pack", placement_timeout_s=3)
    assert time.monotonic() - t0 < 15
    msg = str(e.value)
    assert "12 bundles of {'CPU': 1}" in msg and "STRICT_PACK" in msg and "`ray status`" in msg
    # the pending placement group was removed, so it holds nothing once the cluster catches up
    from ray.util import placement_group_table
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        states = [pg["state"] for pg in placement_group_table().values()]
        if all(s == "REMOVED" for s in states):
            break
        time.sleep(0.2)
    assert all(s == "REMOVED" for s in states), states


# --- tpserve submit against a real head ---------------------------------------------------------

@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """`ray start --head --block` with the job server, on free ports, in its own session.

    A token makes auth deterministic (Ray turns token auth on when it finds one). The short
    --temp-dir keeps socket paths short and /tmp/ray/ray_current_cluster untouched.
    """
    temp = tempfile.mkdtemp(prefix="tpray")
    dash = free_port()
    env = clean_env(RAY_AUTH_TOKEN=secrets.token_hex(32), RAY_USAGE_STATS_ENABLED="0")
    log = tmp_path_factory.mktemp("head") / "head.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(
            [RAY_CLI, "start", "--head", "--block", "--port", str(free_port()),
             "--dashboard-port", str(dash), "--include-dashboard=true", "--num-cpus", "4",
             "--ray-client-server-port", str(free_port()),
             "--dashboard-agent-listen-port", str(free_port()), "--temp-dir", temp],
            stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    headers = {"Authorization": f"Bearer {env['RAY_AUTH_TOKEN']}"}
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"ray start exited:\n{log.read_text()[-3000:]}"
        try:
            if httpx.get(f"{address}/api/jobs/", headers=headers, timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    else:
        end_session(proc)
        pytest.fail(f"the head's job server did not come up:\n{log.read_text()[-3000:]}")
    yield address, env
    left = end_session(proc)
    shutil.rmtree(temp, ignore_errors=True)
    assert not left, f"head processes left behind: {left}"


def submit(address, env, runtime_env, *command) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tpserve.cli", "submit", "--address", address,
                             "--runtime-env", str(runtime_env), "--", *command],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def test_submitted_jobs_stream_their_logs_and_exit_with_their_status(ray_head, demo_checkpoint,
                                                                     tmp_path):
    address, env = ray_head
    # cluster/runtime_env.yaml as shipped (working_dir "." from the repo root, .rayignore) plus
    # this session's demo-model cache.
    runtime_env = yaml.safe_load((ROOT / "cluster" / "runtime_env.yaml").read_text())
    runtime_env["env_vars"]["TPSERVE_CACHE"] = str(demo_checkpoint.parent)
    (tmp_path / "env.yaml").write_text(yaml.safe_dump(runtime_env))
    missing = tmp_path / "no-such-checkpoint"
    # two jobs at once (both mostly wait on process start-up): one fails, one succeeds
    failing = submit(address, env, tmp_path / "env.yaml", "generate", "--model", str(missing))
    good = submit(address, env, tmp_path / "env.yaml", "generate", "--tp", "2", "--prompt-ids",
                  "1,2,3", "--max-tokens", "4", "--ignore-eos")
    out, err = good.communicate(timeout=120)
    assert good.returncode == 0, (out + err)[-3000:]
    want = tpserve.load(demo_checkpoint, tp=1, dtype=torch.float32).generate(
        [1, 2, 3], max_tokens=4, ignore_eos=True)
    assert f"tokens: {want}" in out  # the job's stderr, streamed back as its log
    assert "2 ranks serving" in out and "SUCCEEDED" in err

    out, err = failing.communicate(timeout=60)
    assert failing.returncode == 1, (out + err)[-3000:]
    assert "FAILED" in err and str(missing) in out  # tpserve's one-line error, from the job log


def test_submit_to_an_unreachable_address_names_it_and_ray_start():
    import argparse
    from tpserve import submit as submit_mod
    p = argparse.ArgumentParser()
    submit_mod.add_arguments(p)
    address = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(TpserveError, match=rf"{address}.*`ray start --head"):
        submit_mod.run(p.parse_args(["--address", address, "--", "generate"]))
    with pytest.raises(TpserveError, match="put a tpserve command"):
        submit_mod.run(p.parse_args(["--address", address, "--", "python", "x.py"]))


# --- the cluster/ files -------------------------------------------------------------------------

# Field names of KubeRay's ray.io/v1 API (RayJobSpec, RayClusterSpec, HeadGroupSpec,
# WorkerGroupSpec); a misspelt field would be dropped silently by the API server.
RAYJOB_SPEC = {"activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate",
               "metadata", "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy",
               "entrypoint", "runtimeEnvYAML", "jobId", "submissionMode", "entrypointResources",
               "entrypointNumCpus", "entrypointNumGpus", "ttlSecondsAfterFinished",
               "shutdownAfterJobFinishes", "suspend"}
RAYCLUSTER_SPEC = {"headGroupSpec", "workerGroupSpecs", "rayVersion", "enableInTreeAutoscaling",
                   "autoscalerOptions", "headServiceAnnotations", "suspend", "authOptions",
                   "gcsFaultToleranceOptions", "managedBy", "upgradeStrategy"}
HEAD_GROUP = {"serviceType", "headService", "enableIngress", "rayStartParams", "template"}
WORKER_GROUP = {"groupName", "replicas", "minReplicas", "maxReplicas", "numOfHosts",
                "rayStartParams", "template", "scaleStrategy", "suspend", "idleTimeoutSeconds"}


def check_ray_cluster_spec(spec: dict) -> None:
    assert set(spec) <= RAYCLUSTER_SPEC, set(spec) - RAYCLUSTER_SPEC
    assert spec["rayVersion"] == RAY_VERSION
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    assert set(groups[0]) <= HEAD_GROUP, set(groups[0]) - HEAD_GROUP
    for g in groups[1:]:
        assert set(g) <= WORKER_GROUP, set(g) - WORKER_GROUP
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
    for g in groups:
        assert all(isinstance(v, str) for v in g["rayStartParams"].values())  # map[string]string
        pod = g["template"]["spec"]
        mounts = {m["mountPath"] for c in pod["containers"] for m in c.get("volumeMounts", [])}
        assert "/dev/shm" in mounts
        assert all(c["image"] == f"tpserve:ray{RAY_VERSION}" for c in pod["containers"])
        volumes = {v["name"] for v in pod["volumes"]}
        assert {m["name"] for c in pod["containers"] for m in c["volumeMounts"]} <= volumes


def test_kuberay_manifests_use_kuberay_field_names():
    job = yaml.safe_load((ROOT / "cluster" / "rayjob.yaml").read_text())
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    assert set(job["spec"]) <= RAYJOB_SPEC, set(job["spec"]) - RAYJOB_SPEC
    assert job["spec"]["entrypoint"].startswith("tpserve ")
    assert isinstance(yaml.safe_load(job["spec"]["runtimeEnvYAML"]), dict)
    check_ray_cluster_spec(job["spec"]["rayClusterSpec"])

    cluster, service = yaml.safe_load_all((ROOT / "cluster" / "raycluster.yaml").read_text())
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    check_ray_cluster_spec(cluster["spec"])
    resources = cluster["spec"]["headGroupSpec"]["rayStartParams"]["resources"]
    assert json.loads(json.loads(resources)) == {"tpserve_driver": 1}  # KubeRay's quoted JSON
    assert (service["apiVersion"], service["kind"]) == ("v1", "Service")
    # the Service reaches the head pod (KubeRay's labels), on a port its container declares
    assert service["spec"]["selector"] == {"ray.io/cluster": cluster["metadata"]["name"],
                                           "ray.io/node-type": "head"}
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert service["spec"]["ports"][0]["targetPort"] in {p["containerPort"] for p in head["ports"]}


def test_cluster_yaml_passes_rays_own_schema_and_one_ray_version_everywhere():
    from ray.autoscaler._private.util import prepare_config, validate_config
    config = yaml.safe_load((ROOT / "cluster" / "cluster.yaml").read_text())
    validate_config(prepare_config(config))  # what `ray up` checks before touching a node
    from ray.runtime_env import RuntimeEnv
    RuntimeEnv(**yaml.safe_load((ROOT / "cluster" / "runtime_env.yaml").read_text()))
    import ray
    assert ray.__version__ == RAY_VERSION
    for name in ("Dockerfile", "cluster.yaml", "README.md"):
        text = (ROOT / "cluster" / name).read_text()
        assert f'"ray[default]=={RAY_VERSION}"' in text, name
        assert "ray[default]==" not in text.replace(f"ray[default]=={RAY_VERSION}", ""), name
    # what a job's working_dir uploads (Ray's own walk, .gitignore + .rayignore): the code only
    from ray._private.runtime_env.packaging import _dir_travel
    files = []
    _dir_travel(ROOT.resolve(), [], lambda p: p.is_file() and files.append(p), True)
    tops = {p.relative_to(ROOT.resolve()).parts[0] for p in files}
    assert {"tpserve", "kernels", "pyproject.toml"} <= tops and not tops & {".git", "tests"}, tops
    assert sum(p.stat().st_size for p in files) < 5e6
