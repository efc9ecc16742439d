"""The job as users run it: `ray job submit` against a Ray head, a two-node cluster, and a driver
killed mid-run and resubmitted. Each test owns its cluster (ray.cluster_utils.Cluster), so it only
ever stops its own processes.

These run in a pytest process of their own (see the Makefile): once this process has called
ray.init(), Ray 2.60 switches it to token auth, and clusters started from it no longer come up."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import jpeg_bytes, read_parts, write_tar
from ray.cluster_utils import Cluster

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "jobs" / "caption_shards.py"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _corpus(root: Path, shards: int, per_shard: int) -> str:
    for s in range(shards):
        write_tar(root / f"{s:05d}.tar", {f"{s:02d}_{i:04d}": {"jpg": jpeg_bytes(s * 1000 + i)}
                                          for i in range(per_shard)})
    return str(root / "*.tar")


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               RAY_AUTH_MODE="disabled", **extra)
    env.pop("RAY_ADDRESS", None)
    return env


def _captions(out: Path) -> pa.Table:
    return read_parts(out / "captions")


@pytest.fixture()
def cluster():
    clusters = []

    def start(nodes: int, cpus: int = 2, dashboard_port: int | None = None) -> Cluster:
        # free ports throughout: a head started by `make demo` may hold Ray's default ones
        head_args = {"num_cpus": cpus, "env_vars": {"RAY_AUTH_MODE": "disabled"}, "gcs_server_port": _free_port(),
                     "include_dashboard": bool(dashboard_port), "dashboard_port": dashboard_port or _free_port(),
                     "dashboard_host": "127.0.0.1", "dashboard_agent_listen_port": _free_port(),
                     "metrics_export_port": _free_port(), "runtime_env_agent_port": _free_port()}
        created = Cluster(initialize_head=True, head_node_args=head_args)
        clusters.append(created)
        for _ in range(nodes - 1):
            created.add_node(num_cpus=cpus)
        created.wait_for_nodes()
        return created

    yield start
    for created in clusters:
        created.shutdown()


def test_ray_job_submit_runs_the_job(cluster, tiny_bundle, tmp_path):
    port = _free_port()
    cluster(1, dashboard_port=port)
    inputs = _corpus(tmp_path / "in", shards=1, per_shard=6)
    ray_cli = Path(sys.executable).with_name("ray")
    submit = [str(ray_cli), "job", "submit", "--address", f"http://127.0.0.1:{port}", "--working-dir", str(ROOT),
              "--", sys.executable, "jobs/caption_shards.py", "--input", inputs, "--output", str(tmp_path / "out"),
              "--model", str(tiny_bundle), "--max-new-tokens", "4"]
    deadline = time.time() + 120
    while True:  # the dashboard's job agent comes up a little after the head
        proc = subprocess.run(submit, capture_output=True, text=True, env=_env(), timeout=600)
        not_ready = "No available agent" in proc.stderr or "Connection refused" in proc.stderr
        if proc.returncode == 0 or not not_ready or time.time() > deadline:
            break
        time.sleep(3)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "captioned 6 rows (0 failed" in proc.stdout
    assert sorted(_captions(tmp_path / "out").column("key").to_pylist()) == [f"00_{i:04d}" for i in range(6)]


def test_two_node_cluster_run_is_complete_and_uses_both_nodes(cluster, tiny_bundle, tmp_path):
    """Two actors on a two-node cluster (SPREAD puts one on each): the output is complete and, with
    batches going to the least busy actor, run.json shows rows captioned on both nodes; the commit's
    tasks rewrite parts on both nodes too."""
    # logical CPUs to spare on each node, so that SPREAD can always place the second actor on the other one
    created = cluster(2, cpus=4)
    inputs = _corpus(tmp_path / "in", shards=8, per_shard=24)
    proc = subprocess.run(
        [sys.executable, str(JOB), "--input", inputs, "--output", str(tmp_path / "out"), "--model", str(tiny_bundle),
         "--actors", "2", "--batch-size", "4", "--rows-per-file", "8", "--max-new-tokens", "8"],
        capture_output=True, text=True, env=_env(RAY_ADDRESS=created.address), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_json = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run_json["counts"]["rows"] == 192
    by_node = run_json["counts"]["rows_by_node"]
    assert len(by_node) == 2 and min(by_node.values()) > 0 and sum(by_node.values()) == 192, by_node
    committed = run_json["counts"]["parts_committed_by_node"]
    assert committed.keys() == by_node.keys() and min(committed.values()) > 0, committed
    assert sum(committed.values()) == len(list((tmp_path / "out" / "captions").glob("*.parquet")))
    keys = _captions(tmp_path / "out").column("key").to_pylist()
    assert len(keys) == len(set(keys)) == 192


def test_driver_killed_mid_run_resumes_without_redoing_or_duplicating(cluster, tiny_bundle, tmp_path):
    created = cluster(1)
    # many small shards: a shard is read in blocks of at most 256 rows, and staged parts follow blocks
    inputs = _corpus(tmp_path / "in", shards=12, per_shard=40)
    out = tmp_path / "out"
    command = [sys.executable, str(JOB), "--input", inputs, "--output", str(out), "--model", str(tiny_bundle),
               "--batch-size", "8", "--rows-per-file", "8", "--max-new-tokens", "12"]
    env = _env(RAY_ADDRESS=created.address)
    driver = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    deadline = time.time() + 300
    while len(list((out / "_staging").glob("part-*.parquet"))) < 2 and time.time() < deadline:
        assert driver.poll() is None, "the run finished before it could be killed: make it longer"
        time.sleep(0.1)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    staged_before = sum(pq.read_metadata(p).num_rows for p in (out / "_staging").glob("part-*.parquet"))
    assert 0 < staged_before < 480 and not (out / "run.json").exists()

    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_json = json.loads((out / "run.json").read_text())
    assert run_json["resumed_rows"] >= staged_before  # finished work was not redone
    keys = _captions(out).column("key").to_pylist()
    assert len(keys) == len(set(keys)) == 480
    assert not list(out.rglob("._tmp-*")) and not (out / "_staging").exists()


def _processes_with_env(name: str, value: str) -> list[int]:
    """Processes whose environment holds name=value: every process a run starts inherits it, even a
    Ray worker whose command line is only its title (ray::IDLE)."""
    wanted, found = f"{name}={value}".encode(), []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if wanted in environ.read_bytes().split(b"\0"):
                found.append(int(environ.parent.name))
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found


def _command_lines(pids: list[int]) -> list[str]:
    lines = []
    for pid in pids:
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            lines.append(f"{pid}: {command[:200]}")
        except OSError:
            lines.append(f"{pid}: (gone)")
    return lines


def test_a_plain_python_run_leaves_no_ray_process_behind(tiny_bundle, tmp_path):
    """`python jobs/caption_shards.py` on a machine with no Ray running starts a local Ray (token auth on,
    as Ray does by default, with a token of its own in a fresh HOME) and shuts all of it down at the end."""
    inputs = _corpus(tmp_path / "in", shards=2, per_shard=4)
    ray_root = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths live under it
    env = _env(RAY_TMPDIR=ray_root, HOME=str(tmp_path / "home"))
    env.pop("RAY_AUTH_MODE")
    try:
        proc = subprocess.run([sys.executable, str(JOB), "--input", inputs, "--output", str(tmp_path / "out"),
                               "--model", str(tiny_bundle), "--max-new-tokens", "4"],
                              capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "captioned 8 rows (0 failed" in proc.stdout
        assert list(Path(ray_root).glob("ray/session_*")), "the run did not start a Ray of its own"
        deadline = time.time() + 60  # Ray's processes exit shortly after the driver; on a busy machine, later
        while (left := _processes_with_env("RAY_TMPDIR", ray_root)) and time.time() < deadline:
            time.sleep(0.5)
        assert not left, f"Ray processes left running: {_command_lines(left)}"
    finally:
        for pid in _processes_with_env("RAY_TMPDIR", ray_root):
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(ray_root, ignore_errors=True)


def _pids(pattern: str) -> list[int]:
    found = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()
    return [int(pid) for pid in found]


def _wait_for_parts(out: Path, count: int, driver: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while len(list((out / "_staging").glob("part-*.parquet"))) < count:
        assert driver.poll() is None, "the run finished before the fault: make it longer"
        assert time.time() < deadline, "no progress"
        time.sleep(0.2)


@pytest.mark.parametrize("fault", ["model_actor", "worker_node"])
def test_faults_mid_run_lose_and_duplicate_nothing(cluster, tiny_bundle, tmp_path, fault):
    created = cluster(2 if fault == "worker_node" else 1)
    # long enough that the fault lands mid-run on an idle machine (a finished run deletes _staging/)
    inputs = _corpus(tmp_path / "in", shards=10, per_shard=40)
    out = tmp_path / "out"
    actors = "2" if fault == "worker_node" else "1"
    driver = subprocess.Popen(
        [sys.executable, str(JOB), "--input", inputs, "--output", str(out), "--model", str(tiny_bundle),
         "--actors", actors, "--batch-size", "4", "--rows-per-file", "8", "--max-new-tokens", "12"],
        env=_env(RAY_ADDRESS=created.address), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_parts(out, 2, driver)
    if fault == "model_actor":
        victims = _pids("CaptionActor")
        assert victims, "no model actor process found"
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
    else:
        created.remove_node(created.list_all_nodes()[-1], allow_graceful=False)
    _, stderr = driver.communicate(timeout=600)
    assert driver.returncode == 0, stderr[-3000:]
    keys = _captions(out).column("key").to_pylist()
    assert len(keys) == len(set(keys)) == 400
    statuses = set(_captions(out).column("status").to_pylist())
    assert statuses == {"ok"}, statuses


def _head_start_as_cluster_yaml_has_it(port: int, dashboard_port: int) -> tuple[dict[str, str], list[str]]:
    """cluster.yaml's own `ray start --head` line: its environment and flags, with free ports on this machine
    and without the autoscaler (there is no cloud here)."""
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    line = next(command for command in config["head_start_ray_commands"] if "ray start --head" in command)
    words = shlex.split(line.split(";")[-1])
    env = {}
    while "=" in words[0]:
        name, _, value = words.pop(0).partition("=")
        env[name] = value
    assert words[:3] == ["ray", "start", "--head"], words
    kept = [word for word in words[1:] if not word.startswith(("--autoscaling-config", "--port"))]
    ports = {"--port": port, "--dashboard-port": dashboard_port, "--dashboard-agent-listen-port": _free_port(),
             "--metrics-export-port": _free_port(), "--runtime-env-agent-port": _free_port(),
             "--ray-client-server-port": _free_port()}
    return env, kept + [f"{flag}={value}" for flag, value in ports.items()] + ["--num-cpus=1"]


def test_a_head_started_as_cluster_yaml_starts_it_refuses_a_job_without_the_token(tmp_path):
    """Whoever reaches the dashboard's port can submit a job: code run on every node. The head cluster.yaml
    starts asks for the token that every node and the user's `ray job submit` hold, and listens on
    127.0.0.1 only (the user reaches it through `ray dashboard cluster.yaml`, an SSH tunnel)."""
    ray_root = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths live under it
    with_token, without_token = tmp_path / "with", tmp_path / "without"
    for home in (with_token, without_token):
        home.mkdir()
    (with_token / ".ray").mkdir()
    (with_token / ".ray" / "auth_token").write_text(uuid.uuid4().hex + uuid.uuid4().hex)  # as `make cluster-token`
    dashboard_port = _free_port()
    env, start = _head_start_as_cluster_yaml_has_it(_free_port(), dashboard_port)
    assert env.get("RAY_AUTH_MODE") == "token" and "--dashboard-host=127.0.0.1" in start, (env, start)
    ray_cli = str(Path(sys.executable).with_name("ray"))
    head_env = dict(_env(RAY_TMPDIR=ray_root, HOME=str(with_token)), **env)
    try:
        started = subprocess.run([ray_cli, *start], capture_output=True, text=True, env=head_env, timeout=300)
        assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]
        submit = [ray_cli, "job", "submit", "--address", f"http://127.0.0.1:{dashboard_port}", "--",
                  sys.executable, "-c", "print('the job ran')"]
        stranger = _env(HOME=str(without_token))  # no token, or another one
        for env_of_stranger in ({"RAY_AUTH_MODE": "disabled"}, {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64}):
            refused = subprocess.run(submit, capture_output=True, text=True, env=dict(stranger, **env_of_stranger),
                                     timeout=300)
            assert refused.returncode != 0 and "the job ran" not in refused.stdout, refused.stdout[-2000:]
        user = dict(_env(HOME=str(with_token)), RAY_AUTH_MODE="token")
        deadline = time.time() + 120
        while True:  # the dashboard's job agent comes up a little after the head
            accepted = subprocess.run(submit, capture_output=True, text=True, env=user, timeout=300)
            if accepted.returncode == 0 or "No available agent" not in accepted.stderr or time.time() > deadline:
                break
            time.sleep(3)
        assert accepted.returncode == 0 and "the job ran" in accepted.stdout, accepted.stderr[-2000:]
    finally:
        for pid in _processes_with_env("RAY_TMPDIR", ray_root):
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(ray_root, ignore_errors=True)


def test_training_goes_on_after_a_node_is_lost_and_replaced(cluster, tiny_bundle, tmp_path):
    """`train_captioner.py --num-workers 2` on two nodes, one Ray Train worker each: once the first caption
    epoch's checkpoint is registered, the second node is lost (as a spot node is) and another joins (as the
    autoscaler adds one). The workers restart, resume from a checkpoint, and the run ends with every epoch's
    loss and a bundle that loads."""
    from test_ray_training import _write_output, train_command, wait_for_first_checkpoint

    from pipeline.models.bundle import load_bundle

    created = cluster(2, cpus=2)
    _write_output(tmp_path / "output", 3000, 24)
    out = tmp_path / "run"
    process = subprocess.Popen(train_command(tmp_path / "output", tiny_bundle, out), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env=_env(RAY_ADDRESS=created.address))
    try:
        wait_for_first_checkpoint(out, process)
        [lost] = list(created.worker_nodes)
        created.remove_node(lost, allow_graceful=False)
        created.add_node(num_cpus=2)
        output, _ = process.communicate(timeout=400)
    finally:
        process.kill()
    assert process.returncode == 0, output[-3000:]
    summary = json.loads((out / "train_summary.json").read_text())
    assert (summary["resumed_from"] or "").startswith("captioner-000"), output[-1500:]
    assert len(summary["caption_losses"]) == 4 and all(loss is not None for loss in summary["caption_losses"])
    bundle = load_bundle(out / "bundle")
    assert bundle.captioner is not None and bundle.manifest["sha256"] == summary["bundle_sha256"]
