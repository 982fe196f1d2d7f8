"""A torch generator for every seed a caller may send, 0 to 2**64-1, each its own noise.

Why this exists: torch's CPU generator (the Mersenne Twister, mt19937) keeps a 64-bit seed as its
`initial_seed()` but builds its state from the low 32 bits only (`init_with_uint32`), so
`manual_seed(s)` and `manual_seed(s + 2**32)` draw the same noise: a ComfyUI seed such as
677909188488042 and the same seed plus 2**32 would give the same picture (ComfyUI's own
`torch.manual_seed` does exactly that).  Here:

- a seed below 2**32 seeds the generator as before (`manual_seed`): the same noise as diffusers'
  usual `torch.Generator().manual_seed(seed)`, so those seeds keep their pictures;
- a wider seed fills the twister's state from all its bits with the reference wide-key seeding
  (`init_by_array` over the seed's 32-bit words, as Python's own `random.seed` does for an int), read
  from `random.Random(seed)`, and loaded with `Generator.set_state`; `initial_seed()` reports the seed.

The state layout `set_state` takes (ATen's CPUGeneratorImplStateLegacy: seed, left, seeded, next, 624
state words widened to 64 bits, the normal-sample caches) is checked once against what torch itself
gives for a 32-bit seed before a wide seed is used; a torch that changes it fails the job with a
WorkerError saying so, never with silently different noise.
"""

from __future__ import annotations

import functools
import random
import struct

import torch

from ..errors import WorkerError

WIDE = 2**32  # seeds from here up need the wide seeding
STATE_WORDS = 624  # mt19937's state
HEADER = struct.Struct("<QiiQ")  # the_initial_seed, left, seeded, next
WORDS_AT = HEADER.size  # then the 624 words, each a uint64


def generator_for(seed: int) -> torch.Generator:
    """A CPU generator whose noise is `seed`'s own, for any seed from 0 to 2**64-1."""
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must be from 0 to 2**64-1 (got {seed})")
    made = torch.Generator(device="cpu")
    if seed < WIDE:
        return made.manual_seed(seed)
    raw = bytearray(_template())
    words = random.Random(seed).getstate()[1]  # (624 words, the index: 624, "twist before the next draw")
    HEADER.pack_into(raw, 0, seed, 1, 1, 0)  # left 1, next 0: torch's "twist before the next draw"
    struct.pack_into(f"<{STATE_WORDS}Q", raw, WORDS_AT, *words[:STATE_WORDS])
    made.set_state(torch.frombuffer(raw, dtype=torch.uint8).clone())
    return made


@functools.cache
def _template() -> bytes:
    """torch's state for seed 0, checked to be laid out as this module writes it (else a WorkerError)."""
    raw = bytes(torch.Generator(device="cpu").manual_seed(0).get_state().numpy())
    expected = [0]
    for index in range(1, STATE_WORDS):  # mt19937's init_genrand(0), as torch's init_with_uint32 runs it
        expected.append((1812433253 * (expected[-1] ^ (expected[-1] >> 30)) + index) & 0xFFFFFFFF)
    fits = len(raw) >= WORDS_AT + 8 * STATE_WORDS and HEADER.unpack_from(raw, 0) == (0, 1, 1, 0) and \
        list(struct.unpack_from(f"<{STATE_WORDS}Q", raw, WORDS_AT)) == expected
    if not fits:
        raise WorkerError("input.seed", f"seeds from 2**32 up need torch's CPU generator state as torch 2.x lays it "
                          f"out, and torch {torch.__version__} lays it out otherwise; send a seed below 2**32")
    return raw
