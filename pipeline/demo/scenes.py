"""The demo world's scenes: which objects (shape, colour, size) sit in which of five slots (`generate_scene`),
and their drawing at any size (`render_scene`). Deterministic given a `random.Random`."""

from __future__ import annotations

import colorsys
import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

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
GRID = {"üst": (1, 0), "sol": (0, 1), "orta": (1, 1), "sağ": (2, 1), "alt": (1, 2)}  # (column, row)
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


def canonical_order(group: SceneGroup) -> tuple[int, int]:
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
    return Scene(tuple(sorted(groups, key=canonical_order)))


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
