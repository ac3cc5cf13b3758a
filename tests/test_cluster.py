"""A sweep on a Ray cluster whose nodes share nothing but the cluster and a bucket (slow: real Ray nodes).

Every node here runs on this one machine, but each has its own local cache root (SPO_RAY_LOCAL_CACHE), as
separate machines would: what one node built is on its disk only, so anything another node reads must come
through the bucket — a real S3-compatible server on 127.0.0.1 (the `s3_bucket` fixture).

- `test_a_sweep_on_an_external_cluster_…`: `ray start --head` and a second `ray start --address` node, the
  sweep command run against them with RAY_ADDRESS, Ray Train trials whose workers are pinned to the second
  node;
- `test_a_node_removed_mid_sweep_…`: `ray.cluster_utils.Cluster` (nodes it can remove), the trial's node
  removed after its first checkpoint, the trial finished on another node from that checkpoint.
"""

import io
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import _free_port, tiny_run

ROOT = Path(__file__).resolve().parent.parent
RAY = str(Path(sys.executable).parent / "ray")

pytestmark = pytest.mark.slow


def objects(client, bucket: str, prefix: str = "") -> list[str]:
    keys, token = [], None
    while True:
        page = client.list_objects_v2(Bucket=bucket, Prefix=prefix, **({"ContinuationToken": token} if token else {}))
        keys += [o["Key"] for o in page.get("Contents", [])]
        if not page.get("IsTruncated"):
            return keys
        token = page["NextContinuationToken"]


def uploads(client, bucket: str, prefix: str) -> dict[str, int]:
    """How many times each object under `prefix` was written (the bucket keeps every version)."""
    versions = client.list_object_versions(Bucket=bucket, Prefix=prefix).get("Versions", [])
    counts: dict[str, int] = {}
    for version in versions:
        counts[version["Key"]] = counts.get(version["Key"], 0) + 1
    return counts


def versioned(s3_bucket):
    """The fixture's bucket with versioning on, so the tests can count writes, not log lines (Ray may print a
    worker's lines twice)."""
    bucket, client = s3_bucket
    client.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    return bucket, client


def read_object(client, bucket: str, key: str) -> bytes:
    return client.get_object(Bucket=bucket, Key=key)["Body"].read()


