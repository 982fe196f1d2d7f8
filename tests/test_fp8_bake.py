"""fp8 baked on this CPU (weights/fp8_cpu.py) against fp8 quantised at load, tensor for tensor.

A tiny pipeline in bf16 (every linear the precision rules quantise has fp8-valid shapes: the text
encoder's vocabulary is padded to a multiple of 16, else torchao would leave its lm_head bf16) is
saved, then baked with weights/prepare.py at fp8 for both components on the CPU.  Checked:
- on fake CUDA (placement/fakecuda.py: no GPU, no values), the baked folder read as the worker reads
  a quantised bake (model/sequence.py: each part's `from_pretrained` with `device_map="cuda"`, the
  encoder's lm_head dropped) has, linear for linear, the Float8Tensor the same bf16 folder gets when
  quantised at load through weights/precision.py with torchao's GPU check answered (sm90, as fakecuda
  answers it): subclass, qdata and scale dtypes, shapes and devices, block_size, mm_config,
  act_quant_kwargs, kernel_preference, dtype; and every other tensor alike;
- on the CPU, the values: the qdata and scales in the safetensors equal, bit for bit, what
  torchao's own fp8 quantisation of the same bf16 weights gives (and the per-row formula), and
  `from_pretrained` reads back exactly what the file holds;
- that the CPU's arithmetic is the GPU's: the scale's division (a GPU multiplies by a float32
  reciprocal) for every bf16 value, the float8 cast at every rounding boundary, no mslk kernel;
- the answer to torchao's GPU question is given inside its fp8 quantise call for CPU weights only;
- sizes: the bake's headers, the planner's estimate from the bf16 folder and the loaded bytes agree.
Not checkable here (no float8 GPU is lent): a real GPU's float8 cast and float32 division (CUDA code,
argued from the source in weights/fp8_cpu.py); fp8 matmuls running on the loaded weights; and, with
the Lightning LoRA fused, the bf16 weights themselves: the bake fuses on the CPU, the worker on the
GPU, which can round one bf16 ulp apart before either quantises (as for int8; tests/test_prepare.py).
"""

from __future__ import annotations

import copy
import dataclasses
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from qwen_edit_worker import placement
from qwen_edit_worker.model import tiny
from qwen_edit_worker.placement import fakecuda
from qwen_edit_worker.weights import fp8_cpu, precision, prepare
from qwen_edit_worker.weights.variants import VARIANTS

VARIANT = VARIANTS["edit-2511"]
ROOT = Path(__file__).resolve().parent.parent
E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448
# transformers 5 saves Qwen2.5-VL's language model as `model.` and its vision tower as `visual.`
STORED_PREFIXES = (("model.language_model.", "model."), ("model.visual.", "visual."))


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """{"plain": the bf16 pipeline folder, "baked": the same after prepare(fp8, fp8) here, "prepared": its block}."""
    import diffusers
    from transformers import Qwen2_5_VLForConditionalGeneration

    components = tiny.build_components(VARIANT, tiny.base_scheduler())
    config = copy.deepcopy(components["text_encoder"].config)
    config.text_config.vocab_size = 272  # a multiple of 16, as the real 152,064: lm_head is fp8-valid
    torch.manual_seed(1)
    components["text_encoder"] = Qwen2_5_VLForConditionalGeneration(config).eval()
    root = tmp_path_factory.mktemp("fp8")
    getattr(diffusers, VARIANT.pipeline_class)(**components).to(dtype=torch.bfloat16).save_pretrained(root / "plain")
    shutil.copytree(root / "plain", root / "baked")
    prepared = prepare.prepare(root / "baked", None, None, "fp8", "fp8")
    return {"plain": root / "plain", "baked": root / "baked", "prepared": prepared}


def chosen_linears(parts: Any) -> dict[str, set[str]]:
    """The linears weights/precision.py quantises: every one of the transformer, the encoder's chosen ones."""
    transformer, encoder = (parts["transformer"], parts["text_encoder"]) if isinstance(parts, dict) else (
        parts.transformer, parts.text_encoder)
    chosen = precision.text_encoder_chosen(encoder)
    return {"transformer": {n for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)},
            "text_encoder": {n for n, m in encoder.named_modules() if chosen(m, n)}}


