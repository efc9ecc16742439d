"""The synthetic Turkish demo world: suffixes, scenes, drawings, captions, parsing and the corpus job."""

from __future__ import annotations

import hashlib
import io
import json
import math
import random
import re
import subprocess
import sys
import tarfile
import unicodedata
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

from pipeline.demo.captions import (
    ObjectMention,
    canonical_caption,
    captions_for,
    near_miss_scenes,
    parse_caption,
    scene_negatives,
    score_caption,
    swap_attribute,
)
from pipeline.demo.corpus import make_sample
from pipeline.demo.scenes import (
    COLOURS,
    NUMERALS,
    POSITIONS,
    SHAPES,
    SIZES,
    Scene,
    SceneGroup,
    _layout,
    generate_scene,
    render_scene,
)
from pipeline.demo.turkish import ACC, DAT, GEN, KI, LOC, PL, POSS3, POSS_LOC, inflect
from pipeline.text import tr_capitalize, tr_lower, tr_upper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "jobs"))
import make_demo_corpus  # noqa: E402


def scenes(n: int, seed: int = 0) -> list[tuple[Scene, list[str]]]:
    out = []
    for i in range(n):
        rng = random.Random(seed * 100_000 + i)
        scene = generate_scene(rng)
        out.append((scene, captions_for(scene, rng)))
    return out


# --- Turkish text -------------------------------------------------------------------------------------------------
def test_turkish_casing_maps_dotted_and_dotless_i():
    assert tr_lower("IŞIK İZİ") == "ışık izi"
    assert "IŞIK İZİ".lower() != "ışık izi"  # why the helpers exist
    assert tr_upper("ışık izi") == "IŞIK İZİ"
    assert tr_capitalize("iki yeşil üçgen") == "İki yeşil üçgen"
    assert tr_capitalize("ılık su") == "Ilık su"
    assert tr_lower(unicodedata.normalize("NFD", "İKİ")) == "iki"


@pytest.mark.parametrize(("word", "suffixes", "expected"), [
    # 2-way (a/e) and 4-way (ı/i/u/ü) harmony
    ("ev", (LOC,), "evde"), ("okul", (LOC,), "okulda"), ("göz", (PL,), "gözler"), ("kitap", (PL,), "kitaplar"),
    ("kız", (ACC,), "kızı"), ("el", (ACC,), "eli"), ("okul", (ACC,), "okulu"), ("göz", (ACC,), "gözü"),
    # buffer letters y / n / s after a vowel only
    ("araba", (ACC,), "arabayı"), ("kedi", (DAT,), "kediye"), ("daire", (ACC,), "daireyi"),
    ("artı", (ACC,), "artıyı"), ("daire", (GEN,), "dairenin"), ("ütü", (GEN,), "ütünün"),
    ("üçgen", (GEN,), "üçgenin"), ("yıldız", (GEN,), "yıldızın"), ("oda", (POSS3,), "odası"),
    # d/t after voiceless consonants
    ("kitap", (LOC,), "kitapta"), ("ağaç", (LOC,), "ağaçta"), ("üst", (LOC,), "üstte"), ("sağ", (LOC,), "sağda"),
    # softening before a vowel: polysyllables and marked monosyllables
    ("kitap", (ACC,), "kitabı"), ("ağaç", (GEN,), "ağacın"), ("kağıt", (ACC,), "kağıdı"),
    ("köpek", (GEN,), "köpeğin"), ("çocuk", (ACC,), "çocuğu"), ("renk", (ACC,), "rengi"), ("kalp", (GEN,), "kalbin"),
    ("top", (ACC,), "topu"), ("at", (ACC,), "atı"), ("saç", (ACC,), "saçı"), ("üst", (POSS3,), "üstü"),
    # palatal loanwords take front vowels; the suffix then harmonises on its own vowel
    ("hilal", (GEN,), "hilalin"), ("saat", (ACC,), "saati"), ("rol", (ACC,), "rolü"),
    ("kalp", (PL, GEN), "kalplerin"), ("kalp", (POSS3, POSS_LOC), "kalbinde"),
    # locative + ki, possessive + pronominal n + locative
    ("sol", (LOC, KI), "soldaki"), ("üst", (LOC, KI), "üstteki"), ("orta", (LOC, KI), "ortadaki"),
    ("sol", (POSS3, POSS_LOC), "solunda"), ("sağ", (POSS3, POSS_LOC), "sağında"),
    ("üst", (POSS3, POSS_LOC), "üstünde"), ("alt", (POSS3, POSS_LOC), "altında"),
    ("ara", (POSS3, POSS_LOC), "arasında"),
])
def test_suffixes_follow_turkish_rules(word, suffixes, expected):
    assert inflect(word, *suffixes) == expected


