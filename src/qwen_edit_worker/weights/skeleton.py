"""A component as `from_pretrained` would build it, on the meta device: its layers without their weights.

Why this exists: the streamed bake (weights/stream.py) never builds the transformer or the text
encoder with their weights, yet it must store exactly what `from_pretrained(..., dtype=...,
quantization_config=TorchAoConfig(...))` followed by `save_pretrained(safe_serialization=True)`
stores today.  Every decision of that path that does not depend on a weight's values is the
library's own, made here on a skeleton whose parameters live on the meta device (no storage; the
real transformer's skeleton costs a few MB): the same config handling, the same quantizer object
and its choice of which weights to quantise (diffusers' `check_if_quantized_param`, transformers'
`param_needs_quantization`, with `modules_to_not_convert` as prepare.py passes it), transformers'
renaming of checkpoint names at load (`rename_source_key`) and back at save
(`revert_weight_conversion`, `remove_tied_weights_from_state_dict`), the state dict's order,
`num_parameters`, and the config files as the libraries write them.  Checked against diffusers
0.42.1 and transformers 5.23 by running both bakes side by side (tests/test_stream.py): a library
upgrade that changes any of this fails there.  What the skeleton cannot honour is refused with a
PrepareError naming it (a checkpoint conversion beyond renaming, modules kept in float32).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class SkeletonError(Exception):
    """The streamed bake cannot reproduce what `from_pretrained` does for this component; the message says why."""


@dataclass
class Skeleton:
    """One component's model on the meta device, in the dtype it is read in, with its quantizer (or None)."""

    library: str  # "diffusers" or "transformers"
    model: Any
    quantizer: Any
    component: Path
    conversions: list[Any] = field(default_factory=list)  # transformers' weight renamings (load direction)

    def state_dict(self) -> dict[str, Any]:
        return self.model.state_dict()

    def chooses(self, name: str) -> bool:
        """Whether the library quantises the state-dict entry `name` (always False without a quantizer)."""
        if self.quantizer is None:
            return False
        if self.library == "diffusers":
            params = dict(self.model.named_parameters())
            return name in params and bool(self.quantizer.check_if_quantized_param(
                self.model, params[name], name, {}, param_device=None))
        return bool(self.quantizer.param_needs_quantization(self.model, name))

    def loaded_names(self, stored: Iterable[str]) -> dict[str, str]:
        """{stored name: the state-dict name from_pretrained loads it as}; SkeletonError for a name it cannot map."""
        names = list(stored)
        if self.library == "diffusers":
            return {name: name for name in names}
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        renamings = [c for c in self.conversions if isinstance(c, WeightRenaming)]
        converters = [c for c in self.conversions if isinstance(c, WeightConverter)]
        meta = self.state_dict()
        prefix = self.model.base_model_prefix
        out = {}
        for name in names:  # as transformers' convert_and_load_state_dict_in_model renames each checkpoint key
            renamed, pattern = rename_source_key(name, renamings, converters, prefix, meta)
            if renamed not in meta and name in meta:
                renamed, pattern = rename_source_key(name, [], [], base_model_prefix=prefix, meta_state_dict=meta)
            if pattern is not None:
                raise SkeletonError(f"{self.component.name}: {name} needs a weight conversion (not a renaming) "
                                    "at load, which the streamed bake does not make")
            out[name] = renamed
        self.model._weight_conversions = [c for c in self.conversions if c.was_used()]  # as from_pretrained keeps
        return out

    def left_out(self) -> set[str]:
        """State-dict names save_pretrained leaves out of the files (a tied weight: it is stored once)."""
        if self.library == "diffusers":
            return set()
        from transformers.modeling_utils import remove_tied_weights_from_state_dict

        everything = self.state_dict()  # meta tensors: tied ones are found through the model's own parameters
        return set(everything) - set(remove_tied_weights_from_state_dict(dict(everything), self.model))

    def stored_names(self, flat: dict[str, Any]) -> dict[str, Any]:
        """`flat` (flattened state-dict names) renamed as save_pretrained stores them (the same tensor objects)."""
        if self.library == "diffusers":
            return flat
        from transformers.core_model_loading import revert_weight_conversion

        return revert_weight_conversion(self.model, flat)

    def num_parameters(self) -> int:
        return int(self.model.num_parameters())

    def save_config(self, into: Path) -> None:
        """The component's config files, as save_pretrained writes them for the loaded (and quantised) model."""
        if self.library == "diffusers":
            self.model.save_config(into)
            return
        config = self.model.config
        config.dtype = str(self.model.dtype).split(".")[1]
        config.architectures = [type(self.model).__name__.removeprefix("FSDP")]
        config.save_pretrained(into)
        if self.model.can_generate():
            self.model.generation_config.save_pretrained(into)


