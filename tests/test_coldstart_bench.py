"""bench/coldstart --real-shape, piece by piece: the real-shape folder writer (at a narrow width: the same classes,
configs and layout, a few MB), the page-cache drop and its check, the raw read, the 60-block scaling, and the whole
measurement's JSON on a narrow folder through a real worker process.  No figure is asserted, only what they mean."""

from __future__ import annotations

import json
import os
import socket
import struct
import sys
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import coldreaders  # noqa: E402
import coldreal  # noqa: E402
import coldworker  # noqa: E402
import pagecache  # noqa: E402
import rawread  # noqa: E402
import realfolder  # noqa: E402
import realscale  # noqa: E402
from qwen_edit_worker.placement import realconfig  # noqa: E402
from qwen_edit_worker.weights.variants import VARIANTS  # noqa: E402

VARIANT = VARIANTS["edit-2511"]
BLOCKS = 2
COLD = pagecache.MAX_RESIDENT_FRACTION


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict[str, Any]]]:
    out = {}
    for layout in realfolder.LAYOUTS:
        folder = tmp_path_factory.mktemp(layout) / "model"
        out[layout] = folder, realfolder.write(folder, BLOCKS, layout, VARIANT.name, narrow=True)
    return out


def header(path: Path) -> dict[str, Any]:
    with path.open("rb") as handle:
        return json.loads(handle.read(struct.unpack("<Q", handle.read(8))[0]))


def dtypes(component: Path) -> dict[str, str]:
    return {name: t["dtype"] for path in sorted(component.glob("*.safetensors"))
            for name, t in header(path).items() if name != "__metadata__"}


def manifest(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "manifest.json").read_text())