# --- scenes and drawings ------------------------------------------------------------------------------------------
def test_generated_scenes_respect_the_world_rules_and_cover_it():
    seen: Counter = Counter()
    for i in range(1500):
        scene = generate_scene(random.Random(i))
        slots = [slot for g in scene.groups for slot in g.positions]
        assert 1 <= len(slots) <= 3 and len(set(slots)) == len(slots)
        assert len({(g.colour, g.shape) for g in scene.groups}) == len(scene.groups)
        big = [slot for g in scene.groups if g.size == "büyük" for slot in g.positions]
        assert not ("orta" in big and len(big) > 1), "two big objects next to each other would overlap"
        singles = [POSITIONS.index(g.position) for g in scene.groups if g.count == 1]
        assert singles == sorted(singles) and all(g.count > 1 for g in scene.groups[:len(scene.groups) - len(singles)])
        assert Scene.from_objects(json.loads(json.dumps(scene.objects()))) == scene
        for g in scene.groups:
            seen.update([g.shape, g.colour, g.size, f"count{g.count}", *g.positions])
    expected = {*SHAPES, *COLOURS, *SIZES, *POSITIONS, "count1", "count2", "count3"}
    assert len(SHAPES) >= 8 and len(COLOURS) >= 8
    assert expected <= set(seen)


def test_layout_never_overlaps_objects():
    for i in range(400):
        scene = generate_scene(random.Random(i))
        placed = _layout(scene, random.Random(i))
        for a in range(len(placed)):
            for b in range(a + 1, len(placed)):
                p, q = placed[a], placed[b]
                assert math.hypot(p.x - q.x, p.y - q.y) >= 1.08 * (p.radius + q.radius)


def colour_pixels(image: Image.Image, colour: str) -> np.ndarray:
    pixels = np.asarray(image, dtype=np.float32)
    return np.linalg.norm(pixels - np.array(COLOURS[colour], dtype=np.float32), axis=-1) < 50


def test_render_is_deterministic_size_independent_and_shows_every_object():
    scene = Scene((SceneGroup("kare", "mavi", "büyük", ("sol",)), SceneGroup("yıldız", "sarı", "küçük", ("sağ",))))
    small = render_scene(scene, 64, 64, random.Random(3))
    assert small.size == (64, 64) and small.mode == "RGB"
    assert small.tobytes() == render_scene(scene, 64, 64, random.Random(3)).tobytes()
    assert small.tobytes() != render_scene(scene, 64, 64, random.Random(4)).tobytes()
    large = render_scene(scene, 640, 480, random.Random(3))
    for colour, side in (("mavi", "left"), ("sarı", "right")):
        for image in (small, large):
            xs = np.nonzero(colour_pixels(image, colour))[1]
            assert len(xs) > 0.004 * image.width * image.height
            centre = xs.mean() / image.width
            assert (centre < 0.3) if side == "left" else (centre > 0.7)
    blue_small = colour_pixels(small, "mavi").mean()
    assert colour_pixels(small, "sarı").mean() < blue_small  # small star, big square
    for i in range(60):  # every object of random scenes is visible (no one hidden behind another)
        scene = generate_scene(random.Random(i))
        image = render_scene(scene, 64, 64, random.Random(i))
        for g in scene.groups:
            assert colour_pixels(image, g.colour).sum() >= 25 * g.count, (i, g)


