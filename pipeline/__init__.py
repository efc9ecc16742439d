"""Turkish image-captioning pipeline: CLIP encoder, ClipCap prefix captioner, CLIP-score filter."""