class TestRealFolder:
    """The folder is the bake's layout for its layout, at the real configs cut to N blocks and 2 text layers."""

    def test_bf16_is_unfused_with_the_lora_file_and_a_bakes_manifest(self, folders: dict) -> None:
        folder, report = folders["bf16"]
        index = json.loads((folder / "model_index.json").read_text())
        assert index["_class_name"] == VARIANT.pipeline_class
        assert index["transformer"] == ["diffusers", "QwenImageTransformer2DModel"]
        assert index["text_encoder"] == ["transformers", "Qwen2_5_VLForConditionalGeneration"]
        assert index["vae"] == ["diffusers", "AutoencoderKLQwenImage"]
        lora = folder / "lightning" / VARIANT.lora_basename
        assert {k.rsplit(".", 2)[0].split(".")[1] for k in header(lora) if k != "__metadata__"} == {"0", "1"}
        for name in ("config.json", "model.safetensors", "preprocessor_config.json"):
            assert (folder / "safety_checker" / name).is_file()
        written = manifest(folder)
        on_disk = sorted(p.relative_to(folder).as_posix() for p in pagecache.files(folder))
        assert sorted([f["path"] for f in written["files"]] + ["manifest.json"]) == on_disk
        assert "prepared" not in written and written["bench"]["transformer_blocks"] == BLOCKS
        assert report["bytes"] == sum(p.stat().st_size for p in pagecache.files(folder))
        config = json.loads((folder / "transformer" / "config.json").read_text())
        assert config["num_layers"] == BLOCKS and config["zero_cond_t"] is VARIANT.zero_cond_t
        assert config["attention_head_dim"] == realconfig.TRANSFORMER_CONFIG["attention_head_dim"]
        assert set(dtypes(folder / "transformer").values()) == {"BF16"}

    def test_int8_is_the_bakes_own_preparation(self, folders: dict) -> None:
        folder, report = folders["int8"]
        prepared = manifest(folder)["prepared"]
        assert prepared["fused_lora"] == f"{VARIANT.lora_repo}@{realfolder.COMMIT}"
        assert prepared["fused_layers"] == 14 * BLOCKS  # every LoRA'd linear of every block
        assert prepared["precision"] == {"transformer": "int8", "text_encoder": "int8"}
        assert not (folder / "lightning").exists()  # fused: the bake keeps no LoRA file
        assert "I8" in set(dtypes(folder / "transformer").values())
        encoder = dtypes(folder / "text_encoder")
        assert any(t == "I8" and "layers.0." in n for n, t in encoder.items())
        assert {t for n, t in encoder.items() if "visual" in n} == {"BF16"}  # the vision tower stays bf16
        assert report["prepare_peak_rss_gb"] > 0 and report["bytes"] < folders["bf16"][1]["bytes"]

    @pytest.mark.parametrize("layout", realfolder.LAYOUTS)
    def test_the_workers_own_loader_loads_it_as_a_bake(self, folders: dict, layout: str) -> None:
        from qwen_edit_worker.model.sequence import load_model
        from qwen_edit_worker.settings import Settings

        folder, _ = folders[layout]
        env = {"MODEL_PATH": str(folder), "MODEL_VARIANT": VARIANT.name}
        if layout == "int8":
            env |= {"PRECISION": "int8", "TEXT_ENCODER_PRECISION": "int8"}
        model = load_model(Settings.from_env(env))
        assert model.source == str(folder) and model.manifest and model.safety is not None
        fused = ("load", 14 * BLOCKS) if layout == "bf16" else ("bake", 0)  # bf16: the LoRA file fused at load
        assert (model.lightning_fused, model.lora_layers) == fused
        assert len(model.pipe.transformer.transformer_blocks) == BLOCKS

    def test_a_folder_is_reused_only_when_whole_and_of_the_same_shape(self, folders: dict, tmp_path: Path) -> None:
        import shutil

        copy = tmp_path / "copy"
        shutil.copytree(folders["bf16"][0], copy)
        assert not realfolder.complete(copy, BLOCKS, "bf16", VARIANT.name)  # narrow: never taken for a real one
        written = manifest(copy)
        written["bench"]["width"] = "full"
        (copy / "manifest.json").write_text(json.dumps(written))
        assert realfolder.complete(copy, BLOCKS, "bf16", VARIANT.name)
        assert not realfolder.complete(copy, BLOCKS + 1, "bf16", VARIANT.name)
        assert not realfolder.complete(copy, BLOCKS, "int8", VARIANT.name)
        with (copy / "vae" / "diffusion_pytorch_model.safetensors").open("r+b") as handle:
            handle.truncate(100)
        assert not realfolder.complete(copy, BLOCKS, "bf16", VARIANT.name)

    def test_it_refuses_to_replace_a_folder_it_did_not_make(self, tmp_path: Path) -> None:
        (tmp_path / "precious.txt").write_text("keep")
        with pytest.raises(FileExistsError, match="did not make"):
            realfolder.write(tmp_path, 1, "bf16", narrow=True)
        assert (tmp_path / "precious.txt").read_text() == "keep"

    def test_the_text_encoder_keeps_its_whole_vision_tower(self) -> None:
        config = realconfig.text_encoder_config(2, vision_layers=realconfig.VISION_CONFIG["depth"])
        assert config.text_config.num_hidden_layers == 2
        assert config.vision_config.depth == 32 and config.vision_config.fullatt_block_indexes == [7, 15, 23, 31]
        cut = realconfig.text_encoder_config(2)  # unchanged: `layers` alone cuts both
        assert cut.vision_config.depth == 2 and cut.vision_config.fullatt_block_indexes == [1]


