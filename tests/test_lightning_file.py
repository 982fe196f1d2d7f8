"""Every way a LORA_PATH file can be wrong is one clear LORA_PATH error, on both load paths, with the worker healthy.

The two paths are the whole-model fuse (the tiny model, TINY_MODEL=1: diffusers + peft) and the block-by-block
read of a bf16 folder quantised at load (MODEL_PATH + PRECISION=int8: model/by_block.py).  For each bad file the
worker loads in the background as deployed (WARMUP=1), never asks to be replaced (a new worker would fail the
same way, so RunPod must not replace it), and every job gets the same error, word for word the same on both paths.
"""

from __future__ import annotations

import io
import logging
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from conftest import small_job
from qwen_edit_worker.model import tiny
from qwen_edit_worker.serving.worker import Worker
from test_job_sizing import tiny_folder  # noqa: F401 (fixture: the tiny pipeline saved as a bf16 folder)

LAYERS = len(tiny.LORA_MODULES) * tiny.NUM_LAYERS
Q0 = "transformer_blocks.0.attn.to_q"


def lightx2v(**changes: Any) -> dict[str, torch.Tensor]:
    """The tiny Lightning LoRA (LightX2V keys), with keys replaced (a tensor) or removed (None)."""
    state = tiny.lora_state_dict()
    for key, value in changes.items():
        key = key.replace("__", ".")
        if value is None:
            del state[key]
        else:
            state[key] = value
    return state


def pickled() -> bytes:
    buffer = io.BytesIO()
    torch.save(tiny.lora_state_dict(), buffer)
    return buffer.getvalue()


# name: (what the file holds: a state dict, bytes, None for no file, "folder"; a fragment of the error)
BAD: dict[str, tuple[Any, str]] = {
    "missing": (None, "does not exist"),
    "folder": ("folder", "is not a file"),
    "empty": (b"", "cannot read"),
    "not-safetensors": (b"\x00garbage" * 10, "cannot read"),
    "truncated-header": (struct.pack("<Q", 1000) + b'{"transformer_blocks.0', "cannot read"),
    "pickle": (pickled(), "cannot read"),
    "no-lora-keys": ({"weight": torch.zeros(2)}, "holds no LoRA weights"),
    "matches-nothing": (tiny.lora_state_dict(prefix="nothing_here"), "matched no layer of the transformer"),
    "diff-keys": (lightx2v(**{f"{Q0}.diff": torch.zeros(4), "transformer_blocks.0.img_norm1.diff_b": torch.zeros(4)}),
                  "holds .diff/.diff_b keys"),
    "half-a-pair-converter": (lightx2v(**{f"{Q0}.lora_up.weight": None}), "is not a LoRA diffusers can convert"),
    "half-a-pair": ({f"transformer.{Q0}.lora_A.weight": torch.zeros(2, 12)}, "has half a LoRA pair"),
    "wrong-shapes": (lightx2v(**{f"{Q0}.lora_down.weight": torch.zeros(2, 13)}), "does not fit this model's"),
    "wrong-rank": (lightx2v(**{f"{Q0}.lora_up.weight": torch.zeros(12, 3)}), "does not fit this model's"),
    "bias-key": ({**{f"transformer.{k}": v for k, v in lightx2v().items() if "alpha" not in k},
                  f"transformer.{Q0}.lora_B.bias": torch.zeros(12)}, "holds a key the Lightning fuse cannot use"),
    "dora": (lightx2v(**{f"{Q0}.dora_scale": torch.ones(12, 1)}), "is a DoRA"),
}


def write(path: Path, content: Any) -> Path:
    if content == "folder":
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, dict):
        save_file(content, str(path))
    return path


@pytest.fixture(scope="module")
def paths(tiny_folder: Path) -> dict[str, Callable[[Path], dict[str, str]]]:  # noqa: F811 (the fixture above)
    return {"whole": lambda lora: {"TINY_MODEL": "1", "LORA_PATH": str(lora)},
            "by_block": lambda lora: {"MODEL_PATH": str(tiny_folder), "PRECISION": "int8", "LORA_PATH": str(lora)}}


def answers(env: dict[str, str]) -> list[str]:
    """Load as deployed (WARMUP=1) and answer two jobs; their errors (never a request for a new worker)."""
    worker = Worker({**env, "WARMUP": "1", "MODEL_VARIANT": "edit-2511"})
    worker.start()
    worker.model.wait()
    assert worker.model.unforeseen is None
    outs = [worker.handle(small_job()) for _ in range(2)]
    assert not any("refresh_worker" in out for out in outs)
    return [out.get("error", "") for out in outs]


