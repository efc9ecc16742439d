"""pipeline.quality.verify and jobs/verify_output.py on hand-made output directories: a good one passes, and each
kind of corruption fails the check that names it (and only that one)."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pytest
from conftest import jpeg_bytes, write_tar

from pipeline.io.sinks import CAPTIONS, FILTERED, RUN_JSON, STAGING, OutputDir
from pipeline.io.sources import InputError, expand_inputs
from pipeline.quality.verify import VerifyUsageError, verify
from schemas.captions import captions_schema

ROOT = Path(__file__).resolve().parents[1]
DIM = 4
METADATA = json.dumps({"encoder": {"arch": "tiny"}, "captioner": {"mapper": "mlp"}, "scorer": {"arch": "tiny"},
                       "model": "tiny", "decoding": {"method": "greedy"}, "filter": {}, "version": "0.1.0"})
SCHEMA = captions_schema(DIM, METADATA)


def make_row(key: str, source: str, status: str = "ok", **overrides) -> dict:
    """One captions/ row; failed rows carry an error and no caption, as the schema demands."""
    ok = status == "ok"
    row = {"key": key, "source": source, "status": status, "error": None if ok else "bozuk",
           "width": 8 if ok else None, "height": 6 if ok else None, "caption": f"bir resim {key}" if ok else None,
           "clip_score": 0.25 if ok else None, "image_embedding": [0.5] * DIM if ok else None, "candidates": None,
           "keep": ok, "original_text": None}
    return row | overrides


def write_output(url: str, rows: list[dict], filtered: list[dict] | None = None, counts: dict | None = None,
                 schema: pa.Schema = SCHEMA, limit: int | None = None) -> OutputDir:
    """A finished output as pipeline.run.chain writes it; `filtered` and `counts` default to the consistent ones."""
    output = OutputDir(url)
    output.write_parquet(pa.Table.from_pylist(rows, schema=schema), CAPTIONS, "part-0.parquet")
    filtered = [row for row in rows if row["keep"]] if filtered is None else filtered
    if filtered:
        output.write_parquet(pa.Table.from_pylist(filtered, schema=schema), FILTERED, "part-0.parquet")
    by_status = dict(sorted(Counter(row["status"] for row in rows).items()))
    output.write_json({"config": {"limit": limit},
                       "counts": counts or {"rows": len(rows), "by_status": by_status, "kept": len(filtered)}},
                      RUN_JSON)
    return output


@pytest.fixture
def shard(tmp_path) -> tuple[str, str]:
    """(spec, source URL) of a tar with samples a, b, c."""
    path = write_tar(tmp_path / "in" / "shard.tar", {key: {"jpg": jpeg_bytes(i)} for i, key in enumerate("abc")})
    return str(path), source_url(path)


def source_url(path: Path) -> str:
    """What the pipeline records as `source` for a shard."""
    return expand_inputs([str(path)])[0].url


def good_rows(source: str) -> list[dict]:
    return [make_row("a", source), make_row("b", source, keep=False), make_row("c", source, "decode_error")]


def failed(report) -> set[str]:
    return {check.name for check in report.checks if not check.ok}


def test_a_good_output_passes_every_check(tmp_path, shard):
    spec, url = shard
    write_output(str(tmp_path / "out"), good_rows(url))
    report = verify(str(tmp_path / "out"), [spec])
    assert report.ok, "\n".join(report.lines())
    assert [c.name for c in report.checks] == ["layout", "readable", "schema", "metadata", "unique_keys", "filtered",
                                               "complete", "run_json"]
    assert report.lines()[-1].startswith("OK")


def test_without_inputs_completeness_is_not_checked(tmp_path, shard):
    write_output(str(tmp_path / "out"), good_rows(shard[1])[:1])
    report = verify(str(tmp_path / "out"))
    assert report.ok and "complete" not in {c.name for c in report.checks}


def test_an_fsspec_url_works(shard):
    url = f"memory://verify-{uuid.uuid4().hex}/out"
    write_output(url, good_rows(shard[1]))
    assert verify(url, [shard[0]]).ok


def test_a_renamed_duplicate_key_row_is_expected(tmp_path):
    first = write_tar(tmp_path / "in" / "first.tar", {"a": {"jpg": jpeg_bytes(0)}, "b": {"jpg": jpeg_bytes(1)}})
    again = write_tar(tmp_path / "in" / "again.tar", {"a": {"jpg": jpeg_bytes(2)}})
    rows = [make_row("a", source_url(first)), make_row("b", source_url(first)),
            make_row(f"a@{source_url(again)}#0", source_url(again), "duplicate_key")]
    write_output(str(tmp_path / "out"), rows)
    assert verify(str(tmp_path / "out"), [str(first), str(again)]).ok
    rows[2] = make_row(f"zz@{source_url(again)}#0", source_url(again), "duplicate_key")  # no input key 'zz'
    write_output(str(tmp_path / "bad"), rows)
    assert "complete" in failed(verify(str(tmp_path / "bad"), [str(first), str(again)]))


def test_duplicate_key_fails_unique_keys(tmp_path, shard):
    url = shard[1]
    output = write_output(str(tmp_path / "out"), good_rows(url))
    again = pa.Table.from_pylist([make_row("b", url, keep=False)], schema=SCHEMA)
    output.write_parquet(again, CAPTIONS, "part-1.parquet")
    output.write_json({"counts": {"rows": 4, "by_status": {"decode_error": 1, "ok": 3}, "kept": 1}}, RUN_JSON)
    report = verify(str(tmp_path / "out"))
    assert failed(report) == {"unique_keys"}
    assert "1 keys occur more than once" in report["unique_keys"].detail and ": b" in report["unique_keys"].detail


def test_missing_key_fails_complete(tmp_path, shard):
    spec, url = shard
    write_output(str(tmp_path / "out"), good_rows(url)[:2])
    report = verify(str(tmp_path / "out"), [spec])
    assert failed(report) == {"complete"}
    assert "1 input keys missing (c)" in report["complete"].detail
    assert f"{url}: 3 samples, 2 rows" in report["complete"].detail


def test_a_limit_run_is_complete_with_the_first_samples_in_input_order(tmp_path, shard):
    spec, url = shard
    write_output(str(tmp_path / "out"), good_rows(url)[:2], limit=2)
    report = verify(str(tmp_path / "out"), [spec])
    assert report.ok, "\n".join(report.lines())
    write_output(str(tmp_path / "skipped"), [good_rows(url)[0], good_rows(url)[2]], limit=2)  # a, c: not b
    report = verify(str(tmp_path / "skipped"), [spec])
    assert failed(report) == {"complete"} and "1 input keys missing (b)" in report["complete"].detail


def test_a_key_no_input_yields_fails_complete(tmp_path, shard):
    spec, url = shard
    write_output(str(tmp_path / "out"), [*good_rows(url), make_row("stranger", url)])
    report = verify(str(tmp_path / "out"), [spec])
    assert failed(report) == {"complete"} and "keys no input yields (stranger)" in report["complete"].detail


def test_a_lost_sample_of_a_repeated_key_fails_complete(tmp_path, shard):
    """Both shards yield key 'a'; an output with one 'a' row has every key, but lost a sample."""
    spec, url = shard
    other = write_tar(tmp_path / "in" / "other.tar", {"a": {"jpg": jpeg_bytes(9)}})
    write_output(str(tmp_path / "out"), good_rows(url))
    report = verify(str(tmp_path / "out"), [spec, str(other)])
    assert failed(report) == {"complete"} and f"{source_url(other)}: 1 samples, 0 rows" in report["complete"].detail


@pytest.mark.parametrize("where", [CAPTIONS, FILTERED, STAGING])
def test_a_temporary_file_fails_layout(tmp_path, shard, where):
    output = write_output(str(tmp_path / "out"), good_rows(shard[1]))
    output.fs.makedirs(output.path(where), exist_ok=True)
    output.fs.pipe(output.path(where, "._tmp-0123abcd-part-9.parquet"), b"half a file")
    report = verify(str(tmp_path / "out"))
    assert failed(report) == {"layout"} and "1 temporary files" in report["layout"].detail


def test_a_leftover_staging_folder_fails_layout(tmp_path, shard):
    output = write_output(str(tmp_path / "out"), good_rows(shard[1]))
    output.write_json({"config": {}}, STAGING, "config.json")
    report = verify(str(tmp_path / "out"))
    assert failed(report) == {"layout"} and f"leftover {STAGING}/" in report["layout"].detail


def test_a_stray_file_among_the_parts_fails_layout(tmp_path, shard):
    output = write_output(str(tmp_path / "out"), good_rows(shard[1]))
    output.fs.pipe(output.path(CAPTIONS, "notes.txt"), b"x")
    assert failed(verify(str(tmp_path / "out"))) == {"layout"}


def test_wrong_column_type_fails_schema(tmp_path, shard):
    schema = SCHEMA.set(SCHEMA.get_field_index("width"), pa.field("width", pa.int64()))
    write_output(str(tmp_path / "out"), good_rows(shard[1]), schema=schema)
    report = verify(str(tmp_path / "out"))
    assert failed(report) == {"schema"} and "'width' has type int64" in report["schema"].detail


def test_different_embedding_dims_fail_schema(tmp_path, shard):
    output = write_output(str(tmp_path / "out"), good_rows(shard[1]))
    wide = make_row("d", shard[1], image_embedding=[0.5] * (DIM + 1), keep=False)
    output.write_parquet(pa.Table.from_pylist([wide], schema=captions_schema(DIM + 1, METADATA)), CAPTIONS, "p.parquet")
    output.write_json({"counts": {"rows": 4, "by_status": {"decode_error": 1, "ok": 3}, "kept": 1}}, RUN_JSON)
    report = verify(str(tmp_path / "out"))
    assert failed(report) == {"schema"} and "disagree on the embedding dimension" in report["schema"].detail


def test_missing_captioner_metadata_fails_metadata(tmp_path, shard):
    write_output(str(tmp_path / "out"), good_rows(shard[1]), schema=captions_schema(DIM))
    report = verify(str(tmp_path / "out"))
    assert failed(report) == {"metadata"} and "no 'captioner' schema metadata" in report["metadata"].detail


def test_an_unreadable_part_fails_readable(tmp_path, shard):
    output = write_output(str(tmp_path / "out"), good_rows(shard[1]))
    output.fs.pipe(output.path(CAPTIONS, "part-1.parquet"), b"PAR1 but not really")
    report = verify(str(tmp_path / "out"))
    assert failed(report) == {"readable"} and "captions/part-1.parquet" in report["readable"].detail


@pytest.mark.parametrize(("counts", "message"), [
    ({"rows": 4, "by_status": {"decode_error": 1, "ok": 2}, "kept": 1}, "counts.rows is 4"),
    ({"rows": 3, "by_status": {"ok": 3}, "kept": 1}, "counts.by_status is"),
    ({"rows": 3, "by_status": {"decode_error": 1, "ok": 2}, "kept": 2}, "counts.kept is 2"),
])
def test_run_json_count_mismatch_fails_run_json(tmp_path, shard, counts, message):
    write_output(str(tmp_path / "out"), good_rows(shard[1]), counts=counts)
    report = verify(str(tmp_path / "out"))
    assert failed(report) == {"run_json"} and message in report["run_json"].detail


def test_no_run_json_fails_run_json(tmp_path, shard):
    output = write_output(str(tmp_path / "out"), good_rows(shard[1]))
    output.remove(RUN_JSON)
    assert failed(verify(str(tmp_path / "out"))) == {"run_json"}


def test_a_filtered_row_not_in_captions_fails_filtered(tmp_path, shard):
    rows = good_rows(shard[1])
    write_output(str(tmp_path / "out"), rows, filtered=[rows[0], make_row("ghost", shard[1])])
    report = verify(str(tmp_path / "out"))
    assert failed(report) == {"filtered"} and "1 rows not kept in captions/ (ghost)" in report["filtered"].detail


def test_a_filtered_row_that_differs_from_captions_fails_filtered(tmp_path, shard):
    rows = good_rows(shard[1])
    write_output(str(tmp_path / "out"), rows, filtered=[rows[0] | {"caption": "başka"}])
    report = verify(str(tmp_path / "out"))
    assert failed(report) == {"filtered"} and "1 rows differ from captions/ (a)" in report["filtered"].detail


def test_a_kept_row_missing_from_filtered_fails_filtered(tmp_path, shard):
    rows = good_rows(shard[1])
    write_output(str(tmp_path / "out"), rows, filtered=[])
    report = verify(str(tmp_path / "out"))
    assert failed(report) == {"filtered"} and "1 kept rows missing (a)" in report["filtered"].detail


def test_bad_usage_raises_before_reading(tmp_path):
    with pytest.raises(VerifyUsageError, match="does not exist"):
        verify(str(tmp_path / "nothing"))
    (tmp_path / "out").mkdir()
    with pytest.raises(InputError, match="shard missing"):
        verify(str(tmp_path / "out"), [str(tmp_path / "{0..1}.tar")])


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "jobs" / "verify_output.py"), *args], capture_output=True,
                          text=True, timeout=60)


def test_cli_exit_codes_and_report(tmp_path, shard):
    spec, url = shard
    write_output(str(tmp_path / "good"), good_rows(url))
    result = _cli(str(tmp_path / "good"), "--input", spec)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 9 and all(line.startswith("PASS") for line in lines[:8]) and lines[8].startswith("OK")

    write_output(str(tmp_path / "bad"), good_rows(url)[:2])
    result = _cli(str(tmp_path / "bad"), "--input", spec, "--json")
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert not report["ok"] and [c["name"] for c in report["checks"] if not c["ok"]] == ["complete"]

    for args in ((), (str(tmp_path / "nothing"),), (str(tmp_path / "good"), "--input", str(tmp_path / "x.tar"))):
        result = _cli(*args)
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("error: ")
