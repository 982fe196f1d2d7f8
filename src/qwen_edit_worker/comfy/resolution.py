"""ComfyUI's own size and file-name rules, as its source states them, for the nodes a Qwen edit uses.

Why this exists: a workflow's output size is decided by ComfyUI nodes (FluxKontextImageScale's
preferred-resolution table, ImageScaleToTotalPixels' rounding, the VAE's 8-pixel latent grid), and
its file names by SaveImage's counter rule.  To answer the size and names the caller's ComfyUI
would have produced, they are reproduced here, each next to the file it came from.  Pure arithmetic.
"""

from __future__ import annotations

import math
import os
import time

# comfy_extras/nodes_flux.py: PREFERED_KONTEXT_RESOLUTIONS (width, height), used by FluxKontextImageScale.
KONTEXT_RESOLUTIONS: tuple[tuple[int, int], ...] = (
    (672, 1568), (688, 1504), (720, 1456), (752, 1392), (800, 1328), (832, 1248), (880, 1184), (944, 1104),
    (1024, 1024), (1104, 944), (1184, 880), (1248, 832), (1328, 800), (1392, 752), (1456, 720), (1504, 688),
    (1568, 672),
)
LATENT_FACTOR = 8  # the Qwen-Image VAE's downscale: comfy/sd.py VAE.encode crops pixels to a multiple of it
MEGAPIXEL = 1024 * 1024  # ImageScaleToTotalPixels: total = megapixels * 1024 * 1024


def kontext_size(width: int, height: int) -> tuple[int, int]:
    """FluxKontextImageScale: the preferred resolution nearest in aspect ratio; ties go to the smaller width.

    nodes_flux.py: `min((abs(aspect_ratio - w / h), w, h) for w, h in PREFERED_KONTEXT_RESOLUTIONS)`; the
    picture is then scaled (lanczos) with a center crop to exactly that size.
    """
    aspect = width / height
    _, out_w, out_h = min((abs(aspect - w / h), w, h) for w, h in KONTEXT_RESOLUTIONS)
    return out_w, out_h


def total_pixels_size(width: int, height: int, megapixels: float, resolution_steps: int = 1) -> tuple[int, int]:
    """ImageScaleToTotalPixels (comfy_extras/nodes_post_processing.py): the aspect kept, each side rounded
    (Python's round, halves to even) to a multiple of `resolution_steps`."""
    scale_by = math.sqrt(megapixels * MEGAPIXEL / (width * height))
    return (round(width * scale_by / resolution_steps) * resolution_steps,
            round(height * scale_by / resolution_steps) * resolution_steps)


def latent_size(width: int, height: int) -> tuple[int, int]:
    """The picture size a latent of this size decodes to: VAEEncode crops to the 8-pixel grid, and the
    empty-latent nodes make `height // 8` by `width // 8` latents (nodes.py, comfy_extras/nodes_sd3.py)."""
    return width // LATENT_FACTOR * LATENT_FACTOR, height // LATENT_FACTOR * LATENT_FACTOR


def prefix_problem(prefix: str) -> str | None:
    """Why ComfyUI would refuse this filename_prefix (folder_paths.get_save_image_path), or None."""
    if not prefix.strip():
        return "must not be empty"
    normal = os.path.normpath(prefix)
    if os.path.isabs(normal) or normal == ".." or normal.startswith(".." + os.sep):
        return "saving outside ComfyUI's output folder is not allowed"
    return None


def file_names(prefix: str, size: tuple[int, int], count: int, *, advanced: bool,
               now: time.struct_time | None = None, start: int = 1) -> list[str]:
    """The names ComfyUI gives `count` pictures, as worker-comfyui returns them (no folder).

    folder_paths.get_save_image_path: %width%, %height%, %year%, %month%, %day%, %hour%, %minute% and
    %second% are filled in, the folder part goes to `subfolder` (worker-comfyui returns `filename` only),
    and the counter starts after the highest already in the folder: always 1 here, as nothing is kept
    between jobs.  SaveImage (nodes.py) names `<prefix>_<counter:05>_.png` with `%batch_num%` replaced by
    the picture's index; SaveImageAdvanced (comfy_extras/nodes_images.py) `<prefix>_<counter:05>.png`.
    """
    now = now or time.localtime()
    filled = prefix
    if "%" in filled:
        for token, value in (("%width%", size[0]), ("%height%", size[1]), ("%year%", now.tm_year),
                             ("%month%", f"{now.tm_mon:02}"), ("%day%", f"{now.tm_mday:02}"),
                             ("%hour%", f"{now.tm_hour:02}"), ("%minute%", f"{now.tm_min:02}"),
                             ("%second%", f"{now.tm_sec:02}")):
            filled = filled.replace(token, str(value))
    name = os.path.basename(os.path.normpath(filled))
    tail = ".png" if advanced else "_.png"
    return [f"{name.replace('%batch_num%', str(i))}_{start + i:05}{tail}" for i in range(count)]