# --- captions -----------------------------------------------------------------------------------------------------
def test_captions_are_varied_grammatical_and_canonical_first():
    forms: Counter = Counter()
    plural_shape = re.compile("|".join(rf"\b{inflect(s, PL)}" for s in SHAPES))
    for scene, captions in scenes(300):
        assert len(captions) >= 5 and len(set(captions)) == len(captions)
        assert captions[0] == canonical_caption(scene)
        assert captions[0].startswith("Resimde ") and captions[0].endswith(" var.")
        for caption in captions:
            assert caption.endswith(".") and caption == unicodedata.normalize("NFC", caption)
            assert caption[0] == tr_upper(caption[0]) and "  " not in caption
            assert not plural_shape.search(caption), caption  # no plural after a numeral
            forms[caption.split()[0]] += 1
        for g in scene.groups:  # the canonical caption names everything
            phrase = (f"{NUMERALS[g.count]} {g.size} {g.colour} {g.shape}" if g.count > 1
                      else f"{inflect(g.position, LOC)} {g.size} bir {g.colour} {g.shape}")
            assert phrase in tr_lower(captions[0])
    assert len(forms) >= 8  # many sentence openings, not one template


def test_caption_examples():
    scene = Scene((SceneGroup("kalp", "sarı", "küçük", ("sol", "sağ")), SceneGroup("kare", "mavi", "büyük", ("orta",))))
    captions = captions_for(scene, random.Random(0))
    assert captions[0] == "Resimde iki küçük sarı kalp ve ortada büyük bir mavi kare var."
    assert "İki küçük sarı kalbin arasında büyük bir mavi kare var." in captions
    assert {"Resim iki küçük sarı kalbi ve ortadaki büyük mavi kareyi gösteriyor.",
            "Resim ortadaki büyük mavi kareyi ve iki küçük sarı kalbi gösteriyor."} & set(captions)
    one = Scene((SceneGroup("daire", "kırmızı", "büyük", ("orta",)),))
    assert set(captions_for(one, random.Random(0))) >= {
        "Resimde ortada büyük bir kırmızı daire var.", "Ortadaki şekil büyük bir kırmızı daire.",
        "Resim ortadaki büyük kırmızı daireyi gösteriyor.",
        "Resimde tek bir şekil var: ortada büyük bir kırmızı daire.", "Büyük kırmızı daire ortada."}
    pair = Scene((SceneGroup("hilal", "mor", "büyük", ("üst",)), SceneGroup("daire", "yeşil", "küçük", ("alt",))))
    texts = [c for seed in range(20) for c in captions_for(pair, random.Random(seed))]
    assert "Büyük mor hilalin altında küçük bir yeşil daire var." in texts
    assert "Küçük yeşil dairenin üstünde büyük bir mor hilal var." in texts


# --- parsing and scoring ------------------------------------------------------------------------------------------
def test_every_reference_parses_back_to_the_scene():
    for scene, captions in scenes(400, seed=1):
        for caption in captions:
            mentions = parse_caption(caption)
            assert sorted((m.shape, m.colour, m.count, m.size) for m in mentions) == \
                sorted((g.shape, g.colour, g.count, g.size) for g in scene.groups), caption
            result = score_caption(caption, scene)
            assert result["correct"] and not result["extra"], caption
            assert all(o["position_ok"] in (None, True) for o in result["per_object"]), caption
        canonical = {(m.shape, m.colour, m.count, m.size, m.position) for m in parse_caption(captions[0])}
        assert canonical == {(g.shape, g.colour, g.count, g.size, g.position) for g in scene.groups}


