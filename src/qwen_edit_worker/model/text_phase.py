"""The text phase computes the prompt's hidden states only: no lm_head, no logits, no key/value cache.

Why this exists: both Qwen edit pipelines call the whole Qwen2.5-VL model
(`text_encoder(..., output_hidden_states=True)`) and read only `outputs.hidden_states[-1]`.  Called
that way, transformers keeps every layer's hidden state (29 of them), fills a key/value cache,
and runs `lm_head` on every token: 512 KB a token of logits and states in bf16, 1.43 MB with an
int8 lm_head (its int32 and float32 logits), measured on the real graph (placement/measure.py).
None of it is read.  `hidden_states_only` gives the encoder a forward that runs its base model
(vision tower and language model) without the cache or the extra states and returns the last
hidden state where the pipelines look for it; the last hidden state IS `hidden_states[-1]` (the
final norm's output, bit for bit: tests/test_text_phase.py), so the prompt embeddings are the
same.  It also drops `lm_head` (1.09 GB of bf16 weights, 0.55 GB int8, that now never run) so no
placement holds or moves it; a module that raises takes its place, so nothing can use it unnoticed.
Applied by the load sequence on every path (the tiny model's too), before quantisation and before
any offload hook wraps the forward.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

log = logging.getLogger(__name__)


class NoHead(torch.nn.Module):
    """Where lm_head was: it holds no weight and refuses to run (the worker uses the hidden states only)."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("the text encoder's lm_head is not loaded: this worker uses its hidden states only")


def hidden_states_only(encoder: Any) -> Any:
    """Make `encoder` (Qwen2_5_VLForConditionalGeneration) compute hidden states only; returns it."""
    if getattr(encoder, "_hidden_states_only", False):
        return encoder
    base = encoder.model

    def forward(input_ids: Any = None, attention_mask: Any = None, pixel_values: Any = None,
                image_grid_thw: Any = None, output_hidden_states: bool | None = None, **kwargs: Any) -> Any:
        kwargs.pop("use_cache", None)
        out = base(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                   image_grid_thw=image_grid_thw, use_cache=False, **kwargs)
        return CausalLMOutputWithPast(hidden_states=(out.last_hidden_state,))

    head, embed = encoder.get_output_embeddings(), encoder.get_input_embeddings()
    dropped = isinstance(head, torch.nn.Linear) and (embed is None or head.weight is not embed.weight)
    if dropped:  # a tied head is the input embedding itself: nothing to drop
        encoder.lm_head = NoHead()
    encoder.forward = forward
    encoder._hidden_states_only = True
    log.info("text encoder: hidden states only (no lm_head, logits or key/value cache)%s",
             f"; lm_head dropped ({head.in_features} x {head.out_features})" if dropped else "")
    return encoder