class TestPageCache:
    """A drop is checked, never assumed: mincore sees what stays in memory."""

    def test_drop_read_and_direct_read(self, tmp_path: Path) -> None:
        path = tmp_path / "weights.bin"
        path.write_bytes(os.urandom(8 * 1024 * 1024 + 123))  # not a whole number of pages
        pagecache.flush([path])
        assert pagecache.residency([path])["resident_fraction"] > 0.9  # just written: in the cache
        assert pagecache.drop_checked([path])["resident_fraction"] <= COLD
        seconds, size = rawread.buffered([path], readers=3)
        assert size == path.stat().st_size and seconds > 0
        assert pagecache.residency([path])["resident_bytes"] == size  # every byte read, the tail page counted exactly
        pagecache.drop_checked([path])
        direct = rawread.direct([path])
        if direct is None:
            pytest.skip("this filesystem refuses O_DIRECT")
        assert direct[1] == size and pagecache.residency([path])["resident_fraction"] <= COLD  # no page cache

    def test_a_drop_that_did_not_happen_is_an_error(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        path = tmp_path / "weights.bin"
        path.write_bytes(os.urandom(1024 * 1024))
        monkeypatch.setattr(pagecache, "drop", lambda paths: None)
        with pytest.raises(pagecache.StillCached, match="stayed in the page cache"):
            pagecache.drop_checked([path])

    def test_pieces_cover_every_byte_once(self, tmp_path: Path) -> None:
        paths = []
        for name, size in (("a", 0), ("b", 7), ("c", 9)):
            (tmp_path / name).write_bytes(b"x" * size)
            paths.append(tmp_path / name)
        pieces = rawread.pieces(paths, piece=3)
        assert [(p.name, o, n) for p, o, n in pieces if p.name == "c"] == [("c", 0, 3), ("c", 3, 3), ("c", 6, 3)]
        assert sum(n for _, _, n in pieces) == 16


class TestScaling:
    def test_sixty_blocks_are_the_folder_plus_the_missing_blocks(self, folders: dict) -> None:
        """Checked against the same (narrow) configs counted on the meta device: 2 bytes a bf16 parameter."""
        import torch
        from diffusers import QwenImageTransformer2DModel

        folder, report = folders["bf16"]
        units = {"transformer": BLOCKS, "lightning": BLOCKS, "text_encoder": realfolder.TEXT_LAYERS}
        full = realscale.full_bytes(folder, report["component_bytes"], units)
        config = {**realconfig.transformer_config(VARIANT.zero_cond_t), **realfolder.NARROW["transformer"]}
        with torch.device("meta"):
            params = sum(p.numel() for p in QwenImageTransformer2DModel(**config).parameters())
        assert full["transformer"] == pytest.approx(2 * params, rel=0.01)  # headers and config.json: a few kB
        per_layer = realscale.unit_bytes(folder / "text_encoder", realscale.REPEATED["text_encoder"][0])
        assert per_layer > 0 and full["text_encoder"] == report["component_bytes"]["text_encoder"] + 26 * per_layer
        lora_block = realscale.unit_bytes(folder / "lightning", ("transformer_blocks.0.",))
        assert full["lightning"] == report["component_bytes"]["lightning"] + 58 * lora_block
        assert 2 * lora_block < report["component_bytes"]["lightning"] < 2.2 * lora_block  # the file: 2 blocks
        assert full["vae"] == report["component_bytes"]["vae"]


    def test_the_derived_times_follow_the_runs_own_timeline(self) -> None:
        run = {"bytes": 10**9, "raw_read_gb_s": 1.0, "ready_s": 10.0, "imports_s": 6.0,
               "worker_folder_read_1pct_s": 1.0, "worker_folder_read_99pct_s": 3.0}
        same = realscale.times(run, 10**9)
        assert (same["raw_read_s"], same["ready_s"]) == (1.0, 10.0)  # ratio 1: the run itself
        # read during the imports: at 5x the bytes the read (1..3 s) ends at 11 s, then the 4 s after both, x5
        assert realscale.times(run, 5 * 10**9)["ready_s"] == 11.0 + 4.0 * 5
        assert realscale.times(run, 5 * 10**9)["raw_read_s"] == 5.0
        serial = {**run, "imports_s": None, "worker_folder_read_1pct_s": 4.0, "worker_folder_read_99pct_s": 9.0}
        assert realscale.times(serial, 5 * 10**9)["ready_s"] == 4.0 + 5 * 5 + 1.0 * 5  # 4 s before reading
        unread = {**run, "worker_folder_read_99pct_s": None}  # ready before the last bytes were read
        assert realscale.times(unread, 5 * 10**9)["ready_s"] == 6.0 + 4.0 * 5


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_the_measurement_on_a_narrow_folder_through_a_new_worker_process(folders: dict,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """The --json object's contract (bench/coldstart --real-shape prints it as its last line)."""
    folder, report = folders["bf16"]
    result = coldreal.measure(folder, BLOCKS, "bf16", VARIANT.name, free_port(), "request", report, runs=2)
    json.dumps(result)
    assert {"bytes", "raw_read_s", "imports_s", "ready_s", "blocks", "layout"} <= set(result)
    assert result["bytes"] == report["bytes"] and (result["blocks"], result["layout"]) == (BLOCKS, "bf16")
    assert [r["readers"] for r in result["raw_read"]] == list(coldreal.READERS) * coldreal.ROUNDS
    assert all(r["resident_before"] <= COLD for r in result["raw_read"]) and result["resident_before_worker"] <= COLD
    assert result["raw_read_s"] == min(r["seconds"] for r in result["raw_read"])
    assert result["ready_over_raw_read"] == pytest.approx(result["ready_s"] / result["raw_read_s"], abs=0.01)
    if result["imports_s"] is None:  # today's worker logs no timeline; the note says so
        assert "imports_s is null" in result["timeline_note"]
    else:  # the worker's own clock (since its process started) beside the bench's (since just before Popen); the
        # worker's start is known to a clock tick (10 ms) and both are rounded: 6.79 against 6.78 failed once
        worker = result["worker_ready_s"]
        assert 0 < result["imports_s"] <= result["worker_read_s"] <= worker <= result["ready_s"] + 0.03
    assert result["worker_peak_rss_gb"] > 0 and result["worker_exit_code"] is not None  # stopped, not left running
    assert any("model ready" in line for line in result["worker_log"])
    assert result["worker_folder_read_fraction_at_ready"] > 0  # read from storage: the page cache was cold
    runs = result["worker_runs"]
    assert len(runs) == 2 and all(r["resident_before"] <= COLD for r in runs)  # each run from a dropped cache
    assert result["ready_s"] == min(r["ready_s"] for r in runs)  # the median of two: the lower
    assert set(result["worker_folder_cached_gb_most_seen"]) >= {"transformer", "text_encoder", "vae"}
    assert result["at_60_blocks_derived"]["derived"] is True and result["machine"]["date"]
    coldreal.report(result)  # the table without --json
    table = capsys.readouterr().out
    assert "raw read, 4 reader(s), round 2" in table and "DERIVED at 60 blocks" in table and "worker: ready" in table


def test_the_cli_offers_the_real_shape_mode() -> None:
    import subprocess

    out = subprocess.run([sys.executable, str(BENCH / "coldstart"), "--help"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0
    assert all(flag in out.stdout for flag in ("--real-shape", "--blocks", "--layout", "--dir", "--json", "--variant"))


class TestReaderSweep:
    """bench/coldstart --real-shape --readers: the worker at each READAHEAD_READERS count, interleaved."""

    def test_counts_are_parsed_or_refused_with_what_is_allowed(self) -> None:
        assert coldreaders.parse_counts("1,2,4,8") == [1, 2, 4, 8]
        for bad in ("1,x", "2,2", "0,1", "65", ""):
            with pytest.raises(ValueError, match="--readers: distinct whole numbers from 1 to 64"):
                coldreaders.parse_counts(bad)

    def test_rounds_interleave_the_counts_and_the_ratios_are_to_the_first(self, folders: dict,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
        """The loop and the summary on made-up figures (no process, no timing): 1,2,4,1,2,4 in that order, each
        count's medians over its rounds, gains as first/this and costs as this/first."""
        folder, report = folders["bf16"]
        figures = {1: (10.0, 5.0, 4.0, 8.0), 2: (8.0, 5.5, 2.0, 4.0), 4: (9.0, 7.0, 1.6, 3.2)}  # ready, imports, ...
        calls: list[int] = []

        def one(folder: Path, variant: str, port: int, settings: dict, paths: list, total: int) -> dict:
            count = int(settings["READAHEAD_READERS"])
            calls.append(count)
            ready, imports, ahead, raw = figures[count]
            bump = 1.0 if len(calls) > 3 else 0.0  # the second round is slower: the median sits between
            return {"ready_s": ready + bump, "imports_s": imports + bump, "readahead_s": ahead, "raw_read_s": raw}

        warm = {"ready_s": 6.0, "imports_s": 5.0, "resident_before": 1.0, "log": [
            "   1.00s read-ahead: 1 files, 0.0 GB, 8 readers (auto: 2 CPUs usable (affinity 2, no cgroup CPU quota); "
            "4 a CPU, at most 16), window 2.1 GB", "   1.20s read-ahead: 6.1 GB read in 0.7 s (8.71 GB/s)"]}
        monkeypatch.setattr(coldreaders, "one", one)
        monkeypatch.setattr(coldreal, "start_worker", lambda *args, **kwargs: warm)
        monkeypatch.setattr(coldworker, "package", lambda env: "src/qwen_edit_worker/__init__.py")
        result = coldreaders.measure(folder, BLOCKS, "bf16", VARIANT.name, 0, "request", report, [1, 2, 4], rounds=2)
        assert calls == result["order"] == [1, 2, 4, 1, 2, 4]
        four = result["by_readers"]["4"]
        assert (four["ready_s"], four["ready_s_range"], four["runs"]) == (9.5, [9.0, 10.0], 2)
        assert four["raw_read_speedup_vs_1"] == 2.5 and four["readahead_speedup_vs_1"] == 2.5  # 8/3.2, 4/1.6
        assert four["imports_vs_1"] == round(7.5 / 5.5, 2) and four["ready_vs_1"] == round(9.5 / 10.5, 2)
        assert result["by_readers"]["1"]["ready_vs_1"] == 1.0
        warm_run = result["warm_start"]["runs"][0]
        assert result["warm_start"]["ready_s"] == 6.0 and warm_run["readahead_readers"] == 8
        assert (warm_run["readahead_gb"], warm_run["readahead_s"], warm_run["readahead_done_at_s"]) == (6.1, 0.7, 1.2)
        sixty = result["at_60_blocks_derived"]
        assert sixty["derived"] is True and sixty["raw_read_s_by_readers"]["4"] < sixty["raw_read_s_by_readers"]["1"]

    def test_narrow_folder_through_new_worker_processes(self, folders: dict,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
        """Each worker ran the count it was given (its own log line says so) from a dropped page cache, with this
        checkout's code; the raw read beside it at the same count; the --json object and the table."""
        folder, report = folders["bf16"]  # (int8 tensors loaded in this process above stay mapped: not droppable)
        result = coldreaders.measure(folder, BLOCKS, "bf16", VARIANT.name, free_port(), "request", report, [1, 3],
                                     rounds=1)
        json.dumps(result)
        assert result["order"] == [1, 3] and result["worker_settings"] == {"SAFETY_CHECKER": "request"}
        assert Path(result["worker_package"]).is_relative_to(BENCH.parent / "src")
        for run in result["runs"]:
            assert run["readahead_readers"] == run["readers"]
            assert run["readahead_source"] == f"READAHEAD_READERS={run['readers']}"
            assert run["raw_resident_before"] <= COLD and run["resident_before_worker"] <= COLD
            assert run["loadavg_1min_before_raw"] >= 0 and run["loadavg_1min_before_worker"] >= 0
            assert run["readahead_gb"] is not None and run["ready_s"] > 0 and run["imports_s"] > 0
        warm = result["warm_start"]["runs"][0]
        assert warm["resident_before"] > 1 - COLD and warm["readahead_source"].startswith("auto: ")
        assert result["chosen_here"]["readers"] == warm["readahead_readers"]
        coldreaders.report(result)
        table = capsys.readouterr().out
        assert "ready_/1" in table and "DERIVED at 60 blocks" in table and "the rule here" in table

    def test_the_cli_checks_the_counts_before_any_work(self) -> None:
        import subprocess

        def run(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([sys.executable, str(BENCH / "coldstart"), *args], capture_output=True, text=True,
                                  timeout=60)

        assert all(flag in run("--help").stdout for flag in ("--readers", "--rounds"))
        refused = run("--real-shape", "--readers", "1,two")
        assert refused.returncode == 2 and "--readers: distinct whole numbers" in refused.stderr
        assert "--readers goes with --real-shape" in run("--readers", "1,2").stderr

