"""The model bake script for real: a tiny model served by a loopback hub, baked with the real
script (huggingface_hub over HTTP), then loaded offline by the worker; and every failure path."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import small_job
from hub_server import SAFETY_CHECKER_COMMIT, SAFETY_CHECKER_JUNK, SAFETY_CHECKER_REPO, Hub, Repo, safety_checker_repo
from qwen_edit_worker.model import tiny
from qwen_edit_worker.serving.worker import Worker
from qwen_edit_worker.weights.variants import VARIANTS

ROOT = Path(__file__).resolve().parent.parent
VARIANT = VARIANTS["edit-2511"]
JUNK = {
    "README.md": b"# model card",
    "assets/example.png": b"\x89PNG not needed",
    "transformer/diffusion_pytorch_model.bin": b"pickle weights: a duplicate format",
    "transformer/diffusion_pytorch_model-00099-of-00099.safetensors": b"an unused shard",
    "vae/diffusion_pytorch_model.fp16.safetensors": b"a variant not loaded",
}


@pytest.fixture(scope="module")
def tiny_repo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    import diffusers

    folder = tmp_path_factory.mktemp("tiny-model")
    pipe = getattr(diffusers, VARIANT.pipeline_class)(**tiny.build_components(VARIANT, tiny.base_scheduler()))
    pipe.save_pretrained(folder, max_shard_size="400KB")
    files = Repo.from_folder(folder).files
    assert any(name.startswith("transformer/") and "-of-" in name for name in files)  # really sharded
    return files | JUNK


@pytest.fixture(scope="module")
def lora_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return tiny.write_lora(tmp_path_factory.mktemp("lora") / "l.safetensors").read_bytes()


@functools.cache
def checker_repo() -> Repo:
    """The safety checker's repo (a tiny ViT), built once per test session."""
    return safety_checker_repo(Path(tempfile.mkdtemp(prefix="safety-checker-repo-")))


def repos(model: dict[str, bytes], lora: bytes, **model_options: object) -> dict[str, Repo]:
    return {VARIANT.repo: Repo(files=dict(model), **model_options),  # type: ignore[arg-type]
            VARIANT.lora_repo: Repo(files={VARIANT.lora_file: lora, "README.md": b"card"},
                                    commit="fedcba9876543210fedcba9876543210fedcba98"),
            SAFETY_CHECKER_REPO: checker_repo()}


