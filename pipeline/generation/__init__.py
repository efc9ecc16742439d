"""Captions from image embeddings: batched token generation and the encode, generate, score step."""
