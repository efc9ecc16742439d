"""Inputs and outputs: input specs and readers, caption files, image decoding, the output directory."""
