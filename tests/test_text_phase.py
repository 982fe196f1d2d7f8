"""The text phase computes hidden states only (model/text_phase.py): the same prompt embeddings, bit for bit,
without lm_head, logits or the key/value cache, on every load path (the tiny model's included)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from conftest import picture, small_job, tiny_env
from qwen_edit_worker.model import text_phase, tiny
from qwen_edit_worker.serving.worker import Worker
from qwen_edit_worker.weights import precision
from qwen_edit_worker.weights.variants import VARIANTS


def tiny_pipe(variant: str) -> Any:
    import diffusers

    spec = VARIANTS[variant]
    torch.manual_seed(0)
    return getattr(diffusers, spec.pipeline_class)(**tiny.build_components(spec, tiny.base_scheduler()))


def embeds(pipe: Any, prompt: str, images: list[Any]) -> tuple[torch.Tensor, Any]:
    image = images if pipe.__class__.__name__ == "QwenImageEditPlusPipeline" else images[0]
    with torch.no_grad():
        return pipe.encode_prompt(prompt=prompt, image=image, device="cpu")


class TestSameEmbeddings:
    @pytest.mark.parametrize("variant", ["edit", "edit-2511"])
    def test_prompt_embeddings_equal_the_whole_model_call_bit_for_bit(self, variant: str) -> None:
        """What the pipeline read from `hidden_states[-1]` of the whole model's call is what the base model's
        last hidden state gives, exactly, for one picture and (EditPlus) two."""
        pipe = tiny_pipe(variant)
        cases = [("make the sky a sunset", [picture(64, 48, seed=1)])]
        if variant != "edit":
            cases.append(("put the cat of picture 1 on the sofa", [picture(64, 48, 1), picture(48, 64, 2)]))
        before = [embeds(pipe, prompt, images) for prompt, images in cases]
        text_phase.hidden_states_only(pipe.text_encoder)
        after = [embeds(pipe, prompt, images) for prompt, images in cases]
        for (e0, m0), (e1, m1) in zip(before, after, strict=True):
            assert e0.dtype == e1.dtype and torch.equal(e0, e1)
            assert (m0 is None and m1 is None) or torch.equal(m0, m1)

    def test_an_int8_encoder_gives_the_same_embeddings_as_before_too(self) -> None:
        """Quantised (the bake's and the load's int8), the hidden states are still those the whole call kept."""
        pipe = tiny_pipe("edit-2511")
        precision.quantise_text_encoder(pipe.text_encoder, "int8")
        images = [picture(64, 48, seed=3)]
        before = embeds(pipe, "a red door", images)[0]
        text_phase.hidden_states_only(pipe.text_encoder)
        assert torch.equal(before, embeds(pipe, "a red door", images)[0])


class TestNoHead:
    def test_lm_head_is_dropped_and_cannot_run(self) -> None:
        pipe = tiny_pipe("edit-2511")
        head = pipe.text_encoder.lm_head
        held = sum(p.numel() for p in pipe.text_encoder.parameters())
        text_phase.hidden_states_only(pipe.text_encoder)
        assert isinstance(pipe.text_encoder.lm_head, text_phase.NoHead)
        assert sum(p.numel() for p in pipe.text_encoder.parameters()) == held - head.weight.numel()
        with pytest.raises(RuntimeError, match="hidden states only"):
            pipe.text_encoder.lm_head(torch.zeros(1, 2, head.in_features))

    def test_no_logits_are_computed(self) -> None:
        """The encoder's call returns no logits and never reaches the head (it would raise)."""
        pipe = tiny_pipe("edit-2511")
        text_phase.hidden_states_only(pipe.text_encoder)
        seen: list[Any] = []
        original = pipe.text_encoder.forward

        def spy(*args: Any, **kwargs: Any) -> Any:
            seen.append(original(*args, **kwargs))
            return seen[-1]

        pipe.text_encoder.forward = spy
        embeds(pipe, "make it blue", [picture(64, 48)])
        assert seen and all(out.logits is None and len(out.hidden_states) == 1 for out in seen)

    def test_the_loaded_worker_runs_hidden_states_only(self) -> None:
        """Every load path applies it: the tiny model as the worker loads it (TINY_MODEL=1), quantised at load too;
        the lm_head does not count in the placement's resident bytes."""
        for env in (tiny_env(), tiny_env(TEXT_ENCODER_PRECISION="int8")):
            worker = Worker(env)
            out = worker.handle(small_job())
            assert "error" not in out, out
            encoder = worker.model.get()[0].model.pipe.text_encoder
            assert isinstance(encoder.lm_head, text_phase.NoHead)
            assert not any(name.startswith("lm_head") for name, _ in encoder.named_parameters())
