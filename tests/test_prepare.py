"""Preparing at build time, for real: the tiny model served by the loopback hub, baked with
--fuse-lightning / --precision int8|fp8 / --text-encoder-precision int8|fp8 by the real bake script
on this CPU, then loaded offline by the worker, which must skip what the bake did and refuse
settings that contradict it (fp8 on a CPU: a load error naming PRECISION).  Also the precisions at
load time (int8 through the handler on the CPU).  fp8's tensors against quantising at load:
tests/test_fp8_bake.py."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from conftest import decode_output_image, small_job
from hub_server import Hub, Repo
from qwen_edit_worker.errors import ModelLoadError
from qwen_edit_worker.model import text_phase, tiny
from qwen_edit_worker.model.sources import ModelSource, resolve
from qwen_edit_worker.serving.worker import Worker
from qwen_edit_worker.settings import Settings
from qwen_edit_worker.weights import precision
from test_bake import VARIANT, bake, lora_bytes, repos, tiny_repo  # noqa: F401 (fixtures)

LORA_REF = f"{VARIANT.lora_repo}@fedcba9876543210fedcba9876543210fedcba98"
BAKES = {"plain": (), "fused": ("--fuse-lightning",),
         "int8": ("--fuse-lightning", "--precision", "int8", "--text-encoder-precision", "int8"),
         "fp8": ("--fuse-lightning", "--precision", "fp8", "--text-encoder-precision", "fp8")}


@pytest.fixture(scope="module")
def tiny_repo_bf16(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """The tiny model stored in bf16, as the real repos are (test_bake's tiny repo is float32)."""
    import diffusers

    folder = tmp_path_factory.mktemp("tiny-bf16")
    pipe = getattr(diffusers, VARIANT.pipeline_class)(**tiny.build_components(VARIANT, tiny.base_scheduler()))
    pipe.to(dtype=torch.bfloat16).save_pretrained(folder)
    return Repo.from_folder(folder).files


@pytest.fixture(scope="module")
def baked(tmp_path_factory: pytest.TempPathFactory, tiny_repo: dict[str, bytes],  # noqa: F811
          tiny_repo_bf16: dict[str, bytes], lora_bytes: bytes) -> dict[str, Path]:  # noqa: F811
    """plain and fused from the float32 repo (bit-exact comparisons), int8 from the bf16 one (real sizes), fp8
    from the float32 one (fp8 reads the weights as bf16 whatever is stored, as the worker does on a GPU)."""
    folders = {}
    for name, options in BAKES.items():
        with Hub(repos(tiny_repo_bf16 if name == "int8" else tiny_repo, lora_bytes)) as hub:
            dest = tmp_path_factory.mktemp(name) / "models"
            out = bake(hub, dest, "--variant", VARIANT.name, *options)
        assert out.returncode == 0, out.stderr
        folders[name] = dest / VARIANT.name
    return folders


def manifest(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "manifest.json").read_text())


def loaded(worker: Worker) -> Any:
    return worker.model.get()[0].model


