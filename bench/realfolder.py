"""A baked model folder at the real shapes, small enough for a 24 GB machine: what bench/coldstart loads.

Why this exists: a cold start is reading and constructing ~58 GB (bf16) or ~30 GB (int8) of weights, which
no test machine holds, and the tiny model's 20 MB says nothing about it.  This writes the folder
builder/bake.py would write, at the real configs (placement/realconfig.py, the ones the fake-tensor harness
uses) with random weights, cut where the model repeats itself: the transformer with N of its 60 blocks at
full width, the text encoder with 2 of its 28 layers (embeddings, lm_head and the whole vision tower at
full size), the VAE whole, the real-shaped safety checker (ViT-base, float32 as Falconsai's file is).
Layouts, as the bake writes them:
- `bf16`: unfused, with a Lightning-shaped LoRA (rank 64, alpha 8, as the real file is believed to be:
  facts.md section 11) at lightning/<the variant's file>;
- `int8`: the bake's own preparation (weights/prepare.prepare: the LoRA fused, transformer and text encoder
  int8), exactly what `bake.py --fuse-lightning --precision int8 --text-encoder-precision int8` runs.
manifest.json is the bake's (so the worker reports the source as baked), with a `bench` block saying what
was cut; the commits are zeros: these are not the published weights.  Components are built one at a time
in bf16 on the CPU and freed before the next, so the peak stays near the largest one (reported per phase).

    python bench/realfolder.py --blocks 6 --layout int8 --dir /work/coldstart-scratch/int8-6
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import benchlib  # noqa: F401 (puts src/ on the path)
import pagecache
from qwen_edit_worker.placement import realconfig
from qwen_edit_worker.weights.variants import VARIANTS

LAYOUTS = ("bf16", "int8")
TEXT_LAYERS = 2
LORA_RANK, LORA_ALPHA = 64, 8.0
SHARD = "5GB"  # the published folders' shard size
COMMIT = "0" * 40  # not a published commit: random weights
# Test-only narrow widths (write(..., narrow=True)): the same classes, configs and layout, a few MB.
NARROW = {"transformer": {"num_attention_heads": 2, "joint_attention_dim": 256},
          "text": {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 2, "num_key_value_heads": 2,
                   "vocab_size": 512},
          "vision": {"depth": 2, "hidden_size": 64, "intermediate_size": 128, "num_heads": 2, "out_hidden_size": 256,
                     "fullatt_block_indexes": [1]},
          "vae": {"base_dim": 16}}


def peak_reset() -> None:
    """Start a new peak-RSS window for this process (Linux: 5 > /proc/self/clear_refs resets VmHWM)."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_gb() -> float:
    text = Path("/proc/self/status").read_text()
    return round(int(text.split("VmHWM:")[1].split()[0]) * 1024 / 1e9, 2)


def write(folder: Path, blocks: int, layout: str, variant: str = "edit-2511", *, narrow: bool = False
          ) -> dict[str, Any]:
    """Write the folder (via a staging folder beside it, renamed when whole); what it holds and cost."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, not {layout!r}")
    if folder.exists() and any(folder.iterdir()) and not _ours(folder):
        raise FileExistsError(f"{folder} holds files this writer did not make: give an empty or new folder")
    spec = VARIANTS[variant]
    staging = folder.with_name(f".{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    started = time.perf_counter()
    try:
        peak_reset()
        lora = _write_bf16(staging, blocks, spec, narrow)
        report: dict[str, Any] = {"write_s": round(time.perf_counter() - started, 1), "write_peak_rss_gb": peak_gb()}
        prepared = None
        if layout == "int8":
            from qwen_edit_worker.weights import prepare

            peak_reset()
            began = time.perf_counter()
            prepared = prepare.prepare(staging, lora, f"{spec.lora_repo}@{COMMIT}", "int8", "int8")
            report.update(prepare_s=round(time.perf_counter() - began, 1), prepare_peak_rss_gb=peak_gb())
        _write_manifest(staging, spec, blocks, layout, narrow, prepared)
        pagecache.flush(pagecache.files(staging))
        shutil.rmtree(folder, ignore_errors=True)
        staging.replace(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {**report, **describe(folder)}


def _write_bf16(folder: Path, blocks: int, spec: Any, narrow: bool) -> Path:
    """Every component in bf16 (the safety checker float32), one at a time; the LoRA file's path."""
    import diffusers
    import torch
    import transformers
    from transformers import (
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    import realshapes
    from qwen_edit_worker.model import tiny

    torch.manual_seed(0)
    transformers.utils.logging.disable_progress_bar()  # "Writing model shards" bars: this is a log, not a terminal
    folder.mkdir(parents=True)
    tokenizer = tiny.build_tokenizer()  # byte-level and offline; the text config takes its special-token ids
    classes = {}
    lora = folder / "lightning" / spec.lora_basename
    config = {**realconfig.transformer_config(spec.zero_cond_t, blocks), **(NARROW["transformer"] if narrow else {})}
    with realshapes.on("cpu", torch.bfloat16):
        model = diffusers.QwenImageTransformer2DModel(**config).eval()
    _save(model, folder / "transformer", classes)
    realshapes.write_lora(lora, model, 4 if narrow else LORA_RANK, alpha=LORA_ALPHA)
    del model
    gc.collect()
    with realshapes.on("cpu", torch.bfloat16):
        model = Qwen2_5_VLForConditionalGeneration(_text_config(tokenizer, narrow)).eval()
    _save(model, folder / "text_encoder", classes)
    del model
    gc.collect()
    with realshapes.on("cpu", torch.bfloat16):
        model = diffusers.AutoencoderKLQwenImage(**{**realconfig.VAE_CONFIG, **(NARROW["vae"] if narrow else {})})
    _save(model.eval(), folder / "vae", classes)
    del model
    gc.collect()
    _write_safety_checker(folder / "safety_checker", narrow)
    processor = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(), tokenizer=tokenizer,
                                 video_processor=Qwen2VLVideoProcessor())
    # The pipeline saves the small components and model_index.json; the three models were saved above, so
    # their entries are registered as diffusers' register_modules would ([library, class]) and the index rewritten.
    pipe = getattr(diffusers, spec.pipeline_class)(transformer=None, text_encoder=None, vae=None,
                                                   tokenizer=tokenizer, processor=processor,
                                                   scheduler=tiny.base_scheduler())
    diffusers.utils.logging.set_verbosity_error()  # "transformer=None cannot be saved": saved already
    pipe.save_pretrained(folder)
    pipe.register_to_config(**classes)
    pipe.save_config(folder)
    return lora


