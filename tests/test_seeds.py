"""serving/seeds.py: every seed from 0 to 2**64-1 draws its own noise; seeds below 2**32 draw what they drew before.

What broke before: the engine seeded torch's CPU generator with `manual_seed`, which builds the Mersenne Twister's
state from the seed's low 32 bits, so seeds 2**32 apart gave the same picture.
"""

from __future__ import annotations

import random
import struct

import pytest
import torch

from qwen_edit_worker.errors import WorkerError
from qwen_edit_worker.serving import seeds

COMFY_SEED = 677909188488042  # ComfyUI's 2511 template's seed


def noise(generator: torch.Generator) -> torch.Tensor:
    return torch.randn(64, generator=generator)


class TestTorchTruncates:
    def test_manual_seed_keeps_only_the_low_32_bits(self) -> None:
        """The reason for the module: if torch ever seeds from all 64 bits, the wide path can go."""
        low, high = (torch.Generator().manual_seed(s) for s in (COMFY_SEED, COMFY_SEED + 2**32))
        assert high.initial_seed() == COMFY_SEED + 2**32 and torch.equal(noise(low), noise(high))


class TestGenerators:
    @pytest.mark.parametrize("seed", [0, 1, 42, 2**31, 2**32 - 1])
    def test_below_2_to_the_32_the_noise_is_manual_seeds(self, seed: int) -> None:
        assert torch.equal(noise(seeds.generator_for(seed)), noise(torch.Generator().manual_seed(seed)))

    @pytest.mark.parametrize("seed", [2**32, COMFY_SEED, 2**63, 2**64 - 1])
    def test_wide_seeds_are_reported_and_repeat(self, seed: int) -> None:
        made = seeds.generator_for(seed)
        assert made.initial_seed() == seed
        assert torch.equal(noise(made), noise(seeds.generator_for(seed)))

    def test_seeds_2_to_the_32_apart_differ(self) -> None:
        draws = [noise(seeds.generator_for(s)) for s in (COMFY_SEED, COMFY_SEED + 2**32, COMFY_SEED % 2**32)]
        assert not torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])
        assert not torch.equal(draws[1], draws[2])

    def test_the_wide_state_is_the_reference_wide_key_seeding(self) -> None:
        """The generator's words are Python's `random.Random(seed)` (init_by_array): its 32-bit draws, in order."""
        made = seeds.generator_for(COMFY_SEED)
        draws = torch.empty(3, dtype=torch.int64).random_(0, 2**31, generator=made).tolist()
        reference = random.Random(COMFY_SEED)
        words = [reference.getrandbits(32) for _ in range(6)]
        assert draws == [w % 2**31 for w in words[1::2]]  # torch's 64-bit draw keeps the second word of each pair

    @pytest.mark.parametrize("seed", [-1, 2**64])
    def test_out_of_range(self, seed: int) -> None:
        with pytest.raises(ValueError, match="from 0 to 2"):
            seeds.generator_for(seed)

    def test_a_torch_that_lays_the_state_out_otherwise_fails_plainly(self, monkeypatch: pytest.MonkeyPatch) -> None:
        seeds._template.cache_clear()
        monkeypatch.setattr(seeds, "HEADER", struct.Struct("<QQiQ"))  # as if a field had widened
        try:
            assert torch.equal(noise(seeds.generator_for(7)), noise(torch.Generator().manual_seed(7)))
            with pytest.raises(WorkerError, match=r"^input\.seed: seeds from 2\*\*32 up need torch's CPU generator"):
                seeds.generator_for(2**40)
        finally:
            seeds._template.cache_clear()
