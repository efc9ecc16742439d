"""A synthetic Turkish captioning world: scenes of coloured shapes, their drawings and their captions.

Everything is deterministic given a `random.Random`:
  generate_scene(rng)                 which objects (shape, colour, size) sit in which of five slots
  render_scene(scene, w, h, rng)      a PIL image at any size (positions and sizes are relative)
  captions_for(scene, rng)            the canonical caption first, then other grammatical Turkish forms
  parse_caption / score_caption       read a caption (reference or model output) back into objects
  swap_attribute(caption, rng)        the same caption with one colour or shape replaced
  near_miss_scenes / scene_negatives  one-edit scenes (attributes swapped between objects...) and their captions
  write_corpus(...)                   WebDataset (img2dataset layout) and/or Parquet shards + manifest.json

Suffixes are derived by rule (`inflect`), never spelled out per word: vowel harmony, buffer letters,
consonant assimilation and final-consonant softening, with small exception sets for lexically marked words.
"""

from __future__ import annotations

import colorsys
import contextlib
import hashlib
import io
import json
import math
import multiprocessing
import os
import random
import re
import tarfile
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw
from tqdm import tqdm

from pipeline.io.digest import file_sha256
from pipeline.text import tr_capitalize, tr_lower

# ---------------------------------------------------------------------------------------------------------------
# Turkish suffixes
# ---------------------------------------------------------------------------------------------------------------
# Templates use the usual archiphonemes: A = a/e (2-way harmony), I = ı/i/u/ü (4-way), D = d/t, C = c/ç;
# a leading "(y)", "(n)" or "(s)" is a buffer letter kept only after a vowel.
PL = "lAr"
GEN = "(n)In"
ACC = "(y)I"
DAT = "(y)A"
LOC = "DA"
ABL = "DAn"
POSS3 = "(s)I"
POSS_LOC = "nDA"  # locative after a 3rd-person possessive takes the pronominal n: sol-u-n-da
KI = "ki"

VOWELS = frozenset("aeıioöuü")
_BACK = frozenset("aıou")
_ROUNDED = frozenset("oöuü")
_VOICELESS = frozenset("çfhkpsşt")  # "fıstıkçı şahap"
_SOFTENED = {"p": "b", "ç": "c", "t": "d", "k": "ğ", "g": "ğ"}
_VOWEL_SLOTS = VOWELS | {"A", "I"}
_FOUR_WAY = {(True, False): "ı", (False, False): "i", (True, True): "u", (False, True): "ü"}

# Loanwords whose final consonant is palatal: suffixes take front vowels although the last vowel is back.
FRONT_HARMONY = frozenset({"kalp", "hilal", "saat", "rol", "gol", "alkol", "petrol"})
# Monosyllables keep their final consonant unless lexically marked; polysyllables soften unless marked.
SOFTENING_MONOSYLLABLES = frozenset({"kalp", "renk", "uç", "dip", "kap", "çok"})
NO_SOFTENING = frozenset({"saat", "sepet", "devlet", "millet", "bisiklet", "hayat"})


def _harmony(word: str, front_until: int) -> tuple[bool, bool]:
    """(back, rounded) of the word's last vowel; a vowel before index `front_until` counts as front
    (the stem of a palatal loanword)."""
    index = next((i for i in range(len(word) - 1, -1, -1) if word[i] in VOWELS), None)
    if index is None:
        raise ValueError(f"no vowel to harmonise with in {word!r}")
    return word[index] in _BACK and index >= front_until, word[index] in _ROUNDED


def _soften(word: str) -> str:
    """Final p/ç/t/k/g -> b/c/d/ğ/ğ (nk -> ng) before a vowel, where Turkish does it."""
    if word[-1] not in _SOFTENED or word in NO_SOFTENING:
        return word
    syllables = sum(ch in VOWELS for ch in word)
    if syllables < 2 and word not in SOFTENING_MONOSYLLABLES:
        return word
    if word.endswith("nk"):
        return word[:-1] + "g"
    return word[:-1] + _SOFTENED[word[-1]]


