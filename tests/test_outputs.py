"""Where outputs go: uploads to a real S3-compatible server on loopback (moto's server mode),
per-request s3Config, `image_url` (the first upload, else its data URI), failures that name the
bucket, the 20 MB response check (counting `image_url`), and logs that never hold pictures,
base64, presigned signatures, tokens or keys."""

from __future__ import annotations

import base64
import io
import logging
import os
import tempfile
from collections.abc import Iterator
from typing import Any

import boto3
import numpy as np
import pytest
import requests
from PIL import Image

from api_server import free_port
from conftest import b64_picture, decode_output_image, small_job, tiny_env
from qwen_edit_worker.serving.logs import quiet_libraries
from qwen_edit_worker.serving.worker import Worker

KEY_ID, SECRET = "AKIATESTKEY0001", "s3cr3t/Very+Secret+Key+0001"


@pytest.fixture(scope="module")
def s3() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    client = boto3.client("s3", endpoint_url=url, aws_access_key_id=KEY_ID, aws_secret_access_key=SECRET,
                          region_name="us-east-1")
    for bucket in ("edits", "per-job"):
        client.create_bucket(Bucket=bucket)
    yield url
    server.stop()


def client(url: str) -> Any:
    return boto3.client("s3", endpoint_url=url, aws_access_key_id=KEY_ID, aws_secret_access_key=SECRET,
                        region_name="us-east-1")


def bucket_env(url: str, **extra: str) -> dict[str, str]:
    settings = {"BUCKET_ENDPOINT_URL": url, "BUCKET_ACCESS_KEY_ID": KEY_ID, "BUCKET_SECRET_ACCESS_KEY": SECRET,
                "BUCKET_NAME": "edits"}
    return tiny_env(**(settings | extra))


def test_upload_gives_urls_and_the_objects_are_the_pictures(s3: str) -> None:
    worker = Worker(bucket_env(s3))
    reference = Worker(tiny_env()).handle(small_job(seed=4, num_images=2))
    out = worker.handle(small_job(seed=4, num_images=2))
    assert "error" not in out, out
    for index, (item, inline) in enumerate(zip(out["images"], reference["images"], strict=True)):
        assert item["type"] == "url" and item["image"].startswith(f"{s3}/edits/test-job/{index}-{4 + index}.png")
        stored = client(s3).get_object(Bucket="edits", Key=f"test-job/{index}-{4 + index}.png")
        assert stored["ContentType"] == "image/png"
        pixels = np.asarray(Image.open(io.BytesIO(stored["Body"].read())).convert("RGB"))
        assert np.array_equal(pixels, decode_output_image(inline))  # the same picture as the base64 path
        fetched = requests.get(item["image"], timeout=10)  # the presigned URL works
        assert fetched.status_code == 200 and fetched.content[:8] == b"\x89PNG\r\n\x1a\n"


def test_image_url_is_the_first_upload(s3: str) -> None:
    """RunPod's public endpoints answer `image_url`: with a bucket, the first picture's presigned URL."""
    out = Worker(bucket_env(s3)).handle(small_job(seed=4, num_images=2, output_format="jpeg"))
    assert out["image_url"] == out["images"][0]["image"] and out["images"][0]["type"] == "url"
    fetched = requests.get(out["image_url"], timeout=10)
    assert fetched.status_code == 200 and fetched.content[:3] == b"\xff\xd8\xff"  # the JPEG itself


def test_image_url_without_a_bucket_is_the_first_pictures_data_uri() -> None:
    for fmt in ("png", "jpeg", "webp"):
        out = Worker(tiny_env()).handle(small_job(num_images=2, output_format=fmt))
        first = out["images"][0]
        assert out["image_url"] == f"data:image/{fmt};base64,{first['image']}"
        assert Image.open(io.BytesIO(base64.b64decode(out["image_url"].split(",", 1)[1]))).format.lower() == fmt


def test_response_limit_counts_image_url() -> None:
    """image_url repeats the first picture's base64 (without a bucket): the size check counts it."""
    alone = Worker(tiny_env()).handle(small_job())
    base64_chars = len(alone["images"][0]["image"])
    assert len(alone["image_url"]) > base64_chars
    just_the_images = str(base64_chars + 4096 + 100)  # fitted the response before image_url
    assert Worker(tiny_env(MAX_RESPONSE_BYTES=just_the_images)).handle(small_job())["error"].startswith(
        "output: the response would be ")
    with_image_url = str(base64_chars + len(alone["image_url"]) + 4096)
    assert "error" not in Worker(tiny_env(MAX_RESPONSE_BYTES=with_image_url)).handle(small_job())