@pytest.mark.parametrize("case", BAD)
def test_a_bad_lora_file_is_one_lora_path_error_on_both_paths(case: str, tmp_path: Path,
                                                                paths: dict[str, Callable[[Path], dict[str, str]]]
                                                                ) -> None:
    content, fragment = BAD[case]
    lora = write(tmp_path / f"{case}.safetensors", content)
    whole, by_block = answers(paths["whole"](lora)), answers(paths["by_block"](lora))
    assert whole[0] == whole[1] == by_block[0] == by_block[1], (whole, by_block)
    assert whole[0].startswith("LORA_PATH: ") and str(lora) in whole[0] and fragment in whole[0], whole[0]
    assert "Traceback" not in whole[0] and len(whole[0]) < 400 + len(str(lora))


def test_a_partial_match_warns_and_fuses_the_same_layers_on_both_paths(
        tmp_path: Path, paths: dict[str, Callable[[Path], dict[str, str]]], caplog: pytest.LogCaptureFixture) -> None:
    state = lightx2v()
    for end in ("lora_down.weight", "lora_up.weight", "alpha"):  # one layer renamed to one the model lacks
        state[f"transformer_blocks.0.attn.to_z.{end}"] = state.pop(f"{Q0}.{end}")
    lora = write(tmp_path / "partial.safetensors", state)
    fused = {}
    for name, env in paths.items():
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="qwen_edit_worker"):
            worker = Worker({**env(lora), "WARMUP": "0", "MODEL_VARIANT": "edit-2511"})
            out = worker.handle(small_job())
        assert "error" not in out, out
        warned = [r.getMessage() for r in caplog.records if "layers matched the transformer" in r.getMessage()]
        assert warned == [f"Lightning LoRA {lora}: {LAYERS - 1} of its {LAYERS} layers matched the transformer "
                          "(e.g. transformer_blocks.0.attn.to_z matched none)"], (name, warned)
        fused[name] = worker.model.get()[0].model.lora_layers
    assert fused == {"whole": LAYERS - 1, "by_block": LAYERS - 1}


def test_deployed_a_diff_key_lora_on_the_block_by_block_path_keeps_the_worker_and_answers_every_job(
        tmp_path: Path, tiny_folder: Path) -> None:  # noqa: F811 (the fixture above)
    """handler.py under the RunPod SDK's job loop: the case that used to escape as unforeseen (the worker replaced
    over and over).  It stays up, never reports unhealthy nor asks to be replaced, and tells every job."""
    from fake_queue import deployed_worker, serve_queue

    content, fragment = BAD["diff-keys"]
    lora = write(tmp_path / "diff.safetensors", content)
    log = tmp_path / "worker.log"
    with serve_queue() as queue, deployed_worker(queue, log, TINY_MODEL="0", MODEL_PATH=str(tiny_folder),
                                                 PRECISION="int8", LORA_PATH=str(lora),
                                                 MODEL_VARIANT="edit-2511") as process:
        queue.put({**small_job(), "id": "j-1"}, {**small_job(), "id": "j-2"})
        results = queue.wait_done(["j-1", "j-2"], 240)
        errors = {result.body.get("error") for result in results.values()}
        assert len(errors) == 1, errors
        [error] = errors
        assert error.startswith(f"LORA_PATH: {lora} ") and fragment in error, log.read_text()[-2000:]
        assert not any(result.body.get("stopPod") for result in results.values())
        assert process.poll() is None
        assert not [e for e in queue.of("ping") if e.query.get("status") == ["unhealthy"]]


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                                   RuntimeError("CUDA error: an illegal memory access was encountered")])
def test_running_out_of_gpu_memory_while_fusing_stays_unforeseen(error: Exception, tmp_path: Path,
                                                                paths: dict[str, Callable[[Path], dict[str, str]]],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """torch raises these as RuntimeError, the type a bad file raises too: they must not be called the file's (or
    MODEL_PATH's) fault, so the job is answered with the load's error and RunPod asked to replace the worker, on
    both paths."""
    from qwen_edit_worker.weights import lightning

    def fails(*args: Any, **kwargs: Any) -> None:
        raise error

    lora = write(tmp_path / "fine.safetensors", tiny.lora_state_dict())
    monkeypatch.setattr(lightning, "fuse_pairs", fails)  # the fuse both paths share
    for env in paths.values():
        worker = Worker({**env(lora), "WARMUP": "1", "MODEL_VARIANT": "edit-2511"})
        worker.start()
        out = worker.handle(small_job())
        assert worker.model.unforeseen is error
        assert out["refresh_worker"] is True
        assert out["error"].startswith(f"model: loading failed ({type(error).__name__}")