def _attach(word: str, suffix: str, front_until: int) -> str:
    if suffix.startswith("("):
        buffer, suffix = suffix[1], suffix[3:]
        if word[-1] in VOWELS:
            suffix = buffer + suffix
    if suffix[:1] in _VOWEL_SLOTS and word[-1] not in VOWELS:
        word = _soften(word)
    out = word
    for ch in suffix:
        if ch == "A":
            out += "a" if _harmony(out, front_until)[0] else "e"
        elif ch == "I":
            out += _FOUR_WAY[_harmony(out, front_until)]
        elif ch == "D":
            out += "t" if out[-1] in _VOICELESS else "d"
        elif ch == "C":
            out += "ç" if out[-1] in _VOICELESS else "c"
        else:
            out += ch
    return out


def inflect(word: str, *suffixes: str) -> str:
    """`word` with the suffix templates attached in order, e.g. inflect("kalp", GEN) == "kalbin"."""
    front_until = len(word) if word in FRONT_HARMONY else 0  # softening keeps the stem's length
    for suffix in suffixes:
        word = _attach(word, suffix, front_until)
    return word


# ---------------------------------------------------------------------------------------------------------------
# The world
# ---------------------------------------------------------------------------------------------------------------
SHAPES = ("daire", "kare", "üçgen", "yıldız", "kalp", "altıgen", "artı", "hilal")
# Saturated colours, far apart in hue/lightness, all distinct from the low-saturation backgrounds.
COLOURS: dict[str, tuple[int, int, int]] = {
    "kırmızı": (215, 35, 35),
    "mavi": (35, 80, 215),
    "yeşil": (30, 155, 55),
    "sarı": (240, 205, 25),
    "mor": (125, 45, 175),
    "turuncu": (245, 125, 20),
    "pembe": (245, 125, 195),
    "siyah": (25, 25, 25),
}
SIZES = ("büyük", "küçük")
# Five slots in reading order (top to bottom, left to right): their centres relative to width/height.
SLOTS: dict[str, tuple[float, float]] = {
    "üst": (0.5, 0.2),
    "sol": (0.2, 0.5),
    "orta": (0.5, 0.5),
    "sağ": (0.8, 0.5),
    "alt": (0.5, 0.8),
}
POSITIONS = tuple(SLOTS)
_GRID = {"üst": (1, 0), "sol": (0, 1), "orta": (1, 1), "sağ": (2, 1), "alt": (1, 2)}  # (column, row)
_RADIUS = {"büyük": 0.165, "küçük": 0.105}  # relative to the shorter image side
NUMERALS = {1: "bir", 2: "iki", 3: "üç"}
WORLD_VERSION = 3


@dataclass(frozen=True)
class SceneGroup:
    """Identical objects (same shape, colour and size) of one scene, one per position."""

    shape: str
    colour: str
    size: str
    positions: tuple[str, ...]

    @property
    def count(self) -> int:
        return len(self.positions)

    @property
    def position(self) -> str | None:
        """The slot of a single object; a counted group is described by its count instead."""
        return self.positions[0] if self.count == 1 else None

    def to_json(self) -> dict[str, Any]:
        return {"shape": self.shape, "colour": self.colour, "size": self.size, "position": self.position,
                "count": self.count, "positions": list(self.positions)}


@dataclass(frozen=True)
class Scene:
    """A scene: its groups in canonical order (counted groups first, then single objects in reading order)."""

    groups: tuple[SceneGroup, ...]

    def objects(self) -> list[dict[str, Any]]:
        """The JSON form stored with every sample."""
        return [group.to_json() for group in self.groups]

    @classmethod
    def from_objects(cls, objects: Iterable[dict[str, Any]]) -> Scene:
        """Rebuild a scene from `objects()` (e.g. a sample's KEY.json), for scoring captions."""
        return cls(tuple(SceneGroup(o["shape"], o["colour"], o["size"], tuple(o["positions"])) for o in objects))

    @property
    def total(self) -> int:
        return sum(group.count for group in self.groups)


def _canonical_order(group: SceneGroup) -> tuple[int, int]:
    return (group.count == 1, POSITIONS.index(group.positions[0]))


def _adjacent(a: str, b: str) -> bool:
    """Slots 0.3 apart (the centre and any other); two big objects there would overlap."""
    return a != b and "orta" in (a, b)