def test_per_job_s3_config(s3: str) -> None:
    job = small_job(output_format="webp") | {"s3Config": {"accessId": KEY_ID, "accessSecret": SECRET,
                                                            "bucketName": "per-job", "endpointUrl": s3}}
    out = Worker(tiny_env()).handle(job)
    assert out["images"][0]["type"] == "url" and "/per-job/test-job/0-7.webp" in out["images"][0]["image"]
    assert client(s3).get_object(Bucket="per-job", Key="test-job/0-7.webp")["ContentType"] == "image/webp"


@pytest.mark.parametrize(("config", "message"), [
    ("yes", "s3Config: must be an object"),
    ({"accessId": KEY_ID, "bucketName": "b", "endpointUrl": "http://x"}, "s3Config: missing or empty: accessSecret"),
    ({"accessId": "a", "accessSecret": "b", "endpointUrl": "ftp://x"}, "s3Config.endpointUrl: must be an http(s)"),
])
def test_bad_s3_config(config: Any, message: str) -> None:
    assert Worker(tiny_env()).handle(small_job() | {"s3Config": config})["error"].startswith(message)


def test_upload_failure_fails_the_job_and_names_the_bucket(s3: str, caplog: pytest.LogCaptureFixture) -> None:
    worker = Worker(bucket_env(s3, BUCKET_NAME="no-such-bucket"))
    with caplog.at_level(logging.DEBUG):
        out = worker.handle(small_job())
    assert out == {"error": "bucket 'no-such-bucket' at 127.0.0.1: upload failed (NoSuchBucket)"}
    assert SECRET not in caplog.text
    dead = Worker(bucket_env(f"http://127.0.0.1:{free_port()}"))
    assert dead.handle(small_job())["error"].startswith("bucket 'edits' at 127.0.0.1: upload failed (")


def test_partial_bucket_settings_are_a_settings_error() -> None:
    out = Worker(tiny_env(BUCKET_ENDPOINT_URL="http://127.0.0.1:9")).handle(small_job())
    assert out["error"].startswith("BUCKET_ENDPOINT_URL: BUCKET_ENDPOINT_URL, BUCKET_ACCESS_KEY_ID and")


def test_response_over_the_limit_says_what_to_change() -> None:
    worker = Worker(tiny_env(MAX_RESPONSE_BYTES="30000"))
    error = worker.handle(small_job(num_images=4, width=128, height=128))["error"]
    assert error.startswith("output: the response would be ") and "over the 0.03 MB limit" in error
    for advice in ("jpeg or webp", "fewer num_images", "megapixels", "BUCKET_ENDPOINT_URL"):
        assert advice in error
    assert "error" not in worker.handle(small_job())  # a small one still fits


def test_no_temporary_files_and_no_secrets_in_logs(s3: str, caplog: pytest.LogCaptureFixture,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    token = "hf_TOKENshouldNeverAppear0123456789"
    monkeypatch.setenv("HF_TOKEN", token)
    monkeypatch.setenv("RUNPOD_API_KEY", "rpa_KEYshouldNeverAppear")
    quiet_libraries()  # what the worker's logging set-up does, whatever LOG_LEVEL says
    before = set(os.listdir(tempfile.gettempdir()))
    job = small_job(image="data:image/png;base64," + b64_picture(80, 72, seed=3))
    worker = Worker(bucket_env(s3))
    worker.start()
    with caplog.at_level(logging.DEBUG):
        out = worker.handle(job)
    assert "error" not in out
    url = out["images"][0]["image"]
    signature = url.split("Signature=")[1].split("&")[0] if "Signature=" in url else url.split("?")[1]
    text = caplog.text
    for secret in (token, "rpa_KEYshouldNeverAppear", SECRET, signature, url, job["input"]["image"][40:120]):
        assert secret not in text
    assert "job test-job done" in text
    assert set(os.listdir(tempfile.gettempdir())) <= before | {"qwen-edit-worker-tiny"}
