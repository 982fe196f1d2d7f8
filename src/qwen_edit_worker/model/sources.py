"""Where the weights come from: the baked folder, RunPod's Hugging Face cache, or any folder.

Why this exists: people need to know exactly which weights answered a job.  A baked image carries
builder/bake.py's manifest.json (repos and commit hashes); RunPod's cached models and network
volumes use the Hugging Face cache layout (`models--ORG--NAME/snapshots/<commit>/`), whose
commit is the snapshot's name.  MODEL_PATH may point at a baked folder, a snapshot, or a cache
repo folder (`.../models--Qwen--Qwen-Image-Edit-2511`, resolved through refs/main).  Pure: no torch.

The slim image (BAKE_MODEL=0) bakes only the Lightning LoRA and a manifest into /models/<variant>/;
with MODEL_PATH unset and no model baked there, `locate` takes RunPod's cached model (the endpoint's
Model field) from /runpod-volume/huggingface-cache/hub/models--ORG--NAME/snapshots/<commit>/, and
the baked LoRA beside it.  Neither there: one ModelLoadError naming the Model field and the repo to
enter, which the worker gives every job (serving/lazy.py).

A bake can also have done work ahead (manifest `prepared`: the Lightning LoRA fused into the
transformer, components stored quantised).  The loader skips that work, and a setting that
contradicts it is a load error naming the setting and the bake (`check_settings`), before any
weight is read.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import ModelLoadError
from ..weights.precision import PRECISIONS
from ..weights.variants import Variant

log = logging.getLogger(__name__)
BAKED_ROOT = Path("/models")  # the bake's --dest in the Dockerfile; MODEL_PATH's default is BAKED_ROOT/<variant>
RUNPOD_CACHE = Path("/runpod-volume/huggingface-cache/hub")  # where RunPod puts an endpoint's cached model


@dataclass(frozen=True)
class ModelSource:
    path: Path  # the diffusers folder to load
    kind: str  # "baked", "huggingface-cache" or "folder"
    model: str | None  # "ORG/NAME@commit" when known
    lora: str | None  # the LoRA's "ORG/NAME@commit" when known (from the manifest)
    fused_lora: str | None = None  # "ORG/NAME@commit" of the LoRA the bake fused into the transformer
    transformer_precision: str = "bf16"  # as stored (bake --precision)
    text_encoder_precision: str = "bf16"  # as stored (bake --text-encoder-precision)
    lightning_dir: Path | None = None  # the slim image's baked lightning/ folder, beside a cached model

    def manifest(self) -> dict[str, str] | None:
        """The job output's `model.manifest`: short commits of the weights that answered."""
        if self.model is None:
            return None
        return {k: _short(v) for k, v in (("model", self.model), ("lora", self.lora)) if v}

    def default_lora(self, variant: Variant) -> Path:
        """The Lightning file: in the baked layout, or in a sibling cache repo of the same hub folder."""
        baked = self.path / "lightning" / variant.lora_basename
        if self.lightning_dir is not None and (self.lightning_dir / variant.lora_basename).is_file():
            return self.lightning_dir / variant.lora_basename
        if self.kind != "huggingface-cache" or baked.is_file():
            return baked
        cache_repo = self.path.parent.parent.parent / ("models--" + variant.lora_repo.replace("/", "--"))
        snapshot = _snapshot(cache_repo)
        return snapshot / variant.lora_file if snapshot else baked

    def check_settings(self, lightning: bool, lora_path: Path | None, precision: str,
                       text_encoder_precision: str) -> None:
        """Raise ModelLoadError when a setting contradicts what the bake already did."""
        where = f"{self.path / 'manifest.json'} says"
        if self.fused_lora:
            if not lightning:
                raise ModelLoadError("LIGHTNING", f"0 (the base model) contradicts the bake: {where} the Lightning "
                                                  f"LoRA {self.fused_lora} is fused into the transformer; set "
                                                  "LIGHTNING=1, or bake without --fuse-lightning")
            if lora_path is not None:
                raise ModelLoadError("LORA_PATH", f"is set ({lora_path}) but {where} the Lightning LoRA "
                                                  f"{self.fused_lora} is already fused into the transformer (a "
                                                  "second fuse would add it twice); leave LORA_PATH empty, or bake "
                                                  "without --fuse-lightning")
        elif lightning and self.transformer_precision != "bf16":
            raise ModelLoadError("LIGHTNING", f"1 needs the Lightning LoRA fused before quantisation, but {where} the "
                                              f"transformer was baked {self.transformer_precision} without it; bake "
                                              "with --fuse-lightning, or set LIGHTNING=0")
        for setting, wanted, baked, component, flag in (
            ("PRECISION", precision, self.transformer_precision, "transformer", "--precision"),
            ("TEXT_ENCODER_PRECISION", text_encoder_precision, self.text_encoder_precision, "text encoder",
             "--text-encoder-precision"),
        ):
            if baked != "bf16" and wanted != baked:
                raise ModelLoadError(setting, f"{wanted} contradicts the bake: {where} the {component} was baked "
                                              f"{baked}; set {setting}={baked}, or bake with {flag} {wanted}")


