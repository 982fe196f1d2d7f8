"""builder/bake.py's downloads overlapping the streamed preparation, for real (the loopback hub, huggingface_hub),
and every way it can fail: each ends with bake.py's exit code, a message, no traceback and nothing left in the
destination.  The overlap itself (builder/fetch.py) with a fake download: the order the shards are prepared in,
how many are on disk at once, and that a failure waits for the downloads in flight before it is reported."""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from hub_server import Hub
from test_bake import ROOT, VARIANT, bake, lora_bytes, no_leftovers, repos, tiny_repo  # noqa: F401 (fixtures)
from test_stream import stored

sys.path.insert(0, str(ROOT / "builder"))
import fetch  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
import prepare_before  # noqa: E402

PREPARED = ("--fuse-lightning", "--precision", "int8", "--text-encoder-precision", "int8")


def shards_of(files: dict[str, bytes], component: str) -> list[str]:
    return sorted(p for p in files if p.startswith(f"{component}/") and p.endswith(".safetensors"))


def used_shards(files: dict[str, bytes], component: str) -> list[str]:
    """The shards the component's index names (the repo also holds one it does not: test_bake's JUNK)."""
    index = f"{component}/{'diffusion_pytorch_model' if component == 'transformer' else 'model'}.safetensors.index.json"
    if index not in files:
        return shards_of(files, component)
    return sorted({f"{component}/{name}" for name in json.loads(files[index])["weight_map"].values()})


def fetched(hub: Hub, component: str) -> list[str]:
    return [r for r in hub.requests if r.startswith("GET ") and f"/{component}/" in r and r.endswith(".safetensors")]


class TestStreamedBake:
    def test_it_stores_what_the_whole_model_bake_stored(self, tmp_path: Path, tiny_repo: dict[str, bytes],  # noqa: F811
                                                         lora_bytes: bytes) -> None:  # noqa: F811
        with Hub(repos(tiny_repo, lora_bytes)) as hub:
            plain = bake(hub, tmp_path / "plain", "--variant", VARIANT.name)
            streamed = bake(hub, tmp_path / "streamed", "--variant", VARIANT.name, *PREPARED)
        assert plain.returncode == 0 and streamed.returncode == 0, streamed.stderr
        before = tmp_path / "plain" / VARIANT.name
        block = prepare_before.prepare(before, before / "lightning" / VARIANT.lora_basename,
                                       f"{VARIANT.lora_repo}@fedcba9876543210fedcba9876543210fedcba98", "int8", "int8")
        after = tmp_path / "streamed" / VARIANT.name
        manifest = json.loads((after / "manifest.json").read_text())
        assert {**manifest["prepared"], "seconds": 0} == {**block, "seconds": 0}
        for component in ("transformer", "text_encoder"):
            (new, new_metadata), (old, [old_metadata]) = stored(after / component), stored(before / component)
            assert new == old and all(m == old_metadata for m in new_metadata), component
        shards = sum(len(used_shards(tiny_repo, c)) for c in ("transformer", "text_encoder"))
        assert shards > 2 and streamed.stderr.count(") prepared in ") == shards  # a line as each is prepared
        on_disk = sorted(p.relative_to(after).as_posix() for p in after.rglob("*") if p.is_file())
        assert on_disk == sorted([f["path"] for f in manifest["files"]] + ["manifest.json"])
        assert not (after / "lightning").exists()  # fused: the LoRA file is not kept


