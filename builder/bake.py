"""Bake one Qwen-Image-Edit variant and its Lightning LoRA into a folder, verified, with a manifest.

Why this exists: a serverless worker must never download 58 GB at run time, and a build must be
something a person can trust and repeat.  This script resolves the revisions to commit hashes,
downloads only the files the pipeline loads (safetensors only, only the shards its index names, no
READMEs or pictures; in parallel, builder/fetch.py), checks every safetensors header and the LoRA's
keys, writes manifest.json (repos, commits, files, bytes), and only then moves the folder into place,
so a failure never leaves a half-written model behind.

    python builder/bake.py --variant edit-2511 [--model-revision main] [--lora-revision main] [--dest /models]
        [--fuse-lightning] [--precision bf16|int8|fp8] [--text-encoder-precision bf16|int8|fp8] [--lora-only]
        [--safety-checker-revision COMMIT | --no-safety-checker]

--lora-only (the slim image, Dockerfile BAKE_MODEL=0) bakes the Lightning LoRA and a manifest and no
model: the worker then loads the base model from RunPod's cached models (the endpoint's Model field).

Preparing at build time (qwen_edit_worker/weights/prepare.py): --fuse-lightning fuses the Lightning LoRA
into the transformer and stores the fused weights (the LoRA file is then not kept), so a cold start
does no LoRA work; --precision and --text-encoder-precision store those components quantised
(torchao, safetensors).  The manifest's `prepared` block records it (`quantised`: each component's
precision, made on which device, torchao version and configuration); the worker skips that work
and refuses settings that contradict it.  The preparation streams: the LoRA is read and checked
against the transformer's layers first (before any shard is downloaded), then each shard of the
transformer and the text encoder is prepared as soon as it has downloaded, while the next ones
download (fetch.AHEAD of them), a tensor at a time, and deleted once its output is written
(weights/stream.py).  Memory stays at a couple of GB whatever the model's size (no model is built
with its weights), and the disk holds the final folder plus the shards in flight (checked first).
The fuse, int8 and fp8 all run on a CPU; fp8 runs torchao's own quantisation with its GPU check
answered inside that call only (weights/fp8_cpu.py), giving the tensors an Ada or Hopper GPU would
make at load.  The stored tensors are those the whole-model preparation stored (tests/test_stream.py).

The safety checker (the worker's SAFETY_CHECKER, src/qwen_edit_worker/safety/) is baked too, in both
images (RunPod's cached models hold one repo per endpoint, so it cannot come from there): the three
files of Falconsai/nsfw_image_detection the worker loads, at a pinned commit, checked, and listed in
the manifest's `safety_checker`; --no-safety-checker (Dockerfile SAFETY_CHECKER=off) leaves it out.

Layout (what the worker's MODEL_PATH and LORA_PATH defaults expect):
    <dest>/<variant>/model_index.json, transformer/, text_encoder/, vae/, ...
    <dest>/<variant>/lightning/<the variant's Lightning file>
    <dest>/<variant>/safety_checker/config.json, model.safetensors, preprocessor_config.json
    <dest>/<variant>/manifest.json
With --lora-only there is no model_index.json, and the manifest's `model` says `"baked": false`.

A token, when the repos need one, comes from HF_TOKEN or the file --token-file (default
/run/secrets/hf_token, where a BuildKit secret is mounted); it is never printed.  HF_ENDPOINT
selects another hub (the tests serve a tiny model on loopback).
Exit codes: 0 done, 2 bad arguments, 3 access refused, 4 disk too small (before or while baking),
5 download failed, 6 verification failed (a damaged file, a LoRA not in the Lightning form),
7 preparation failed (a LoRA matching no layer, the fuse or the quantisation).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# builder/fetch.py and builder/verify.py, beside this script
import fetch as fetching
from verify import BakeError, verify, verify_lora, verify_safety_checker

# In a checkout or install the package is importable; in the image's build stage only the
# qwen_edit_worker.weights subpackage is copied to /builder/qwen_edit_worker/weights/, beside this
# script (a namespace package there: no qwen_edit_worker/__init__.py is needed; see the Dockerfile).
from qwen_edit_worker.weights import prepare as preparing
from qwen_edit_worker.weights.variants import VARIANTS, Variant

log = logging.getLogger("bake")
SAFETY_CHECKER_REPO = "Falconsai/nsfw_image_detection"  # the worker's safety.REPO (tests/test_bake.py pins it)
SAFETY_CHECKER_REVISION = "main"  # resolved to a commit at build time and recorded in the manifest, as the model's
SAFETY_CHECKER_FILES = ("config.json", "model.safetensors", "preprocessor_config.json")


def bake(variant: Variant, dest: Path, model_revision: str, lora_revision: str, token: str | None,
         fuse: bool = False, precision: str = "bf16", text_encoder_precision: str = "bf16",
         checker_revision: str | None = SAFETY_CHECKER_REVISION) -> Path:
    from huggingface_hub import HfApi, hf_hub_download

    for flag, value in (("--precision", precision), ("--text-encoder-precision", text_encoder_precision)):
        try:  # before any download: a precision this bake cannot make (unknown; fp8 on an unchecked torchao)
            preparing.check_can_quantise(flag, value)
        except preparing.PrepareError as err:
            raise BakeError(2, str(err)) from None

    final, staging = _destination(dest, variant)
    api = HfApi(token=token)
    try:
        model = _info(api, variant.repo, model_revision)
        lora_info = _info(api, variant.lora_repo, lora_revision)
        sizes = {s.rfilename: int(s.size or 0) for s in model.siblings or []}
        lora_sizes = {s.rfilename: int(s.size or 0) for s in lora_info.siblings or []}
        if variant.lora_file not in lora_sizes:
            raise BakeError(2, f"{variant.lora_repo}@{lora_revision} has no file {variant.lora_file}")

        def fetch(repo: str, commit: str, name: str, into: Path) -> Path:
            try:
                return Path(hf_hub_download(repo, name, revision=commit, local_dir=into, token=token))
            except Exception as err:  # network, HTTP and disk errors all end the bake
                raise _download_error(repo, name, err) from None

        index = json.loads(fetch(variant.repo, model.sha, "model_index.json", staging).read_text())
        shard_maps = {path: json.loads(fetch(variant.repo, model.sha, path, staging).read_text())["weight_map"]
                      for path in sizes if path.endswith(".safetensors.index.json")}
        files = fetching.select_files(sizes, index, shard_maps)
        small = [p for p in files if not p.endswith(".safetensors")]  # configs, tokenizers: what the plan reads
        for path in small:
            fetch(variant.repo, model.sha, path, staging)
        rewritten = preparing.streamed(precision, text_encoder_precision, fuse)
        fetching.check_disk(dest, staging, files, sizes, lora_sizes[variant.lora_file], rewritten, fuse, precision,
                    text_encoder_precision)
        fetched = fetch(variant.lora_repo, lora_info.sha, variant.lora_file, staging / ".lora")
        (staging / "lightning").mkdir()
        lora = staging / "lightning" / variant.lora_basename
        fetched.replace(lora)
        verify_lora(lora)
        preparation = None
        if rewritten:
            with fetching.preparing_errors("reading the LoRA"):  # checked against the transformer, before any shard
                preparation = preparing.Preparation(staging, lora if fuse else None,
                                                    f"{variant.lora_repo}@{lora_info.sha}", precision,
                                                    text_encoder_precision, files=files)
        streamed = preparation.pending() if preparation else []
        weights = [p for p in files if p.endswith(".safetensors") and p not in streamed]
        parts = " and ".join(rewritten).replace("_", " ")
        log.info("downloading %d weight files (%.2f GB) with %d connections%s", len(weights) + len(streamed),
                 sum(sizes[p] for p in [*weights, *streamed]) / 1e9, fetching.WORKERS,
                 f"; preparing the {len(streamed)} shards of the {parts} as they arrive ({fetching.AHEAD} downloaded "
                 "ahead)" if streamed else "")
        fetching.download_and_prepare(lambda path: fetch(variant.repo, model.sha, path, staging), weights, streamed,
                                      lambda path, local: fetching.prepare_shard(preparation, path, local))
        prepared = None
        if preparation is not None:
            with fetching.preparing_errors("writing the prepared components' configs"):
                prepared = preparation.finish()
        _remove_extras(staging, set(files))
        verify(staging, None if fuse else lora)
        checker = None if checker_revision is None else bake_safety_checker(api, staging, checker_revision, token)
        on_disk = sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file())
        manifest = {
            "variant": variant.name,
            "baked_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "model": {"repo": variant.repo, "revision": model_revision, "commit": model.sha},
            "lora": {"repo": variant.lora_repo, "file": variant.lora_file, "revision": lora_revision,
                     "commit": lora_info.sha},
            "files": [{"path": p, "bytes": (staging / p).stat().st_size} for p in on_disk],
        }
        if prepared is not None:
            manifest["prepared"] = prepared
        if checker is not None:
            manifest["safety_checker"] = checker
        manifest["total_bytes"] = sum(f["bytes"] for f in manifest["files"])
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        staging.replace(final)
        log.info("baked %s into %s (%.2f GB, manifest.json written)", variant.name, final,
                 manifest["total_bytes"] / 1e9)
        return final
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _destination(dest: Path, variant: Variant) -> tuple[Path, Path]:
    """(the final folder, the staging folder beside it that is renamed into place only when whole)."""
    final = dest / variant.name
    if final.exists():
        raise BakeError(2, f"{final} already exists; remove it or choose another --dest")
    dest.mkdir(parents=True, exist_ok=True)
    return final, dest / f".{variant.name}.partial-{os.getpid()}"


def bake_safety_checker(api: Any, staging: Path, revision: str, token: str | None) -> dict[str, Any]:
    """The safety checker's files into <staging>/safety_checker/, checked; its manifest entry."""
    from huggingface_hub import hf_hub_download

    info = _info(api, SAFETY_CHECKER_REPO, revision)
    missing = [f for f in SAFETY_CHECKER_FILES if f not in {s.rfilename for s in info.siblings or []}]
    if missing:
        raise BakeError(2, f"{SAFETY_CHECKER_REPO}@{revision} has no {', '.join(missing)}")
    folder = staging / "safety_checker"
    for name in SAFETY_CHECKER_FILES:
        try:
            hf_hub_download(SAFETY_CHECKER_REPO, name, revision=info.sha, local_dir=folder, token=token)
        except Exception as err:  # network, HTTP and disk errors all end the bake
            raise _download_error(SAFETY_CHECKER_REPO, name, err) from None
    shutil.rmtree(folder / ".cache", ignore_errors=True)
    verify_safety_checker(folder)
    log.info("safety checker %s@%s baked (%.0f MB)", SAFETY_CHECKER_REPO, info.sha[:12],
             sum(p.stat().st_size for p in folder.iterdir()) / 1e6)
    return {"repo": SAFETY_CHECKER_REPO, "revision": revision, "commit": info.sha,
            "files": [f"safety_checker/{name}" for name in SAFETY_CHECKER_FILES]}


