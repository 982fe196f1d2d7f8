"""Requests written for RunPod's worker-comfyui: a Qwen-Image-Edit ComfyUI workflow, read without ComfyUI.

Why this exists: callers of worker-comfyui send an API-format graph (`input.workflow`) and named
pictures (`input.images`) and read `output.images` as `[{"filename", "type", "data"}]`.  This
subpackage reads such a graph as one edit of this worker (it interprets the Qwen-Image-Edit node
set; it executes nothing) and shapes the answer the same way.  Pure: no torch.

- `workflow_job(input, settings)`: a `ComfyJob` (this worker's own `input`, the field names to put
  back into errors, the file names) for worker-comfyui's request, None for this worker's own.
- `ComfyJob.rename(error)`, `ComfyJob.object_names()`, and `shape(output, job)` for the answer.
- graph.py (the graph and its checks), nodes.py (the node table), interpret.py (the walk from the
  output back), deployment.py (what the worker serves), files.py (model and LoRA file names),
  resolution.py (ComfyUI's size and name rules), request.py (the request), answer.py (the answer).
"""

from .answer import shape
from .request import ComfyJob, workflow_job

__all__ = ["ComfyJob", "shape", "workflow_job"]
