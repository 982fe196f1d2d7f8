"""The text encoder read straight from its memory-mapped files onto the device and quantised there.

Why this exists: with a bf16 bake (the Hub's default build) and TEXT_ENCODER_PRECISION int8|fp8,
letting the pipeline's `from_pretrained` load the Qwen2.5-VL encoder puts all 16.6 GB of bf16
weights in host memory before it is quantised.  Here it is read first, on its own, by
transformers' `from_pretrained` with `device_map={"": device}`: transformers (5.x,
`modeling_utils._load_pretrained_model`) opens each safetensors file with the mmap backend, keeps
lazy slices, and materialises one tensor at a time (a few on its loader threads) straight to
`device`, so the host holds a few tensors beyond the page cache.  The encoder is then quantised on
`device` with weights/precision.py (the vision tower kept bf16; lm_head dropped first, never run:
model/text_phase.py) and left on `home`: the GPU when the placement keeps everything resident, else
the CPU, as int8/fp8 (9.0 GB of host memory instead of 16.6), where accel.place takes it from
there.  The loader hands it to the pipeline's `from_pretrained` as `text_encoder=`, so it is read
once.

GPU memory during this step: the whole bf16 encoder (16.6 GB) plus one layer's quantisation temp.
That fits a 24 GB GPU only because it runs before the transformer reaches the GPU; the loader
calls it first.  On a CPU (tests) the same path runs with device and home "cpu".
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from ..errors import ModelLoadError
from ..weights import precision
from . import text_phase

log = logging.getLogger(__name__)


def encoder_class(pipeline_folder: Path) -> Any:
    """The transformers class model_index.json names for `text_encoder` (Qwen2_5_VLForConditionalGeneration)."""
    import transformers

    index = json.loads((pipeline_folder / "model_index.json").read_text())
    library, name = index.get("text_encoder", [None, None])
    if library != "transformers" or not hasattr(transformers, name or ""):
        raise ModelLoadError("MODEL_PATH", f"{pipeline_folder / 'model_index.json'} names text_encoder "
                                           f"{library}.{name}; this worker reads a transformers text encoder")
    return getattr(transformers, name)


def load_text_encoder(pipeline_folder: Path, dtype: Any, device: str, home: str, quantise_to: str
                      ) -> tuple[Any, dict[str, Any]]:
    """The encoder of `pipeline_folder` read onto `device`, quantised there, left on `home`; (model, record)."""
    import torch

    started = time.perf_counter()
    model_class = encoder_class(pipeline_folder)
    try:
        encoder = model_class.from_pretrained(str(pipeline_folder / "text_encoder"), dtype=dtype,
                                              device_map={"": device}, local_files_only=True)
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as err:
        raise ModelLoadError("MODEL_PATH", f"cannot load the text encoder from {pipeline_folder}: {err}") from None
    read_seconds = time.perf_counter() - started
    text_phase.hidden_states_only(encoder)  # lm_head dropped before quantising: it never runs
    done = precision.quantise_by_block(encoder, quantise_to, device, device, precision.text_encoder_chosen(encoder))
    if str(home) != str(device):
        encoder.to(home)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the bf16 encoder's 16.6 GB go back before the transformer is read
    seconds = time.perf_counter() - started
    where = f"{torch.device(device).type}, read from the files onto it"
    log.info("text encoder read %s in %.1f s and quantised to %s there (%d blocks, %.1f s in all, kept on %s)",
             where, read_seconds, quantise_to, done["blocks"], seconds, home)
    return encoder, {"where": where, "blocks": done["blocks"], "seconds": round(seconds, 2)}
