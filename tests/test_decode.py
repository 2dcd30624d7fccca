"""The input pipeline's image decoder: the same pixels as PIL (what TFDS decodes with), for
every kind of image the prepared data and the TFDS sources hold, whichever decoder runs."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from bnfree_jax.data import decode
from data_fixtures import jpeg_bytes, tiny_images


def _pil(raw: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))


def test_the_fastest_installed_decoder_is_used():
    pytest.importorskip("simplejpeg")  # requirements.txt pins it; PIL is the fallback
    assert decode.decoder_name() == "simplejpeg"


@pytest.mark.parametrize("quality", [75, 95])
def test_jpeg_pixels_equal_pil(quality):
    for img in tiny_images(6, seed=quality):
        raw = jpeg_bytes(img, quality)
        out = decode.decode_image(raw)
        assert out.dtype == np.uint8 and out.shape == img.shape
        np.testing.assert_array_equal(out, _pil(raw))


def test_cmyk_png_and_grayscale_go_through_pil():
    img = tiny_images(1, seed=3)[0]
    buf = io.BytesIO()
    Image.fromarray(img).convert("CMYK").save(buf, format="JPEG", quality=95)
    cmyk = buf.getvalue()
    np.testing.assert_array_equal(decode.decode_image(cmyk), _pil(cmyk))  # not an error
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    np.testing.assert_array_equal(decode.decode_image(buf.getvalue()), img)  # lossless
    for fmt in ("PNG", "JPEG"):  # grayscale: three equal channels, as PIL's RGB conversion
        buf = io.BytesIO()
        Image.fromarray(img[..., 0]).save(buf, format=fmt)
        gray = decode.decode_image(buf.getvalue())
        assert gray.shape == img.shape
        np.testing.assert_array_equal(gray, _pil(buf.getvalue()))


def test_pil_fallback_when_simplejpeg_is_missing(monkeypatch):
    monkeypatch.setattr(decode, "_simplejpeg", lambda: None)
    assert decode.decoder_name() == "pil"
    raw = jpeg_bytes(tiny_images(1, seed=5)[0])
    np.testing.assert_array_equal(decode.decode_image(raw), _pil(raw))