def generate_scene(rng: random.Random) -> Scene:
    """1-3 objects in distinct slots; identical objects form a counted group; (colour, shape) unique per group."""
    total = rng.choices((1, 2, 3), weights=(25, 40, 35))[0]
    if total == 1:
        counts = [1]
    elif total == 2:
        counts = [2] if rng.random() < 0.25 else [1, 1]
    else:
        counts = rng.choices(([3], [2, 1], [1, 1, 1]), weights=(10, 30, 60))[0]
    kinds = rng.sample([(colour, shape) for colour in COLOURS for shape in SHAPES], len(counts))
    while True:
        slots = rng.sample(POSITIONS, total)
        sizes = [rng.choice(SIZES) for _ in counts]
        per_slot = [size for size, count in zip(sizes, counts, strict=True) for _ in range(count)]
        big = [slot for slot, size in zip(slots, per_slot, strict=True) if size == "büyük"]
        if not any(_adjacent(a, b) for a in big for b in big):
            break
    groups, start = [], 0
    for (colour, shape), size, count in zip(kinds, sizes, counts, strict=True):
        positions = tuple(sorted(slots[start:start + count], key=POSITIONS.index))
        groups.append(SceneGroup(shape, colour, size, positions))
        start += count
    return Scene(tuple(sorted(groups, key=_canonical_order)))


# ---------------------------------------------------------------------------------------------------------------
# Drawing
# ---------------------------------------------------------------------------------------------------------------
def _polygon(shape: str) -> list[tuple[float, float]]:
    """Outline in unit coordinates (about radius 1, y pointing down)."""
    def ring(n: int, radius: float, start: float) -> list[tuple[float, float]]:
        return [(radius * math.cos(start + 2 * math.pi * i / n), radius * math.sin(start + 2 * math.pi * i / n))
                for i in range(n)]

    if shape == "kare":
        return [(-0.74, -0.74), (0.74, -0.74), (0.74, 0.74), (-0.74, 0.74)]
    if shape == "üçgen":
        return [(x, y + 0.1) for x, y in ring(3, 1.05, -math.pi / 2)]
    if shape == "yıldız":
        outer, inner = ring(5, 1.08, -math.pi / 2), ring(5, 0.46, -math.pi / 2 + math.pi / 5)
        return [p for pair in zip(outer, inner, strict=True) for p in pair]
    if shape == "altıgen":
        return ring(6, 0.98, 0.0)
    if shape == "artı":
        a, w = 0.98, 0.33
        return [(-w, -a), (w, -a), (w, -w), (a, -w), (a, w), (w, w), (w, a), (-w, a), (-w, w), (-a, w), (-a, -w),
                (-w, -w)]
    if shape == "kalp":
        points = []
        for i in range(60):
            t = 2 * math.pi * i / 60
            x = 16 * math.sin(t) ** 3
            y = -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t))
            points.append((x / 16, (y - 2.5) / 16))
        return points
    raise ValueError(f"{shape!r} is not a polygon shape")


def _rotate(points: Sequence[tuple[float, float]], angle: float) -> list[tuple[float, float]]:
    c, s = math.cos(angle), math.sin(angle)
    return [(x * c - y * s, x * s + y * c) for x, y in points]


@dataclass(frozen=True)
class _Placed:
    shape: str
    rgb: tuple[int, int, int]
    x: float  # centre, relative to width
    y: float  # centre, relative to height
    radius: float  # relative to the shorter side
    angle: float


def _layout(scene: Scene, rng: random.Random) -> list[_Placed]:
    """Jittered positions, sizes and rotations, resampled until no two objects overlap."""
    items = [(group, slot) for group in scene.groups for slot in group.positions]
    rgbs = [tuple(min(255, max(0, c + rng.randint(-14, 14))) for c in COLOURS[group.colour]) for group, _ in items]
    angles = [0.0 if group.shape == "daire" else math.radians(rng.uniform(-15, 15)) for group, _ in items]
    for attempt in range(20):
        jitter = 0.03 if attempt < 19 else 0.0  # the bare slots always fit: generate_scene saw to that
        placed = []
        for (group, slot), rgb, angle in zip(items, rgbs, angles, strict=True):
            sx, sy = SLOTS[slot]
            scale = rng.uniform(0.93, 1.07) if jitter else 1.0
            placed.append(_Placed(group.shape, rgb, sx + rng.uniform(-jitter, jitter),
                                  sy + rng.uniform(-jitter, jitter), _RADIUS[group.size] * scale, angle))
        if all(math.hypot(a.x - b.x, a.y - b.y) >= 1.08 * (a.radius + b.radius)
               for i, a in enumerate(placed) for b in placed[i + 1:]):
            break
    return placed


