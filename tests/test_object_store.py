"""The pipeline on an object store, as a LAION-scale run uses it: shards read from s3:// and the output
written to s3://, against moto's S3 server through s3fs (the `cloud` extra). An s3fs listing cache once
made such a run commit zero rows and delete the staged ones; local paths cannot show that."""

from __future__ import annotations

import contextlib
import os
import socket
import threading

import pytest
import ray
import s3fs
from conftest import jpeg_bytes, write_tar
from moto.server import ThreadedMotoServer

from pipeline.config import GenerationSettings, RunConfig
from pipeline.io.retry import TransientIOError
from pipeline.io.sinks import shard_id
from pipeline.quality.verify import verify
from pipeline.run.chain import run
from pipeline.run.filtering import FilterSettings

BUCKET = "captions-test"


class FlakyProxy:
    """A TCP proxy in front of the S3 server that breaks downloads the way a flaky network does: the next
    `failures` GETs whose request line holds `needle` get their response cut off after `cut_after` bytes
    (headers included) and the connection closed."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.needle, self.failures, self.cut_after = b"", 0, 0
        self.lock = threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def fail(self, needle: bytes, failures: int, cut_after: int) -> None:
        with self.lock:
            self.needle, self.failures, self.cut_after = needle, failures, cut_after

    def _accept(self) -> None:
        while True:
            client, _ = self.listener.accept()
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        upstream = socket.create_connection(("127.0.0.1", self.target_port))
        cut = []  # bytes left before the response being forwarded is cut off, when it is to be

        def requests() -> None:
            with contextlib.suppress(OSError):
                while data := client.recv(65536):
                    line = data.split(b"\r\n", 1)[0]
                    with self.lock:
                        if line.startswith(b"GET ") and self.needle and self.needle in line and self.failures:
                            self.failures -= 1
                            cut[:] = [self.cut_after]
                    upstream.sendall(data)
            upstream.close()

        threading.Thread(target=requests, daemon=True).start()
        with contextlib.suppress(OSError):
            while data := upstream.recv(65536):
                if cut and len(data) >= cut[0]:
                    client.sendall(data[:cut[0]])
                    client.shutdown(socket.SHUT_RDWR)  # now, not when the other thread's recv returns
                    break
                if cut:
                    cut[0] -= len(data)
                client.sendall(data)
        client.close()
        upstream.close()


@pytest.fixture(scope="module")
def s3_proxy():
    """A moto S3 server behind a FlakyProxy (which passes everything until told otherwise)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield FlakyProxy(port)
    server.stop()


@pytest.fixture(scope="module")
def s3_env(s3_proxy):
    """The driver and every Ray worker reach the S3 server through AWS_ENDPOINT_URL (the proxy)."""
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{s3_proxy.port}", "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    ray.shutdown()  # a Ray started by another module has workers without these variables
    ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False,
             runtime_env={"env_vars": {**env, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}})
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield env
    ray.shutdown()
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def test_s3_shards_to_an_s3_output_every_row_once_resumable_and_refiltered(s3_env, tiny_bundle, tmp_path):
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.mkdir(BUCKET)
    for shard in range(2):
        samples = {f"{shard}-{i}": {"jpg": jpeg_bytes(10 * shard + i), "txt": f"örnek {i}".encode()} for i in range(4)}
        fs.put(str(write_tar(tmp_path / f"{shard:05d}.tar", samples)), f"{BUCKET}/in/{shard:05d}.tar")
    inputs = (f"s3://{BUCKET}/in/*.tar",)
    config = RunConfig(inputs=inputs, output=f"s3://{BUCKET}/out", model=str(tiny_bundle),
                       decode=GenerationSettings(max_new_tokens=4), write_webdataset=True)

    summary = run(config)
    assert summary["counts"]["rows"] == 8 and summary["counts"]["kept"] == 8
    report = verify(config.output, list(inputs))  # every input key exactly once, run.json counts
    assert report.ok, "\n".join(report.lines())
    listed = {path.split("/", 2)[2] for path in fs.find(f"{BUCKET}/out")}
    assert not any(path.startswith("_staging") for path in listed)
    assert {"run.json", "filtered_wds/00000.tar", "filtered_wds/00001_stats.json"} <= listed

    assert run(config) == summary  # a resubmission of a finished run changes nothing
    refiltered = run(RunConfig(inputs=inputs, output=config.output, model=str(tiny_bundle),
                               decode=GenerationSettings(max_new_tokens=4), write_webdataset=True,
                               filter=FilterSettings(keep_top_fraction=0.5), overwrite=True))
    assert refiltered["counts"]["kept"] == 4 and refiltered["webdataset"]["samples"] == 4
    assert verify(config.output, list(inputs)).ok


