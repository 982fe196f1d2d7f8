"""The fake-CUDA builders (placement/fakecuda.py) and the alive-bytes counter (placement/memcount.py).

The real components are built from the project's configs on fake tensors: their parameter counts
must be the published ones, their weights quantised by the project's own precision path, and the
counter must see what a forward keeps alive (and not the weights)."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import torch

from qwen_edit_worker.placement import fakecuda, memcount, realconfig


def test_configs_are_the_published_ones() -> None:
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel

    # diffusers' defaults are the published 20B transformer and the VAE (facts.md section 11)
    for cls, ours in ((QwenImageTransformer2DModel, realconfig.TRANSFORMER_CONFIG),
                      (AutoencoderKLQwenImage, realconfig.VAE_CONFIG)):
        defaults = {k: v.default for k, v in inspect.signature(cls.__init__).parameters.items()}
        assert {k: defaults[k] for k in ours} == ours
    with fakecuda.fake_cuda():
        counts = {"transformer": sum(p.numel() for p in fakecuda.transformer(False).parameters()),
                  "text_encoder": sum(p.numel() for p in fakecuda.text_encoder().parameters()),
                  "vae": sum(p.numel() for p in fakecuda.vae().parameters())}
    # facts.md section 2: 20.43 B, 8.29 B, 127 M parameters
    assert counts["transformer"] == pytest.approx(20.43e9, rel=0.002)
    assert counts["text_encoder"] == pytest.approx(8.29e9, rel=0.002)
    assert counts["vae"] == pytest.approx(127e6, rel=0.01)


def test_builders_need_the_fake_world() -> None:
    with pytest.raises(RuntimeError, match="fake_cuda"):
        fakecuda.vae()


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_quantised_through_the_projects_path(precision: str) -> None:
    from qwen_edit_worker.weights.precision import quantised_linears

    with fakecuda.fake_cuda():
        model = fakecuda.transformer(True, precision, layers=1)
        linears = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
        assert quantised_linears(model) == linears
        assert next(model.parameters()).device.type == "cuda"


def test_peak_counts_activations_not_weights_and_two_layers_equal_four() -> None:
    peaks = []
    for layers in (2, 4):
        with fakecuda.fake_cuda():
            model = fakecuda.transformer(False, layers=layers)
            with torch.no_grad(), memcount.PeakMemory() as memory:
                x = torch.randn(1, 2 * 1024, 64, dtype=torch.bfloat16)
                text = torch.randn(1, 100, 3584, dtype=torch.bfloat16)
                out = model(hidden_states=x, timestep=torch.tensor([0.5]), encoder_hidden_states=text,
                            img_shapes=[[(1, 32, 32), (1, 32, 32)]], return_dict=False)[0]
                assert out.shape == (1, 2048, 64)
                del out
            peaks.append(memory.peak)
            kept = memory.alive - x.nbytes - text.nbytes  # beyond the inputs: the RoPE tables the model caches
            assert 0 <= kept < 0.01 * memory.peak
    # one block alive at a time; the 0.2 GB of a block's bf16 input/MLP tensors, not 0.7 GB of its weights
    assert peaks[0] == peaks[1]
    assert 0.1e9 < peaks[0] < 0.4e9


def test_flops_of_the_real_graph_match_the_formula_the_cost_tables_use() -> None:
    """docs/benchmarks.md: the FLOP formula (facts.md section 6) agrees with the real graph's count."""
    from qwen_edit_worker.placement import measure

    job = measure.Job("edit-2509", 0.5).shape()
    counted = measure.denoise_phase(job, 1, "bf16", False).flops
    tokens = job.tokens()
    formula = 2 * 6.80e9 * tokens + 4 * tokens**2 * 3072 * 60
    assert counted == pytest.approx(formula, rel=0.005)
    assert counted == pytest.approx(73.6e12, rel=0.001)  # the docs' row


def test_the_real_graph_flop_table_is_the_harness() -> None:
    """client/qwen_edit_client/real_graph_flops.json (what the client and the docs' time tables read) is what
    the harness counts: two rows re-measured, and the table covers every variant at every size it names."""
    from qwen_edit_worker.placement import flopstable
    from qwen_edit_worker.weights.variants import VARIANTS

    path = Path(__file__).resolve().parents[1] / "client" / "qwen_edit_client" / "real_graph_flops.json"
    table = json.loads(path.read_text())
    assert table["source"] == flopstable.SOURCE and "derived from the real graph" in table["source"]
    assert table["steps"] == flopstable.STEPS == 3
    rows = {(r["variant"], r["megapixels"]): r for r in table["rows"]}
    assert set(rows) == {(v, mp) for v in VARIANTS for mp in flopstable.MEGAPIXELS}
    for key in (("edit", 0.5), ("edit-2511", 0.5)):
        measured, stored = flopstable.row(*key), rows[key]
        assert measured["tokens"] == stored["tokens"], key
        for phase, tflop in measured["tflop"].items():
            assert stored["tflop"][phase] == pytest.approx(tflop, abs=0.011), (key, phase)
        assert stored["job_tflop"] == pytest.approx(measured["job_tflop"], abs=0.011), key
    for row in rows.values():  # a job: text, encode, 3 passes, decode
        t = row["tflop"]
        assert row["job_tflop"] == pytest.approx(t["text"] + t["encode"] + 3 * t["denoise"] + t["decode"], abs=0.05)