def test_parser_tolerates_model_output():
    expected = [ObjectMention("daire", "kırmızı", 1, "büyük", "sol"), ObjectMention("kalp", "sarı", 2, "küçük")]
    for text in ("Resimde solda büyük bir kırmızı daire ve iki küçük sarı kalp var.",
                 "RESİMDE SOLDA BÜYÜK BİR KIRMIZI DAİRE VE İKİ KÜÇÜK SARI KALP VAR",
                 "resimde   solda büyük bir kırmızı daire ve iki küçük sarı kalp var",
                 unicodedata.normalize("NFD", "Resimde solda büyük bir kırmızı daire, iki küçük sarı kalp!")):
        assert parse_caption(text) == expected, text
    assert parse_caption("Büyük kırmızı daire solda, sarı kalp.") == [
        ObjectMention("daire", "kırmızı", 1, "büyük", "sol"), ObjectMention("kalp", "sarı")]
    assert parse_caption("Hiçbir şey yok.") == []


def test_score_flags_wrong_colour_shape_and_count():
    scene = Scene((SceneGroup("üçgen", "yeşil", "küçük", ("sol", "sağ")),
                   SceneGroup("kare", "mavi", "büyük", ("orta",))))
    right = score_caption("Resimde iki küçük yeşil üçgen ve ortada büyük bir mavi kare var.", scene)
    assert right["correct"] and right["objects_correct"] and right["counts_correct"]
    assert [o["size_ok"] for o in right["per_object"]] == [True, True]
    assert [o["position_ok"] for o in right["per_object"]] == [None, True]
    colour = score_caption("Resimde iki küçük yeşil üçgen ve ortada büyük bir mor kare var.", scene)
    assert not colour["objects_correct"] and colour["counts_correct"]
    assert colour["counts_by_kind_correct"]  # the looser count reading never fails a strictly right count
    assert [o["named"] for o in colour["per_object"]] == [True, False]
    assert colour["extra"] == [{"shape": "kare", "colour": "mor", "count": 1, "size": "büyük", "position": "orta"}]
    shape = score_caption("Resimde iki küçük yeşil üçgen ve ortada büyük bir mavi altıgen var.", scene)
    assert not shape["objects_correct"] and not shape["correct"]
    count = score_caption("Resimde üç küçük yeşil üçgen ve ortada büyük bir mavi kare var.", scene)
    assert count["objects_correct"] and not count["counts_correct"] and not count["correct"]
    assert [o["count_ok"] for o in count["per_object"]] == [False, True]
    missing = score_caption("Resimde iki küçük yeşil üçgen var.", scene)
    assert not missing["objects_correct"] and not missing["counts_correct"]
    assert not count["counts_by_kind_correct"] and not missing["counts_by_kind_correct"]
    one_by_one = score_caption("Resimde solda küçük bir yeşil üçgen, sağda küçük bir yeşil üçgen ve ortada büyük bir "
                               "mavi kare var.", scene)
    assert not one_by_one["counts_correct"] and one_by_one["counts_by_kind_correct"]
    assert not one_by_one["objects_correct"]  # the strict check wants the pair named as one group
    merged = score_caption("Resimde iki küçük yeşil üçgen ve ortada büyük bir mavi kare var.",
                           Scene((SceneGroup("üçgen", "yeşil", "küçük", ("sol",)),
                                  SceneGroup("altıgen", "yeşil", "küçük", ("sağ",)),
                                  SceneGroup("kare", "mavi", "büyük", ("orta",)))))
    assert not merged["counts_correct"] and not merged["counts_by_kind_correct"]
    wrong_place = score_caption("Resimde iki küçük yeşil üçgen ve solda küçük bir mavi kare var.", scene)
    assert wrong_place["correct"]  # position and size are reported, not part of object accuracy
    assert wrong_place["per_object"][1]["position_ok"] is False and wrong_place["per_object"][1]["size_ok"] is False


