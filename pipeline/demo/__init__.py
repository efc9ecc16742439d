"""The synthetic Turkish world of the demo model, deterministic given a `random.Random`:
  turkish.py   suffixes by rule (`inflect`): vowel harmony, buffer letters, assimilation, softening
  scenes.py    which objects sit in which of five slots (`generate_scene`), drawn at any size (`render_scene`)
  captions.py  captions written (`captions_for`), read back (`parse_caption`, `score_caption`), and edited into
               hard negatives (`swap_attribute`, `near_miss_scenes`, `scene_negatives`)
  corpus.py    WebDataset (img2dataset layout) and/or Parquet shards + manifest.json (`write_corpus`)
and the object checker evaluation is given for it (`DemoObjects`)."""

from __future__ import annotations

import random
from typing import Any

from pipeline.demo.captions import score_caption, swap_attribute
from pipeline.demo.scenes import Scene


class DemoObjects:
    """`pipeline.quality.evaluation.ObjectChecker` for the demo world: KEY.json "objects" are its scene."""

    def objects(self, meta: dict[str, Any]) -> Scene | None:
        try:
            return Scene.from_objects(meta["objects"]) if meta.get("objects") else None
        except (KeyError, TypeError):  # an "objects" entry of some other metadata schema: not a demo scene
            return None

    def single_object(self, objects: Scene) -> bool:
        return objects.total == 1

    def check(self, caption: str, objects: Scene) -> dict[str, Any]:
        return score_caption(caption, objects)

    def swap(self, caption: str, rng: random.Random) -> str:
        return swap_attribute(caption, rng)
