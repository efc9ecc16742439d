"""The original ClipCap loop, the baseline that tests and benchmarks compare against."""

from __future__ import annotations

import torch

from pipeline.models.captioner import PrefixCaptioner


@torch.inference_mode()
def reference_clipcap_generate(captioner: PrefixCaptioner, prefix: torch.Tensor, max_new_tokens: int) -> list[int]:
    """The original ClipCap greedy loop for ONE image: no KV cache, the whole sequence is fed again
    at every step, stop at the stop token. The baseline that tests and benchmarks compare against."""
    stop_ids = captioner.stop_token_ids()
    eos = captioner.tokenizer.eos_token_id
    generated = prefix[:1]
    tokens: list[int] = []
    for _ in range(max_new_tokens):
        logits = captioner.lm(inputs_embeds=generated).logits[:, -1, :]
        token = int(logits.argmax(-1).item())
        if token in stop_ids and token == eos:
            break
        tokens.append(token)
        if token in stop_ids:
            break
        next_embed = captioner.embed_tokens(torch.tensor([[token]], device=prefix.device))
        generated = torch.cat((generated, next_embed), dim=1)
    return tokens
