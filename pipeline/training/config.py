"""A training run's settings: one typed object (`TrainConfig`), recorded in train_summary.json, with the
architectures of the models a run builds from config (`ClipArch`, `LMArch`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class ClipArch:
    """The small custom CLIP of stage 1 (ModifiedResNet vision tower: fast and accurate on 2 cores)."""

    image_size: int = 64
    embed_dim: int = 256
    vision_layers: tuple[int, ...] = (2, 2, 2, 2)
    vision_width: int = 32
    # 32: open_clip's ModifiedResNet; 16: without the stem's average pool, so that a 48 px input ends in a
    # 3x3 grid whose cells line up with the demo's slot rows and columns (docs/demo-model.md)
    vision_stride: int = 32
    text_width: int = 128
    text_layers: int = 3
    text_heads: int = 4
    context_length: int = 32  # the demo captions take at most 25 tokens; padding costs text-tower time

    def open_clip_config(self, vocab_size: int, eos_id: int) -> dict[str, Any]:
        return {
            "embed_dim": self.embed_dim,
            # open_clip sizes the attention pool for image_size // 32 cells a side
            "vision_cfg": {"image_size": self.image_size * 32 // self.vision_stride, "layers": list(self.vision_layers),
                           "width": self.vision_width},
            "vision_stride": self.vision_stride,
            "preprocess": {"size": self.image_size},
            "text_cfg": {"context_length": self.context_length, "vocab_size": vocab_size, "width": self.text_width,
                         "heads": self.text_heads, "layers": self.text_layers, "pool_type": "eos", "eos_id": eos_id},
        }


@dataclass
class LMArch:
    """A small GPT-2 built from config when no pretrained LM is named."""

    n_embd: int = 192
    n_layer: int = 3
    n_head: int = 4
    n_positions: int = 96
    # no dropout (the demo corpus draws fresh captions per epoch) and exact GELU, one kernel where GPT-2's
    # tanh approximation ("gelu_new") is five: together a fifth less time per CPU step (0.22 s, not 0.28-0.31 s)
    dropout: float = 0.0
    activation: str = "gelu"


# rmokady/CLIP_prefix_caption's train.py: AdamW at 2e-5 for the mapper and a pretrained GPT-2
CLIPCAP_LR = 2e-5


@dataclass
class TrainConfig:
    out: str
    data: tuple[str, ...] = ()             # images + captions: WebDataset / Parquet / directories / caption files
    image_root: str | None = None          # relative image paths of caption files; None: each file's folder
    embeddings_from: tuple[str, ...] = ()  # this project's output: image_embedding + text_column, or + data's captions
    text_column: str = "caption"           # of embeddings_from: "caption" or "original_text"
    clip: str | None = None                # open_clip ARCH[:WEIGHTS], or a bundle dir's encoder; None: stage 1
    lm: str | None = None                  # Hugging Face LM name or dir; None: GPT-2 from LMArch
    mapper: str = "mlp"
    freeze_lm: bool = False
    prefix_length: int = 10
    clip_arch: ClipArch = field(default_factory=ClipArch)
    lm_arch: LMArch = field(default_factory=LMArch)
    vocab_size: int = 1024
    clip_epochs: int = 30
    caption_epochs: int = 20
    clip_batch_size: int = 128
    caption_batch_size: int = 128
    caption_micro_batch_size: int | None = None  # gradient accumulation: a caption batch in pieces of this many
    clip_lr: float = 2e-3
    caption_lr: float | None = None  # None: 1e-3 for a GPT-2 from scratch, ClipCap's 2e-5 for a pretrained --lm
    seed: int = 0
    limit: int | None = None
    device: str = "auto"     # auto: the GPU where there is one; cpu; cuda; cuda:N
    precision: str = "auto"  # autocast dtype (fp32: none): auto is pipeline.precision's choice for the device
    # Stage 2 draws the first reference with this probability (the rest uniformly); None: all uniform.
    # A corpus whose first reference is its most regular form (the demo's canonical caption) then
    # teaches greedy decoding one consistent form.
    first_reference_prob: float | None = None
    shuffle_buffer_mb: int = 256  # the examples each epoch is shuffled among (pipeline.training.examples)
    save_fp16: bool = False  # store the bundle's weights as fp16 (half the size; loaded as fp32)
    # Locked-image tuning: a text tower (clip_arch's) trained against the frozen encoder's image embeddings
    # becomes the bundle's scorer, so that its scores read the captions' language
    train_scorer: bool = False
    scorer_text_tower: str | None = None  # a Hugging Face model the text tower starts from; None: clip_arch's
    scorer_epochs: int = 10
    scorer_lr: float | None = None  # None: 1e-3 from config, 1e-4 from a pretrained --scorer-text-tower

    @property
    def shuffle_buffer_bytes(self) -> int:
        return self.shuffle_buffer_mb << 20

    def caption_peak_lr(self) -> float:
        """caption_lr, else by the LM: a from-scratch rate would wreck a pretrained LM's weights in a few steps."""
        if self.caption_lr is not None:
            return self.caption_lr
        return 1e-3 if self.lm is None else CLIPCAP_LR

    def scorer_peak_lr(self) -> float:
        """scorer_lr, else by the text tower: a pretrained one starts from what it knows."""
        if self.scorer_lr is not None:
            return self.scorer_lr
        return 1e-3 if self.scorer_text_tower is None else 1e-4

    def to_json(self) -> dict[str, Any]:
        return asdict(self) | {"caption_lr": self.caption_peak_lr(), "scorer_lr": self.scorer_peak_lr()}
