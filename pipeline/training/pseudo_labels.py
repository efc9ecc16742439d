"""The pseudo-label round (jobs/pseudo_label_round.py): a teacher trained on a labelled set captions a pool of
images, the CLIP score keeps the best captions, and a student trained on the labelled set and the kept
pseudo-labels is compared with its teacher on a test set, over several seeds. A further round makes the student
the teacher. Each step is one of the project's own: `pipeline.training.trainer.train`, `pipeline.run.chain.run`,
`pipeline.quality.evaluation.evaluate`; each is skipped where its result is already written, so a rerun resumes.

OUT/seed-S/teacher/                    the first teacher's training run (bundle/, train_summary.json)
OUT/seed-S/round-R/pool/               the pool captioned by round R's teacher (a caption_shards output)
OUT/seed-S/round-R/student/            the student's training run
OUT/seed-S/{teacher,round-R}/eval.json the test set's figures of that model
OUT/seed-S/round-R/filter-NAME/        with --compare-filter: the same pool under another filter (pool/, a re-filtered
                                       copy), its student and eval.json
OUT/results.json, results.md, results.svg   the table over seeds: mean and standard deviation
"""

from __future__ import annotations

import json
import logging
import statistics
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from pipeline.config import DEMO_BUNDLE, DEMO_MODEL, GenerationSettings, RunConfig, differing_keys
from pipeline.run.filtering import FilterSettings
from pipeline.training.config import TrainConfig

log = logging.getLogger(__name__)

# the table's columns: (name, where in an evaluation report)
FIGURES = (("every object right", ("object_accuracy", "correct")),
           ("objects right", ("object_accuracy", "objects_correct")),
           ("single objects", ("object_accuracy", "objects_correct_single_object")),
           ("counts", ("object_accuracy", "counts_correct")),
           ("BLEU-4", ("caption_metrics", "BLEU-4")),
           ("CIDEr", ("caption_metrics", "CIDEr")))


@dataclass(frozen=True)
class RoundConfig:
    out: str
    labelled: tuple[str, ...]   # images + captions (as train_captioner's --data)
    pool: tuple[str, ...]       # images (as caption_shards' --input)
    test: tuple[str, ...]       # images + captions (as evaluate's --data)
    clip: str = DEMO_MODEL      # the frozen encoder and scorer: a bundle ("demo": the embedded one)
    seeds: tuple[int, ...] = (0, 1, 2)
    rounds: int = 1
    teacher_epochs: int = 20
    student_epochs: int = 20
    batch_size: int = 128
    # how the teacher captions the pool: best of 8 samples by CLIP score, the top half kept
    decode: GenerationSettings = field(default_factory=lambda: GenerationSettings(method="sample", num_candidates=8,
                                                                                  top_p=0.9))
    filter: FilterSettings = field(default_factory=lambda: FilterSettings(keep_top_fraction=0.5))
    # more students in each round, on the same candidates kept by other filters, for the same number of steps
    compare: tuple[FilterSettings, ...] = ()
    pool_limit: int | None = None
    test_limit: int | None = None
    num_workers: int | None = 1  # Ray Train workers of each training run; None: each runs in this process

    def to_json(self) -> dict[str, Any]:
        return asdict(self) | {"filter": self.filter.to_json(), "compare": [f.to_json() for f in self.compare]}


