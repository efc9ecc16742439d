"""The pseudo-label round at tiny scale: teacher, pool captioned with best-of-N and filtered, students trained on
the labelled set plus the kept pseudo-labels, two rounds over two seeds, the table; a rerun resumes."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ElementTree

import pytest

import pipeline.training.trainer
from pipeline.config import GenerationSettings
from pipeline.demo.corpus import write_corpus
from pipeline.run.filtering import FilterSettings
from pipeline.training.pseudo_labels import RoundConfig, run_rounds


@pytest.fixture(scope="module")
def round_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("round-data")
    for name, seed, counts in (("labelled", 11, {"train": 24}), ("pool", 12, {"train": 30}),
                               ("test", 13, {"test": 12})):
        write_corpus(root / name, seed=seed, counts=counts, size=(32, 32), formats=("webdataset",))
    return root


def _config(root, data, **overrides) -> RoundConfig:
    settings = {"seeds": (0, 1), "rounds": 2, "teacher_epochs": 1, "student_epochs": 1, "batch_size": 8,
                "decode": GenerationSettings(method="sample", num_candidates=2, top_p=0.9, max_new_tokens=8),
                "filter": FilterSettings(keep_top_fraction=0.5), "num_workers": None}
    return RoundConfig(out=str(root), labelled=(str(data / "labelled" / "train" / "*.tar"),),
                       pool=(str(data / "pool" / "train" / "*.tar"),), test=(str(data / "test" / "test" / "*.tar"),),
                       **settings | overrides)


def test_a_round_trains_students_on_kept_pseudo_labels_and_tabulates_them_over_seeds(ray_local, tiny_bundle,
                                                                                     round_data, tmp_path,
                                                                                     monkeypatch):
    config = _config(tmp_path / "round", round_data, clip=str(tiny_bundle))
    results = run_rounds(config)
    assert [row["model"] for row in results["models"]] == ["teacher", "student, round 1", "student, round 2"]
    for row in results["models"]:
        assert row["seeds"] == 2
        assert len(row["figures"]["every object right"]["seeds"]) == 2 and "CIDEr" in row["figures"]
    assert results["models"][1]["pseudo_labels_kept"] == [15, 15]  # the top half of the pool of 30
    for seed in (0, 1):
        for round_number in (1, 2):
            folder = tmp_path / "round" / f"seed-{seed}" / f"round-{round_number}"
            run = json.loads((folder / "pool" / "run.json").read_text())
            assert run["counts"]["kept"] == 15 and run["config"]["decode"]["seed"] == seed
            # the student learnt from the labelled scenes and the pseudo-labels, with fresh captioner weights
            summary = json.loads((folder / "student" / "train_summary.json").read_text())
            assert summary["examples"] == 24 + 15
        # round 2's pool was captioned by round 1's student
        captioner = json.loads((tmp_path / "round" / f"seed-{seed}" / "round-2" / "pool" / "run.json").read_text())
        first_student = json.loads((tmp_path / "round" / f"seed-{seed}" / "round-1" / "student" /
                                    "train_summary.json").read_text())
        assert captioner["model"]["sha256"] == first_student["bundle_sha256"]
    table = (tmp_path / "round" / "results.md").read_text()
    assert table.count("\n| ") == 3 and "| student, round 2 |" in table and " ± " in table
    assert ElementTree.fromstring((tmp_path / "round" / "results.svg").read_text()).tag.endswith("svg")

    # a rerun reads what is written: nothing is trained, captioned or evaluated again
    monkeypatch.setattr(pipeline.training.trainer, "train", lambda *a, **k: pytest.fail("trained again"))
    monkeypatch.setattr("pipeline.quality.evaluation.evaluate", lambda *a, **k: pytest.fail("evaluated again"))
    assert run_rounds(config)["models"] == results["models"]
    with pytest.raises(ValueError, match=r"holds a round with other settings \(student_epochs\)"):
        run_rounds(_config(tmp_path / "round", round_data, clip=str(tiny_bundle), student_epochs=2))


def test_other_filters_train_students_on_the_same_candidates_for_the_same_steps(ray_local, tiny_bundle, round_data,
                                                                                tmp_path):
    from conftest import read_parts

    compare = (FilterSettings(), FilterSettings(keep_top_fraction=0.5, clusters=2))
    config = _config(tmp_path / "round", round_data, clip=str(tiny_bundle), seeds=(0,), rounds=1, student_epochs=2,
                     compare=compare)
    results = run_rounds(config)
    assert [row["model"] for row in results["models"]] == [
        "teacher", "student, round 1", "student, round 1, no filter", "student, round 1, top 0.5 per cluster of 2"]
    counts = [row["pseudo_labels_kept"][0] for row in results["models"][1:]]
    assert counts[:2] == [15, 30] and 14 <= counts[2] <= 16  # half of each cluster, each rounded
    folder = tmp_path / "round" / "seed-0" / "round-1"
    captioned = read_parts(folder / "pool" / "captions").sort_by("key")
    for name, kept, epochs in (("filter-none", 30, 1), ("filter-top-0.5-clusters-2", counts[2], 2)):
        copy = read_parts(folder / name / "pool" / "captions").sort_by("key")
        assert copy.drop_columns(["keep"]).equals(captioned.drop_columns(["keep"]))  # the same candidates
        assert sum(copy.column("keep").to_pylist()) == kept
        summary = json.loads((folder / name / "student" / "train_summary.json").read_text())
        # 2 epochs of 24 + 15 examples: as many steps as 1 epoch of 24 + 30 (rounded), or 2 of 24 + about 15
        assert summary["examples"] == 24 + kept and summary["config"]["caption_epochs"] == epochs
    assert json.loads((folder / "pool" / "run.json").read_text())["counts"]["kept"] == 15  # the round's own, as it was
    # a filter added later resumes the round: only its student is trained
    more = run_rounds(_config(tmp_path / "round", round_data, clip=str(tiny_bundle), seeds=(0,), rounds=1,
                              student_epochs=2, compare=(*compare, FilterSettings(keep_top_fraction=0.25))))
    assert more["models"][:4] == results["models"] and more["models"][4]["pseudo_labels_kept"] == [8]
