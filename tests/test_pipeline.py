"""The Ray pipeline end to end, in-process, on small shards of every input kind."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import tarfile

import fsspec
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from conftest import jpeg_bytes, read_parts, tar_corpus, write_tar
from fsspec import AbstractFileSystem
from fsspec.implementations.memory import MemoryFileSystem

from pipeline.config import ActorRange, GenerationSettings, RunConfig
from pipeline.io.sinks import STAGING, STAGING_CONFIG, OutputDir
from pipeline.precision import resolve_dtype
from pipeline.quality.report import build_report
from pipeline.quality.verify import verify
from pipeline.run.chain import run
from pipeline.run.errors import ActorStartFailed, StagingNotListed, UsageError
from pipeline.run.filtering import FilterSettings
from schemas.captions import validate_table


def test_webdataset_end_to_end(ray_local, tiny_bundle, tmp_path):
    tar_corpus(tmp_path / "in")
    config = RunConfig(inputs=(str(tmp_path / "in" / "{00000..00001}.tar"),), output=str(tmp_path / "out"),
                       model=str(tiny_bundle), decode=GenerationSettings(max_new_tokens=5), batch_size=4,
                       filter=FilterSettings(keep_top_fraction=0.5))
    summary = run(config)
    captions = read_parts(tmp_path / "out" / "captions")
    validate_table(captions, 24)
    assert sorted(captions.column("key").to_pylist()) == sorted(f"{s:03d}{i:04d}" for s in range(2) for i in range(5))
    assert set(captions.column("status").to_pylist()) == {"ok"}
    assert captions.column("width").to_pylist() == [48] * 10
    assert captions.column("original_text").to_pylist()[0].startswith("örnek")
    original_scores = captions.column("original_clip_score").to_pylist()  # every sample came with a text
    assert None not in original_scores and original_scores != captions.column("clip_score").to_pylist()
    filtered = read_parts(tmp_path / "out" / "filtered")
    assert filtered.num_rows == 5 == summary["counts"]["kept"]
    scores = sorted(captions.column("clip_score").to_pylist(), reverse=True)
    assert min(filtered.column("clip_score").to_pylist()) == pytest.approx(scores[4])
    meta = json.loads(pq.read_schema(next((tmp_path / "out" / "captions").glob("*.parquet"))).metadata[b"captioner"])
    assert meta["filter"]["keep_top_fraction"] == 0.5 and meta["model"] == "tiny"
    run_json = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run_json["counts"]["rows"] == 10 and not (tmp_path / "out" / "_staging").exists()
    timings = run_json["timings"]  # Ray was up already: joining it is quick; the shards were published in the run
    assert 0 <= timings["ray_start_s"] < 1 and 0 < timings["first_published_s"] <= timings["wall_s"]
    # what "auto" resolved to on the actors' machine, per row: a run resumed elsewhere shows both
    compute = str(resolve_dtype("auto", torch.device("cpu"))).removeprefix("torch.")
    assert run_json["counts"]["rows_by_compute"] == {f"cpu {compute}": 10}
    # --actors auto (the default) on 2 CPUs with memory to spare: one single-thread actor per core
    assert run_json["config"]["actors"] is None and run_json["actors"] == {"min": 2, "max": 2}
    # the ecosystem reads it: pandas, and Hugging Face datasets' parquet loader
    import datasets
    import pandas as pd

    frame = pd.read_parquet(tmp_path / "out" / "filtered")
    assert len(frame) == 5 and frame["keep"].all()
    loaded = datasets.load_dataset("parquet", data_files=str(tmp_path / "out" / "filtered" / "*.parquet"),
                                   split="train", cache_dir=str(tmp_path / "hf-cache"))
    assert sorted(loaded["key"]) == sorted(filtered.column("key").to_pylist())
    assert len(loaded[0]["image_embedding"]) == 24


def test_an_embed_only_run_writes_every_row_with_the_captioning_run_s_embeddings_and_no_caption(
        ray_local, tiny_bundle, tmp_path):
    """--embed-only: the same rows, statuses, image_embedding and original_clip_score as a captioning run of the
    same images (one image forward serves both), caption and clip_score null, every ok row kept; decoding settings
    do not define it; it verifies, exports to WebDataset without KEY.txt and has a report page."""
    tar_corpus(tmp_path / "in")
    write_tar(tmp_path / "in" / "00002.tar", {"bad": {"jpg": b"not an image", "txt": b"bozuk"}})
    inputs = (str(tmp_path / "in" / "*.tar"),)
    captioned = run(RunConfig(inputs=inputs, output=str(tmp_path / "captioned"), model=str(tiny_bundle),
                              decode=GenerationSettings(max_new_tokens=4), batch_size=4))
    base = {"inputs": inputs, "output": str(tmp_path / "embedded"), "model": str(tiny_bundle), "batch_size": 4,
            "embed_only": True, "write_webdataset": True}
    summary = run(RunConfig(**base))
    assert summary["counts"]["rows"] == captioned["counts"]["rows"] == 11 and summary["counts"]["kept"] == 10
    embedded = read_parts(tmp_path / "embedded" / "captions").sort_by("key")
    reference = read_parts(tmp_path / "captioned" / "captions").sort_by("key")
    validate_table(embedded, 24, captioned=False)
    for name in ("key", "status", "error", "original_text", "image_embedding"):
        assert embedded.column(name).to_pylist() == reference.column(name).to_pylist(), name
    assert embedded.column("original_clip_score").to_pylist() == pytest.approx(
        reference.column("original_clip_score").to_pylist(), abs=1e-6)
    assert set(embedded.column("caption").to_pylist()) == {None} == set(embedded.column("clip_score").to_pylist())
    assert None not in reference.column("caption").to_pylist()[:10]
    meta = json.loads(pq.read_schema(next((tmp_path / "embedded" / "captions").glob("*.parquet"))).metadata[
        b"captioner"])
    assert meta["decoding"] is None
    assert verify(str(tmp_path / "embedded"), list(inputs)).ok
    with tarfile.open(next((tmp_path / "embedded" / "filtered_wds").glob("*.tar"))) as tar:
        names = tar.getnames()
    assert names and not any(name.endswith(".txt") for name in names)
    page = build_report(str(tmp_path / "embedded"))  # no score to plot, every image with its original text
    assert "nothing to plot" in page and page.count('class="card"') == 11  # 10 kept, 1 failed
    assert ">Embedded<" in page and ">Captioned<" not in page
    # decoding settings define nothing here: a rerun with others is the same run, complete already
    assert run(RunConfig(**base, decode=GenerationSettings(method="beam", num_candidates=2)))["counts"] == \
        summary["counts"]
    with pytest.raises(ValueError, match="--embed-only writes no captions"):
        RunConfig(**base, filter=FilterSettings(min_clip_score=0.2))


def test_a_clip_alone_embeds_once_and_its_embeddings_train_a_captioner_that_captions(ray_local, tmp_path):
    """ClipCap's recipe end to end at tiny scale: --embed-only with a pretrained CLIP alone (an open_clip folder,
    no bundle: the run carries it to its actors as an encoder bundle), training from those stored embeddings and
    the images' own texts, then a captioning run with the bundle it made. Without --embed-only a CLIP alone is
    no bundle to caption with."""
    import sys
    from pathlib import Path

    import numpy as np
    from conftest import tiny_multilingual_folder

    from pipeline.io.images import decode_image
    from pipeline.models.clip_factory import ClipSpec, create_clip
    from pipeline.models.errors import ModelLoadError
    from pipeline.training.config import ClipArch, LMArch, TrainConfig

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "jobs"))
    from pipeline.training.trainer import train

    folder, _ = tiny_multilingual_folder(tmp_path / "models")
    tar_corpus(tmp_path / "in", per_shard=8)
    base = {"inputs": (str(tmp_path / "in" / "*.tar"),), "output": str(tmp_path / "embedded"), "model": str(folder),
            "embed_only": True, "batch_size": 8, "dtype": "fp32"}  # compared with the CLIP's own fp32 embedding
    first = run(RunConfig(**base))
    assert first["counts"]["rows"] == 16 and first["model"]["captioner"] is None
    assert run(RunConfig(**base)) == first  # the same CLIP is the same run: complete already
    rows = read_parts(tmp_path / "embedded" / "captions").sort_by("key")
    clip = create_clip(ClipSpec.parse(str(folder)))
    image = decode_image(jpeg_bytes(0), clip.image_spec).pixels
    with torch.inference_mode():
        expected = clip.encode_images(torch.from_numpy(image[None]))[0].numpy()
    np.testing.assert_allclose(rows.column("image_embedding").to_pylist()[0], expected, atol=2e-3)  # float16
    with pytest.raises(ModelLoadError, match="not a model bundle"):
        run(RunConfig(**{**base, "embed_only": False, "output": str(tmp_path / "captioned")}))

    config = TrainConfig(out=str(tmp_path / "train"), embeddings_from=(str(tmp_path / "embedded" / "captions"),),
                         text_column="original_text", clip=str(folder), caption_epochs=2, caption_batch_size=8,
                         vocab_size=300, precision="fp32", prefix_length=4, clip_arch=ClipArch(),
                         lm_arch=LMArch(n_embd=32, n_layer=1, n_head=2, n_positions=64))
    summary = train(config)
    assert summary["examples"] == 16
    captioned = run(RunConfig(inputs=base["inputs"], output=str(tmp_path / "captioned"), model=summary["bundle"],
                              decode=GenerationSettings(max_new_tokens=4), batch_size=8, dtype="fp32"))
    table = read_parts(tmp_path / "captioned" / "captions").sort_by("key")
    assert captioned["counts"]["rows"] == 16 and None not in table.column("caption").to_pylist()
    assert table.column("image_embedding").to_pylist() == rows.column("image_embedding").to_pylist()


def test_a_pool_larger_than_the_cluster_starts_with_the_actors_it_gets(ray_local, tiny_bundle, tmp_path, monkeypatch):
    """The run waits for the pool's minimum of actors only where the nodes hold them (the two-node
    cluster test covers that side); asking for more than there is must not stall until the timeout."""
    import pipeline.run.chain as pipeline_run
    from pipeline.run.placement import actor_places, live_node_resources

    nodes = live_node_resources()
    assert actor_places(nodes, 0.0) == 2 and actor_places(nodes, 1.0) == 0  # 2 CPUs
    monkeypatch.setattr(pipeline_run, "MIN_ACTORS_TIMEOUT_S", 20)  # a wrong wait fails fast, not in 30 minutes
    tar_corpus(tmp_path / "in", shards=1, per_shard=4)
    config = RunConfig(inputs=(str(tmp_path / "in" / "*.tar"),), output=str(tmp_path / "out"), model=str(tiny_bundle),
                       decode=GenerationSettings(max_new_tokens=3), batch_size=2, actors=ActorRange.parse("3"))
    assert run(config)["counts"]["rows"] == 4


def test_one_shard_is_captioned_by_every_actor(ray_local, tiny_bundle, tmp_path):
    """A read task's output is cut into blocks by bytes only: a shard of small images was one block, which one
    actor captioned while the other waited. Cut into batches, the shard keeps both actors busy."""
    tar_corpus(tmp_path / "in", shards=1, per_shard=48)
    config = RunConfig(inputs=(str(tmp_path / "in" / "*.tar"),), output=str(tmp_path / "out"), model=str(tiny_bundle),
                       decode=GenerationSettings(max_new_tokens=3), batch_size=4, actors=ActorRange.parse("2"))
    by_actor = run(config)["counts"]["rows_by_actor"]
    assert len(by_actor) == 2 and min(by_actor.values()) >= 8, by_actor
    assert sum(by_actor.values()) == 48


def test_a_shard_smaller_than_a_batch_is_still_shared_by_every_actor(ray_local, tiny_bundle, tmp_path):
    """A local input of known size is cut into as many equal blocks as there are actors (here 6 rows, batch 256):
    one block of 6 rows left one of the two actors idle, and a short run took the time of the whole batch."""
    tar_corpus(tmp_path / "in", shards=1, per_shard=6)
    config = RunConfig(inputs=(str(tmp_path / "in" / "*.tar"),), output=str(tmp_path / "out"), model=str(tiny_bundle),
                       decode=GenerationSettings(max_new_tokens=3), actors=ActorRange.parse("2"))
    assert sorted(run(config)["counts"]["rows_by_actor"].values()) == [3, 3]


@pytest.mark.parametrize(("rows", "actors", "batch", "expected"), [
    (None, 2, 256, 256),  # size unknown: a batch
    (64, 2, 256, 32),  # smaller than a batch: one block per actor
    (576, 2, 256, 144),  # 256 + 256 + 64 left one actor the tail alone: 4 x 144
    (1, 4, 256, 1),
    (4096, 16, 256, 256),  # a batch per actor exactly
])
def test_rows_per_block_gives_every_actor_an_equal_share(rows, actors, batch, expected):
    from pipeline.run.placement import rows_per_block

    assert rows_per_block(rows, actors, batch) == expected
    for rows in range(1, 1200):  # never over a batch, and the busiest actor's rows over an equal share: at most
        block = rows_per_block(rows, actors, batch)  # one per batch each actor takes
        busiest = math.ceil(math.ceil(rows / block) / actors) * block
        assert block <= batch and busiest - rows / actors <= math.ceil(rows / (actors * batch)), rows


def test_a_small_local_input_is_counted_and_a_large_or_remote_one_is_not(tmp_path):
    from pipeline.io.sources import count_samples, expand_inputs

    tar_corpus(tmp_path / "in", shards=2, per_shard=5)
    shards = expand_inputs([str(tmp_path / "in" / "*.tar")])
    assert count_samples(shards, at_most=10) == 10
    assert count_samples(shards, at_most=9) is None  # reading stops there
    remote = [dataclasses.replace(shard, url=f"s3://bucket/{shard.url.rsplit('/', 1)[-1]}") for shard in shards]
    assert count_samples(remote, at_most=100) is None  # never read twice from a store


def test_auto_actors_take_every_gpu_share_or_every_core_the_memory_holds(tiny_bundle):
    import pipeline.run.placement as placement

    gib = 2**30
    cpu_node = {"CPU": 16.0, "memory": 64.0 * gib}
    small_cpu_node = {"CPU": 16.0, "memory": 24.0 * gib}
    gpu_node = {"CPU": 96.0, "GPU": 8.0, "memory": 700.0 * gib}
    vit_b32 = 3.4 * gib
    assert placement.auto_actors([cpu_node], 0.0, vit_b32) == ActorRange(16, 16)  # every core
    assert placement.auto_actors([small_cpu_node], 0.0, vit_b32) == ActorRange(7, 7)  # what the memory holds
    assert placement.auto_actors([cpu_node, small_cpu_node], 0.0, vit_b32) == ActorRange(23, 23)
    assert placement.auto_actors([gpu_node], 1.0, vit_b32) == ActorRange(8, 8)  # one per GPU, not per core
    assert placement.auto_actors([gpu_node, cpu_node], 0.5, vit_b32) == ActorRange(16, 16)  # GPU nodes only
    assert placement.auto_actors([{"CPU": 2.0, "memory": 1.0 * gib}], 0.0, vit_b32) == ActorRange(1, 1)
    files = sum(f.stat().st_size for f in tiny_bundle.rglob("*") if f.is_file())
    assert placement.actor_memory_estimate(tiny_bundle) == 1.5 * gib + 4 * files


def test_actors_that_do_not_start_in_time_stop_the_run_with_one_clear_error(ray_local, tiny_bundle, tmp_path,
                                                                            monkeypatch):
    import pipeline.run.chain as pipeline_run

    monkeypatch.setattr(pipeline_run, "MIN_ACTORS_TIMEOUT_S", 0.001)  # no actor loads its models that fast
    tar_corpus(tmp_path / "in", shards=1, per_shard=2)
    config = RunConfig(inputs=(str(tmp_path / "in" / "*.tar"),), output=str(tmp_path / "out"), model=str(tiny_bundle),
                       decode=GenerationSettings(max_new_tokens=3), actors=ActorRange.parse("1"))
    stopped = r"1 model actor\(s\) \(1 CPU each\) did not start within 0.001 s"
    with pytest.raises(ActorStartFailed, match=stopped):
        run(config)
    monkeypatch.setattr(pipeline_run, "MIN_ACTORS_TIMEOUT_S", 1800)
    assert run(config)["counts"]["rows"] == 2  # and a rerun goes on


class ListingCacheFS(MemoryFileSystem):
    """An in-memory store that caches directory listings as s3fs and gcsfs do (unless told not to)."""

    protocol = "listingcache"
    find = AbstractFileSystem.find  # through ls, as an object store lists (MemoryFileSystem reads its dict)

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(path.removeprefix(f"{cls.protocol}://"))

    def ls(self, path, detail=True, **kwargs):
        path = self._strip_protocol(path)
        listing = self.dircache[path] if path in self.dircache else super().ls(path, detail=True, **kwargs)
        self.dircache[path] = listing  # kept only where the listings cache is on
        return listing if detail else [entry["name"] for entry in listing]


def test_output_listings_see_what_other_processes_wrote_on_a_listing_caching_store():
    """The driver lists the parts worker processes staged; s3fs's cached listing of the staging folder, taken
    before the workers wrote, once made a run on S3 commit zero rows and delete the staged ones."""
    fsspec.register_implementation(ListingCacheFS.protocol, ListingCacheFS, clobber=True)
    try:
        output = OutputDir("listingcache://run")
        output.write_json({"run": 1}, STAGING, STAGING_CONFIG)
        assert output.parts(STAGING) == []
        worker = fsspec.filesystem(ListingCacheFS.protocol, skip_instance_cache=True)  # another process's view
        worker.pipe(f"{output.path(STAGING)}/part-a.parquet", b"rows")
        assert [path.rsplit("/", 1)[-1] for path in output.parts(STAGING)] == ["part-a.parquet"]
    finally:
        MemoryFileSystem.store.clear()
        MemoryFileSystem.pseudo_dirs[:] = [""]


def test_a_commit_that_would_miss_staged_parts_stops_and_the_rerun_finishes(ray_local, tiny_bundle, tmp_path,
                                                                           monkeypatch):
    """If the driver's listing misses parts this attempt wrote, it commits nothing and deletes nothing: one
    clear error, and the same command again finishes with every row."""
    tar_corpus(tmp_path / "in", shards=2, per_shard=3)
    config = RunConfig(inputs=(str(tmp_path / "in" / "*.tar"),), output=str(tmp_path / "out"),
                       model=str(tiny_bundle), decode=GenerationSettings(max_new_tokens=4))
    listed = OutputDir.parts
    monkeypatch.setattr(OutputDir, "parts", lambda self, folder, pattern="*.parquet": [] if folder == STAGING
                        else listed(self, folder, pattern))  # a stale listing, in the driver only
    with pytest.raises(StagingNotListed, match=r"part\(s\) this run wrote are not listed .*submit the job again"):
        run(config)
    assert not (tmp_path / "out" / "run.json").exists() and not (tmp_path / "out" / "captions").exists()
    assert sorted((tmp_path / "out" / "_staging").glob("part-*.parquet"))
    monkeypatch.undo()
    summary = run(config)
    assert summary["counts"]["rows"] == 6 and summary["resumed_rows"] == 6


def test_rerun_is_a_no_op_and_other_config_is_refused(ray_local, tiny_bundle, tmp_path):
    tar_corpus(tmp_path / "in", shards=1, per_shard=3)
    base = {"inputs": (str(tmp_path / "in" / "*.tar"),), "output": str(tmp_path / "out"), "model": str(tiny_bundle),
            "decode": GenerationSettings(max_new_tokens=4)}
    first = run(RunConfig(**base))
    assert run(RunConfig(**base, batch_size=7)) == first  # speed knobs do not change the run
    # nor do settings greedy decoding ignores, or another path to the same bundle
    ignored = GenerationSettings(max_new_tokens=4, seed=5, temperature=0.7, beam_width=2)
    assert run(RunConfig(**{**base, "decode": ignored, "model": f"{tiny_bundle}/"})) == first
    with pytest.raises(UsageError, match=r"different configuration \(decode\)"):
        run(RunConfig(**{**base, "decode": GenerationSettings(max_new_tokens=5)}))
    (tmp_path / "out" / "report.html").write_text("the first run's page")
    again = run(RunConfig(**{**base, "decode": GenerationSettings(max_new_tokens=5)}, overwrite=True))
    assert again["counts"]["rows"] == 3
    assert not (tmp_path / "out" / "report.html").exists()  # it described the run replaced
    # a shard added under the glob since: refused rather than reported complete without its samples
    tar_corpus(tmp_path / "more", shards=1, per_shard=2)
    (tmp_path / "more" / "00000.tar").rename(tmp_path / "in" / "00009.tar")
    newer = {**base, "decode": GenerationSettings(max_new_tokens=5)}
    with pytest.raises(UsageError, match="the shards --input matches"):
        run(RunConfig(**newer))
    assert run(RunConfig(**newer, overwrite=True))["counts"]["rows"] == 5


def test_parts_hold_at_most_rows_per_file_rows(ray_local, tiny_bundle, tmp_path):
    """A shard is one block of model output; its rows are still split into parts of --rows-per-file."""
    tar_corpus(tmp_path / "in", shards=1, per_shard=7)
    run(RunConfig(inputs=(str(tmp_path / "in" / "*.tar"),), output=str(tmp_path / "out"), model=str(tiny_bundle),
                  decode=GenerationSettings(max_new_tokens=4), rows_per_file=3))
    sizes = sorted(pq.read_metadata(path).num_rows for path in (tmp_path / "out" / "captions").glob("*.parquet"))
    assert sizes == [1, 3, 3]
    keys = read_parts(tmp_path / "out" / "captions").column("key").to_pylist()
    assert sorted(keys) == [f"000{i:04d}" for i in range(7)]


def test_an_attempt_that_staged_nothing_binds_no_later_command(ray_local, tiny_bundle, tmp_path):
    """A command refused after the output was claimed (no actor fits, say) staged only its settings: the
    corrected command starts, where it used to be refused as 'a different configuration'."""
    tar_corpus(tmp_path / "in", shards=1, per_shard=2)
    (tmp_path / "out" / "_staging").mkdir(parents=True)
    (tmp_path / "out" / "_staging" / "config.json").write_text(json.dumps({"config": {"model": "other"}}))
    summary = run(RunConfig(inputs=(str(tmp_path / "in" / "*.tar"),), output=str(tmp_path / "out"),
                            model=str(tiny_bundle), decode=GenerationSettings(max_new_tokens=4)))
    assert summary["counts"]["rows"] == 2


def test_usage_the_bundle_rules_out_is_one_line_before_any_work(tiny_bundle, tmp_path):
    tar_corpus(tmp_path / "in", shards=1, per_shard=1)
    base = {"inputs": (str(tmp_path / "in" / "*.tar"),), "model": str(tiny_bundle)}
    with pytest.raises(UsageError, match=r"--max-new-tokens 100000 exceeds the \d+ positions"):
        run(RunConfig(**base, output=str(tmp_path / "out"), decode=GenerationSettings(max_new_tokens=100_000)))
    assert not (tmp_path / "out").exists()
    with pytest.raises(UsageError, match="cannot write --output /sys/kernel/"):  # refused even to root
        run(RunConfig(**base, output="/sys/kernel/caption_test_out", decode=GenerationSettings(max_new_tokens=4)))


def test_a_new_filter_on_a_finished_run_refilters_stored_scores_without_models(ray_local, tiny_bundle, tmp_path,
                                                                              monkeypatch):
    import pipeline.run.chain as run_module
    import pipeline.run.commit as commit

    tar_corpus(tmp_path / "in")
    out = tmp_path / "out"
    base = {"inputs": (str(tmp_path / "in" / "*.tar"),), "output": str(out), "model": str(tiny_bundle),
            "decode": GenerationSettings(max_new_tokens=4), "batch_size": 4}
    first = run(RunConfig(**base, filter=FilterSettings(keep_top_fraction=0.5)))
    before = read_parts(out / "captions").sort_by("key")
    with pytest.raises(UsageError, match="different configuration"):
        run(RunConfig(**base, filter=FilterSettings(keep_top_fraction=0.3)))

    def no_models(*args, **kwargs):
        raise AssertionError("a re-filter must not run the models")

    monkeypatch.setattr(run_module, "_caption_into_staging", no_models)
    (out / "report.html").write_text("a page of the old filter's figures")
    summary = run(RunConfig(**base, filter=FilterSettings(keep_top_fraction=0.3), overwrite=True))
    assert not (out / "report.html").exists()
    after = read_parts(out / "captions").sort_by("key")
    assert after.drop_columns(["keep"]).equals(before.drop_columns(["keep"]))  # same rows, scores, captions
    top3 = sorted(after.column("clip_score").to_pylist(), reverse=True)[:3]
    filtered = read_parts(out / "filtered")
    assert sorted(filtered.column("clip_score").to_pylist(), reverse=True) == top3
    assert summary["counts"]["kept"] == 3 == sum(after.column("keep").to_pylist())
    assert summary["counts"]["rows"] == first["counts"]["rows"] == 10 and summary["timings"]["refilter_s"] >= 0
    assert json.loads((out / "run.json").read_text())["config"]["filter"]["keep_top_fraction"] == 0.3
    meta = json.loads(pq.read_schema(next((out / "filtered").glob("*.parquet"))).metadata[b"captioner"])
    assert meta["filter"]["keep_top_fraction"] == 0.3
    assert run(RunConfig(**base, filter=FilterSettings(keep_top_fraction=0.3))) == summary  # now the recorded run
    report = verify(str(out), list(base["inputs"]))  # schema, layout, keep vs filtered/, counts in run.json
    assert report.ok, "\n".join(report.lines())

    # a re-filter killed between two groups of parts is completed by the next run, before anything else
    real_write = commit._write

    def dies_after_first_group(output, config, plan, *args):
        assert len(plan.groups) > 1
        real_write(output, config, dataclasses.replace(plan, groups=plan.groups[:1]), *args)
        raise KeyboardInterrupt

    monkeypatch.setattr(commit, "_write", dies_after_first_group)
    nothing_passes = RunConfig(**base, filter=FilterSettings(min_clip_score=1.0), overwrite=True)
    with pytest.raises(KeyboardInterrupt):
        run(nothing_passes)
    assert (out / "_refilter.json").is_file()
    monkeypatch.setattr(commit, "_write", real_write)
    with pytest.raises(UsageError, match="different configuration"):  # the output is heading elsewhere now
        run(RunConfig(**base, filter=FilterSettings(keep_top_fraction=0.3)))
    done = run(RunConfig(**base, filter=FilterSettings(min_clip_score=1.0)))
    assert done["counts"]["kept"] == 0 and pq.read_table(out / "filtered").num_rows == 0  # empty, still a table
    assert sorted(p.name for p in (out / "filtered").glob("*.parquet")) == sorted(
        p.name for p in (out / "captions").glob("*.parquet"))
    assert not any(read_parts(out / "captions").column("keep").to_pylist()) and not (out / "_refilter.json").exists()
    assert read_parts(out / "captions").num_rows == 10
    report = verify(str(out), list(base["inputs"]))
    assert report.ok, "\n".join(report.lines())


def test_a_fraction_per_cluster_is_the_same_committed_or_refiltered(ray_local, tiny_bundle, tmp_path):
    tar_corpus(tmp_path / "in", shards=2, per_shard=12)
    base = {"inputs": (str(tmp_path / "in" / "*.tar"),), "model": str(tiny_bundle),
            "decode": GenerationSettings(max_new_tokens=4), "batch_size": 4, "rows_per_file": 5}
    per_cluster = FilterSettings(keep_top_fraction=0.5, clusters=3)
    direct = run(RunConfig(**base, output=str(tmp_path / "direct"), filter=per_cluster))
    run(RunConfig(**base, output=str(tmp_path / "later"), filter=FilterSettings(keep_top_fraction=0.5)))
    later = run(RunConfig(**base, output=str(tmp_path / "later"), filter=per_cluster, overwrite=True))
    assert "refilter_s" in later["timings"]
    flags = [read_parts(tmp_path / name / "captions").sort_by("key").select(["key", "keep"])
             for name in ("direct", "later")]
    assert flags[0].equals(flags[1])
    cutoffs = direct["counts"]["top_fraction_cutoff_scores_by_cluster"]
    assert later["counts"]["top_fraction_cutoff_scores_by_cluster"] == cutoffs and len(cutoffs) == 3
    assert direct["counts"]["top_fraction_cutoff_score"] is None
    assert 9 <= direct["counts"]["kept"] <= 15 and direct["counts"]["kept"] == later["counts"]["kept"]
    for name in ("direct", "later"):
        report = verify(str(tmp_path / name), list(base["inputs"]))
        assert report.ok, "\n".join(report.lines())


def test_an_output_written_before_a_column_was_added_still_refilters(ray_local, tiny_bundle, tmp_path):
    """Parts written before original_clip_score existed (no such column) are re-filtered with it as nulls."""
    tar_corpus(tmp_path / "in", shards=1, per_shard=4)
    out = tmp_path / "out"
    base = {"inputs": (str(tmp_path / "in" / "*.tar"),), "output": str(out), "model": str(tiny_bundle),
            "decode": GenerationSettings(max_new_tokens=4), "batch_size": 4}
    run(RunConfig(**base))
    for path in (out / "captions").glob("*.parquet"):
        older = pq.read_table(path).drop_columns(["original_clip_score"])
        pq.write_table(older, path)
    summary = run(RunConfig(**base, filter=FilterSettings(keep_top_fraction=0.5), overwrite=True))
    captions = read_parts(out / "captions")
    validate_table(captions, 24)
    assert summary["counts"]["kept"] == 2 and captions.column("original_clip_score").null_count == 4
    report = verify(str(out), list(base["inputs"]))
    assert report.ok, "\n".join(report.lines())


def test_same_key_in_two_shards_keeps_both_samples(ray_local, tiny_bundle, tmp_path):
    shared = {"jpg": jpeg_bytes(1)}
    write_tar(tmp_path / "in" / "a.tar", {"dup": shared, "only_a": {"jpg": jpeg_bytes(2)}})
    write_tar(tmp_path / "in" / "b.tar", {"dup": {"jpg": jpeg_bytes(3)}})
    summary = run(RunConfig(inputs=(str(tmp_path / "in" / "*.tar"),), output=str(tmp_path / "out"),
                            model=str(tiny_bundle), decode=GenerationSettings(max_new_tokens=3)))
    rows = {row["key"]: row for row in read_parts(tmp_path / "out" / "captions").to_pylist()}
    b_url = str(tmp_path / "in" / "b.tar")
    assert set(rows) == {"dup", "only_a", f"dup@{b_url}#0"}
    assert rows["dup"]["status"] == "ok" and rows["dup"]["source"].endswith("a.tar")
    duplicate = rows[f"dup@{b_url}#0"]
    assert duplicate["status"] == "duplicate_key" and duplicate["caption"] is None and "a.tar" in duplicate["error"]
    assert summary["counts"]["by_status"] == {"duplicate_key": 1, "ok": 2}


def test_a_resumed_run_reads_only_the_shards_not_staged_completely(ray_local, tiny_bundle, tmp_path, monkeypatch):
    import pipeline.run.chain as run_module
    import pipeline.run.resume as resume
    from pipeline.io.sinks import OutputDir, shard_id
    from pipeline.io.sources import expand_inputs

    tar_corpus(tmp_path / "in", shards=3, per_shard=4)
    out = tmp_path / "out"
    config = RunConfig(inputs=(str(tmp_path / "in" / "*.tar"),), output=str(out), model=str(tiny_bundle),
                       decode=GenerationSettings(max_new_tokens=4), batch_size=4)
    real_finalize = run_module.finalize

    def driver_killed(*args, **kwargs):  # after the model stage, before the commit
        raise KeyboardInterrupt

    monkeypatch.setattr(run_module, "finalize", driver_killed)
    with pytest.raises(KeyboardInterrupt):
        run(config)
    markers = sorted((out / "_staging" / "shards").iterdir())
    assert len(markers) == 3 and all(marker.name.endswith(".4") for marker in markers)

    shards = expand_inputs(list(config.inputs))
    staged = resume.staged_samples(OutputDir(str(out)))
    assert staged.finished == {shard.url for shard in shards} and not staged.partial and staged.rows == 12
    # a record short (a part lost with its row): that shard must be read again, for its missing record only
    for part in (out / "_staging").glob("part-*.parquet"):
        table = pq.read_table(part)
        short = pc.and_(pc.equal(table.column("source"), shards[0].url), pc.equal(table.column("index"), 3))
        if pc.any(short).as_py():
            pq.write_table(table.filter(pc.invert(short)), part)
    staged = resume.staged_samples(OutputDir(str(out)))
    assert staged.finished == {shards[1].url, shards[2].url} and staged.rows == 11
    assert staged.partial == {shards[0].url: {0, 1, 2}}

    read_again = []
    real_caption = run_module._caption_into_staging

    def spy(config, output, unfinished, *args):
        read_again.extend(shard.url for shard in unfinished)
        return real_caption(config, output, unfinished, *args)

    (out / "_staging" / "shards" / markers[1].name).unlink()  # as if killed before that shard's end
    monkeypatch.setattr(run_module, "finalize", real_finalize)
    monkeypatch.setattr(run_module, "_caption_into_staging", spy)
    summary = run(config)
    unmarked = {shard.url for shard in shards if shard_id(shard.url) == markers[1].name.split(".")[0]}
    assert sorted(read_again) == sorted(unmarked | {shards[0].url})
    assert summary["resumed_rows"] == 11 and summary["counts"]["rows"] == 12
    keys = read_parts(out / "captions").column("key").to_pylist()
    assert len(keys) == len(set(keys)) == 12


def test_a_ray_address_nothing_listens_on_is_one_usage_line(monkeypatch):
    """ray.init() retried such an address for minutes, printing only GCS connection warnings."""
    import socket

    import pipeline.run.chain as run_module
    from pipeline.run.chain import init_ray

    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        port = listening.getsockname()[1]  # bound, not listening: connections are refused
        monkeypatch.setattr(run_module.ray, "is_initialized", lambda: False)
        monkeypatch.setattr(run_module.ray, "init", lambda **kwargs: pytest.fail("ray.init was called"))
        for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}"):
            monkeypatch.setenv("RAY_ADDRESS", address)
            with pytest.raises(UsageError, match=rf"^RAY_ADDRESS={re.escape(address)}: no Ray cluster answers there"):
                init_ray()
        listening.listen()
        monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
        called = []
        monkeypatch.setattr(run_module.ray, "init", lambda **kwargs: called.append(kwargs))
        init_ray()
        assert called[0]["address"] == f"127.0.0.1:{port}"
