"""The synthetic Turkish world of the demo model: scenes, captions, corpus shards (`world`), and the object
checker evaluation is given for it (`DemoObjects`)."""

from __future__ import annotations

import random
from typing import Any

from pipeline.demo.world import Scene, score_caption, swap_attribute


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