def header(path: Path) -> dict[str, Any]:
    with path.open("rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        return json.loads(handle.read(length))


def component_bytes(folder: Path, component: str) -> tuple[int, int]:
    """(file bytes, tensor data bytes) of a component's safetensors files."""
    files = sorted((folder / component).glob("*.safetensors"))
    data = sum(max(t["data_offsets"][1] for k, t in header(p).items() if k != "__metadata__") for p in files)
    return sum(p.stat().st_size for p in files), data


def parameter_count(folder: Path, component: str) -> int:
    return sum(int(np.prod(t["shape"])) for p in sorted((folder / component).glob("*.safetensors"))
               for k, t in header(p).items() if k != "__metadata__")


class TestFusedBake:
    def test_manifest_records_the_fuse_and_the_lora_file_is_not_kept(self, baked: dict[str, Path]) -> None:
        folder = baked["fused"]
        prepared = manifest(folder)["prepared"]
        assert prepared["fused_lora"] == LORA_REF
        assert prepared["fused_layers"] == 28  # 14 LoRA'd modules x 2 blocks of the tiny transformer
        assert prepared["precision"] == {"transformer": "bf16", "text_encoder": "bf16"}
        assert not (folder / "lightning").exists()
        on_disk = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
        assert on_disk == sorted([f["path"] for f in manifest(folder)["files"]] + ["manifest.json"])
        assert "prepared" not in manifest(baked["plain"])

    def test_loads_with_no_lora_work_and_gives_the_runtime_fuses_pixels(
            self, baked: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
        """Tolerance: none.  Both paths fuse the same float32 weights with the same code on the same
        CPU and the bake stores float32 losslessly, so weights and pixels must be bit-identical.
        (On the real model the bake fuses bf16 on a CPU and the runtime fuse bf16 on the GPU, where
        rounding can differ by one bf16 ulp: not testable here.)"""
        import diffusers

        runtime = Worker({"MODEL_PATH": str(baked["plain"]), "WARMUP": "0"})
        expected = runtime.handle(small_job(seed=11))
        assert loaded(runtime).lora_layers == 28 and expected["model"]["lightning_fused"] == "load"

        calls: list[str] = []
        pipeline_class = getattr(diffusers, VARIANT.pipeline_class)
        monkeypatch.setattr(pipeline_class, "load_lora_weights", lambda *a, **k: calls.append("load_lora_weights"))
        monkeypatch.setattr(pipeline_class, "fuse_lora", lambda *a, **k: calls.append("fuse_lora"))
        fused = Worker({"MODEL_PATH": str(baked["fused"]), "WARMUP": "0"})
        out = fused.handle(small_job(seed=11))
        assert "error" not in out, out
        assert calls == [] and loaded(fused).lora_layers == 0
        assert out["model"]["lightning_fused"] == "bake" and out["model"]["lightning"] is True
        mine, theirs = loaded(fused).pipe.transformer.state_dict(), loaded(runtime).pipe.transformer.state_dict()
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
        assert np.array_equal(decode_output_image(out["images"][0]), decode_output_image(expected["images"][0]))


class TestInt8Bake:
    def test_stored_quantised_as_safetensors_and_smaller_than_bf16(self, baked: dict[str, Path]) -> None:
        from torchao.prototype.safetensors.safetensors_utils import is_metadata_torchao

        folder, plain = baked["int8"], baked["plain"]
        assert manifest(folder)["prepared"]["precision"] == {"transformer": "int8", "text_encoder": "int8"}
        for component in ("transformer", "text_encoder"):
            files = sorted((folder / component).glob("*.safetensors"))
            assert files and not list((folder / component).glob("*.bin"))
            tensors = {k: t for p in files for k, t in header(p).items() if k != "__metadata__"}
            assert any(t["dtype"] == "I8" for t in tensors.values())
            assert all(is_metadata_torchao(header(p)["__metadata__"]) for p in files)  # torchao's own format
            config = json.loads((folder / component / "config.json").read_text())
            assert config["quantization_config"]["quant_method"] == "torchao"  # from_pretrained loads it quantised
            file_bytes, data_bytes = component_bytes(folder, component)
            bf16_bytes = 2 * parameter_count(plain, component)  # the same component stored in bf16
            assert data_bytes < bf16_bytes
            if component == "transformer":  # the text encoder's file is mostly headers at this toy size
                assert file_bytes < bf16_bytes
        _, data = component_bytes(folder, "transformer")
        assert data < 0.75 * 2 * parameter_count(plain, "transformer")  # linears are most of it: ~1 byte each

    def test_loads_quantised_without_requantising_and_runs(self, baked: dict[str, Path],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
        def refuse(*args: object) -> None:
            raise AssertionError("re-quantised at load")

        monkeypatch.setattr(precision, "quantise_transformer", refuse)
        monkeypatch.setattr(precision, "quantise_text_encoder", refuse)
        monkeypatch.setattr(precision, "quantise_by_block", refuse)
        worker = Worker({"MODEL_PATH": str(baked["int8"]), "WARMUP": "0", "PRECISION": "int8",
                         "TEXT_ENCODER_PRECISION": "int8"})
        out = worker.handle(small_job())
        assert "error" not in out, out
        assert (out["model"]["precision"], out["model"]["text_encoder_precision"]) == ("int8", "int8")
        assert out["model"]["quantised_at_load"] == {}
        pipe = loaded(worker).pipe
        assert precision.quantised_linears(pipe.transformer) > 0 and precision.quantised_linears(pipe.text_encoder) > 0
        assert decode_output_image(out["images"][0]).shape == (64, 64, 3)


class TestContradictions:
    @pytest.mark.parametrize(("bake_name", "settings", "error"), [
        ("fused", {"LIGHTNING": "0"}, "LIGHTNING: 0 (the base model) contradicts the bake: {m} says the Lightning "
                                      "LoRA {lora} is fused into the transformer; set LIGHTNING=1, or bake without "
                                      "--fuse-lightning"),
        ("fused", {"LORA_PATH": "/x.safetensors"}, "LORA_PATH: is set (/x.safetensors) but {m} says the Lightning "
                                                   "LoRA {lora} is already fused into the transformer"),
        ("int8", {"TEXT_ENCODER_PRECISION": "int8"}, "PRECISION: bf16 contradicts the bake: {m} says the "
                                                     "transformer was baked int8; set PRECISION=int8, or bake with "
                                                     "--precision bf16"),
        ("int8", {"PRECISION": "int8"}, "TEXT_ENCODER_PRECISION: bf16 contradicts the bake: {m} says the text "
                                        "encoder was baked int8; set TEXT_ENCODER_PRECISION=int8, or bake with "
                                        "--text-encoder-precision bf16"),
    ])
    def test_setting_against_the_bake_is_a_load_error_naming_both(
            self, baked: dict[str, Path], bake_name: str, settings: dict[str, str], error: str) -> None:
        folder = baked[bake_name]
        out = Worker({"MODEL_PATH": str(folder), "WARMUP": "0", **settings}).handle(small_job())
        assert out["error"].startswith(error.format(m=folder / "manifest.json", lora=LORA_REF))

    def test_lora_over_a_quantised_bake_and_unknown_precisions(self, tmp_path: Path) -> None:
        source = ModelSource(tmp_path, "baked", "Q/X@c", "l/Y@d", None, "int8", "bf16")
        with pytest.raises(ModelLoadError, match="LIGHTNING: 1 needs the Lightning LoRA fused before quantisation"):
            source.check_settings(True, None, "int8", "bf16")
        source.check_settings(False, None, "int8", "bf16")  # the base model, quantised: consistent
        ModelSource(tmp_path, "baked", "Q/X@c", "l/Y@d").check_settings(True, None, "int8", "int8")  # at load
        (tmp_path / "manifest.json").write_text(json.dumps(
            {"model": {"repo": "Q/X", "commit": "c"}, "lora": {"repo": "l/Y", "commit": "d"},
             "prepared": {"fused_lora": None, "precision": {"transformer": "int4", "text_encoder": "bf16"}}}))
        with pytest.raises(ModelLoadError, match="MODEL_PATH: .* records transformer precision 'int4'"):
            resolve(tmp_path)


class TestImageBuildStage:
    def test_the_weights_subpackage_imports_nothing_else_of_the_worker(self) -> None:
        """The bake layer depends on weights/ alone: an import of another part would break the build stage."""
        import ast

        folder = Path(__file__).resolve().parent.parent / "src/qwen_edit_worker/weights"
        for file in folder.glob("*.py"):
            for node in ast.walk(ast.parse(file.read_text())):
                if isinstance(node, ast.ImportFrom):
                    assert node.level <= 1, f"{file.name} imports from outside weights/: {ast.unparse(node)}"
                    assert node.level == 1 or not (node.module or "").startswith("qwen_edit_worker"), file.name
                elif isinstance(node, ast.Import):
                    assert not any(a.name.startswith("qwen_edit_worker") for a in node.names), file.name

    def test_the_files_the_dockerfile_copies_are_enough_to_fuse_and_quantise(
            self, tmp_path: Path, tiny_repo: dict[str, bytes], lora_bytes: bytes) -> None:  # noqa: F811
        """The build stage has bake.py and the weights subpackage copied beside it, not the installed package."""
        import os
        import re
        import shlex
        import shutil
        import subprocess
        import sys

        root = Path(__file__).resolve().parent.parent
        joined = re.sub(r"\\\n\s*", " ", (root / "Dockerfile").read_text())
        builder = tmp_path / "builder"
        for line in joined.splitlines():
            if line.startswith("COPY ") and "/builder/" in line:
                *sources, dest = shlex.split(line)[1:]
                target = builder / dest.removeprefix("/builder/")
                for source in sources:
                    if (root / source).is_dir():  # COPY dir/ dest/ copies the folder's contents
                        shutil.copytree(root / source, target, ignore=shutil.ignore_patterns("__pycache__"))
                        continue
                    into = target / Path(source).name if dest.endswith("/") else target
                    into.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy(root / source, into)
        assert (builder / "bake.py").is_file()
        copied = sorted(p.relative_to(builder).as_posix() for p in builder.rglob("*.py"))
        # one self-contained part of the package: the weights subpackage and nothing else of the worker
        assert {p for p in copied if "/" not in p} == {"bake.py", "fetch.py", "verify.py"}  # builder/'s own scripts
        assert {p for p in copied if "/" in p} == {
            f"qwen_edit_worker/weights/{f.name}" for f in (root / "src/qwen_edit_worker/weights").glob("*.py")}
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING", "PYTHONPATH"))}
        dest = tmp_path / "models"
        with Hub(repos(tiny_repo, lora_bytes)) as hub:
            env.update({"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_DISABLE_XET": "1"})
            out = subprocess.run([sys.executable, str(builder / "bake.py"), "--variant", VARIANT.name, "--dest",
                                  str(dest), "--token-file", str(tmp_path / "none"), "--fuse-lightning",
                                  "--precision", "int8", "--text-encoder-precision", "fp8"], env=env, cwd=tmp_path,
                                 capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        prepared = manifest(dest / VARIANT.name)["prepared"]
        assert prepared["fused_lora"] == LORA_REF
        assert prepared["precision"] == {"transformer": "int8", "text_encoder": "fp8"}  # fp8 too, from weights/ alone
        assert prepared["quantised"]["text_encoder"]["made_on"] == "cpu"


    def test_build_args_reach_the_bake_and_become_the_runtime_defaults(self) -> None:
        from test_image_build import DOCKERFILE, instructions

        args = {a.split("=")[0]: a.split("=")[1] for a in instructions("ARG") if "=" in a}
        assert (args["FUSE_LIGHTNING"], args["PRECISION"], args["TEXT_ENCODER_PRECISION"]) == ("0", "bf16", "bf16")
        [bake_step] = [r for r in instructions("RUN") if "bake.py" in r]
        assert '--precision "${PRECISION}" --text-encoder-precision "${TEXT_ENCODER_PRECISION}"' in bake_step
        assert 'if [ "${FUSE_LIGHTNING}" = "1" ]; then fuse="--fuse-lightning"' in bake_step
        env = " ".join(instructions("ENV"))
        assert "PRECISION=${PRECISION}" in env and "TEXT_ENCODER_PRECISION=${TEXT_ENCODER_PRECISION}" in env
        # a code change outside the copied modules keeps the weights layer
        assert DOCKERFILE.index("ARG FUSE_LIGHTNING") < DOCKERFILE.index("bake.py --variant")


class TestFp8Bake:
    def test_fp8_bakes_on_this_cpu_and_the_manifest_says_how(self, baked: dict[str, Path]) -> None:
        from torchao.prototype.safetensors.safetensors_utils import is_metadata_torchao

        from qwen_edit_worker.weights import fp8_cpu

        assert not torch.cuda.is_available()  # the bake above ran on a machine with no GPU
        folder = baked["fp8"]
        prepared = manifest(folder)["prepared"]
        assert prepared["fused_lora"] == LORA_REF
        assert prepared["precision"] == {"transformer": "fp8", "text_encoder": "fp8"}
        # 34 linears; the encoder's 14 (its 264-row lm_head is no multiple of 16: torchao leaves it bf16)
        for component, layers in (("transformer", 34), ("text_encoder", 14)):
            assert prepared["quantised"][component] == {
                "precision": "fp8", "made_on": "cpu", "torchao": "0.18.0",
                "config": "Float8DynamicActivationFloat8WeightConfig", "granularity": "per-row", "layers": layers,
                "hardware_check": fp8_cpu.HARDWARE_CHECK}
            files = sorted((folder / component).glob("*.safetensors"))
            tensors = {k: t for p in files for k, t in header(p).items() if k != "__metadata__"}
            assert sum(t["dtype"] == "F8_E4M3" for t in tensors.values()) == layers
            assert all(is_metadata_torchao(header(p)["__metadata__"]) for p in files)
            config = json.loads((folder / component / "config.json").read_text())["quantization_config"]
            assert config["quant_method"] == "torchao"
            assert "Float8DynamicActivationFloat8WeightConfig" in json.dumps(config["quant_type"])
        on_disk = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
        assert on_disk == sorted([f["path"] for f in manifest(folder)["files"]] + ["manifest.json"])
        assert manifest(baked["int8"])["prepared"]["quantised"]["transformer"]["made_on"] == "cpu"

    @pytest.mark.parametrize("settings", [{"PRECISION": "fp8", "TEXT_ENCODER_PRECISION": "fp8"},
                                          {"PRECISION": "auto", "TEXT_ENCODER_PRECISION": "fp8"}])
    def test_on_a_cpu_the_worker_says_so_naming_precision(self, baked: dict[str, Path],
                                                          settings: dict[str, str]) -> None:
        """The worker still refuses fp8 on a CPU (no float8 units), before reading a weight, and says that no
        other PRECISION can load these weights (auto takes the baked fp8)."""
        out = Worker({"MODEL_PATH": str(baked["fp8"]), "WARMUP": "0", **settings}).handle(small_job())
        assert out["error"] == (
            "PRECISION: fp8 needs a CUDA GPU with float8 units (Ada or Hopper); the image's weights are baked fp8 "
            "(manifest.json), so no other PRECISION loads them: run it on an Ada or Hopper GPU, or bake with "
            "--precision bf16 or --precision int8")


class TestPrecisionsAtLoad:
    def test_int8_transformer_and_text_encoder_through_the_handler(self, worker_for: Callable[..., Worker]) -> None:
        bf16 = worker_for("edit-2511").handle(small_job(seed=5))
        worker = worker_for("edit-2511", PRECISION="int8", TEXT_ENCODER_PRECISION="int8")
        out = worker.handle(small_job(seed=5))
        assert "error" not in out, out
        assert (out["model"]["precision"], out["model"]["text_encoder_precision"]) == ("int8", "int8")
        assert {r["where"] for r in out["model"]["quantised_at_load"].values()} == {"cpu, block by block"}
        pipe = loaded(worker).pipe
        quantised = {name for name, m in pipe.text_encoder.named_modules()
                     if precision.quantised_linears(m) and isinstance(m, torch.nn.Linear)}
        assert any(".language_model." in n for n in quantised)
        assert isinstance(pipe.text_encoder.lm_head, text_phase.NoHead)  # dropped before quantising: never runs
        assert not any(n.startswith("model.visual") for n in quantised)  # the vision tower stays as it was
        linears = sum(isinstance(m, torch.nn.Linear) for m in pipe.transformer.modules())
        assert precision.quantised_linears(pipe.transformer) == linears
        # Quantised, so not the bf16 picture (random weights: the size of the change says nothing of quality).
        assert not np.array_equal(decode_output_image(out["images"][0]), decode_output_image(bf16["images"][0]))

    @pytest.mark.parametrize("setting", ["PRECISION", "TEXT_ENCODER_PRECISION"])
    def test_fp8_on_a_cpu_is_a_clear_load_error(self, setting: str) -> None:
        error = Worker({"TINY_MODEL": "1", "WARMUP": "0", setting: "fp8"}).handle(small_job())["error"]
        assert error == f"{setting}: fp8 needs a CUDA GPU with float8 units (Ada or Hopper); use bf16 or int8"

    def test_gpu_generations(self) -> None:
        with pytest.raises(ModelLoadError, match=r"PRECISION: int8 needs compute capability 8.0 or newer \(Ampere, "
                                                 r"Ada or Hopper\); this GPU is 7.5; use bf16$"):
            precision.check("int8", "PRECISION", True, (7, 5))  # a T4
        with pytest.raises(ModelLoadError, match="TEXT_ENCODER_PRECISION: fp8 needs compute capability 8.9 .* "
                                                 "this GPU is 8.6; use bf16 or int8"):
            precision.check("fp8", "TEXT_ENCODER_PRECISION", True, (8, 6))  # an A5000 / 3090 / A6000
        precision.check("int8", "PRECISION", True, (8, 0))  # an A100
        precision.check("fp8", "PRECISION", True, (9, 0))  # an H100
        precision.check("int8", "PRECISION", False, None)  # a CPU runs int8

    def test_with_the_weights_baked_so_the_message_names_the_bake(self) -> None:
        """No setting helps when the weights are stored at a precision this machine cannot run: the message says
        to run the image elsewhere or to bake another precision (the fp8 bake on a CPU: TestFp8Bake)."""
        with pytest.raises(ModelLoadError, match=r"^TEXT_ENCODER_PRECISION: fp8 needs compute capability 8\.9 .* "
                                                 r"this GPU is 8\.0; the image's weights are baked fp8 .* or bake "
                                                 r"with --text-encoder-precision bf16 or --text-encoder-precision "
                                                 r"int8$"):
            precision.check("fp8", "TEXT_ENCODER_PRECISION", True, (8, 0), "fp8")  # an A100
        with pytest.raises(ModelLoadError, match=r"this GPU is 7\.5; the image's weights are baked int8 .* run it on "
                                                 r"an Ampere, Ada or Hopper GPU, or bake with --precision bf16$"):
            precision.check("int8", "PRECISION", True, (7, 5), "int8")  # a T4
        precision.check("fp8", "PRECISION", True, (8, 9), "fp8")  # an L4 / 4090 / L40S

    def test_stored_int8_bytes_are_what_torchao_saves(self) -> None:
        """The bytes table (bench/gpu --bytes) counts int8 weights with these constants."""
        from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

        layer = torch.nn.Sequential(torch.nn.Linear(96, 40, bias=False)).to(torch.bfloat16)
        precision.quantise_transformer(layer, "int8")
        flat, _ = flatten_tensor_state_dict(layer.state_dict())
        stored = sum(t.numel() * t.element_size() for t in flat.values())
        assert stored == precision.linear_weight_bytes(40, 96, "int8") == 40 * 96 + 40 * 5

    def test_settings(self) -> None:
        s = Settings.from_env({"PRECISION": "INT8", "TEXT_ENCODER_PRECISION": "fp8"})
        assert (s.precision, s.text_encoder_precision) == ("int8", "fp8")
        assert Settings.from_env({}).text_encoder_precision == "bf16"
        with pytest.raises(Exception, match=r"TEXT_ENCODER_PRECISION: must be one of bf16, int8, fp8 \(got 'int4'\)"):
            Settings.from_env({"TEXT_ENCODER_PRECISION": "int4"})
