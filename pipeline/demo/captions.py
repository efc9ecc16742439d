"""The demo world's Turkish captions: written (`captions_for`: the canonical caption first, then other grammatical
forms), read back into objects (`parse_caption`, `score_caption`), and edited into hard negatives (`swap_attribute`,
`near_miss_scenes`, `scene_negatives`)."""

from __future__ import annotations

import random
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from pipeline.demo.scenes import (
    COLOURS,
    GRID,
    NUMERALS,
    POSITIONS,
    SHAPES,
    SIZES,
    SLOTS,
    Scene,
    SceneGroup,
    canonical_order,
)
from pipeline.demo.turkish import ABL, ACC, DAT, GEN, KI, LOC, PL, POSS3, POSS_LOC, inflect
from pipeline.text import tr_capitalize, tr_lower


def _loc(slot: str) -> str:
    return inflect(slot, LOC)


def _loc_ki(slot: str) -> str:
    return inflect(slot, LOC, KI)


def _desc(group: SceneGroup, article: str | None = "before", case: tuple[str, ...] = ()) -> str:
    """Noun phrase: 'büyük bir kırmızı daire' (article before/after the colour, or none), 'iki küçük sarı kalp'."""
    noun = inflect(group.shape, *case)
    if group.count > 1:  # no plural after a numeral
        return f"{NUMERALS[group.count]} {group.size} {group.colour} {noun}"
    if article == "before":
        return f"{group.size} bir {group.colour} {noun}"
    if article == "after":
        return f"{group.size} {group.colour} bir {noun}"
    return f"{group.size} {group.colour} {noun}"


def _placed(group: SceneGroup, phrase: str) -> str:
    return f"{_loc(group.position)} {phrase}" if group.position else phrase


