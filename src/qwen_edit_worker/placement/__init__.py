"""Where the weights live on the GPU, and how large a job the memory left can take.

`planner` is the pure planning code (component bytes and GPU bytes in, a Plan out);
`activations` the per-job memory estimate (tokens and batch in, bytes out); `jobs` sizes one
request against a plan (batches, or a refusal); `python -m qwen_edit_worker.placement` prints a
plan before deploying (`__main__`); `syncs` counts what would make the host wait for the GPU (a
test and a command, on fake CUDA; not re-exported); `measure` and `flopstable` are the real-shape
harness and the FLOP table it writes for the client and the docs (they import torch: not
re-exported); `deploytable` writes what `qwen-edit deploy` needs of this planner, hub.json and the
settings into the client package (a command: not re-exported).  The package re-exports the names
callers use.
"""

from .activations import BASE_JOB, JobShape
from .jobs import JobFit, fit_job, fit_request, job_shape
from .planner import (
    COMPONENTS,
    GB,
    MODES,
    PCIE_BYTES_PER_SECOND,
    REFERENCE_BYTES,
    RESERVE_BYTES,
    STREAM_WINDOW_BYTES,
    Plan,
    folder_bytes,
    model_bytes,
    need,
    plan,
    reference_sizes,
)

__all__ = ["BASE_JOB", "COMPONENTS", "GB", "MODES", "PCIE_BYTES_PER_SECOND", "REFERENCE_BYTES", "RESERVE_BYTES",
           "STREAM_WINDOW_BYTES", "JobFit", "JobShape", "Plan", "fit_job", "fit_request", "folder_bytes", "job_shape",
           "model_bytes", "need", "plan", "reference_sizes"]