def run_rounds(config: RoundConfig) -> dict[str, Any]:
    """Every seed's teacher, rounds and evaluations (those already written are read), then the table. Returns
    results.json's content."""
    from pipeline.io.caption_files import expand_labelled_inputs

    for specs in (config.labelled, config.pool, config.test):  # a typo ends the run now, not after a training
        expand_labelled_inputs(list(specs))
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    _claim(out, config)
    reports: dict[str, list[dict[str, Any]]] = {}
    kept: dict[str, list[int]] = {}
    encoder = str(DEMO_BUNDLE) if config.clip == DEMO_MODEL else config.clip
    for seed in config.seeds:
        folder = out / f"seed-{seed}"
        teacher = _train(config, folder / "teacher", seed, config.teacher_epochs, encoder)
        reports.setdefault("teacher", []).append(_evaluate(config, teacher, folder / "teacher" / "eval.json", seed))
        for round_number in range(1, config.rounds + 1):
            round_folder = folder / f"round-{round_number}"
            log.info("seed %d, round %d: the teacher captions the pool", seed, round_number)
            captioned = _caption(config, teacher, round_folder / "pool", seed)
            # the teacher's bundle as --clip: the encoder that made the pool's embeddings
            student = _train(config, round_folder / "student", seed, config.student_epochs, str(teacher),
                             pseudo_labels=round_folder / "pool")
            name = f"student, round {round_number}"
            reports.setdefault(name, []).append(_evaluate(config, student, round_folder / "eval.json", seed))
            kept.setdefault(name, []).append(captioned["counts"]["kept"])
            for other in config.compare:
                folder_other = round_folder / f"filter-{filter_slug(other)}"
                refiltered = _caption(config, teacher, folder_other / "pool", seed, other,
                                      copy_of=round_folder / "pool")
                epochs = _same_steps(config.student_epochs, student.parent, captioned, refiltered)
                student_other = _train(config, folder_other / "student", seed, epochs, str(teacher),
                                       pseudo_labels=folder_other / "pool")
                name_other = f"{name}, {describe_filter(other)}"
                reports.setdefault(name_other, []).append(
                    _evaluate(config, student_other, folder_other / "eval.json", seed))
                kept.setdefault(name_other, []).append(refiltered["counts"]["kept"])
            teacher = student
    results = {"config": config.to_json(), "models": _table(reports, kept)}
    (out / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    (out / "results.md").write_text(format_markdown(results))
    (out / "results.svg").write_text(plot_svg(results))
    return results


def _claim(out: Path, config: RoundConfig) -> None:
    """A rerun resumes only the same round: other data or settings would mix their results in."""
    settings = out / "round.json"
    defining = {k: v for k, v in json.loads(json.dumps(config.to_json())).items()
                if k not in ("seeds", "rounds", "compare")}
    if settings.is_file():
        changed = differing_keys(defining, json.loads(settings.read_text()))
        if changed:
            raise ValueError(f"{out} holds a round with other settings ({', '.join(changed)}); use another --out "
                             "(only more seeds, rounds or compared filters resume it)")
    settings.write_text(json.dumps(defining, indent=2) + "\n")


def _train(config: RoundConfig, out: Path, seed: int, epochs: int, clip: str, pseudo_labels: Path | None = None
           ) -> Path:
    """A captioner (mapper + LM, fresh weights) on the labelled set and, for a student, the pseudo-labels an output
    kept, over `clip`'s frozen encoder. Returns its bundle."""
    from pipeline.training.trainer import Scaling, train

    bundle = out / "bundle"
    if (out / "train_summary.json").is_file():
        return bundle
    log.info("training %s", out)
    train_config = TrainConfig(out=str(out), data=config.labelled, clip=clip, caption_epochs=epochs,
                               clip_batch_size=config.batch_size, caption_batch_size=config.batch_size, seed=seed,
                               embeddings_from=(str(pseudo_labels),) if pseudo_labels is not None else ())
    train(train_config, scaling=None if config.num_workers is None else Scaling(config.num_workers))
    return bundle


def _caption(config: RoundConfig, teacher: Path, out: Path, seed: int, settings: FilterSettings | None = None,
             copy_of: Path | None = None) -> dict[str, Any]:
    """The pool captioned by `teacher` (a finished output is read, not captioned again), or, with `copy_of`, a
    copy of that output re-filtered by `settings` (no model run). Returns its run.json."""
    import shutil

    from pipeline.io.sinks import CAPTIONS, RUN_JSON
    from pipeline.run.chain import run

    settings = settings or config.filter
    finished = json.loads((out / RUN_JSON).read_text()) if (out / RUN_JSON).is_file() else None
    if finished is not None and finished["config"]["filter"] == settings.to_json():  # written when it finished
        return finished
    if copy_of is not None and finished is None:  # run.json last: a copy without it is incomplete
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(copy_of / CAPTIONS, out / CAPTIONS)
        shutil.copy(copy_of / RUN_JSON, out / RUN_JSON)
    return run(RunConfig(inputs=config.pool, output=str(out), model=str(teacher), filter=settings,
                         decode=replace(config.decode, seed=seed), limit=config.pool_limit,
                         overwrite=copy_of is not None))


def _same_steps(epochs: int, student: Path, captioned: dict[str, Any], other: dict[str, Any]) -> int:
    """Epochs over the labelled set and the other filter's pseudo-labels that take as many steps as `epochs`
    over the round's own (the student at `student` learnt from): filters compared at the same compute, as
    DataComp compares them."""
    examples = json.loads((student / "train_summary.json").read_text())["examples"]
    labelled = examples - captioned["counts"]["kept"]
    return max(1, round(epochs * examples / (labelled + other["counts"]["kept"])))


def describe_filter(settings: FilterSettings) -> str:
    if not settings.filters:
        return "no filter"
    parts = [] if settings.min_clip_score is None else [f"score >= {settings.min_clip_score:g}"]
    if settings.keep_top_fraction is not None:
        parts.append(f"top {settings.keep_top_fraction:g}" +
                     ("" if settings.clusters is None else f" per cluster of {settings.clusters}"))
    return ", ".join(parts)


def filter_slug(settings: FilterSettings) -> str:
    parts = [] if settings.min_clip_score is None else [f"min-{settings.min_clip_score:g}"]
    if settings.keep_top_fraction is not None:
        parts.append(f"top-{settings.keep_top_fraction:g}")
    if settings.clusters is not None:
        parts.append(f"clusters-{settings.clusters}")
    return "-".join(parts) or "none"


def _evaluate(config: RoundConfig, bundle_path: Path, report_file: Path, seed: int) -> dict[str, Any]:
    """The test set's figures of a bundle, greedy (as written before, where they were)."""
    import itertools

    from pipeline.demo import DemoObjects
    from pipeline.io.caption_files import expand_labelled_inputs, read_labelled_inputs
    from pipeline.models.bundle import load_bundle
    from pipeline.quality.evaluation import evaluate

    if report_file.is_file():
        return json.loads(report_file.read_text())
    log.info("evaluating %s", bundle_path)
    caption_files, shards = expand_labelled_inputs(list(config.test))
    samples = itertools.islice(read_labelled_inputs(caption_files, shards), config.test_limit)
    report = evaluate(load_bundle(bundle_path), samples, GenerationSettings(), seed=seed, baseline=False,
                      checker=DemoObjects())
    report_file.parent.mkdir(parents=True, exist_ok=True)
    report_file.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return report


def _table(reports: dict[str, list[dict[str, Any]]], kept: dict[str, list[int]]) -> list[dict[str, Any]]:
    """Per model: every figure's mean and standard deviation over the seeds (and each seed's value)."""
    rows = []
    for name, runs in reports.items():
        figures = {}
        for label, (section, key) in FIGURES:
            values = [run[section][key] for run in runs if run.get(section) and run[section].get(key) is not None]
            if values:
                figures[label] = {"mean": statistics.fmean(values),
                                  "std": statistics.stdev(values) if len(values) > 1 else 0.0, "seeds": values}
        rows.append({"model": name, "seeds": len(runs), "figures": figures,
                     "pseudo_labels_kept": kept.get(name)})
    return rows


def format_markdown(results: dict[str, Any]) -> str:
    labels = [label for label, _ in FIGURES]
    lines = ["| model | " + " | ".join(labels) + " | pseudo-labels kept |",
             "|---|" + "---|" * (len(labels) + 1)]
    for row in results["models"]:
        cells = [f"{row['figures'][label]['mean']:.3f} ± {row['figures'][label]['std']:.3f}"
                 if label in row["figures"] else "" for label in labels]
        kept = row["pseudo_labels_kept"]
        cells.append(f"{statistics.fmean(kept):.0f}" if kept else "")
        lines.append(f"| {row['model']} | " + " | ".join(cells) + " |")
    seeds = results["config"]["seeds"]
    lines.append("")
    lines.append(f"Mean ± standard deviation over {len(seeds)} seed(s) ({', '.join(map(str, seeds))}); greedy "
                 "captions of the test set.")
    return "\n".join(lines) + "\n"


def plot_svg(results: dict[str, Any], labels: tuple[str, ...] = ("every object right", "single objects",
                                                                   "counts")) -> str:
    """Grouped bars of the object accuracies per model, with one standard deviation as whiskers."""
    models = results["models"]
    width, height, margin, bar = 640, 320, 40, 18
    group = bar * len(models) + 24
    colours = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860")
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
             'font-size="12">', f'<line x1="{margin}" y1="{height - margin}" x2="{width - 10}" '
             f'y2="{height - margin}" stroke="black"/>']
    scale = height - 2 * margin
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        y = height - margin - tick * scale
        parts.append(f'<text x="{margin - 6}" y="{y + 4:.1f}" text-anchor="end">{tick:.2f}</text>')
        parts.append(f'<line x1="{margin}" y1="{y:.1f}" x2="{width - 10}" y2="{y:.1f}" stroke="#ddd"/>')
    for g, label in enumerate(labels):
        x0 = margin + 12 + g * (group + 20)
        parts.append(f'<text x="{x0 + group / 2 - 12:.1f}" y="{height - margin + 16}" text-anchor="middle">'
                     f'{label}</text>')
        for m, row in enumerate(models):
            figure = row["figures"].get(label)
            if figure is None:
                continue
            x = x0 + m * bar
            top = height - margin - figure["mean"] * scale
            parts.append(f'<rect x="{x}" y="{top:.1f}" width="{bar - 2}" height="{figure["mean"] * scale:.1f}" '
                         f'fill="{colours[m % len(colours)]}"/>')
            low, high = (height - margin - (figure["mean"] + s) * scale for s in (-figure["std"], figure["std"]))
            parts.append(f'<line x1="{x + bar / 2 - 1}" y1="{low:.1f}" x2="{x + bar / 2 - 1}" y2="{high:.1f}" '
                         'stroke="black"/>')
    for m, row in enumerate(models):
        parts.append(f'<rect x="{width - 170}" y="{12 + m * 16}" width="10" height="10" '
                     f'fill="{colours[m % len(colours)]}"/><text x="{width - 154}" y="{21 + m * 16}">'
                     f'{row["model"]}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"