def bake(hub: Hub, dest: Path, *args: str, token: str | None = None, python: tuple[str, ...] = ()
         ) -> subprocess.CompletedProcess[str]:
    """builder/bake.py run against `hub` (`python`: options for the interpreter before the script)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update({"HF_ENDPOINT": hub.url, "HF_HOME": str(dest.parent / "hf-home"), "HF_HUB_DISABLE_XET": "1"})
    if token:
        env["HF_TOKEN"] = token
    return subprocess.run([sys.executable, *python, str(ROOT / "builder" / "bake.py"), "--dest", str(dest),
                           "--token-file", str(dest.parent / "no-secret"), *args],
                          env=env, capture_output=True, text=True, timeout=300)


def no_leftovers(dest: Path) -> bool:
    return not dest.exists() or not any(p.name.startswith(".") or p.name == VARIANT.name for p in dest.iterdir())


def test_bake_round_trip_then_worker_loads_it_offline(tmp_path: Path, tiny_repo: dict[str, bytes],
                                                      lora_bytes: bytes) -> None:
    dest = tmp_path / "models"
    with Hub(repos(tiny_repo, lora_bytes)) as hub:
        out = bake(hub, dest, "--variant", "edit-2511")
    assert out.returncode == 0, out.stderr
    folder = dest / "edit-2511"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["model"] == {"repo": VARIANT.repo, "revision": "main",
                                 "commit": "0123456789abcdef0123456789abcdef01234567"}
    assert manifest["lora"]["commit"] == "fedcba9876543210fedcba9876543210fedcba98"
    on_disk = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert on_disk == sorted([f["path"] for f in manifest["files"]] + ["manifest.json"])
    assert manifest["total_bytes"] == sum((folder / f["path"]).stat().st_size for f in manifest["files"])
    for junk in JUNK:
        assert not (folder / junk).exists(), junk
    assert (folder / "lightning" / VARIANT.lora_basename).read_bytes() == lora_bytes
    # The safety checker: the three files the worker loads, main resolved to its commit and recorded.
    assert manifest["safety_checker"] == {"repo": SAFETY_CHECKER_REPO, "revision": "main",
                                          "commit": SAFETY_CHECKER_COMMIT, "files": [
                                              "safety_checker/config.json", "safety_checker/model.safetensors",
                                              "safety_checker/preprocessor_config.json"]}
    assert sorted(p.name for p in (folder / "safety_checker").iterdir()) == [
        "config.json", "model.safetensors", "preprocessor_config.json"]
    assert not any((folder / "safety_checker" / junk).exists() for junk in SAFETY_CHECKER_JUNK)
    assert not any(p.name.startswith(".") for p in dest.iterdir())

    worker = Worker({"MODEL_PATH": str(folder), "WARMUP": "0"})  # the hub is gone: loading is offline
    result = worker.handle(small_job())
    assert "error" not in result, result
    assert result["model"]["source"] == str(folder)
    assert result["model"]["manifest"] == {"model": f"{VARIANT.repo}@0123456789ab",
                                           "lora": f"{VARIANT.lora_repo}@fedcba987654"}
    assert result["model"]["safety_checker"]["model"] == f"{SAFETY_CHECKER_REPO}@{SAFETY_CHECKER_COMMIT[:12]}"
    assert len(result["has_nsfw_concepts"]) == 1  # the baked (random) classifier answered for the one picture
    assert result["timing"]["safety_ms"] > 0


def test_the_bake_and_the_worker_name_the_same_checker() -> None:
    from qwen_edit_worker import safety

    assert SAFETY_CHECKER_REPO == safety.REPO
    source = (ROOT / "builder" / "bake.py").read_text()
    assert f'SAFETY_CHECKER_REPO = "{safety.REPO}"' in source
    assert 'SAFETY_CHECKER_REVISION = "main"' in source  # resolved and recorded at build time, as MODEL_REVISION


def test_without_a_checker_the_worker_needs_safety_checker_off(tmp_path: Path, tiny_repo: dict[str, bytes],
                                                             lora_bytes: bytes) -> None:
    dest = tmp_path / "models"
    with Hub(repos(tiny_repo, lora_bytes)) as hub:
        out = bake(hub, dest, "--variant", "edit-2511", "--no-safety-checker")
    assert out.returncode == 0, out.stderr
    folder = dest / "edit-2511"
    assert not (folder / "safety_checker").exists()
    assert "safety_checker" not in json.loads((folder / "manifest.json").read_text())
    error = Worker({"MODEL_PATH": str(folder), "WARMUP": "0"}).handle(small_job())["error"]
    assert error.startswith("SAFETY_CHECKER: no safety checker is baked") and "SAFETY_CHECKER=off" in error
    result = Worker({"MODEL_PATH": str(folder), "WARMUP": "0", "SAFETY_CHECKER": "off"}).handle(small_job())
    assert "error" not in result and "has_nsfw_concepts" not in result


def test_a_checker_that_is_not_an_nsfw_classifier_fails_verification(tmp_path: Path, tiny_repo: dict[str, bytes],
                                                                    lora_bytes: bytes) -> None:
    hub_repos = repos(tiny_repo, lora_bytes)
    hub_repos[SAFETY_CHECKER_REPO] = safety_checker_repo(tmp_path / "cats", ("cat", "dog"))
    with Hub(hub_repos) as hub:
        out = bake(hub, tmp_path / "models", "--variant", "edit-2511")
    assert out.returncode == 6 and "is not a ViT nsfw classifier" in out.stderr, out.stderr
    assert no_leftovers(tmp_path / "models")


@pytest.mark.parametrize(("options", "token", "code", "message"), [
    ({"token": "hf_right"}, None, 3, "needs a Hugging Face token; pass one as the BuildKit secret hf_token"),
    ({"token": "hf_right"}, "hf_wrong", 3, "was refused with the token given"),
    ({"claimed_size": {"transformer/config.json": 10**15}}, None, 4, "give the build more disk"),
    ({"break_off": "the first transformer shard"}, None, 5, "failed or was interrupted"),
])
def test_bake_failures_leave_nothing(tmp_path: Path, tiny_repo: dict[str, bytes], lora_bytes: bytes,
                                     options: dict[str, object], token: str | None, code: int, message: str) -> None:
    dest = tmp_path / "models"
    if "break_off" in options:
        options = {"break_off": {min(p for p in tiny_repo if p.startswith("transformer/diffusion_pytorch_model-0"))}}
    with Hub(repos(tiny_repo, lora_bytes, **options)) as hub:
        out = bake(hub, dest, "--variant", "edit-2511", token=token)
    assert out.returncode == code, out.stderr
    assert message in out.stderr and "Traceback" not in out.stderr
    assert no_leftovers(dest)
    if token:
        assert token not in out.stderr + out.stdout


def test_bake_with_the_right_token(tmp_path: Path, tiny_repo: dict[str, bytes], lora_bytes: bytes) -> None:
    with Hub(repos(tiny_repo, lora_bytes, token="hf_right")) as hub:
        out = bake(hub, tmp_path / "models", "--variant", "edit-2511", token="hf_right")
    assert out.returncode == 0, out.stderr
    assert "hf_right" not in out.stderr + out.stdout


def test_bad_variant_and_revision(tmp_path: Path, tiny_repo: dict[str, bytes], lora_bytes: bytes) -> None:
    with Hub(repos(tiny_repo, lora_bytes)) as hub:
        out = bake(hub, tmp_path / "models", "--variant", "edit-3000")
        assert out.returncode == 2 and "unknown variant 'edit-3000'; choose one of edit, edit-2509" in out.stderr
        out = bake(hub, tmp_path / "models", "--variant", "edit-2511", "--model-revision", "v9")
        assert out.returncode == 2 and "has no revision 'v9'" in out.stderr


def test_damaged_weights_fail_verification(tmp_path: Path, tiny_repo: dict[str, bytes], lora_bytes: bytes) -> None:
    damaged = dict(tiny_repo)
    name = max(p for p in tiny_repo if p.startswith("vae/diffusion_pytorch_model-0"))
    damaged[name] = damaged[name][:-100]  # served whole, but shorter than its own header says
    with Hub(repos(damaged, lora_bytes)) as hub:
        out = bake(hub, tmp_path / "models", "--variant", "edit-2511")
    assert out.returncode == 6 and f"{name}: size" in out.stderr and "truncated or damaged" in out.stderr
    assert no_leftovers(tmp_path / "models")


def test_a_file_that_is_not_a_lightning_lora_fails_verification(tmp_path: Path, tiny_repo: dict[str, bytes]) -> None:
    import torch
    from safetensors.torch import save_file

    save_file({"model.weight": torch.zeros(2)}, str(tmp_path / "x.safetensors"))
    with Hub(repos(tiny_repo, (tmp_path / "x.safetensors").read_bytes())) as hub:
        out = bake(hub, tmp_path / "models", "--variant", "edit-2511")
    assert out.returncode == 6 and "is not a transformer LoRA" in out.stderr


def cache_layout(root: Path, repo: str, commit: str, files: dict[str, bytes]) -> Path:
    """`files` laid out as RunPod's model cache (Hugging Face hub layout) under `root`; returns the snapshot."""
    repo_dir = root / ("models--" + repo.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / commit
    for name, data in files.items():
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / name).write_bytes(data)
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    return snapshot