def _background(width: int, height: int, rng: random.Random) -> np.ndarray:
    """Plain, gradient or lightly textured, always low-saturation so no object colour can blend in."""
    def tone() -> np.ndarray:
        rgb = colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.0, 0.15), rng.uniform(0.6, 0.9))
        return np.array(rgb, dtype=np.float32) * 255

    side = min(width, height)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    u, v = (xs + 0.5) / side, (ys + 0.5) / side  # square units, so textures look the same at any aspect
    kind = rng.choice(("plain", "gradient", "stripes", "dots", "checker"))
    base = tone()
    angle = rng.uniform(0, math.pi)
    along = u * math.cos(angle) + v * math.sin(angle)
    if kind == "plain":
        image = np.broadcast_to(base, (height, width, 3))
    elif kind == "gradient":
        other = tone()
        t = (along - along.min()) / max(float(np.ptp(along)), 1e-6)
        image = base + (other - base) * t[..., None]
    else:
        period, amplitude = rng.uniform(0.08, 0.2), rng.uniform(6, 15) * rng.choice((-1, 1))
        if kind == "stripes":
            pattern = (np.sin(2 * math.pi * along / period) > 0).astype(np.float32)
        elif kind == "dots":
            across = -u * math.sin(angle) + v * math.cos(angle)
            du, dv = (along / period) % 1 - 0.5, (across / period) % 1 - 0.5
            pattern = (du * du + dv * dv < 0.06).astype(np.float32)
        else:
            pattern = ((np.floor(u / period) + np.floor(v / period)) % 2).astype(np.float32)
        image = base + amplitude * pattern[..., None]
    return np.asarray(image, dtype=np.float32).copy()


def render_scene(scene: Scene, width: int, height: int, rng: random.Random) -> Image.Image:
    """Draw `scene` as an RGB image; the same scene and rng state give the same picture at any size."""
    noise_rng = np.random.default_rng(rng.getrandbits(64))
    canvas = Image.fromarray(np.clip(_background(width, height, rng), 0, 255).astype(np.uint8))
    side = min(width, height)
    factor = 4 if side <= 160 else 2  # shapes are drawn supersampled, then box-filtered: anti-aliased edges
    for item in _layout(scene, rng):
        mask = Image.new("L", (width * factor, height * factor), 0)
        draw = ImageDraw.Draw(mask)
        cx, cy, r = item.x * width * factor, item.y * height * factor, item.radius * side * factor
        if item.shape == "daire":
            draw.ellipse((cx - 0.97 * r, cy - 0.97 * r, cx + 0.97 * r, cy + 0.97 * r), fill=255)
        elif item.shape == "hilal":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
            (ox, oy), inner = _rotate([(0.42, -0.06)], item.angle)[0], 0.8 * r
            draw.ellipse((cx + ox * r - inner, cy + oy * r - inner, cx + ox * r + inner, cy + oy * r + inner), fill=0)
        else:
            draw.polygon([(cx + x * r, cy + y * r) for x, y in _rotate(_polygon(item.shape), item.angle)], fill=255)
        canvas.paste(item.rgb, None, mask.reduce(factor))
    pixels = np.asarray(canvas, dtype=np.float32)
    pixels = pixels + noise_rng.normal(0.0, rng.uniform(1.5, 6.0), pixels.shape)
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))


# ---------------------------------------------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------------------------------------------
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
    tc, tr = _GRID[target]
    for slot in reference:
        rc, rr = _GRID[slot]
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