def test_swap_attribute_changes_one_word_and_is_scored_wrong():
    rng = random.Random(0)
    for scene, captions in scenes(150, seed=2):
        for caption in captions:
            swapped = swap_attribute(caption, rng)
            before, after = caption.split(), swapped.split()
            assert len(before) == len(after) and sum(a != b for a, b in zip(before, after, strict=True)) == 1
            assert not score_caption(swapped, scene)["objects_correct"], (caption, swapped)
    genitives = {tr_capitalize(inflect(s, GEN)) for s in SHAPES}
    results = {swap_attribute("Kalbin üstünde bir kare var.", random.Random(seed)) for seed in range(40)}
    heads = {r.split()[0] for r in results if r.endswith("bir kare var.")}
    assert heads and heads <= genitives - {"Kalbin"}  # suffix kept, capital kept, another shape
    with pytest.raises(ValueError):
        swap_attribute("Hiçbir şey yok.", rng)


def test_near_miss_scenes_are_distinct_one_edit_scenes_mostly_binding_swaps():
    binding_swaps = 0
    for scene, _ in scenes(200, seed=3):
        edited = near_miss_scenes(scene, random.Random(1), 8)
        assert len(edited) == len(set(edited)) and scene not in edited
        assert len(edited) == 8 or scene.total == 1  # a single object has fewer possible edits
        truth = sorted((g.colour, g.shape, g.size, g.positions) for g in scene.groups)
        for other in edited:
            groups = sorted((g.colour, g.shape, g.size, g.positions) for g in other.groups)
            assert groups != truth
            if len(groups) == len(truth) and sorted(g[0] for g in groups) == sorted(g[0] for g in truth) \
                    and sorted(g[1] for g in groups) == sorted(g[1] for g in truth) \
                    and {(g[0], g[1]) for g in groups} != {(g[0], g[1]) for g in truth}:
                binding_swaps += 1  # the same colours and shapes, paired differently
    assert binding_swaps > 100  # swaps are most of the edits offered for scenes of several groups


def test_scene_negatives_describe_the_near_miss_scenes_in_every_sentence_form():
    """A negative is a caption of a near-miss scene (it parses back to that scene's objects), and its
    sentence form is drawn like the references', so the form cannot give a negative away."""
    canonical_share = []
    for index, (scene, _) in enumerate(scenes(150, seed=4)):
        negatives = scene_negatives(scene, random.Random(index), 8)
        edited = near_miss_scenes(scene, random.Random(index), 8)
        assert len(negatives) == len(edited)
        for negative in negatives:
            assert any(score_caption(negative, other)["correct"] for other in edited), negative
            canonical_share.append(any(negative == canonical_caption(other) for other in edited))
    assert 0.05 < sum(canonical_share) / len(canonical_share) < 0.5


# --- samples and the corpus job -----------------------------------------------------------------------------------
def test_sample_regenerates_alone_and_captions_do_not_depend_on_size():
    a, b = make_sample(5, "val", 17, (64, 64)), make_sample(5, "val", 17, (64, 64))
    assert a == b and a.key == "val_000000017"
    assert make_sample(5, "val", 17, (96, 80)).captions == a.captions
    assert make_sample(6, "val", 17).jpg != a.jpg and make_sample(5, "test", 17).jpg != a.jpg
    assert Image.open(io.BytesIO(a.jpg)).format == "JPEG"


def run_cli(out: Path, *extra: str) -> None:
    result = CliRunner().invoke(make_demo_corpus.main, [
        "--out", str(out), "--seed", "7", "--train", "5", "--val", "2", "--test", "3", "--shard-size", "3", *extra])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().count("\n") == 0 and result.stdout.startswith("wrote 10 samples")