def build(component: Path, library: str, class_name: str, dtype: Any, quantization_config: Any = None) -> Skeleton:
    """The skeleton of `component` as from_pretrained(component, dtype=dtype, quantization_config=...) builds it."""
    if library == "diffusers":
        return _diffusers(component, class_name, dtype, quantization_config)
    if library == "transformers":
        return _transformers(component, class_name, dtype, quantization_config)
    raise SkeletonError(f"{component.name}: no streamed bake for a {library} component")


def _diffusers(component: Path, class_name: str, dtype: Any, quantization_config: Any) -> Skeleton:
    import accelerate
    import diffusers
    import torch
    from diffusers.models.modeling_utils import no_init_weights
    from diffusers.quantizers import DiffusersAutoQuantizer

    cls = getattr(diffusers, class_name)
    if cls._keep_in_fp32_modules:
        raise SkeletonError(f"{component.name}: {class_name} keeps modules in float32, which the streamed bake "
                            "does not reproduce")
    config, unused = cls.load_config(component, return_unused_kwargs=True)
    config = copy.deepcopy(config)
    quantizer = None
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
        quantizer = DiffusersAutoQuantizer.from_config(quantization_config, pre_quantized=False)
        quantizer.validate_environment(torch_dtype=dtype, device_map=None)
    previous = torch.get_default_dtype()
    cls._set_default_torch_dtype(dtype)
    try:
        with no_init_weights(), accelerate.init_empty_weights():
            model = cls.from_config(config, **unused)
    finally:
        torch.set_default_dtype(previous)
    if quantizer is not None:
        quantizer.preprocess_model(model=model, device_map=None, keep_in_fp32_modules=[])
        model.register_to_config(_name_or_path=component, _pre_quantization_dtype=dtype)
    else:
        model.register_to_config(_name_or_path=component)
    return Skeleton("diffusers", model.eval(), quantizer, component)


def _transformers(component: Path, class_name: str, dtype: Any, quantization_config: Any) -> Skeleton:
    import transformers
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.modeling_utils import _get_dtype
    from transformers.quantizers.auto import get_hf_quantizer
    from transformers.utils.generic import ContextManagers

    cls = getattr(transformers, class_name)
    config = transformers.AutoConfig.from_pretrained(component)
    quantizer, config, _ = get_hf_quantizer(config, quantization_config, None, True, {})
    config, dtype = _get_dtype(dtype, None, config, None, None, True, quantizer)
    config.name_or_path = str(component)
    config = copy.deepcopy(config)
    with ContextManagers(cls.get_init_context(dtype, quantizer is not None, False, None)):
        model = cls(config)
        if quantizer is not None:
            quantizer.preprocess_model(model=model, dtype=dtype, device_map=None, checkpoint_files=None,
                                       use_kernels=False)
    model.tie_weights()  # as from_pretrained does once the weights are in (on the meta device: the same objects)
    if model._get_dtype_plan(dtype):
        raise SkeletonError(f"{component.name}: {class_name} keeps modules in float32 at {dtype}, which the "
                            "streamed bake does not reproduce")
    conversions = get_model_conversion_mapping(model, None, quantizer)
    return Skeleton("transformers", model.eval(), quantizer, component, conversions)