def _save(model: Any, into: Path, classes: dict[str, tuple[str, str]]) -> None:
    model.save_pretrained(into, safe_serialization=True, max_shard_size=SHARD)
    classes[into.name] = (type(model).__module__.split(".")[0], type(model).__name__)


def _text_config(tokenizer: Any, narrow: bool) -> Any:
    import realshapes

    if not narrow:
        return realshapes.text_encoder_config(tokenizer, TEXT_LAYERS, realconfig.VISION_CONFIG["depth"])
    from transformers import Qwen2_5_VLConfig

    from qwen_edit_worker.model import tiny

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in tiny.SPECIAL_TOKENS}
    text = {**realconfig.TEXT_CONFIG, **NARROW["text"], "num_hidden_layers": TEXT_LAYERS,
            "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"]}
    return Qwen2_5_VLConfig(text_config=text, vision_config={**realconfig.VISION_CONFIG, **NARROW["vision"]},
                            vocab_size=NARROW["text"]["vocab_size"], image_token_id=ids["<|image_pad|>"],
                            video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                            vision_end_token_id=ids["<|vision_end|>"])


def _write_safety_checker(folder: Path, narrow: bool) -> None:
    """Laid out as the bake lays out Falconsai/nsfw_image_detection (config, weights, preprocessor)."""
    import torch

    import realshapes
    from qwen_edit_worker.safety import tiny as safety_tiny

    safety_tiny.save(folder)  # the preprocessor config the worker reads; the tiny weights are replaced below
    if not narrow:
        realshapes.safety_checker("cpu", torch.float32).model.save_pretrained(folder, safe_serialization=True)


def _write_manifest(folder: Path, spec: Any, blocks: int, layout: str, narrow: bool,
                    prepared: dict[str, Any] | None) -> None:
    """builder/bake.py's manifest, and a `bench` block saying what this folder is (and is not)."""
    from qwen_edit_worker.safety import REPO

    on_disk = sorted(p.relative_to(folder).as_posix() for p in pagecache.files(folder))
    manifest: dict[str, Any] = {
        "variant": spec.name,
        "baked_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "model": {"repo": spec.repo, "revision": "random-weights", "commit": COMMIT},
        "lora": {"repo": spec.lora_repo, "file": spec.lora_file, "revision": "random-weights", "commit": COMMIT},
        "files": [{"path": p, "bytes": (folder / p).stat().st_size} for p in on_disk],
    }
    if prepared is not None:
        manifest["prepared"] = prepared
    manifest["safety_checker"] = {"repo": REPO, "revision": "random-weights", "commit": COMMIT,
                                  "files": [p for p in on_disk if p.startswith("safety_checker/")]}
    manifest["total_bytes"] = sum(f["bytes"] for f in manifest["files"])
    manifest["bench"] = bench_block(blocks, layout, narrow)
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def bench_block(blocks: int, layout: str, narrow: bool = False) -> dict[str, Any]:
    return {"writer": "bench/realfolder.py", "weights": "random", "layout": layout, "width": "narrow (test)" if narrow
            else "full", "transformer_blocks": blocks, "of_transformer_blocks": realconfig.TRANSFORMER_CONFIG[
                "num_layers"], "text_layers": TEXT_LAYERS, "of_text_layers": realconfig.TEXT_CONFIG[
                "num_hidden_layers"], "lora_rank": LORA_RANK if layout == "bf16" else None}


def complete(folder: Path, blocks: int, layout: str, variant: str) -> bool:
    """Whether `folder` is a whole folder this writer made for these blocks, layout and variant (reusable)."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
        return (manifest["bench"] == bench_block(blocks, layout) and manifest["variant"] == variant
                and all((folder / f["path"]).stat().st_size == f["bytes"] for f in manifest["files"]))
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _ours(folder: Path) -> bool:
    try:
        return json.loads((folder / "manifest.json").read_text())["bench"]["writer"] == "bench/realfolder.py"
    except (OSError, ValueError, KeyError, TypeError):
        return False


def describe(folder: Path) -> dict[str, Any]:
    """Bytes on disk: in all, and per component (top-level folder; loose files as `other`)."""
    sizes: dict[str, int] = {}
    for path in pagecache.files(folder):
        top = path.relative_to(folder).parts
        key = top[0] if len(top) > 1 else "other"
        sizes[key] = sizes.get(key, 0) + path.stat().st_size
    return {"bytes": sum(sizes.values()), "component_bytes": dict(sorted(sizes.items()))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, required=True, help="transformer blocks written (of 60)")
    parser.add_argument("--layout", choices=LAYOUTS, required=True)
    parser.add_argument("--variant", default="edit-2511", choices=sorted(VARIANTS))
    parser.add_argument("--dir", type=Path, required=True, help="the folder to write (replaced if there)")
    args = parser.parse_args()
    print(json.dumps(write(args.dir, args.blocks, args.layout, args.variant)))


if __name__ == "__main__":
    main()