def test_training_on_ray_train_reads_embeddings_from_s3_and_checkpoints_and_writes_its_bundle_there(
        s3_env, tiny_bundle, tmp_path):
    """--embeddings-from and --out as s3:// URLs: Ray Train keeps its checkpoints in the bucket, the bundle and
    train_summary.json land beside them, and a rerun with more epochs resumes from the bucket's checkpoint."""
    from dataclasses import replace

    from test_ray_training import _config, _write_output

    from pipeline.models.bundle import load_bundle
    from pipeline.training.trainer import Scaling, train

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    bucket = "training-test"  # its own: s3fs's mkdir of an existing bucket raises, exist_ok or not
    fs.mkdir(bucket)
    _write_output(tmp_path / "output", 64, 24)
    fs.put(str(tmp_path / "output" / "part-0.parquet"), f"{bucket}/emb/part-0.parquet")
    config = replace(_config(tmp_path, tmp_path, tiny_bundle, train_scorer=False), out=f"s3://{bucket}/train",
                     embeddings_from=(f"s3://{bucket}/emb",))
    scaling = Scaling(num_workers=1, cpus_per_worker=1, max_failures=0)
    summary = train(config, scaling=scaling)
    assert summary["examples"] == 64 and len(summary["caption_losses"]) == 2
    listed = {path.split("/", 2)[2] for path in fs.find(f"{bucket}/train")}
    assert {"train_summary.json", "bundle/bundle.json", "checkpoints/captioner-0002/captioner-0002/mapper.pt",
            "checkpoints/captioner-0002/text_tokenizer.json"} <= listed
    fs.get(f"{bucket}/train/bundle/", str(tmp_path / "bundle"), recursive=True)
    bundle = load_bundle(tmp_path / "bundle")
    assert bundle.captioner is not None and bundle.manifest["sha256"] == summary["bundle_sha256"]

    resumed = train(replace(config, caption_epochs=3), scaling=scaling)
    assert resumed["caption_losses"][:2] == summary["caption_losses"] and len(resumed["caption_losses"]) == 3


def test_a_flaky_network_loses_nothing_and_a_shard_it_kept_from_is_read_by_the_next_run(s3_env, s3_proxy,
                                                                                       tiny_bundle, tmp_path):
    """Downloads cut off mid-body (the connection reset by the network, not bytes missing from the tar) are
    read again: no `truncated_shard` row. One that keeps failing stops the run without marking its shard
    finished, and the same command, once the network is back, reads it and finishes with every row once."""
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    bucket = "flaky-test"
    fs.mkdir(bucket)
    for shard in range(2):
        samples = {f"{shard}-{i}": {"jpg": jpeg_bytes(10 * shard + i)} for i in range(6)}
        fs.put(str(write_tar(tmp_path / f"{shard:05d}.tar", samples)), f"{bucket}/in/{shard:05d}.tar")
    size = (tmp_path / "00000.tar").stat().st_size
    inputs = (f"s3://{bucket}/in/*.tar",)

    def config(out: str) -> RunConfig:
        return RunConfig(inputs=inputs, output=f"s3://{bucket}/{out}", model=str(tiny_bundle),
                         decode=GenerationSettings(max_new_tokens=4))

    s3_proxy.fail(b"/in/00000.tar", failures=3, cut_after=size // 2)
    summary = run(config("passing"))
    assert s3_proxy.failures == 0  # every cut happened
    assert summary["counts"]["rows"] == 12 and summary["counts"]["by_status"] == {"ok": 12}
    assert verify(config("passing").output, list(inputs)).ok

    s3_proxy.fail(b"/in/00000.tar", failures=10_000, cut_after=size // 2)
    with pytest.raises(TransientIOError, match="a rerun resumes"):
        run(config("lasting"))
    markers = [path.rsplit("/", 1)[-1] for path in fs.find(f"{bucket}/lasting/_staging/shards")]
    assert not any(marker.startswith(shard_id(f"s3://{bucket}/in/00000.tar")) for marker in markers), markers
    s3_proxy.fail(b"", failures=0, cut_after=0)
    summary = run(config("lasting"))
    assert summary["counts"]["rows"] == 12 and summary["counts"]["by_status"] == {"ok": 12}
    assert verify(config("lasting").output, list(inputs)).ok