def bake_lora_only(variant: Variant, dest: Path, lora_revision: str, token: str | None,
                   checker_revision: str | None = SAFETY_CHECKER_REVISION) -> Path:
    """The slim bake: the Lightning LoRA, verified, and a manifest that says the model is not baked."""
    from huggingface_hub import HfApi, hf_hub_download

    final, staging = _destination(dest, variant)
    api = HfApi(token=token)
    try:
        lora_info = _info(api, variant.lora_repo, lora_revision)
        if variant.lora_file not in {s.rfilename for s in lora_info.siblings or []}:
            raise BakeError(2, f"{variant.lora_repo}@{lora_revision} has no file {variant.lora_file}")
        try:
            fetched = Path(hf_hub_download(variant.lora_repo, variant.lora_file, revision=lora_info.sha,
                                           local_dir=staging / ".lora", token=token))
        except Exception as err:  # network, HTTP and disk errors all end the bake
            raise _download_error(variant.lora_repo, variant.lora_file, err) from None
        (staging / "lightning").mkdir()
        lora = staging / "lightning" / variant.lora_basename
        fetched.replace(lora)
        _remove_extras(staging, set())
        verify_lora(lora)
        checker = None if checker_revision is None else bake_safety_checker(api, staging, checker_revision, token)
        files = [f"lightning/{variant.lora_basename}", *(checker["files"] if checker else [])]
        manifest = {
            "variant": variant.name,
            "baked_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "model": {"repo": variant.repo, "baked": False,
                      "from": "RunPod's cached models: the endpoint's Model field set to " + variant.repo},
            "lora": {"repo": variant.lora_repo, "file": variant.lora_file, "revision": lora_revision,
                     "commit": lora_info.sha},
            "files": [{"path": path, "bytes": (staging / path).stat().st_size} for path in files],
        }
        if checker is not None:
            manifest["safety_checker"] = checker
        manifest["total_bytes"] = sum(f["bytes"] for f in manifest["files"])
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        staging.replace(final)
        log.info("baked the Lightning LoRA of %s into %s (%.2f MB, no model: it comes from RunPod's cached "
                 "models, the endpoint's Model field %s)", variant.name, final, manifest["total_bytes"] / 1e6,
                 variant.repo)
        return final
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _info(api: Any, repo: str, revision: str) -> Any:
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        return api.model_info(repo, revision=revision, files_metadata=True)
    except RevisionNotFoundError:
        raise BakeError(2, f"{repo} has no revision {revision!r}") from None
    except (GatedRepoError, RepositoryNotFoundError):
        raise BakeError(3, _refused(repo, api.token)) from None
    except HfHubHTTPError as err:
        status = getattr(err.response, "status_code", None)
        if status in (401, 403):
            raise BakeError(3, _refused(repo, api.token)) from None
        raise BakeError(5, f"asking the hub about {repo} failed (HTTP {status})") from None
    except Exception as err:  # connection refused, DNS, timeouts
        raise BakeError(5, f"cannot reach the hub for {repo} ({type(err).__name__})") from None