# ---------------------------------------------------------------------------------------------------------------
# Reading captions back
# ---------------------------------------------------------------------------------------------------------------
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
        edited = Scene(tuple(sorted(groups_after, key=_canonical_order)))
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
# Corpus files
# ---------------------------------------------------------------------------------------------------------------
SPLITS = ("train", "val", "test")
FORMATS = ("webdataset", "parquet")
JPEG_QUALITY = 90
# Hard negatives for contrastive training (see scene_negatives).
NEGATIVES_PER_SAMPLE = 8
PARQUET_SCHEMA = pa.schema([
    ("key", pa.string()), ("jpg", pa.binary()), ("caption", pa.string()), ("captions", pa.list_(pa.string())),
    ("objects", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
])
_ROW_GROUP = 1000


def sample_rng(seed: int, split: str, index: int, stream: str) -> random.Random:
    """An independent RNG per (seed, split, index, stream), so any sample can be regenerated on its own."""
    digest = hashlib.sha256(f"demo-world/{WORLD_VERSION}/{seed}/{split}/{index}/{stream}".encode()).digest()
    return random.Random(int.from_bytes(digest[:16], "big"))


def sample_key(split: str, index: int) -> str:
    return f"{split}_{index:09d}"


@dataclass(frozen=True)
class Sample:
    """One generated sample: the JPEG, its captions (canonical first) and the scene's objects."""

    key: str
    jpg: bytes
    captions: list[str]
    negatives: list[str]
    objects: list[dict[str, Any]]
    width: int
    height: int

    @property
    def caption(self) -> str:
        return self.captions[0]

    def meta(self) -> dict[str, Any]:
        return {"key": self.key, "captions": self.captions, "negatives": self.negatives, "objects": self.objects,
                "width": self.width, "height": self.height}


def make_sample(seed: int, split: str, index: int, size: tuple[int, int] = (64, 64)) -> Sample:
    """Sample `index` of `split`: identical wherever and whenever it is generated."""
    width, height = size
    scene = generate_scene(sample_rng(seed, split, index, "scene"))
    image = render_scene(scene, width, height, sample_rng(seed, split, index, "render"))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    captions = captions_for(scene, sample_rng(seed, split, index, "captions"))
    negative_rng = sample_rng(seed, split, index, "negatives")
    negatives = scene_negatives(scene, negative_rng, NEGATIVES_PER_SAMPLE)
    return Sample(sample_key(split, index), buffer.getvalue(), captions, negatives, scene.objects(), width, height)


@contextlib.contextmanager
def _atomic(path: Path) -> Iterator[Path]:
    """A hidden temporary name beside `path`, renamed into place only when the block succeeds."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)  # fixed metadata: same samples, same bytes
    info.size, info.mode, info.mtime = len(data), 0o644, 0
    tar.addfile(info, io.BytesIO(data))


def write_shard(out_dir: str | Path, seed: int, split: str, shard: int, count: int, size: tuple[int, int],
                shard_size: int, formats: Sequence[str], on_sample: Callable[[], None] | None = None,
                ) -> list[dict[str, Any]]:
    """Write shard number `shard` of a split holding `count` samples; returns its manifest file entries."""
    out_dir = Path(out_dir)
    indices = range(shard * shard_size, min(count, (shard + 1) * shard_size))
    split_dir = out_dir / split
    split_dir.mkdir(parents=True, exist_ok=True)
    paths = {fmt: split_dir / f"shard-{shard:05d}.{'tar' if fmt == 'webdataset' else 'parquet'}" for fmt in formats}
    rows: list[Sample] = []
    with contextlib.ExitStack() as stack:
        tar = parquet = None
        if "webdataset" in paths:
            tmp = stack.enter_context(_atomic(paths["webdataset"]))
            tar = stack.enter_context(tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT))
        if "parquet" in paths:
            parquet = stack.enter_context(pq.ParquetWriter(stack.enter_context(_atomic(paths["parquet"])),
                                                           PARQUET_SCHEMA))

        def flush() -> None:
            if parquet is not None and rows:
                parquet.write_table(pa.Table.from_pylist([
                    {"key": s.key, "jpg": s.jpg, "caption": s.caption, "captions": s.captions,
                     "objects": json.dumps(s.objects, ensure_ascii=False), "width": s.width, "height": s.height}
                    for s in rows], schema=PARQUET_SCHEMA))
            rows.clear()

        for index in indices:
            sample = make_sample(seed, split, index, size)
            if tar is not None:  # img2dataset's member order: KEY.jpg, KEY.json, KEY.txt
                _tar_member(tar, f"{sample.key}.jpg", sample.jpg)
                _tar_member(tar, f"{sample.key}.json", json.dumps(sample.meta(), ensure_ascii=False).encode())
                _tar_member(tar, f"{sample.key}.txt", sample.caption.encode())
            rows.append(sample)
            if len(rows) >= _ROW_GROUP:
                flush()
            if on_sample is not None:
                on_sample()
        flush()
    return [{"path": path.relative_to(out_dir).as_posix(), "samples": len(indices), "bytes": path.stat().st_size,
             "sha256": file_sha256(path)} for path in paths.values()]


_drawn: Any = None  # in a corpus worker process: the shared count of samples drawn, for the progress bar


def _count_drawn() -> None:
    with _drawn.get_lock():
        _drawn.value += 1


def _start_corpus_worker(counter: Any) -> None:
    global _drawn
    _drawn = counter


def _write_shards_in_processes(out_dir: Path, seed: int, shards: list[tuple[str, int, int]], size: tuple[int, int],
                               shard_size: int, formats: Sequence[str], workers: int, bar: tqdm,
                               ) -> list[dict[str, Any]]:
    # spawn, not fork: the caller may hold threads (Ray, torch) that a forked child would inherit mid-lock
    context = multiprocessing.get_context("spawn")
    counter = context.Value("q", 0)
    with ProcessPoolExecutor(min(workers, len(shards)), mp_context=context, initializer=_start_corpus_worker,
                             initargs=(counter,)) as pool:
        pending = {pool.submit(write_shard, out_dir, seed, split, shard, count, size, shard_size, formats,
                               _count_drawn) for split, shard, count in shards}
        done: set[Future] = set()
        try:
            while pending:
                finished, pending = wait(pending, timeout=1.0, return_when=FIRST_EXCEPTION)
                done |= finished
                bar.update(counter.value - bar.n)
                for future in finished:
                    future.result()  # a worker's error stops the run now, not after every shard is drawn
        except BaseException:
            pool.shutdown(cancel_futures=True)
            raise
    return [entry for future in done for entry in future.result()]


def write_corpus(out_dir: str | Path, seed: int, counts: dict[str, int], size: tuple[int, int] = (64, 64),
                 shard_size: int = 10000, formats: Sequence[str] = FORMATS, progress: bool = False,
                 workers: int = 1) -> dict[str, Any]:
    """Write every split's shards and `manifest.json` (seed, counts, sizes, sha256 per file); returns the manifest.

    `workers` processes draw shards side by side (each sample depends only on seed, split and index, so the
    files are the same for any number of workers). Shard files of earlier runs that this run does not
    produce are removed, so the directory matches the manifest.
    """
    out_dir = Path(out_dir)
    if (not formats or not set(formats) <= set(FORMATS) or not set(counts) <= set(SPLITS)
            or min(counts.values(), default=0) < 0 or shard_size < 1 or min(size) < 1 or workers < 1):
        raise ValueError(f"bad corpus settings: formats={formats}, counts={counts}, size={size}, "
                         f"shard_size={shard_size}, workers={workers}")
    out_dir.mkdir(parents=True, exist_ok=True)
    shards = [(split, shard, counts[split]) for split in SPLITS if counts.get(split, 0)
              for shard in range(math.ceil(counts[split] / shard_size))]
    files: list[dict[str, Any]] = []
    with tqdm(total=sum(counts.values()), unit="img", desc="demo corpus", disable=not progress) as bar:
        if workers == 1 or len(shards) == 1:
            for split, shard, count in shards:
                files += write_shard(out_dir, seed, split, shard, count, size, shard_size, formats,
                                     on_sample=lambda: bar.update(1))
        else:
            files = _write_shards_in_processes(out_dir, seed, shards, size, shard_size, formats, workers, bar)
    written = {f["path"] for f in files}
    for split in SPLITS:
        for stale in sorted((out_dir / split).glob("shard-*")):
            if stale.suffix in (".tar", ".parquet") and stale.relative_to(out_dir).as_posix() not in written:
                stale.unlink()
    manifest = {
        "world_version": WORLD_VERSION, "seed": seed, "counts": {s: counts.get(s, 0) for s in SPLITS},
        "width": size[0], "height": size[1], "shard_size": shard_size, "formats": list(formats),
        "files": sorted(files, key=lambda f: f["path"]),
    }
    with _atomic(out_dir / "manifest.json") as tmp:
        tmp.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return manifest
