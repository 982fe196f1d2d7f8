"""Whether a job's pictures are checked: the SAFETY_CHECKER setting against the caller's wish.

Why this exists: the deployer decides what a caller may turn off, and the answer must be plain.
`off`: nothing is loaded or baked, nothing is checked (a caller's `true` gets a warning saying so);
`request`: `input.enable_safety_checker` decides, default true (RunPod's public endpoints and fal
default to true); `always`: every picture is checked and a caller's `false` is refused.  Pure.
"""

from __future__ import annotations

from ..errors import RequestError

MODES = ("off", "request", "always")
DEFAULT_MODE = "request"


def wanted(mode: str, requested: bool | None) -> tuple[bool, str | None]:
    """(check this job's pictures?, a warning for the caller or None); RequestError when the caller may not."""
    if mode == "off":
        warning = ("input.enable_safety_checker is true but this worker runs with SAFETY_CHECKER=off: the pictures "
                   "were not checked") if requested else None
        return False, warning
    if mode == "always" and requested is False:
        raise RequestError("input.enable_safety_checker", "false is not allowed: this worker checks every picture "
                           "(SAFETY_CHECKER=always); leave the field out or send true")
    return requested is not False, None
