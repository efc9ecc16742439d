"""The three frozen models, usable without Ray: CLIP encoder/scorer and the ClipCap prefix captioner."""