class TestSlimBake:
    """BAKE_MODEL=0: the Lightning LoRA and a manifest baked; the base model from RunPod's cached models."""

    def test_lora_only_bake_then_the_worker_uses_runpods_cached_model(
            self, tmp_path: Path, tiny_repo: dict[str, bytes], lora_bytes: bytes,
            monkeypatch: pytest.MonkeyPatch) -> None:
        from qwen_edit_worker.model import sources

        dest = tmp_path / "models"
        with Hub(repos({}, lora_bytes)) as hub:  # the model repo is never asked for
            out = bake(hub, dest, "--variant", "edit-2511", "--lora-only")
        assert out.returncode == 0, out.stderr
        folder = dest / "edit-2511"
        assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) == [
            f"lightning/{VARIANT.lora_basename}", "manifest.json", "safety_checker/config.json",
            "safety_checker/model.safetensors", "safety_checker/preprocessor_config.json"]
        manifest = json.loads((folder / "manifest.json").read_text())
        assert manifest["model"]["baked"] is False and manifest["model"]["repo"] == VARIANT.repo
        assert manifest["safety_checker"]["commit"] == SAFETY_CHECKER_COMMIT
        assert manifest["total_bytes"] == sum((folder / f["path"]).stat().st_size for f in manifest["files"])
        assert manifest["files"][0] == {"path": f"lightning/{VARIANT.lora_basename}", "bytes": len(lora_bytes)}

        monkeypatch.setattr(sources, "BAKED_ROOT", dest)
        monkeypatch.setattr(sources, "RUNPOD_CACHE", tmp_path / "cache")
        missing = Worker({"MODEL_PATH": str(folder), "WARMUP": "0"}).handle(small_job())
        error = missing["error"]
        assert error.startswith("MODEL_PATH: ") and "the endpoint's Model field" in error
        assert f"set the endpoint's Model field to {VARIANT.repo}" in error and "only the Lightning LoRA" in error

        commit = "abcdef0123456789abcdef0123456789abcdef01"
        snapshot = cache_layout(tmp_path / "cache", VARIANT.repo,
                                commit, {k: v for k, v in tiny_repo.items() if k not in JUNK})
        result = Worker({"MODEL_PATH": str(folder), "WARMUP": "0"}).handle(small_job())
        assert "error" not in result, result
        assert result["model"]["source"] == str(snapshot)
        assert result["model"]["manifest"] == {"model": f"{VARIANT.repo}@{commit[:12]}",
                                               "lora": f"{VARIANT.lora_repo}@fedcba987654"}
        # The checker comes from the slim image, beside the LoRA (the cache holds only the model's repo).
        assert result["model"]["safety_checker"]["model"] == f"{SAFETY_CHECKER_REPO}@{SAFETY_CHECKER_COMMIT[:12]}"
        assert "has_nsfw_concepts" in result

    def test_another_variants_cache_is_named(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        from qwen_edit_worker.errors import ModelLoadError
        from qwen_edit_worker.model import sources

        monkeypatch.setattr(sources, "BAKED_ROOT", tmp_path / "models")
        monkeypatch.setattr(sources, "RUNPOD_CACHE", tmp_path / "cache")
        cache_layout(tmp_path / "cache", "Qwen/Qwen-Image-Edit-2509", "c" * 40, {"model_index.json": b"{}"})
        with pytest.raises(ModelLoadError) as caught:
            sources.locate(tmp_path / "models" / "edit-2511", VARIANT)
        assert "holds no model" in str(caught.value) and "Qwen/Qwen-Image-Edit-2509 instead" in str(caught.value)
        # an explicit MODEL_PATH elsewhere is taken as given: no cache lookup
        assert sources.locate(tmp_path / "mine", VARIANT).kind == "folder"

    @pytest.mark.parametrize("flag", [["--fuse-lightning"], ["--precision", "int8"]])
    def test_lora_only_refuses_preparation(self, tmp_path: Path, lora_bytes: bytes, flag: list[str]) -> None:
        with Hub(repos({}, lora_bytes)) as hub:
            out = bake(hub, tmp_path / "models", "--variant", "edit-2511", "--lora-only", *flag)
        assert out.returncode == 2 and f"--lora-only (BAKE_MODEL=0) bakes no model, so {flag[0]}" in out.stderr
        assert no_leftovers(tmp_path / "models")
