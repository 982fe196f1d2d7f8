"""`python -m qwen_edit_worker.placement`: the plan a worker would make, before deploying it.

Why this exists: choosing a GPU class and precisions is a deployment decision, and the answer
(what stays on the GPU, what crosses PCIe per job, the largest job, images per batch) should be
known before paying for a worker.  It prints the same JSON object the worker logs at load and
reports in each job's `model.placement`, from the real model's sizes (REFERENCE_BYTES) or from a
diffusers folder's safetensors headers (`--model-path`), with the safety checker's 0.17 GB unless
`--safety-checker off` (SAFETY_CHECKER's default, request, loads it; `safety_checker_included`
says).  Exit 0 when the plan fits; 1 with the
plan and its reason when nothing fits; 2 with one line on a bad argument.  Never a traceback.
With `--megapixels` (and `--pictures`, `--images`) it answers one job instead: `fits`,
`batched_images` (images a batch), `batches` and `peak_gb` by phase (`text`, `denoise`,
`decode`: GB on the GPU at that phase's peak, weights and RESERVE_BYTES included, from the
activation model fitted to the real graph, placement/activations.py); exit 1 with `reason` when
it does not fit.
A command, not the worker: its answer is printed (JSON on stdout, the one-line errors on stderr),
where the worker's own code logs.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from ..errors import RequestError
from ..safety import DEFAULT_MODE as SAFETY_DEFAULT
from ..safety import MODES as SAFETY_MODES
from ..weights.precision import PRECISION_SETTINGS, PRECISIONS
from ..weights.variants import DEFAULT_VARIANT, VARIANTS
from .activations import JobShape
from .jobs import fit_job
from .planner import GB, MAX_API_IMAGES, MAX_API_MEGAPIXELS, MODES, Plan, model_bytes, plan, reference_sizes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qwen_edit_worker.placement",
                                     description="Print the placement plan for a GPU size and precisions (JSON).")
    parser.add_argument("--gpu-gb", type=float, required=True, help="GPU memory in GB (10^9 bytes)")
    parser.add_argument("--precision", choices=PRECISION_SETTINGS, default="bf16",
                        help="PRECISION (the transformer; auto: fp8 or int8 by GPU, the same bytes)")
    parser.add_argument("--text-encoder-precision", choices=PRECISIONS, default="bf16",
                        help="TEXT_ENCODER_PRECISION")
    parser.add_argument("--offload", choices=("auto", *MODES), default="auto", help="OFFLOAD (default auto)")
    parser.add_argument("--memory-saving", choices=("auto", "on", "off"), default="auto",
                        help="MEMORY_SAVING (auto: VAE slicing and tiling below 48 GB)")
    parser.add_argument("--safety-checker", choices=SAFETY_MODES, default=SAFETY_DEFAULT,
                        help=f"SAFETY_CHECKER (default {SAFETY_DEFAULT}; its 0.17 GB is counted unless off)")
    parser.add_argument("--megapixels", type=float, help="a job's output size in MP (answers that job)")
    parser.add_argument("--pictures", type=int, default=1, help="the job's input pictures (1 to 3)")
    parser.add_argument("--images", type=int, default=1, help="the job's num_images (1 to 4)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--variant", choices=list(VARIANTS), default=DEFAULT_VARIANT,
                       help="the real model's sizes (same transformer for every variant)")
    where.add_argument("--model-path", type=Path, help="a diffusers folder: sizes from its safetensors headers")
    args = parser.parse_args(argv)
    if not 0 < args.gpu_gb < 10_000:
        print(f"--gpu-gb: must be a positive size in GB (got {args.gpu_gb:g})", file=sys.stderr)
        return 2
    if args.megapixels is not None and not (0 < args.megapixels <= MAX_API_MEGAPIXELS
                                            and 1 <= args.pictures <= 3 and 1 <= args.images <= MAX_API_IMAGES):
        print(f"--megapixels must be in (0, {MAX_API_MEGAPIXELS:g}], --pictures 1 to 3, --images 1 to "
              f"{MAX_API_IMAGES} (got {args.megapixels:g}, {args.pictures}, {args.images})", file=sys.stderr)
        return 2
    variant = VARIANTS[args.variant]
    sized = "int8" if args.precision == "auto" else args.precision  # fp8 and int8 take the same bytes
    if args.model_path is not None:
        if not (args.model_path / "model_index.json").is_file():
            print(f"--model-path: {args.model_path} is not a diffusers pipeline folder (no model_index.json)",
                  file=sys.stderr)
            return 2
        try:
            sizes = model_bytes(args.model_path, sized, args.text_encoder_precision)
            if args.safety_checker != "off":  # a pipeline folder holds no checker: its reference size
                sizes["safety_checker"] = reference_sizes(sized, args.text_encoder_precision)["safety_checker"]
        except (OSError, ValueError, KeyError) as err:
            print(f"--model-path: cannot read the safetensors headers in {args.model_path}: {err}", file=sys.stderr)
            return 2
        index = json.loads((args.model_path / "model_index.json").read_text())
        edit_plus = index.get("_class_name") != "QwenImageEditPipeline"
    else:
        sizes = reference_sizes(sized, args.text_encoder_precision, args.safety_checker != "off")
        edit_plus = variant.pipeline_class != "QwenImageEditPipeline"
    tiled = None if args.memory_saving == "auto" else args.memory_saving == "on"
    result = plan(sizes, int(args.gpu_gb * GB), args.offload, precision=args.precision, vae_tiled=tiled,
                  edit_plus=edit_plus, text_encoder_precision=args.text_encoder_precision,
                  zero_cond_t=variant.zero_cond_t)
    checker = {"safety_checker": args.safety_checker, "safety_checker_included": "safety_checker" in sizes}
    if args.megapixels is not None:
        return _answer_job(result, args.megapixels, args.pictures, args.images, edit_plus, checker)
    info = {**result.info(), "component_gb": {k: round(v / GB, 2) for k, v in sizes.items()},
            "precision": args.precision, "text_encoder_precision": args.text_encoder_precision, **checker}
    print(json.dumps(info, indent=2))
    return 0 if result.fits else 1


def _answer_job(result: Plan, megapixels: float, pictures: int, images: int, edit_plus: bool,
                checker: dict[str, object]) -> int:
    """Print one job's answer under `result` (JSON); 0 when it fits, 1 with its reason when not."""
    one = JobShape.one_image(megapixels, pictures, edit_plus)
    job = JobShape(one.output_pixels, one.input_pixels, edit_plus=edit_plus, num_images=images)
    batch = result.batch_for(job) if result.fits else 0
    reason = result.reason
    if result.fits:
        try:
            fit = fit_job(result, job)
            reason = f"{images} image(s) in {fit.batches} batch(es) of up to {fit.batch} (offload={result.offload})"
        except RequestError as err:
            reason = str(err)
    peaks = result.peak_bytes(job, max(batch, 1))
    print(json.dumps({"fits": batch >= 1, "batched_images": batch,
                      "batches": math.ceil(images / batch) if batch else 0,
                      "peak_gb": {k: round(v / GB, 2) for k, v in peaks.items()},
                      "offload": result.offload, "gpu_gb": round((result.gpu_bytes or 0) / GB, 1),
                      "megapixels": megapixels, "pictures": pictures, "images": images,
                      "vae_tiled": result.vae_tiled, **checker, "reason": reason}, indent=2))
    return 0 if batch >= 1 else 1


if __name__ == "__main__":
    sys.exit(main())
