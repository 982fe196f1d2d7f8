"""Where the weights live on the GPU, and how large a job the memory left can take.

`planner` is the pure planning code (component bytes and GPU bytes in, a Plan out); the package
re-exports its names so callers write `placement.plan(...)`.
"""

from .planner import (
    COMPONENTS,
    GB,
    JOB_HEADROOM_BYTES,
    MODES,
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

__all__ = ["COMPONENTS", "GB", "JOB_HEADROOM_BYTES", "MODES", "REFERENCE_BYTES", "RESERVE_BYTES",
           "STREAM_WINDOW_BYTES", "Plan", "folder_bytes", "model_bytes", "need", "plan", "reference_sizes"]