def stored_name(name: str) -> str:
    """The key a checkpoint stores the state-dict entry `name` under."""
    for loaded, stored in STORED_PREFIXES:
        if name.startswith(loaded):
            return stored + name.removeprefix(loaded)
    return name


def described(model: Any) -> dict[str, tuple]:
    """Every parameter and buffer as the worker would hold it: for a Float8Tensor, all torchao records."""
    from torchao.quantization import Float8Tensor

    out = {}
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        where = (type(t).__name__, tuple(t.shape), t.dtype, str(t.device))
        if isinstance(t, Float8Tensor):
            where += (t.qdata.dtype, tuple(t.qdata.shape), str(t.qdata.device), t.scale.dtype, tuple(t.scale.shape),
                      str(t.scale.device), list(t.block_size), t.mm_config, t.act_quant_kwargs, t.kernel_preference)
        out[name] = where
    return out


@contextmanager
def files_read_for_fake_cuda(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The loaders' file reads made fake, nothing else: a fake world cannot map file bytes into tensors.

    diffusers' `safetensors.torch.load_file` and transformers' slice reads run on the real CPU and hand
    back fresh fake tensors of the same shapes and dtypes (fake tensors carry no values: the values are
    checked on the CPU below).  transformers loads in one thread (the fake mode is per thread).  For
    plain parameters accelerate's `set_module_tensor_to_device` rebuilds `type(old)(new)`, which a
    fake parameter (a FakeTensor) cannot do, and `dispatch_model`'s final `model.to` cannot swap fake
    parameters: both are replaced by direct placement.  torchao's reconstruction and device move of
    the quantised weights (the subject here) run as they are.
    """
    import safetensors.torch
    from diffusers.models import model_loading_utils, modeling_utils
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    from transformers import core_model_loading

    def fresh(real: torch.Tensor) -> torch.Tensor:
        return torch.empty(real.shape, dtype=real.dtype, device="cpu")

    read = safetensors.torch.load_file

    def load_file(*args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        with unset_fake_temporarily(), torch.device("cpu"):
            real = read(*args, **kwargs)
        return {name: fresh(t) for name, t in real.items()}

    def materialize(tensor: Any, device: Any = None, dtype: Any = None) -> torch.Tensor:
        with unset_fake_temporarily(), torch.device("cpu"):
            real = tensor[...]
        return fresh(real).to(device=device, dtype=dtype)

    def place(module: Any, name: str, device: Any, value: torch.Tensor, dtype: Any = None, **_: Any) -> None:
        owner, _, leaf = name.rpartition(".")
        holder = module.get_submodule(owner)
        value = value.to(device=device, dtype=dtype if dtype is not None and value.is_floating_point() else None)
        if leaf in holder._buffers:
            holder._buffers[leaf] = value
        else:
            holder._parameters[leaf] = torch.nn.Parameter(value, requires_grad=False)

    def dispatch(model: Any, device_map: dict[str, Any], **_: Any) -> None:
        assert {str(d) for d in device_map.values()} == {"cuda"}, device_map  # all placed already

    monkeypatch.setattr(safetensors.torch, "load_file", load_file)
    monkeypatch.setattr(core_model_loading, "_materialize_copy", materialize)
    monkeypatch.setattr(model_loading_utils, "set_module_tensor_to_device", place)
    monkeypatch.setattr(modeling_utils, "dispatch_model", dispatch)
    monkeypatch.setenv("HF_DEACTIVATE_ASYNC_LOAD", "1")
    yield


def load_as_the_worker(folder: Path) -> dict[str, Any]:
    """The transformer and text encoder as model/sequence.py reads a folder that fits the GPU whole
    (`read_text_encoder`, `read_transformer`: each class's `from_pretrained` with the device as the map,
    the encoder then made hidden-states-only, which drops its lm_head before anything is quantised)."""
    import diffusers

    from qwen_edit_worker.model import text_encoder, text_phase

    encoder = text_encoder.encoder_class(folder).from_pretrained(
        str(folder / "text_encoder"), dtype=torch.bfloat16, device_map="cuda", local_files_only=True)
    transformer = diffusers.QwenImageTransformer2DModel.from_pretrained(
        str(folder / "transformer"), dtype=torch.bfloat16, device_map="cuda", local_files_only=True)
    return {"transformer": transformer, "text_encoder": text_phase.hidden_states_only(encoder)}


class TestOnFakeCuda:
    def test_the_bake_loads_to_the_tensors_quantising_at_load_gives(self, folders: dict[str, Any],
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
        from torchao.quantization import Float8Tensor

        with files_read_for_fake_cuda(monkeypatch), fakecuda.fake_cuda():
            baked = load_as_the_worker(folders["baked"])
            at_load = load_as_the_worker(folders["plain"])
            with fakecuda._hopper():  # torchao's GPU question, answered inside the quantise calls only
                precision.quantise_transformer(at_load["transformer"], "fp8")
                precision.quantise_text_encoder(at_load["text_encoder"], "fp8")
            chosen = chosen_linears(at_load)
            for component in ("transformer", "text_encoder"):
                mine, theirs = described(baked[component]), described(at_load[component])
                assert mine == theirs, component
                fp8 = {name.removesuffix(".weight") for name, d in mine.items() if d[0] == Float8Tensor.__name__}
                assert fp8 == chosen[component] and fp8, component  # every chosen linear, and only those
                assert {d[3] for d in mine.values()} == {"cuda:0"}
            weight = baked["transformer"].transformer_blocks[0].attn.to_q.weight
            assert (weight.qdata.dtype, weight.scale.dtype, tuple(weight.scale.shape)) == (
                torch.float8_e4m3fn, torch.float32, (weight.shape[0], 1))
            assert weight.block_size == [1, weight.shape[1]] and weight.dtype == torch.bfloat16

    def test_every_linear_of_the_real_configs_is_fp8_shaped(self) -> None:
        """torchao leaves a linear whose sides are not multiples of 16 in bf16, silently: none is, in the real
        transformer and text encoder (one layer of each), so the byte counts' assumption holds."""
        with fakecuda.fake_cuda():
            for build in (lambda: fakecuda.transformer(True, "fp8", layers=1),
                          lambda: fakecuda.text_encoder("fp8", layers=1)):
                model = build()
                chosen = precision.text_encoder_chosen(model) if hasattr(model, "lm_head") else (
                    lambda m, fqn: isinstance(m, torch.nn.Linear))
                assert precision.quantised_linears(model) == sum(chosen(m, n) for n, m in model.named_modules())


class TestValuesOnTheCpu:
    def test_stored_values_are_torchaos_fp8_of_the_same_bf16_weights_bit_for_bit(
            self, folders: dict[str, Any]) -> None:
        """The reference: torchao's own `Float8Tensor.from_hp` (what its fp8 handler calls; it asks no GPU
        question itself) on the bf16 weights of the unbaked folder, beside the per-row formula written out.  The
        file holds exactly that, `from_pretrained` reads the file back exactly, every other tensor is as it was."""
        import diffusers
        from torchao.quantization import Float8Tensor, PerRow

        pipe_class = getattr(diffusers, VARIANT.pipeline_class)
        loaded = pipe_class.from_pretrained(str(folders["baked"]), dtype=torch.bfloat16, local_files_only=True)
        plain = pipe_class.from_pretrained(str(folders["plain"]), dtype=torch.bfloat16, local_files_only=True)
        checked = 0
        for component in ("transformer", "text_encoder"):
            stored = {k: v for p in sorted((folders["baked"] / component).glob("*.safetensors"))
                      for k, v in load_file(str(p)).items()}
            back, before = getattr(loaded, component).state_dict(), getattr(plain, component).state_dict()
            assert back.keys() == before.keys()
            for name, got in back.items():
                if not isinstance(got, Float8Tensor):
                    assert torch.equal(got, before[name]), name  # biases, norms, the vision tower: as they were
                    continue
                module, _, leaf = stored_name(name).rpartition(".")
                qdata, scale = stored[f"{module}._{leaf}_qdata"], stored[f"{module}._{leaf}_scale"]
                weight = before[name]
                assert weight.dtype == torch.bfloat16
                want = Float8Tensor.from_hp(weight, float8_dtype=torch.float8_e4m3fn, granularity=PerRow())
                per_row = (weight.abs().amax(dim=-1, keepdim=True) / E4M3_MAX).float()  # bf16 amax / 448
                formula = (weight.float() / per_row).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
                for q in (qdata, got.qdata, formula):
                    assert torch.equal(q.view(torch.uint8), want.qdata.view(torch.uint8)), name
                for sc in (scale, got.scale, per_row):
                    assert sc.dtype == torch.float32 and torch.equal(sc.view(torch.int32), want.scale.view(torch.int32))
                checked += 1
        assert checked == sum(len(v) for v in chosen_linears(loaded).values()) > 40

    def test_the_scale_divides_as_a_gpu_does_for_every_bf16_value(self) -> None:
        """`_choose_scale_float8`: amax (bf16) / 448, a Python scalar.  A CUDA GPU computes a tensor divided by a
        CPU scalar as a times float32(1 / b) (ATen BinaryDivTrueKernel.cu), the CPU as a / b; rounded to bf16 the
        two agree for all 32,640 finite non-negative bf16 values (an amax is never negative)."""
        x = torch.arange(0, 1 << 15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
        x = x[torch.isfinite(x)]
        inverse = torch.tensor(1.0) / torch.tensor(E4M3_MAX, dtype=torch.float32)
        as_a_gpu = (x.float() * inverse).to(torch.bfloat16)
        assert x.numel() == 32_640
        assert torch.equal((x / E4M3_MAX).view(torch.int16), as_a_gpu.view(torch.int16))

    def test_the_float8_cast_rounds_to_nearest_even_at_every_boundary(self) -> None:
        """`_quantize_affine_float8` ends in a float32 -> float8_e4m3fn cast: a GPU runs c10's scalar conversion
        (round to nearest, ties to even), the CPU may run a vectorised one.  Every e4m3 value, every midpoint
        between neighbours and the float32 values either side of it, both signs, land where round-to-nearest-even
        puts them, through the vectorised path (one tensor) and the scalar one (one element at a time)."""
        codes = torch.arange(0, 127, dtype=torch.uint8)  # +0 ... +448 (code 127 is NaN)
        values = codes.view(torch.float8_e4m3fn).float()
        middle = ((values[:-1].double() + values[1:].double()) / 2).float()  # exact in float32 (5 bits)
        above, below = torch.nextafter(middle, torch.tensor(1e9)), torch.nextafter(middle, torch.tensor(0.0))
        low, high = codes[:-1], codes[1:]
        inputs = torch.cat([values, middle, above, below])
        expected = torch.cat([codes, torch.where(low % 2 == 0, low, high), high, low])
        inputs, expected = torch.cat([inputs, -inputs]), torch.cat([expected, expected | 0x80])
        assert torch.equal(inputs.to(torch.float8_e4m3fn).view(torch.uint8), expected)
        one_by_one = torch.cat([inputs[i:i + 1].to(torch.float8_e4m3fn).view(torch.uint8) for i in range(len(inputs))])
        assert torch.equal(one_by_one, expected)

    def test_no_mslk_kernel_here_or_in_the_image(self) -> None:
        """torchao's only other fp8 quantise kernel (mslk's triton quantize_fp8_row, Hopper) needs mslk: absent here,
        not in the image's pins, so an H100 quantising at load runs the torch path the bake ran."""
        from torchao.utils import _is_mslk_available

        assert not _is_mslk_available()
        pins = (ROOT / "builder" / "requirements.txt").read_text().lower()
        assert "mslk" not in pins and "fbgemm" not in pins

    def test_stored_fp8_bytes_are_what_torchao_saves(self) -> None:
        """The bytes table (bench/gpu --bytes) and the planner count fp8 weights with these constants."""
        from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

        layer = torch.nn.Sequential(torch.nn.Linear(96, 48, bias=False)).to(torch.bfloat16)
        with fp8_cpu.answered():
            precision.quantise_transformer(layer, "fp8")
        flat, _ = flatten_tensor_state_dict(layer.state_dict())
        assert {k: v.dtype for k, v in flat.items()} == {"0._weight_qdata": torch.float8_e4m3fn,
                                                         "0._weight_scale": torch.float32}
        stored = sum(t.numel() * t.element_size() for t in flat.values())
        assert stored == precision.linear_weight_bytes(48, 96, "fp8") == 48 * 96 + 48 * 4


class TestTheAnswer:
    def test_given_inside_the_quantise_call_for_cpu_weights_only(self) -> None:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, quantize_
        from torchao.quantization.transform_module import _QUANTIZE_CONFIG_HANDLER

        config = precision.torchao_config("fp8")
        original = _QUANTIZE_CONFIG_HANDLER[Float8DynamicActivationFloat8WeightConfig]
        layer = torch.nn.Linear(32, 16, bias=False).to(torch.bfloat16)
        with pytest.raises(AssertionError, match="Float8"):  # torchao's own refusal: no GPU here
            quantize_(torch.nn.Sequential(layer), config)
        seen = []
        with fp8_cpu.answered():
            assert not torch.cuda.is_available()  # nothing answered outside the call
            quantize_(torch.nn.Sequential(layer), config, filter_fn=lambda m, fqn: seen.append(
                torch.cuda.is_available()) or isinstance(m, torch.nn.Linear))
            assert precision.quantised_linears(layer) == 1 and not any(seen)
            with fakecuda.fake_cuda(), pytest.raises(AssertionError, match="Float8"):
                quantize_(torch.nn.Sequential(torch.nn.Linear(32, 16, dtype=torch.bfloat16)), config)  # on cuda
        assert _QUANTIZE_CONFIG_HANDLER[Float8DynamicActivationFloat8WeightConfig] is original
        assert not torch.cuda.is_available()

    def test_another_torchao_is_refused_before_anything_runs(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import torchao

        assert fp8_cpu.unsupported() is None and torchao.__version__ == fp8_cpu.CHECKED_TORCHAO
        monkeypatch.setattr(torchao, "__version__", "0.19.0")
        with pytest.raises(prepare.PrepareError, match=r"--precision: fp8 weights are made on the CPU with torchao "
                                                       r"0\.18\.0's own code, .* this build has torchao 0\.19\.0"):
            prepare.check_can_quantise("--precision", "fp8")
        prepare.check_can_quantise("--precision", "int8")  # int8 does not depend on it


class TestSizes:
    def test_headers_estimate_and_loaded_bytes_agree_and_so_do_the_plans(self, folders: dict[str, Any]) -> None:
        """An fp8 bake's headers (1-byte qdata, float32 scales kept float32) count what the planner estimates from
        the bf16 folder at fp8, which is what the loaded weights hold (read: all of them; held: without the
        encoder's lm_head, dropped at load by model/text_phase.py); so an fp8 bake is placed as planned."""
        import diffusers
        from torchao.utils import TorchAOBaseTensor

        from qwen_edit_worker.model import text_phase

        def stored(module: Any) -> int:  # what files hold (the state dict: not RoPE's inv_freq)
            total = 0
            for t in module.state_dict().values():
                parts = [getattr(t, n) for n in t.__tensor_flatten__()[0]] if isinstance(t, TorchAOBaseTensor) else [t]
                total += sum(p.numel() * p.element_size() for p in parts)
            return total

        baked, read = (placement.model_bytes(folders["baked"], "fp8", "fp8", held=h) for h in (True, False))
        assert baked == placement.model_bytes(folders["plain"], "fp8", "fp8")
        assert read == placement.model_bytes(folders["plain"], "fp8", "fp8", held=False)
        pipe = getattr(diffusers, VARIANT.pipeline_class).from_pretrained(
            str(folders["baked"]), dtype=torch.bfloat16, local_files_only=True)
        assert {c: stored(getattr(pipe, c)) for c in read} == read
        text_phase.hidden_states_only(pipe.text_encoder)  # as the worker holds it
        assert {c: stored(getattr(pipe, c)) for c in baked} == baked
        assert read["text_encoder"] - baked["text_encoder"] == precision.linear_weight_bytes(272, 16, "fp8")
        options = {"precision": "fp8", "text_encoder_precision": "fp8", "zero_cond_t": True}
        for gpu_gb in (None, 24, 80):
            gpu = None if gpu_gb is None else gpu_gb * placement.GB
            planned = placement.plan(placement.model_bytes(folders["plain"], "fp8", "fp8"), gpu, **options)
            assert dataclasses.asdict(placement.plan(baked, gpu, **options)) == dataclasses.asdict(planned)


def test_fp8_bake_record(folders: dict[str, Any]) -> None:
    prepared = folders["prepared"]
    assert prepared["precision"] == {"transformer": "fp8", "text_encoder": "fp8"}
    for component, layers in (("transformer", 34), ("text_encoder", 15)):
        assert prepared["quantised"][component] == {
            "precision": "fp8", "made_on": "cpu", "torchao": "0.18.0",
            "config": "Float8DynamicActivationFloat8WeightConfig", "granularity": "per-row", "layers": layers,
            "hardware_check": fp8_cpu.HARDWARE_CHECK}