def locate(path: Path, variant: Variant) -> ModelSource:
    """The model MODEL_PATH names; at its default with no model baked, RunPod's cached model instead."""
    baked_root, cache_root = BAKED_ROOT, RUNPOD_CACHE  # read at call time: tests move both into a tmp folder
    if path != baked_root / variant.name or (path / "model_index.json").is_file():
        return resolve(path)
    cache_repo = cache_root / ("models--" + variant.repo.replace("/", "--"))
    snapshot = _snapshot(cache_repo) if (cache_repo / "snapshots").is_dir() else None
    if snapshot is None or not (snapshot / "model_index.json").is_file():
        raise ModelLoadError("MODEL_PATH", _no_model(path, variant, cache_root, cache_repo, snapshot))
    log.info("no model baked in %s: using RunPod's cached model %s", path, snapshot)
    return replace(resolve(snapshot), lora=_baked_lora(path), lightning_dir=path / "lightning")


def _no_model(path: Path, variant: Variant, cache_root: Path, cache_repo: Path, snapshot: Path | None) -> str:
    baked = "only the Lightning LoRA (the slim image)" if (path / "lightning").is_dir() else "no model"
    found = "" if snapshot is None else f" ({snapshot} has no model_index.json: an incomplete download?)"
    others = sorted(p.name.removeprefix("models--").replace("--", "/") for p in cache_root.glob("models--*")
                    if p != cache_repo) if cache_root.is_dir() else []
    hint = f"; the cache holds {', '.join(others)} instead (another MODEL_VARIANT?)" if others else ""
    return (f"{path} holds {baked} and RunPod's model cache has no {variant.repo} under {cache_root}{found}{hint}: "
            f"set the endpoint's Model field to {variant.repo} (RunPod console: the endpoint, Manage, Edit "
            f"Endpoint, Model), or point MODEL_PATH at a diffusers folder")


def _baked_lora(path: Path) -> str | None:
    """The slim bake's LoRA as "ORG/NAME@commit", from its manifest."""
    try:
        lora = json.loads((path / "manifest.json").read_text())["lora"]
        return f"{lora['repo']}@{lora['commit']}"
    except (OSError, ValueError, KeyError, TypeError):
        return None


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
            prepared = manifest.get("prepared") or {}
            stored = prepared.get("precision") or {}
            source = ModelSource(path, "baked", f"{model['repo']}@{model['commit']}",
                                 f"{lora['repo']}@{lora['commit']}", prepared.get("fused_lora"),
                                 stored.get("transformer", "bf16"), stored.get("text_encoder", "bf16"))
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            log.warning("ignoring unreadable %s (%s)", manifest_file, type(err).__name__)
        else:
            for component, value in (("transformer", source.transformer_precision),
                                     ("text_encoder", source.text_encoder_precision)):
                if value not in PRECISIONS:
                    raise ModelLoadError("MODEL_PATH", f"{manifest_file} records {component} precision {value!r}; "
                                                       f"this worker loads {', '.join(PRECISIONS)}")
            return source
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
