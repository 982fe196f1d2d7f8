"""Fetching request LoRAs, without a model: URLs through the SSRF guard (loopback server), Hugging
Face files through huggingface_hub (the loopback hub, HF_HUB_OFFLINE on), LORA_DIR names; the cache
by content; one download for concurrent askers; every bad case a clean error that caches nothing."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from hub_server import Hub, Repo
from lora_files import FileServer, Route, lora_bytes
from qwen_edit_worker.errors import RequestError
from qwen_edit_worker.loras.cache import LoraCache
from qwen_edit_worker.loras.fetch import LoraFetcher
from qwen_edit_worker.loras.request import parse_loras


def fetcher(tmp_path: Path, *, max_bytes: int = 10_000_000, loopback: bool = True, endpoint: str = "http://x",
            token: str = "", cache_bytes: int = 10**9, lora_dir: Path | None = None, timeout_s: float = 30
            ) -> LoraFetcher:
    return LoraFetcher(LoraCache(tmp_path / "cache", cache_bytes), max_bytes=max_bytes, lora_dir=lora_dir,
                       allow_loopback=loopback, hf_endpoint=endpoint, hf_token=token, timeout_s=timeout_s)


def items(*paths: str) -> tuple:
    return parse_loras([{"path": p} for p in paths], 8)


def failure(f: LoraFetcher, path: str) -> str:
    with pytest.raises(RequestError) as caught:
        f.fetch_all(items(path))
    return str(caught.value)


def nothing_cached(f: LoraFetcher) -> bool:
    return f.cache.total_bytes() == 0 and not any(f.cache.partial.iterdir()) and not any(f.cache.blobs.iterdir())


class TestUrl:
    def test_downloaded_once_then_cached_by_content(self, tmp_path: Path) -> None:
        with FileServer({"/a.safetensors": Route(lora_bytes(1)), "/b": Route(lora_bytes(1))}) as server:
            f = fetcher(tmp_path)
            (first,) = f.fetch_all(items(f"{server.url}/a.safetensors?sig=1"))
            (second,) = f.fetch_all(items(f"{server.url}/a.safetensors?sig=1"))
            (other_url,) = f.fetch_all(items(f"{server.url}/b"))
        assert (first.cached, second.cached, other_url.cached) == (False, True, False)
        assert first.sha256 == second.sha256 == other_url.sha256 and first.declared_layers == 28
        assert server.hits["/a.safetensors"] == 1 and f.downloads == 2
        assert len(list(f.cache.blobs.iterdir())) == 1  # one file for two URLs of the same content
        assert first.report()["path"] == f"{server.url}/a.safetensors"  # no query string

    def test_two_jobs_asking_for_one_new_url_at_once_download_it_once(self, tmp_path: Path) -> None:
        with FileServer({"/slow.safetensors": Route(lora_bytes(2), delay_s=0.5)}) as server:
            f = fetcher(tmp_path)
            results: list[object] = []
            threads = [threading.Thread(target=lambda: results.append(f.fetch_all(items(
                f"{server.url}/slow.safetensors"))[0])) for _ in range(2)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(10)
        assert len(results) == 2 and server.hits["/slow.safetensors"] == 1 and f.downloads == 1
        assert len({r.sha256 for r in results}) == 1  # type: ignore[attr-defined]

    def test_a_redirect_to_a_refused_address_is_refused(self, tmp_path: Path) -> None:
        with FileServer({"/r": Route(status=302, location="http://169.254.169.254/latest.safetensors")}) as server:
            message = failure(fetcher(tmp_path), f"{server.url}/r")
        assert message.startswith("input.loras[0].path: cannot fetch the LoRA: ") and "link-local" in message

    def test_loopback_needs_allow_loopback_urls(self, tmp_path: Path) -> None:
        with FileServer({"/a": Route(lora_bytes(1))}) as server:
            f = fetcher(tmp_path, loopback=False)
            assert "loopback" in failure(f, f"{server.url}/a")
        assert server.hits["/a"] == 0  # refused before connecting

    @pytest.mark.parametrize(("route", "words"), [
        (Route(b"missing", 404), "HTTP 404"),
        (Route(lora_bytes(1), break_off=True), "broke off"),
        (Route(b"\x80\x04" + b"pickled" * 10), "never loads"),
        (Route(lora_bytes(1)[:-100]), "cut off"),
        (Route(b'{"json": "not a lora"}' * 3), "not a safetensors file"),
        (Route(lora_bytes(1), delay_s=3), "Timeout"),
    ])
    def test_bad_downloads_are_clean_errors_and_cache_nothing(self, tmp_path: Path, route: Route, words: str) -> None:
        with FileServer({"/x.safetensors": route}) as server:
            f = fetcher(tmp_path, timeout_s=1)
            message = failure(f, f"{server.url}/x.safetensors?token=SECRET")
        assert message.startswith("input.loras[0].path: ") and words in message and "SECRET" not in message
        assert nothing_cached(f)

    def test_the_byte_cap_stops_the_download(self, tmp_path: Path) -> None:
        body = lora_bytes(1, rank=8)
        with FileServer({"/big": Route(body)}) as server:
            f = fetcher(tmp_path, max_bytes=len(body) // 4)
            message = failure(f, f"{server.url}/big")
        assert "LORA_MAX_BYTES" in message and nothing_cached(f)

    def test_the_cache_stays_under_its_limit(self, tmp_path: Path) -> None:
        size = len(lora_bytes(0))
        routes = {f"/{n}": Route(lora_bytes(n)) for n in range(5)}
        with FileServer(routes) as server:
            f = fetcher(tmp_path, cache_bytes=int(size * 2.5))
            for n in range(5):
                for done in f.fetch_all(items(f"{server.url}/{n}")):
                    done.release()
                assert f.cache.total_bytes() <= size * 2.5
        on_disk = sum(p.stat().st_size for p in f.cache.blobs.iterdir())
        assert on_disk == f.cache.total_bytes() == 2 * size
        assert f.fetch_all(items(f"{server.url}/4"))[0].cached  # the most recent stayed


class TestHuggingFace:
    def test_repo_file_and_only_file_with_offline_mode_on_and_restored(self, tmp_path: Path) -> None:
        from huggingface_hub import constants

        repos = {"org/one": Repo({"style.safetensors": lora_bytes(3), "README.md": b"hi"}),
                 "org/two": Repo({"a.safetensors": lora_bytes(4), "b/c.safetensors": lora_bytes(5)})}
        saved, constants.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE, True  # what the image sets for the base model
        try:
            with Hub(repos) as hub:
                f = fetcher(tmp_path, endpoint=hub.url, loopback=False)  # the hub is the operator's: not guarded
                (only,) = f.fetch_all(items("org/one"))
                (named,) = f.fetch_all(items(f"org/two@{repos['org/two'].commit}/b/c.safetensors"))
                (again,) = f.fetch_all(items("org/one"))
                several = failure(f, "org/two")
                missing = failure(f, "org/two/nope.safetensors")
                no_repo = failure(f, "org/none")
            assert constants.HF_HUB_OFFLINE is True
        finally:
            constants.HF_HUB_OFFLINE = saved
        assert only.report()["source"] == "huggingface" and only.declared_layers == 28 and again.cached
        assert named.sha256 != only.sha256 and not named.cached
        assert "holds 2 .safetensors files (a.safetensors, b/c.safetensors)" in several
        assert missing.startswith("input.loras[0].path: ") and "nope.safetensors" in missing
        assert "no such repo" in no_repo

    def test_a_gated_repo_needs_the_endpoints_token(self, tmp_path: Path) -> None:
        repos = {"org/gated": Repo({"g.safetensors": lora_bytes(6)}, token="hf_secret_token")}
        with Hub(repos) as hub:
            without = failure(fetcher(tmp_path / "a", endpoint=hub.url), "org/gated")
            wrong = failure(fetcher(tmp_path / "b", endpoint=hub.url, token="hf_wrong"), "org/gated")
            allowed = fetcher(tmp_path / "c", endpoint=hub.url, token="hf_secret_token")
            (fetched,) = allowed.fetch_all(items("org/gated"))
        assert "HF_TOKEN" in without and "HF_TOKEN" in wrong and "hf_" not in without + wrong
        assert fetched.declared_layers == 28

    def test_too_large_by_the_listing_is_refused_before_downloading(self, tmp_path: Path) -> None:
        repos = {"org/big": Repo({"big.safetensors": lora_bytes(7)})}
        with Hub(repos) as hub:
            f = fetcher(tmp_path, endpoint=hub.url, max_bytes=1000)
            message = failure(f, "org/big")
        assert "LORA_MAX_BYTES" in message and not any("resolve" in r for r in hub.requests)
        assert nothing_cached(f)


class TestLocal:
    def test_names_in_lora_dir_and_names_that_escape_it(self, tmp_path: Path) -> None:
        folder = tmp_path / "loras"
        folder.mkdir()
        (folder / "style.safetensors").write_bytes(lora_bytes(8))
        (tmp_path / "outside.safetensors").write_bytes(lora_bytes(9))
        os.symlink(tmp_path / "outside.safetensors", folder / "link.safetensors")
        f = fetcher(tmp_path, lora_dir=folder)
        (one,) = f.fetch_all(items("style"))
        (two,) = f.fetch_all(items("style.safetensors"))
        assert one.sha256 == two.sha256 and one.cached and one.report()["source"] == "local"
        assert "outside LORA_DIR" in failure(f, "link")
        assert "it has: link.safetensors, style.safetensors" in failure(f, "nope")
        assert "needs LORA_DIR" in failure(fetcher(tmp_path), "style")
        assert f.downloads == 0
