"""The streamed bake (weights/stream.py) against the whole-model bake it replaced (bench/prepare_before.py).

Both run here on the same folders and must store the same thing: every tensor of the transformer and
the text encoder bit for bit (names, dtypes, shapes, bytes), the torchao metadata in every shard's
header, the config files, and the same manifest `prepared` block, for int8 and fp8, fused and not,
the fuse alone, from bf16 and from float32 checkpoints, one file or many shards, and with weights
quantised a few rows at a time (tiny blocks, so every layer is split).  Folders: bench/realfolder.py's
narrow one (the real configs at a few MB: an lm_head of 512 rows, which fp8 quantises as it does the
real one) and the tiny pipeline saved in float32 in many small shards.  Also: what the streamed bake
builds (no model with its weights), its safetensors writer, and that the worker loads what it made.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from qwen_edit_worker.model import tiny
from qwen_edit_worker.weights import prepare, shards
from qwen_edit_worker.weights.variants import VARIANTS

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))
import prepare_before  # noqa: E402
import realfolder  # noqa: E402

VARIANT = VARIANTS["edit-2511"]
REF = f"{VARIANT.lora_repo}@{'0' * 40}"
CASES = {  # name: (fuse, transformer precision, text encoder precision, rows quantised at once)
    "int8, fused": (True, "int8", "int8", None),
    "int8, fused, a few rows at a time": (True, "int8", "int8", 2048),
    "fp8, fused, a few rows at a time": (True, "fp8", "fp8", 2048),
    "fp8, fused": (True, "fp8", "fp8", None),
    "the fuse alone": (True, "bf16", "bf16", None),
    "int8 transformer, not fused": (False, "int8", "bf16", None),
    "fp8 text encoder alone": (False, "bf16", "fp8", 4096),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """{"narrow": bench/realfolder.py's bf16 folder at narrow width, "float32": the tiny pipeline in 25+ shards}."""
    import diffusers

    root = tmp_path_factory.mktemp("stream")
    realfolder.write(root / "narrow", 2, "bf16", VARIANT.name, narrow=True)
    pipe = getattr(diffusers, VARIANT.pipeline_class)(**tiny.build_components(VARIANT, tiny.base_scheduler()))
    pipe.save_pretrained(root / "float32", max_shard_size="20KB")  # float32, as test_bake's hub serves it
    tiny.write_lora(root / "float32" / "lightning" / VARIANT.lora_basename)
    return {"narrow": root / "narrow", "float32": root / "float32"}


def both(source: Path, into: Path, fuse: bool, transformer: str, text_encoder: str, rows: int | None
         ) -> tuple[Path, Path, dict[str, Any], dict[str, Any]]:
    """The folder baked the old way and the streamed way, and their `prepared` blocks (less the seconds)."""
    made = []
    for name, module in (("before", prepare_before), ("after", prepare)):
        folder = into / name
        shutil.copytree(source, folder)
        lora = folder / "lightning" / VARIANT.lora_basename if fuse else None
        options = {"chunk_bytes": rows} if rows and module is prepare else {}
        block = module.prepare(folder, lora, REF if fuse else None, transformer, text_encoder, **options)
        block.pop("seconds")
        made.append((folder, block))
    return made[0][0], made[1][0], made[0][1], made[1][1]


def stored(component: Path) -> tuple[dict[str, tuple[str, tuple[int, ...], bytes]], list[dict[str, str]]]:
    """Every tensor of a component's files ({name: (dtype, shape, bytes)}) and each file's header metadata."""
    tensors, metadata = {}, []
    for path in sorted(component.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            metadata.append(handle.metadata())
            for name in handle.keys():  # noqa: SIM118 (safe_open has no iter)
                t = handle.get_tensor(name)
                tensors[name] = (str(t.dtype), tuple(t.shape), t.contiguous().reshape(-1).view(torch.uint8).numpy()
                                 .tobytes())
    return tensors, metadata


def configs(component: Path) -> dict[str, Any]:
    out = {}
    for path in sorted(component.glob("*config.json")):
        config = json.loads(path.read_text())
        config.pop("_name_or_path", None)  # the folder it was read from: the two bakes ran in two folders
        out[path.name] = config
    return out


class TestTheSameBytes:
    @pytest.mark.parametrize("case", CASES)
    @pytest.mark.parametrize("source", ["narrow", "float32"])
    def test_every_stored_tensor_and_the_manifest_block(self, folders: dict[str, Path], tmp_path: Path,
                                                        source: str, case: str) -> None:
        fuse, transformer, text_encoder, rows = CASES[case]
        before, after, old_block, new_block = both(folders[source], tmp_path, fuse, transformer, text_encoder, rows)
        assert new_block == old_block
        assert new_block["precision"] == {"transformer": transformer, "text_encoder": text_encoder}
        for component in ("transformer", "text_encoder"):
            old_tensors, old_metadata = stored(before / component)
            new_tensors, new_metadata = stored(after / component)
            assert sorted(new_tensors) == sorted(old_tensors), component
            different = [name for name in old_tensors if new_tensors[name] != old_tensors[name]]
            assert not different, f"{component}: {len(different)} tensors differ, e.g. {different[0]}"
            assert all(m == old_metadata[0] for m in old_metadata + new_metadata), component  # in every shard
            assert configs(after / component) == configs(before / component), component
        # the other components are not touched, and nothing is left over
        for component in ("vae", "tokenizer", "scheduler", "processor"):
            assert {p.name: p.read_bytes() for p in (after / component).iterdir()} == {
                p.name: p.read_bytes() for p in (before / component).iterdir()}, component
        assert sorted(p.name for p in after.iterdir()) == sorted(p.name for p in before.iterdir())

    def test_a_sharded_component_keeps_its_shards_and_index(self, folders: dict[str, Path], tmp_path: Path) -> None:
        """The float32 folder's transformer is in many shards: one output shard each, and an index that names every
        stored tensor (the bytes above; here the layout from_pretrained reads)."""
        _, after, _, block = both(folders["float32"], tmp_path, True, "int8", "int8", None)
        for component, index_name in (("transformer", "diffusion_pytorch_model.safetensors.index.json"),
                                      ("text_encoder", "model.safetensors.index.json")):
            inputs = sorted(p.name for p in (folders["float32"] / component).glob("*.safetensors"))
            assert sorted(p.name for p in (after / component).glob("*.safetensors")) == inputs
            index = json.loads((after / component / index_name).read_text())
            tensors, _ = stored(after / component)
            assert sorted(index["weight_map"]) == sorted(tensors)
            assert index["metadata"]["total_size"] == sum(len(t[2]) for t in tensors.values())
        assert block["quantised"]["transformer"]["layers"] == 34


class TestNoWholeModel:
    def test_no_model_is_loaded_with_its_weights(self, folders: dict[str, Path], tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
        """The streamed bake never calls from_pretrained (the whole-model bake's first step), and the skeletons it
        builds hold no storage: every parameter on the meta device."""
        import diffusers
        import transformers

        from qwen_edit_worker.weights import skeleton

        def refuse(*args: object, **kwargs: object) -> None:
            raise AssertionError("a model was loaded with its weights")

        monkeypatch.setattr(diffusers.ModelMixin, "from_pretrained", refuse)
        monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", refuse)
        built = []
        real_build = skeleton.build
        monkeypatch.setattr(prepare, "build", lambda *a, **k: built.append(real_build(*a, **k)) or built[-1])
        folder = tmp_path / "folder"
        shutil.copytree(folders["narrow"], folder)
        prepare.prepare(folder, folder / "lightning" / VARIANT.lora_basename, REF, "int8", "int8")
        assert {s.component.name for s in built} == {"transformer", "text_encoder"}
        assert all(p.device.type == "meta" for s in built for p in s.model.parameters())


class TestTheLoraLayerByLayer:
    def test_each_pair_made_alone_is_the_whole_files_conversion(self, folders: dict[str, Path]) -> None:
        """weights/lora_stream.py converts a layer's keys when it is fused; the whole file converted at once (the
        worker's lightning_file.read) gives the same bits, and the check on meta tensors matched the same layers."""
        import diffusers

        from qwen_edit_worker.weights import lightning_file
        from qwen_edit_worker.weights.lora_stream import LayerPairs
        from qwen_edit_worker.weights.skeleton import build

        folder = folders["narrow"]
        pipeline = getattr(diffusers, VARIANT.pipeline_class)
        linears = lightning_file.linear_shapes(build(folder / "transformer", "diffusers",
                                                     "QwenImageTransformer2DModel", torch.bfloat16).model)
        path = folder / "lightning" / VARIANT.lora_basename
        whole = lightning_file.read(path, "LORA_PATH", pipeline).pairs(linears)
        lazy = LayerPairs(path, "LORA_PATH", pipeline, linears)
        assert sorted(lazy) == sorted(whole) and len(lazy) == len(whole) > 20
        for layer, (down, up) in whole.items():
            made = lazy.pop(layer)
            assert torch.equal(made[0], down) and torch.equal(made[1], up) and made[0].dtype == down.dtype, layer
        assert len(lazy) == 0 and lazy.pop("transformer_blocks.0.attn.to_q") is None


def test_freed_memory_goes_back_to_the_system() -> None:
    """glibc's mmap threshold is fixed for the bake's process (it is glibc here: the call must succeed)."""
    assert prepare.return_freed_memory() is True


class TestShardWriter:
    def test_written_tensor_by_tensor_and_in_rows_read_back_by_safetensors(self, tmp_path: Path) -> None:
        wide, scale = torch.randn(40, 24).to(torch.bfloat16), torch.rand(40, 1)
        small = torch.arange(6, dtype=torch.int8)
        path = tmp_path / "x.safetensors"
        with shards.ShardWriter(path, {"w": (wide.dtype, (40, 24)), "s": (torch.float32, (40, 1)),
                                       "i": (torch.int8, (6,))}, {"format": "pt"}) as out:
            out.write("w", wide[16:], row=16)  # rows in any order
            out.write("i", small)
            out.write("w", wide[:16])
            out.write("s", scale)
        with safe_open(str(path), framework="pt") as handle:
            assert handle.metadata() == {"format": "pt"}
            assert torch.equal(handle.get_tensor("w"), wide) and torch.equal(handle.get_tensor("s"), scale)
            assert torch.equal(handle.get_tensor("i"), small)

    def test_a_tensor_left_unwritten_or_of_another_shape_leaves_no_file(self, tmp_path: Path) -> None:
        path = tmp_path / "x.safetensors"
        with pytest.raises(shards.ShardError, match=r"x\.safetensors: 1 tensors were not written \(e\.g\. b\)"):
            with shards.ShardWriter(path, {"a": (torch.float32, (2,)), "b": (torch.float32, (2,))}, {}) as out:
                out.write("a", torch.zeros(2))
        assert not path.exists()
        with pytest.raises(shards.ShardError, match=r"a is planned as torch.float32 \[2\], got torch.bfloat16"):
            with shards.ShardWriter(path, {"a": (torch.float32, (2,))}, {}) as out:
                out.write("a", torch.zeros(2, dtype=torch.bfloat16))
        assert not path.exists()


def test_the_worker_loads_the_streamed_bake_quantised(folders: dict[str, Path], tmp_path: Path) -> None:
    """from_pretrained reads the streamed folder back quantised, with the values the files hold."""
    import diffusers
    from torchao.quantization import Int8Tensor

    folder = tmp_path / "folder"
    shutil.copytree(folders["float32"], folder)
    prepare.prepare(folder, folder / "lightning" / VARIANT.lora_basename, REF, "int8", "int8")
    pipe = getattr(diffusers, VARIANT.pipeline_class).from_pretrained(str(folder), local_files_only=True,
                                                                     dtype=torch.float32)
    weight = pipe.transformer.transformer_blocks[0].attn.to_q.weight
    assert isinstance(weight, Int8Tensor) and isinstance(pipe.text_encoder.lm_head.weight, Int8Tensor)
    tensors, _ = stored(folder / "transformer")
    qdata = tensors["transformer_blocks.0.attn.to_q._weight_qdata"]
    assert weight.qdata.contiguous().view(torch.uint8).reshape(-1).numpy().tobytes() == qdata[2]
