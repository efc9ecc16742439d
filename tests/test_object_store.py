"""The pipeline on an object store, as a LAION-scale run uses it: shards read from s3:// and the output
written to s3://, against moto's S3 server through s3fs (the `cloud` extra). An s3fs listing cache once
made such a run commit zero rows and delete the staged ones; local paths cannot show that."""

from __future__ import annotations

import os
import socket

import pytest
import ray
import s3fs
from conftest import jpeg_bytes, write_tar
from moto.server import ThreadedMotoServer

from pipeline.config import GenerationSettings, RunConfig
from pipeline.quality.verify import verify
from pipeline.run.chain import run
from pipeline.run.filtering import FilterSettings

BUCKET = "captions-test"


@pytest.fixture(scope="module")
def s3_env():
    """A moto S3 server; the driver and every Ray worker reach it through AWS_ENDPOINT_URL."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    ray.shutdown()  # a Ray started by another module has workers without these variables
    ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False,
             runtime_env={"env_vars": {**env, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}})
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield env
    ray.shutdown()
    server.stop()
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