def test_cli_writes_readable_deterministic_shards(tmp_path):
    import webdataset as wds

    run_cli(tmp_path / "a", "--workers", "1")
    run_cli(tmp_path / "b", "--workers", "3")  # shards drawn in three processes: the same bytes
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert [str(p) for p in files] == [
        "manifest.json", "test/shard-00000.parquet", "test/shard-00000.tar", "train/shard-00000.parquet",
        "train/shard-00000.tar", "train/shard-00001.parquet", "train/shard-00001.tar", "val/shard-00000.parquet",
        "val/shard-00000.tar"]
    for rel in files:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel

    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["seed"] == 7 and manifest["counts"] == {"train": 5, "val": 2, "test": 3}
    assert (manifest["width"], manifest["height"]) == (64, 64)
    for entry in manifest["files"]:
        assert hashlib.sha256((tmp_path / "a" / entry["path"]).read_bytes()).hexdigest() == entry["sha256"]

    with tarfile.open(tmp_path / "a" / "train" / "shard-00001.tar") as tar:
        names = tar.getnames()
        assert names == [f"train_00000000{i}.{ext}" for i in (3, 4) for ext in ("jpg", "json", "txt")]
        meta = json.loads(tar.extractfile("train_000000003.json").read())
        assert tar.extractfile("train_000000003.txt").read().decode() == meta["captions"][0]
    expected = make_sample(7, "train", 3)
    assert meta == expected.meta() and meta["key"] == "train_000000003" and len(meta["captions"]) >= 5
    assert set(meta["objects"][0]) >= {"shape", "colour", "size", "position", "count"}

    samples = list(wds.WebDataset(str(tmp_path / "a" / "train" / "shard-0000{0..1}.tar"), shardshuffle=False))
    assert [s["__key__"] for s in samples] == [f"train_00000000{i}" for i in range(5)]
    assert samples[3]["jpg"] == expected.jpg and samples[3]["txt"].decode() == expected.caption

    table = pq.read_table(tmp_path / "a" / "train" / "shard-00001.parquet")
    assert table.schema.names == ["key", "jpg", "caption", "captions", "objects", "width", "height"]
    assert str(table.schema.field("width").type) == "int32" and str(table.schema.field("captions").type) == \
        "list<element: string>"
    row = table.to_pylist()[0]
    assert row["key"] == "train_000000003" and row["jpg"] == expected.jpg and row["captions"] == expected.captions
    assert json.loads(row["objects"]) == expected.objects and (row["width"], row["height"]) == (64, 64)

    run_cli(tmp_path / "c", "--seed", "8")
    assert (tmp_path / "c" / "val" / "shard-00000.tar").read_bytes() != (tmp_path / "a" / "val" / "shard-00000.tar"
                                                                            ).read_bytes()
    result = CliRunner().invoke(make_demo_corpus.main, ["--out", str(tmp_path / "a"), "--seed", "7", "--train", "2",
                                                        "--val", "0", "--test", "0", "--formats", "webdataset"])
    assert result.exit_code == 0, result.output
    left = sorted(str(p.relative_to(tmp_path / "a")) for p in (tmp_path / "a").rglob("shard-*"))
    assert left == ["train/shard-00000.tar"]  # stale shards of the earlier run are gone


@pytest.mark.parametrize(("args", "message"), [
    (["--train", "-1"], "--train"),
    (["--size", "64"], "WIDTHxHEIGHT"),
    (["--size", "8x8"], "WIDTHxHEIGHT"),
    (["--formats", "csv"], "webdataset,parquet"),
])
def test_cli_bad_usage_is_one_line(tmp_path, args, message):
    result = CliRunner().invoke(make_demo_corpus.main, ["--out", str(tmp_path / "x"), *args])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1 and message in result.stderr
    assert not (tmp_path / "x").exists()


def test_cli_bad_usage_in_a_real_process(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / "make_demo_corpus.py"), "--out", str(tmp_path),
                           "--val", "-3"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ") and "--val" in proc.stderr
