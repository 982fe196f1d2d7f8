"""Where the weights come from: the baked folder, RunPod's Hugging Face cache, or any folder.

Why this exists: people need to know exactly which weights answered a job.  A baked image carries
builder/bake.py's manifest.json (repos and commit hashes); RunPod's cached models and network
volumes use the Hugging Face cache layout (`models--ORG--NAME/snapshots/<commit>/`), whose
commit is the snapshot's name.  MODEL_PATH may point at a baked folder, a snapshot, or a cache
repo folder (`.../models--Qwen--Qwen-Image-Edit-2511`, resolved through refs/main).  Pure: no torch.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from .variants import Variant

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSource:
    path: Path  # the diffusers folder to load
    kind: str  # "baked", "huggingface-cache" or "folder"
    model: str | None  # "ORG/NAME@commit" when known
    lora: str | None  # the LoRA's "ORG/NAME@commit" when known (from the manifest)

    def manifest(self) -> dict[str, str] | None:
        """The job output's `model.manifest`: short commits of the weights that answered."""
        if self.model is None:
            return None
        return {k: _short(v) for k, v in (("model", self.model), ("lora", self.lora)) if v}

    def default_lora(self, variant: Variant) -> Path:
        """The Lightning file: in the baked layout, or in a sibling cache repo of the same hub folder."""
        baked = self.path / "lightning" / variant.lora_basename
        if self.kind != "huggingface-cache" or baked.is_file():
            return baked
        cache_repo = self.path.parent.parent.parent / ("models--" + variant.lora_repo.replace("/", "--"))
        snapshot = _snapshot(cache_repo)
        return snapshot / variant.lora_file if snapshot else baked


def resolve(path: Path) -> ModelSource:
    """Describe the model folder at `path` (not checked for completeness here: the loader does)."""
    if path.name.startswith("models--") and (path / "snapshots").is_dir():
        snapshot = _snapshot(path)
        if snapshot is not None:
            path = snapshot
    if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
        repo = path.parent.parent.name.removeprefix("models--").replace("--", "/")
        return ModelSource(path, "huggingface-cache", f"{repo}@{path.name}", None)
    manifest_file = path / "manifest.json"
    if manifest_file.is_file():
        try:
            manifest = json.loads(manifest_file.read_text())
            model, lora = manifest["model"], manifest["lora"]
            return ModelSource(path, "baked", f"{model['repo']}@{model['commit']}", f"{lora['repo']}@{lora['commit']}")
        except (ValueError, KeyError, TypeError) as err:
            log.warning("ignoring unreadable %s (%s)", manifest_file, type(err).__name__)
    return ModelSource(path, "folder", None, None)


def _snapshot(cache_repo: Path) -> Path | None:
    ref = cache_repo / "refs" / "main"
    if ref.is_file() and (cache_repo / "snapshots" / ref.read_text().strip()).is_dir():
        return cache_repo / "snapshots" / ref.read_text().strip()
    snapshots = sorted((cache_repo / "snapshots").glob("*"), key=lambda p: p.stat().st_mtime) if (
        cache_repo / "snapshots").is_dir() else []
    return snapshots[-1] if snapshots else None


def _short(ref: str) -> str:
    repo, _, commit = ref.rpartition("@")
    return f"{repo}@{commit[:12]}"
