"""Turkish image-captioning pipeline: CLIP encoder, ClipCap prefix captioner, CLIP-score filter."""

__version__ = "0.1.0"