def sweep_file(tmp_path: Path, bucket: str, name: str, **sections) -> Path:
    raw = tiny_run(**sections)
    raw.update(name=name, storage_path=f"s3://{bucket}/results", wandb={"mode": "disabled"})
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def wait_for_nodes(address: str, count: int, env: dict, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = subprocess.run([RAY, "status", f"--address={address}"], capture_output=True, text=True, env=env)
        if len(re.findall(r"^\s*1 node_", status.stdout, re.MULTILINE)) >= count:
            return
        time.sleep(1)
    pytest.fail(f"the cluster did not reach {count} nodes: {status.stdout[-2000:]}")


def stop_node(process: subprocess.Popen, temp_dir: str) -> None:
    """Stop a `ray start --block` node and every process it started (found by its own temp dir), leaving any
    other Ray on this machine alone (`ray stop` would stop them all)."""
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
    subprocess.run(["pkill", "-9", "-f", temp_dir], check=False)


def test_a_sweep_on_an_external_cluster_reads_caches_through_the_bucket_and_builds_each_once(s3_bucket, tmp_path):
    bucket, client = versioned(s3_bucket)
    port = _free_port()
    address = f"127.0.0.1:{port}"
    # Ray ≥ 2.5x clusters started with `ray start` check a token: every node and the driver share it.
    ray_env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": uuid.uuid4().hex}
    nodes = []
    try:
        for args, cache in (([f"--head", f"--port={port}", "--num-cpus=1", "--include-dashboard=false"], "head"),
                            ([f"--address={address}", "--num-cpus=2", '--resources={"trainer": 2}'], "node-b")):
            temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths have a limit
            env = {**ray_env, "SPO_RAY_LOCAL_CACHE": str(tmp_path / cache)}
            nodes.append((subprocess.Popen([RAY, "start", "--block", f"--temp-dir={temp_dir}", *args], env=env,
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), temp_dir))
            if cache == "head":
                wait_for_nodes(address, 1, ray_env)
        wait_for_nodes(address, 2, ray_env)

        # Ray Train trials (a TorchTrainer per trial, checkpoints through Train's storage into the bucket);
        # their workers need the "trainer" resource: node b's.
        config = sweep_file(tmp_path, bucket, "cluster", loss={"name": {"grid": ["dpo", "spo"]}},
                            scaling={"num_workers": 1, "cpus_per_worker": 1, "resources_per_worker": {"trainer": 1},
                                     "force_ray_train": True},
                            tune={"max_concurrent_trials": 2})
        env = {**ray_env, "RAY_ADDRESS": address, "SPO_RAY_LOCAL_CACHE": str(tmp_path / "driver"),
               "WANDB_MODE": "disabled"}
        done = subprocess.run([sys.executable, "-m", "spo_ray.sweep", str(config)], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=900)  # hang guard: 2.5 min idle, 5+ in make test
        output = done.stdout + done.stderr
        assert done.returncode == 0, output[-4000:]
    finally:
        for process, temp_dir in nodes:
            stop_node(process, temp_dir)

    keys = objects(client, bucket)
    results = pd.read_csv(io.BytesIO(read_object(client, bucket, "results/cluster/results.csv")))
    assert sorted(results["loss"]) == ["dpo", "spo"] and set(results["status"]) == {"TERMINATED"}
    assert set(results["step"]) == {6}
    history = pd.read_parquet(io.BytesIO(read_object(client, bucket, "results/cluster/history.parquet")))
    assert not history.duplicated(["trial_id", "step"]).any() and len(history) == 4  # steps 3 and 6, twice
    assert "results/cluster/sweep.yaml" in keys and "results/cluster/tuner.pkl" in keys
    assert len([k for k in keys if re.fullmatch(r"results/cluster/reference_cache/reflogps-\w+\.parquet", k)]) == 2
    assert [k for k in keys if k.endswith("/trainer_state.pt")], "no checkpoint reached the bucket"

    # The init: built by the driver (before Ray) and uploaded once; node b, where both trials ran, fetched it
    # (a build there would have uploaded it again).
    [init] = {k.split("/")[2] for k in keys if k.startswith("results/.cache/") and k.endswith("/init.json")}
    written = uploads(client, bucket, f"results/.cache/{init}/")
    assert len(written) >= 4 and set(written.values()) == {1}, written
    assert "built and uploaded to" in output and f"init {init}: fetched from" in output
    assert len(list((tmp_path / "node-b").glob(f"mirror/*/{init}/init.json"))) == 1
    assert len(list((tmp_path / "driver").glob(f"mirror/*/{init}/init.json"))) == 1
    assert not (tmp_path / "head").exists()  # the head node ran no training worker
    # The reference tables (train, eval): computed by one trial under the driver's lease, written once each,
    # read by the other trial.
    assert list(uploads(client, bucket, "results/cluster/reference_cache/").values()) == [1, 1]
    assert "computed into s3://" in output and "read from s3://" in output
    assert not (tmp_path / "s3:").exists() and not (ROOT / "s3:").exists()  # no URI turned into a local path


def test_a_node_removed_mid_sweep_restarts_its_trial_on_another_node_from_the_checkpoint(s3_bucket, tmp_path,
                                                                                        monkeypatch):
    import ray._private.utils
    from ray.cluster_utils import Cluster

    # Cluster() writes its address to /tmp/ray/ray_current_cluster, where every plain `ray.init()` on this
    # machine looks first: the other tests' sweeps (parallel test workers) would join this cluster and lose
    # their trials when it shuts down. The sweep here gets the address through RAY_ADDRESS instead.
    monkeypatch.setattr(ray._private.utils, "write_ray_address", lambda *args, **kwargs: None)
    bucket, client = versioned(s3_bucket)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        node_b = cluster.add_node(num_cpus=1, resources={"trainer": 1},
                                  env_vars={"SPO_RAY_LOCAL_CACHE": str(tmp_path / "node-b")})
        config = sweep_file(tmp_path, bucket, "lost", loss={"name": "dpo"},
                            train={"max_steps": 400, "log_every": 10, "eval_every": 200, "probe_every": 200,
                                   "checkpoint_every": 50},
                            scaling={"num_workers": 1, "cpus_per_worker": 1, "resources_per_worker": {"trainer": 1}},
                            tune={"max_failures": 2})
        env = {**os.environ, "RAY_ADDRESS": cluster.address, "SPO_RAY_LOCAL_CACHE": str(tmp_path / "driver"),
               "WANDB_MODE": "disabled"}
        sweep = subprocess.Popen([sys.executable, "-m", "spo_ray.sweep", str(config)], cwd=tmp_path, env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        checkpointed, deadline = None, time.time() + 240
        while checkpointed is None and time.time() < deadline and sweep.poll() is None:
            if any(k.endswith("/trainer_state.pt") for k in objects(client, bucket, "results/lost/")):
                checkpointed = time.time()
            time.sleep(0.5)
        assert checkpointed, "no checkpoint reached the bucket"
        cluster.add_node(num_cpus=1, resources={"trainer": 1},
                         env_vars={"SPO_RAY_LOCAL_CACHE": str(tmp_path / "node-c")})
        cluster.remove_node(node_b)
        output, _ = sweep.communicate(timeout=900)  # a hang guard, as above
        assert sweep.returncode == 0, output[-4000:]
    finally:
        cluster.shutdown()

    results = pd.read_csv(io.BytesIO(read_object(client, bucket, "results/lost/results.csv")))
    assert len(results) == 1 and results.loc[0, "status"] == "TERMINATED" and results.loc[0, "step"] == 400
    history = pd.read_parquet(io.BytesIO(read_object(client, bucket, "results/lost/history.parquet")))
    assert list(history["step"]) == list(range(10, 410, 10))  # every step once
    # node b died with the trial on it; node c took the trial over from a checkpoint in the bucket, after
    # fetching the init that node b's disk had (the driver's copy is on the driver's disk only).
    assert "The actor died because its node has died" in output
    [resumed] = set(re.findall(rf"resuming from the checkpoint of step (\d+) \({bucket}/results/lost/", output))
    assert int(resumed) in range(50, 400, 50), "the trial restarted from scratch, not from its checkpoint"
    # Node c fetched the init node b had (the driver's copy is on the driver's disk only); built only once.
    assert list((tmp_path / "node-b").glob("mirror/*/*/init.json"))
    assert list((tmp_path / "node-c").glob("mirror/*/*/init.json"))
    assert set(uploads(client, bucket, "results/.cache/").values()) == {1}
    assert list(uploads(client, bucket, "results/lost/reference_cache/").values()) == [1, 1]