class TestFailures:
    def test_a_shard_cut_off_mid_download(self, tmp_path: Path, tiny_repo: dict[str, bytes],  # noqa: F811
                                          lora_bytes: bytes) -> None:  # noqa: F811
        cut = used_shards(tiny_repo, "transformer")[-1]
        with Hub(repos(tiny_repo, lora_bytes, break_off={cut})) as hub:
            out = bake(hub, tmp_path / "models", "--variant", VARIANT.name, *PREPARED)
        assert out.returncode == 5 and f"download of {VARIANT.repo}/{cut} failed or was interrupted" in out.stderr
        assert "Traceback" not in out.stderr and no_leftovers(tmp_path / "models")

    def test_a_damaged_shard_is_refused_before_it_is_prepared(self, tmp_path: Path, tiny_repo: dict[str, bytes],  # noqa: F811
                                                              lora_bytes: bytes) -> None:  # noqa: F811
        damaged = dict(tiny_repo)
        name = used_shards(tiny_repo, "text_encoder")[0]
        damaged[name] = damaged[name][:-64]  # served whole, but shorter than its own header says
        with Hub(repos(damaged, lora_bytes)) as hub:
            out = bake(hub, tmp_path / "models", "--variant", VARIANT.name, *PREPARED)
        assert out.returncode == 6 and f"{name}: size" in out.stderr and "truncated or damaged" in out.stderr
        assert "Traceback" not in out.stderr and no_leftovers(tmp_path / "models")

    def test_a_lora_matching_no_layer_ends_before_any_shard_is_downloaded(
            self, tmp_path: Path, tiny_repo: dict[str, bytes]) -> None:  # noqa: F811
        """Keys in the Lightning form (verify.py passes them) for a module the transformer does not have."""
        lora = tmp_path / "stranger.safetensors"
        save_file({"transformer_blocks.0.attn.to_nothing.lora_down.weight": torch.zeros(4, 16, dtype=torch.bfloat16),
                   "transformer_blocks.0.attn.to_nothing.lora_up.weight": torch.zeros(16, 4, dtype=torch.bfloat16),
                   "transformer_blocks.0.attn.to_nothing.alpha": torch.tensor(4.0)}, str(lora))
        with Hub(repos(tiny_repo, lora.read_bytes())) as hub:
            out = bake(hub, tmp_path / "models", "--variant", VARIANT.name, *PREPARED)
            assert fetched(hub, "transformer") == [] and fetched(hub, "text_encoder") == []
        assert out.returncode == 7 and "--fuse-lightning: " in out.stderr and "matched no layer" in out.stderr
        assert "Traceback" not in out.stderr and no_leftovers(tmp_path / "models")

    def test_the_disk_filling_up_while_a_shard_is_written(self, tmp_path: Path, tiny_repo: dict[str, bytes],  # noqa: F811
                                                          lora_bytes: bytes) -> None:  # noqa: F811
        """The disk is made to fill when the preparation writes its first output bytes (os.pwrite is what
        weights/shards.py writes with; downloads write otherwise): the error a full disk gives, ENOSPC."""
        full = ("import errno, os, runpy, sys\n"
                "def full(*args):\n    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))\n"
                "os.pwrite = full\nsys.argv = sys.argv[1:]\nsys.path.insert(0, os.path.dirname(sys.argv[0]))\n"
                "runpy.run_path(sys.argv[0], run_name='__main__')\n")
        with Hub(repos(tiny_repo, lora_bytes)) as hub:
            out = bake(hub, tmp_path / "models", "--variant", VARIANT.name, *PREPARED, python=("-c", full))
        assert out.returncode == 4, out.stderr[-2000:]
        assert "the disk filled up while preparing transformer/" in out.stderr
        assert "give the build more disk" in out.stderr
        assert "Traceback" not in out.stderr and no_leftovers(tmp_path / "models")

    def test_too_little_disk_for_the_folder_and_the_shards_in_flight(
            self, tmp_path: Path, tiny_repo: dict[str, bytes], lora_bytes: bytes) -> None:  # noqa: F811
        huge = used_shards(tiny_repo, "transformer")[0]
        with Hub(repos(tiny_repo, lora_bytes, claimed_size={huge: 10**15})) as hub:
            out = bake(hub, tmp_path / "models", "--variant", VARIANT.name, *PREPARED)
            assert fetched(hub, "transformer") == []
        assert out.returncode == 4 and "the bake needs" in out.stderr and "at its largest" in out.stderr
        assert "Traceback" not in out.stderr and no_leftovers(tmp_path / "models")


class TestOverlap:
    """builder/fetch.py's download_and_prepare with a fake download (a short sleep) and a fake preparation."""

    def run(self, streamed: list[str], plain: list[str], ahead: int, fail: str | None = None,
            fail_download: str | None = None) -> dict[str, object]:
        lock, state = threading.Lock(), {"on_disk": set(), "most": 0, "running": 0, "prepared": [], "started": []}

        def download(path: str) -> Path:
            with lock:
                state["running"] += 1  # type: ignore[operator]
                state["started"].append(path)  # type: ignore[union-attr]
                if path in streamed:
                    state["on_disk"].add(path)  # type: ignore[union-attr]
                    state["most"] = max(state["most"], len(state["on_disk"]))  # type: ignore[arg-type,call-overload]
            time.sleep(0.02)
            with lock:
                state["running"] -= 1  # type: ignore[operator]
            if path == fail_download:
                raise RuntimeError(f"download of {path} cut")
            return Path(path)

        def prepare(path: str, local: Path) -> None:
            if path == fail:
                raise RuntimeError(f"{path} failed")
            state["prepared"].append(path)  # type: ignore[union-attr]
            with lock:
                state["on_disk"].discard(path)  # type: ignore[union-attr]

        try:
            fetch.download_and_prepare(download, plain, streamed, prepare, ahead=ahead, workers=4)
        except RuntimeError as err:
            state["error"] = str(err)
        return state

    @pytest.mark.parametrize("ahead", [0, 1, 2])
    def test_shards_prepared_in_order_with_at_most_ahead_plus_one_on_disk(self, ahead: int) -> None:
        streamed, plain = [f"s{i}" for i in range(7)], [f"p{i}" for i in range(5)]
        state = self.run(streamed, plain, ahead)
        assert state["prepared"] == streamed and sorted(state["started"]) == sorted(streamed + plain)
        assert state["most"] == ahead + 1  # the one being prepared and `ahead` more: never the whole component

    def test_a_failed_preparation_cancels_the_rest_and_waits_for_downloads_in_flight(self) -> None:
        streamed = [f"s{i}" for i in range(8)]
        state = self.run(streamed, [f"p{i}" for i in range(8)], 2, fail="s2")
        assert state["error"] == "s2 failed" and state["prepared"] == ["s0", "s1"]
        assert state["running"] == 0  # nothing still writing when the error reaches bake.py (which removes staging)
        assert "s6" not in state["started"] and "s7" not in state["started"]

    def test_a_failed_download_ends_it_before_that_shard_is_prepared(self) -> None:
        state = self.run(["s0", "s1", "s2"], [], 1, fail_download="s1")
        assert state["error"] == "download of s1 cut" and state["prepared"] == ["s0"] and state["running"] == 0

    def test_ahead_must_not_be_negative(self) -> None:
        with pytest.raises(ValueError, match="ahead must be 0 or more, not -1"):
            fetch.download_and_prepare(Path, [], ["a"], lambda p, q: None, ahead=-1)

