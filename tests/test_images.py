"""Reading input pictures (base64, data URI, http URL) and encoding outputs, with real codecs."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator

import numpy as np
import pytest
from PIL import Image

from conftest import encode_picture, picture
from qwen_edit_worker.errors import RequestError
from qwen_edit_worker.pictures import images_out
from qwen_edit_worker.pictures.images_in import InputLimits, decode_image, load_image
from routes_server import Routes, serve_routes

LIMITS = InputLimits(max_bytes=2_000_000, max_pixels=4_000_000)
LOOPBACK = InputLimits(max_bytes=2_000_000, max_pixels=4_000_000, allow_loopback_urls=True)  # a test aid
FIELD = "input.image"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def load(source: str, limits: InputLimits = LIMITS) -> Image.Image:
    return load_image(source, FIELD, limits)


def rejects(source: str, fragment: str, limits: InputLimits = LIMITS) -> None:
    with pytest.raises(RequestError) as caught:
        load(source, limits)
    assert caught.value.subject == FIELD and fragment in caught.value.message


class TestSources:
    def test_raw_base64_and_data_uri_give_the_same_pixels(self) -> None:
        data = encode_picture(picture(80, 48))
        raw, uri = load(b64(data)), load("data:image/png;base64," + b64(data))
        assert raw.size == (80, 48) and raw.mode == "RGB"
        assert np.array_equal(np.asarray(raw), np.asarray(uri))
        assert np.array_equal(np.asarray(raw), np.asarray(picture(80, 48)))

    def test_base64_with_newlines_and_no_padding(self) -> None:
        text = b64(encode_picture(picture(40, 40))).rstrip("=")
        assert load("\n".join(text[i:i + 76] for i in range(0, len(text), 76))).size == (40, 40)

    @pytest.mark.parametrize(("source", "fragment"), [
        ("file:///etc/passwd", "scheme 'file' is not allowed"),
        ("ftp://example.com/a.png", "scheme 'ftp' is not allowed"),
        ("/etc/passwd", "not a picture"),  # a path is never read: it is only (bad) base64
        ("not base64 at all!", "not valid base64"),
        ("data:image/png,rawbytes", "must be base64 encoded"),
        ("data:;;;", "malformed data URI"),
        (b64(b"hello world, not a picture"), "not a picture"),
    ])
    def test_rejected_sources(self, source: str, fragment: str) -> None:
        rejects(source, fragment)

    def test_byte_cap_before_decoding(self) -> None:
        rejects(b64(encode_picture(picture(300, 300))), "MAX_INPUT_BYTES", InputLimits(10_000, 4_000_000))


class TestDecoding:
    def test_pixel_cap_checked_before_full_decode(self) -> None:
        rejects(b64(encode_picture(Image.new("RGB", (3000, 2000)))), "MAX_INPUT_PIXELS")

    def test_minimum_side(self) -> None:
        rejects(b64(encode_picture(picture(31, 64))), "at least 32 pixels")

    def test_truncated_file(self) -> None:
        data = encode_picture(picture(200, 200), "JPEG")
        rejects(b64(data[: len(data) // 2]), "damaged or truncated")

    def test_exif_orientation_applied(self) -> None:
        exif = Image.Exif()
        exif[0x0112] = 6  # rotate 90 degrees clockwise to display
        assert load(b64(encode_picture(picture(80, 40), "JPEG", exif=exif))).size == (40, 80)

    def test_alpha_goes_over_white(self) -> None:
        rgba = Image.new("RGBA", (40, 40), (255, 0, 0, 0))
        rgba.paste((0, 0, 255, 255), (0, 0, 20, 40))
        pixels = np.asarray(load(b64(encode_picture(rgba))))
        assert tuple(pixels[0, 0]) == (0, 0, 255) and tuple(pixels[0, 39]) == (255, 255, 255)

    def test_palette_with_transparency(self) -> None:
        pal = Image.new("P", (40, 40), 0)
        pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
        pal.paste(1, (0, 0, 20, 40))
        pal.info["transparency"] = 0
        pixels = np.asarray(load(b64(encode_picture(pal, transparency=0))))
        assert tuple(pixels[0, 0]) == (255, 0, 0) and tuple(pixels[0, 39]) == (255, 255, 255)

    @pytest.mark.parametrize("mode", ["L", "CMYK", "I;16", "LA"])
    def test_modes_become_rgb(self, mode: str) -> None:
        img = picture(48, 48).convert(mode) if mode != "I;16" else Image.new("I;16", (48, 48), 65535)
        fmt = "JPEG" if mode == "CMYK" else "PNG"
        out = load(b64(encode_picture(img, fmt)))
        assert out.mode == "RGB" and out.size == (48, 48)
        if mode == "I;16":
            assert tuple(np.asarray(out)[0, 0]) == (255, 255, 255)  # 16-bit white stays white

    def test_animation_takes_first_frame(self) -> None:
        frames = [Image.new("RGB", (40, 40), color) for color in ((255, 0, 0), (0, 255, 0))]
        buffer = io.BytesIO()
        frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:])
        assert tuple(np.asarray(load(b64(buffer.getvalue())))[5, 5]) == (255, 0, 0)

    def test_large_jpeg_decodes_at_reduced_scale_but_not_below_the_working_area(self) -> None:
        data = encode_picture(picture(2400, 1600), "JPEG")
        full = decode_image(data, FIELD, 10**8)
        reduced = decode_image(data, FIELD, 10**8, target_area=256 * 256)
        assert full.size == (2400, 1600)
        assert reduced.size == (600, 400)  # 1/4 scale: 1/8 (300x200) would be under 256*256 pixels
        assert decode_image(data, FIELD, 10**8, target_area=1200 * 800).size == (2400, 1600)  # not 4x larger
        assert decode_image(encode_picture(picture(2400, 1600)), FIELD, 10**8, 256 * 256).size == (2400, 1600)

    @pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "BMP", "TIFF"])
    def test_formats(self, fmt: str) -> None:
        assert decode_image(encode_picture(picture(64, 40), fmt), FIELD, 10**6).size == (64, 40)


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with serve_routes() as base:
        yield base


class TestUrls:
    def test_fetch(self, server: str) -> None:
        Routes.table["/a.png"] = (200, {}, encode_picture(picture(50, 60)))
        assert np.array_equal(np.asarray(load(f"{server}/a.png", LOOPBACK)), np.asarray(picture(50, 60)))

    def test_loopback_refused_by_default(self, server: str) -> None:
        rejects(f"{server}/a.png", "127.0.0.1: resolves to a loopback address")

    def test_http_error_names_host(self, server: str) -> None:
        rejects(f"{server}/nothing.png", "failed: 127.0.0.1: HTTP 404", LOOPBACK)

    def test_size_cap_from_content_length(self, server: str) -> None:
        Routes.table["/big.bin"] = (200, {}, b"\0" * 300_000)
        rejects(f"{server}/big.bin", "300,000 bytes, over the 100,000-byte limit", InputLimits(100_000, 10**6, True))

    def test_unreachable_host(self) -> None:
        rejects("http://127.0.0.1:9/a.png", "127.0.0.1: connection failed", LOOPBACK)


class TestOutputs:
    @pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
    def test_round_trip(self, fmt: str) -> None:
        source = picture(96, 64)
        encoded = images_out.encode(np.asarray(source), fmt, 95)
        back = Image.open(io.BytesIO(encoded.data))
        assert back.format == fmt.upper() and back.size == (96, 64) == (encoded.width, encoded.height)
        assert base64.b64decode(encoded.base64()) == encoded.data
        if fmt == "png":
            assert np.array_equal(np.asarray(back.convert("RGB")), np.asarray(source))  # lossless

    def test_quality_changes_lossy_size(self) -> None:
        source = np.asarray(picture(128, 128))
        for fmt in ("jpeg", "webp"):
            assert len(images_out.encode(source, fmt, 20).data) < len(images_out.encode(source, fmt, 95).data)

    @pytest.mark.parametrize("shape", [(1, 1), (2, 3), (37, 64), (300, 17)])
    def test_own_png_writer_is_lossless_and_standard(self, shape: tuple[int, int]) -> None:
        pixels = (np.random.default_rng(sum(shape)).random((*shape, 3)) * 255).astype(np.uint8)
        data = images_out.png_bytes(pixels)
        decoded = Image.open(io.BytesIO(data))
        decoded.load()  # Pillow checks every chunk's CRC and the zlib stream
        assert decoded.format == "PNG" and decoded.mode == "RGB"
        assert np.array_equal(np.asarray(decoded), pixels)

    def test_png_backend(self) -> None:
        assert images_out.DEFLATE_NAME == "isal"  # the fast path is installed (builder/requirements.txt)