def _and(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " ve " + items[-1]


def _shuffled(scene: Scene, rng: random.Random) -> list[SceneGroup]:
    groups = list(scene.groups)
    rng.shuffle(groups)
    return groups


def canonical_caption(scene: Scene) -> str:
    """The fixed, most regular form: every group with position (or count), size, colour and shape."""
    return _finish("Resimde " + _and([_placed(g, _desc(g)) for g in scene.groups]) + " var")


def _form_locative_first(scene: Scene, rng: random.Random) -> str:
    parts = [_placed(g, _desc(g, "after")) for g in _shuffled(scene, rng)]
    return ", ".join(parts) + " " + rng.choice(("duruyor", "görünüyor", "bulunuyor"))


def _form_ki_subject(scene: Scene, rng: random.Random) -> str:
    singles = [g for g in _shuffled(scene, rng) if g.position]
    parts = [f"{_loc_ki(g.position)} şekil {_desc(g)}" for g in singles]
    parts += [f"{'diğer' if singles else 'resimdeki'} şekiller {_desc(g)}" for g in scene.groups if not g.position]
    return ", ".join(parts)


def _relation(target: str, reference: Sequence[str]) -> str | None:
    """Where `target` lies relative to the reference slots: sol/sağ/üst/alt, or ara (between two)."""
    found = set()
    tc, tr = GRID[target]
    for slot in reference:
        rc, rr = GRID[slot]
        if tr == rr:
            found.add("sol" if tc < rc else "sağ")
        elif tc == rc:
            found.add("üst" if tr < rr else "alt")
        else:
            return None
    if len(found) == 1:
        return found.pop()
    return "ara" if found in ({"sol", "sağ"}, {"üst", "alt"}) else None


def _form_relation(scene: Scene, rng: random.Random) -> str | None:
    """'Kırmızı dairenin solunda ...': genitive + possessive + locative; None when no pair is aligned."""
    options = [(ref, tgt, rel) for tgt in scene.groups if tgt.position for ref in scene.groups
               if ref is not tgt and (rel := _relation(tgt.position, ref.positions))]
    if not options:
        return None
    ref, tgt, rel = rng.choice(options)
    text = f"{_desc(ref, None, (GEN,))} {inflect(rel, POSS3, POSS_LOC)} {_desc(tgt)} var"
    for other in (g for g in scene.groups if g is not ref and g is not tgt):
        text += f", {_loc(other.position)} ise {_desc(other)} duruyor" if other.position else \
            f", ayrıca {_desc(other)} var"
    return text


def _form_accusative(scene: Scene, rng: random.Random) -> str:
    parts = [f"{_loc_ki(g.position)} {_desc(g, None, (ACC,))}" if g.position else _desc(g, None, (ACC,))
             for g in _shuffled(scene, rng)]
    return "Resim " + _and(parts) + " gösteriyor"


def _form_colour_adjective(scene: Scene, rng: random.Random) -> str:
    parts = [_placed(g, f"{g.colour} renkli {g.size} bir {g.shape}") if g.count == 1
             else f"{g.colour} renkli {NUMERALS[g.count]} {g.size} {g.shape}" for g in _shuffled(scene, rng)]
    return "Bu resimde " + _and(parts) + " görülüyor"


def _form_count(scene: Scene, rng: random.Random) -> str:
    total = "tek bir" if scene.total == 1 else NUMERALS[scene.total]
    return f"Resimde {total} şekil var: " + _and([_placed(g, _desc(g)) for g in _shuffled(scene, rng)])


def _form_nominal(scene: Scene, rng: random.Random) -> str:
    singles = [g for g in _shuffled(scene, rng) if g.position]
    parts = [f"{_desc(g, None)} {_loc(g.position)}" for g in singles]
    parts += [f"{'ayrıca' if singles else 'resimde sadece'} {_desc(g)} var" for g in scene.groups if not g.position]
    return ", ".join(parts)


_FORMS: tuple[Callable[[Scene, random.Random], str | None], ...] = (
    _form_locative_first, _form_ki_subject, _form_relation, _form_accusative, _form_colour_adjective,
    _form_count, _form_nominal,
)


def _finish(text: str) -> str:
    return unicodedata.normalize("NFC", tr_capitalize(text) + ".")


def captions_for(scene: Scene, rng: random.Random) -> list[str]:
    """At least 5 distinct reference captions; the canonical caption is first."""
    captions = [canonical_caption(scene)]
    for form in _FORMS:
        text = form(scene, rng)
        if text is not None and _finish(text) not in captions:
            captions.append(_finish(text))
    return captions


@dataclass(frozen=True)
class ObjectMention:
    """One object (or counted group) named in a caption; size/position are None when not stated."""

    shape: str
    colour: str | None
    count: int = 1
    size: str | None = None
    position: str | None = None


_SHAPE_CASES: tuple[tuple[str, ...], ...] = (
    (), (GEN,), (ACC,), (DAT,), (LOC,), (ABL,), (POSS3,), (PL,), (PL, GEN), (PL, ACC), (PL, DAT), (PL, LOC),
    (PL, ABL),
)
_SHAPE_FORMS: dict[str, tuple[str, tuple[str, ...]]] = {
    inflect(shape, *case): (shape, case) for shape in SHAPES for case in _SHAPE_CASES}
_POSITION_WORDS = {form: slot for slot in SLOTS for form in (_loc(slot), _loc_ki(slot))}
_COUNT_WORDS = {"bir": 1, "tek": 1, "iki": 2, "üç": 3, "dört": 4, "beş": 5}
_GENERIC_NOUNS = frozenset({"şekil", "şekiller", "nesne", "nesneler"})
_SEPARATORS = frozenset({",", ";", ":", ".", "!", "?", "ve", "ile"})
_TOKEN = re.compile(r"\w+|[.,;:!?]")


def parse_caption(text: str) -> list[ObjectMention]:
    """Objects named in `text`, in order. Attributes before a shape word belong to it ('solda büyük bir kırmızı
    daire'); ones left at the end of a clause fill the gaps of its last object ('kırmızı daire solda')."""
    mentions: list[ObjectMention] = []
    pending: dict[str, Any] = {}
    clause: list[int] = []

    def close_clause() -> None:
        if pending and clause:
            last = mentions[clause[-1]]
            mentions[clause[-1]] = replace(last, **{k: v for k, v in pending.items()
                                                    if k != "count" and getattr(last, k) is None})
        pending.clear()
        clause.clear()

    for token in _TOKEN.findall(tr_lower(text)):
        if token in _SEPARATORS:
            close_clause()
        elif token in _SHAPE_FORMS:
            mentions.append(ObjectMention(_SHAPE_FORMS[token][0], pending.get("colour"), pending.get("count", 1),
                                          pending.get("size"), pending.get("position")))
            clause.append(len(mentions) - 1)
            pending.clear()
        elif token in COLOURS:
            pending["colour"] = token
        elif token in SIZES:
            pending["size"] = token
        elif token in _COUNT_WORDS:
            pending["count"] = _COUNT_WORDS[token]
        elif token in _POSITION_WORDS:
            pending["position"] = _POSITION_WORDS[token]
        elif token in _GENERIC_NOUNS:  # 'üç şekil', 'soldaki şekil': the count is not an object's
            pending = {k: v for k, v in pending.items() if k == "position"}
    close_clause()
    return mentions


def score_caption(caption: str, scene: Scene) -> dict[str, Any]:
    """Object accuracy of one caption against its scene.

    objects_correct: every group named with its colour and shape, and nothing else named.
    counts_correct: the counts named, as a multiset, equal the scene's (so no object missed or invented).
    correct: both, and every named group's count right. per_object: one entry per scene group, with
    size_ok/position_ok None when the caption does not state them. extra: mentions matching no group.
    counts_by_kind_correct: a looser reading, reported beside the strict one: the counts are right, or
    for every colour + shape the objects named add up to the scene's, so two identical objects named
    one by one with their places ("solda ... bir pembe üçgen ... altta ... bir pembe üçgen") count as
    the pair they are.
    """
    mentions = parse_caption(caption)
    unmatched = list(mentions)
    per_object = []
    for group in scene.groups:
        match = next((m for m in unmatched if (m.shape, m.colour) == (group.shape, group.colour)), None)
        if match is not None:
            unmatched.remove(match)
        per_object.append({
            "shape": group.shape, "colour": group.colour, "named": match is not None,
            "count_ok": match is not None and match.count == group.count,
            "size_ok": None if match is None or match.size is None else match.size == group.size,
            "position_ok": None if match is None or match.position is None else match.position == group.position,
        })
    objects_correct = all(o["named"] for o in per_object) and not unmatched
    counts_correct = sorted(m.count for m in mentions) == sorted(g.count for g in scene.groups)
    return {
        "objects_correct": objects_correct,
        "counts_correct": counts_correct,
        "counts_by_kind_correct": counts_correct or _kind_totals(mentions) == _kind_totals(scene.groups),
        "correct": objects_correct and counts_correct and all(o["count_ok"] for o in per_object),
        "per_object": per_object,
        "extra": [asdict(m) for m in unmatched],
    }


def _kind_totals(groups: Iterable[ObjectMention | SceneGroup]) -> Counter[tuple[str | None, str | None]]:
    totals: Counter[tuple[str | None, str | None]] = Counter()
    for group in groups:
        totals[group.shape, group.colour] += group.count
    return totals


def swap_attribute(caption: str, rng: random.Random) -> str:
    """`caption` with one colour or one shape word (keeping its suffixes) replaced by a different one."""
    text = unicodedata.normalize("NFC", caption)
    lowered = tr_lower(text)
    if len(lowered) != len(text):  # keep spans aligned; tr_lower maps Turkish letters one to one
        text = lowered
    candidates = [m for m in re.finditer(r"\w+", lowered) if m.group() in COLOURS or m.group() in _SHAPE_FORMS]
    if not candidates:
        raise ValueError(f"no colour or shape to swap in {caption!r}")
    match = rng.choice(candidates)
    word = match.group()
    if word in COLOURS:
        new = rng.choice([c for c in COLOURS if c != word])
    else:
        shape, case = _SHAPE_FORMS[word]
        new = inflect(rng.choice([s for s in SHAPES if s != shape]), *case)
    if text[match.start()] != lowered[match.start()]:
        new = tr_capitalize(new)
    return text[:match.start()] + new + text[match.end():]


def near_miss_scenes(scene: Scene, rng: random.Random, count: int) -> list[Scene]:
    """Up to `count` distinct scenes that differ from `scene` by one edit.

    Most edits swap an attribute (colour, shape, size, position) between two groups, the binding a
    bag-of-words embedding misses; the rest replace one attribute, move an object or drop one.
    """
    groups = list(scene.groups)
    pairs = [(a, b) for a in range(len(groups)) for b in range(a + 1, len(groups))]
    free = [slot for slot in POSITIONS if all(slot not in g.positions for g in groups)]

    def swapped(field: str) -> list[SceneGroup]:
        a, b = rng.choice(pairs)
        edited = list(groups)
        edited[a], edited[b] = (replace(groups[a], **{field: getattr(groups[b], field)}),
                                replace(groups[b], **{field: getattr(groups[a], field)}))
        return edited

    def replaced(field: str, values: Sequence[Any]) -> list[SceneGroup]:
        index = rng.randrange(len(groups))
        edited = list(groups)
        edited[index] = replace(groups[index], **{field: rng.choice([v for v in values
                                                                     if v != getattr(groups[index], field)])})
        return edited

    def moved() -> list[SceneGroup]:
        index = rng.randrange(len(groups))
        positions = list(groups[index].positions)
        positions[rng.randrange(len(positions))] = rng.choice(free)
        edited = list(groups)
        edited[index] = replace(groups[index], positions=tuple(sorted(positions, key=POSITIONS.index)))
        return edited

    def dropped() -> list[SceneGroup]:
        edited = list(groups)
        del edited[rng.randrange(len(edited))]
        return edited

    edits: list[Callable[[], list[SceneGroup]]] = [
        lambda: replaced("colour", list(COLOURS)), lambda: replaced("shape", SHAPES),
        lambda: replaced("size", SIZES)]
    if free:
        edits.append(moved)
    if pairs:
        edits += [lambda: swapped("colour"), lambda: swapped("shape"), lambda: swapped("size"),
                  lambda: swapped("positions"), dropped] * 2  # binding errors are the common ones
    found: list[Scene] = []
    for _ in range(20 * count):  # edits can repeat or change nothing (swapping equal sizes)
        groups_after = rng.choice(edits)()
        kinds = [(g.colour, g.shape) for g in groups_after]
        if len(set(kinds)) < len(kinds):  # two groups of one kind would be one counted group
            continue
        edited = Scene(tuple(sorted(groups_after, key=canonical_order)))
        if edited != scene and edited not in found:
            found.append(edited)
            if len(found) == count:
                break
    return found


def scene_negatives(scene: Scene, rng: random.Random, count: int) -> list[str]:
    """Hard negative captions for contrastive training (as NegCLIP's): each describes a near-miss
    scene, in a sentence form drawn like the references' (a random one of `captions_for`), so the
    form never tells a negative from a positive; only the content does."""
    return [rng.choice(captions_for(edited, rng)) for edited in near_miss_scenes(scene, rng, count)]


# ---------------------------------------------------------------------------------------------------------------