def _refused(repo: str, token: str | None) -> str:
    if token:
        return f"access to {repo} was refused with the token given: check that it has read access to the repo"
    return (f"access to {repo} was refused: it needs a Hugging Face token; pass one as the BuildKit secret "
            "hf_token (docker build --secret id=hf_token,env=HF_TOKEN ...)")


def _download_error(repo: str, name: str, err: Exception) -> BakeError:
    if isinstance(err, OSError) and err.errno == 28:
        return BakeError(4, f"the disk filled up while downloading {name}; give the build more disk")
    status = getattr(getattr(err, "response", None), "status_code", None)
    if status in (401, 403):
        return BakeError(3, _refused(repo, None))
    return BakeError(5, f"download of {repo}/{name} failed or was interrupted ({type(err).__name__}); "
                        "nothing was kept, run the build again")


def _remove_extras(folder: Path, keep: set[str]) -> None:
    shutil.rmtree(folder / ".cache", ignore_errors=True)
    shutil.rmtree(folder / ".lora", ignore_errors=True)
    for path in sorted(folder.rglob("*"), reverse=True):
        rel = path.relative_to(folder).as_posix()
        if path.is_file() and rel not in keep and not rel.startswith("lightning/"):
            path.unlink()


def read_token(token_file: Path) -> str | None:
    if os.environ.get("HF_TOKEN", "").strip():
        return os.environ["HF_TOKEN"].strip()
    if token_file.is_file():
        return token_file.read_text().strip() or None
    return None


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="bake: %(message)s")  # libraries: warnings only
    log.setLevel(logging.INFO)
    logging.getLogger("qwen_edit_worker.weights").setLevel(logging.INFO)  # each shard as it is prepared
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", required=True, help=f"one of {', '.join(VARIANTS)}")
    parser.add_argument("--model-revision", default="main")
    parser.add_argument("--lora-revision", default="main")
    parser.add_argument("--dest", type=Path, default=Path("/models"))
    parser.add_argument("--token-file", type=Path, default=Path("/run/secrets/hf_token"))
    parser.add_argument("--fuse-lightning", action="store_true",
                        help="fuse the Lightning LoRA into the transformer and store it fused (no LoRA work at start)")
    parser.add_argument("--precision", default="bf16", help="transformer as stored: bf16, int8 or fp8 (quantised "
                        "after the fuse, on the CPU; fp8 then runs on Ada/Hopper GPUs only)")
    parser.add_argument("--text-encoder-precision", default="bf16",
                        help="text encoder as stored: bf16, int8 or fp8 (the vision tower stays bf16)")
    parser.add_argument("--safety-checker-revision", default=SAFETY_CHECKER_REVISION,
                        help=f"the {SAFETY_CHECKER_REPO} commit or branch to bake (default: the pinned commit)")
    parser.add_argument("--no-safety-checker", action="store_true",
                        help="bake no safety checker (the worker then needs SAFETY_CHECKER=off)")
    parser.add_argument("--lora-only", action="store_true",
                        help="the slim image: bake the Lightning LoRA and a manifest, no model (the worker loads "
                        "it from RunPod's cached models)")
    args = parser.parse_args(argv)
    checker = None if args.no_safety_checker else args.safety_checker_revision
    try:
        if args.variant not in VARIANTS:
            raise BakeError(2, f"unknown variant {args.variant!r}; choose one of {', '.join(VARIANTS)}")
        if args.lora_only:
            prepared = [flag for flag, on in (("--fuse-lightning", args.fuse_lightning),
                                              ("--precision", args.precision.lower() != "bf16"),
                                              ("--text-encoder-precision", args.text_encoder_precision.lower()
                                               != "bf16")) if on]
            if prepared:
                raise BakeError(2, f"--lora-only (BAKE_MODEL=0) bakes no model, so {', '.join(prepared)} has nothing "
                                   "to prepare; leave it at its default or bake the model")
            bake_lora_only(VARIANTS[args.variant], args.dest, args.lora_revision, read_token(args.token_file),
                           checker)
            return 0
        bake(VARIANTS[args.variant], args.dest, args.model_revision, args.lora_revision, read_token(args.token_file),
             args.fuse_lightning, args.precision.lower(), args.text_encoder_precision.lower(), checker)
    except BakeError as err:
        log.error("%s", err)
        return err.code
    return 0


if __name__ == "__main__":
    sys.exit(main())
