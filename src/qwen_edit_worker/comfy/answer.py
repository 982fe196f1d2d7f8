"""The job's result in worker-comfyui's answer shape, with this worker's own fields beside it.

Why this exists: worker-comfyui (runpod-workers/worker-comfyui handler.py, README "Output")
answers `{"images": [{"filename", "type": "base64" | "s3_url", "data"}]}`, one entry per picture
of each output node, `filename` as ComfyUI named the file, `data` the base64 PNG or, with
BUCKET_ENDPOINT_URL set, the uploaded object's URL; `errors` (non-fatal problems) only when
there were some.  A caller reading that keeps working; `seed`, `timing`, `cost`, `model`,
`warnings` and the safety checker's `has_nsfw_concepts` (one per returned entry) come beside it.
This worker has no non-fatal errors (a failed upload fails the job), so `errors` never appears.
"""

from __future__ import annotations

from typing import Any

from .request import ComfyJob


def shape(out: dict[str, Any], job: ComfyJob) -> dict[str, Any]:
    """worker-comfyui's `output` from this worker's (whose pictures are in `out["images"]`)."""
    pictures = out["images"]
    flags = out.get("has_nsfw_concepts")
    images, nsfw = [], []
    for names in job.filenames:
        for index, (item, name) in enumerate(zip(pictures, names, strict=True)):
            images.append({"filename": name, "type": "s3_url" if item["type"] == "url" else "base64",
                           "data": item["image"]})
            if flags is not None:
                nsfw.append(flags[index])
    rest = {k: v for k, v in out.items() if k not in ("images", "image_url", "has_nsfw_concepts", "warnings")}
    answer = {"images": images, **rest, "warnings": job.warnings + list(out.get("warnings", []))}
    return answer if flags is None else answer | {"has_nsfw_concepts": nsfw}
