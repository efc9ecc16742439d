"""Per-epoch checkpoints of the training stages, on local disk (Ray Train reports the folder as its checkpoint)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from pipeline.models.weights import load_state


class Checkpoints:
    """Per-epoch checkpoints, each written to a temporary directory and renamed into place, so a
    training killed at any moment resumes from its last complete epoch."""

    def __init__(self, root: Path):
        self.root = root
        self.resumed_from: str | None = None  # the checkpoint this run's latest start resumed from
        root.mkdir(parents=True, exist_ok=True)

    def save(self, stage: str, epoch: int, modules: dict[str, torch.nn.Module],
             optimizer: torch.optim.Optimizer, losses: list[float | None]) -> None:
        """`losses`: the stage's mean loss of every epoch so far, so a resumed run reports its whole history."""
        final = self.root / f"{stage}-{epoch:04d}"
        temporary = self.root / f".tmp-{stage}-{epoch:04d}"
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir()
        for name, module in modules.items():
            torch.save(module.state_dict(), temporary / f"{name}.pt")
        torch.save(optimizer.state_dict(), temporary / "optimizer.pt")
        # batch order and caption choice are re-seeded per epoch; only torch's global RNG (dropout) carries
        torch.save({"torch": torch.get_rng_state()}, temporary / "rng.pt")
        (temporary / "losses.json").write_text(json.dumps(losses))
        shutil.rmtree(final, ignore_errors=True)
        temporary.rename(final)
        for old in sorted(self.root.glob(f"{stage}-*"))[:-1]:
            shutil.rmtree(old)

    def resume(self, stage: str, modules: dict[str, torch.nn.Module],
               optimizer: torch.optim.Optimizer) -> list[float | None]:
        """Load the newest checkpoint of a stage; returns the mean loss of each epoch it completed (none:
        no checkpoint; None for an epoch whose loss a checkpoint of an earlier version did not record)."""
        found = sorted(self.root.glob(f"{stage}-*"))
        if not found:
            return []
        path = found[-1]
        self.resumed_from = path.name
        # read onto the CPU: a run resumed on another machine may have no GPU, or another one
        for name, module in modules.items():
            load_state(module, torch.load(path / f"{name}.pt", weights_only=True, map_location="cpu"),
                       str(path / f"{name}.pt"))
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu"))
        torch.set_rng_state(torch.load(path / "rng.pt", weights_only=True)["torch"])
        epochs = int(path.name.rsplit("-", 1)[1])
        history = path / "losses.json"
        return json.loads(history.read_text()) if history.is_file() else [None] * epochs
