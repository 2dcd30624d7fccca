"""Image decoding for the input pipeline: the fastest decoder that is installed.

Decoding JPEGs is most of a host's input work on ImageNet.  Measured here on a 256×341
q95 JPEG (the size `bnfree prepare --resize 256` stores), one core, other jobs on the
machine: PIL 952 images/s, simplejpeg 1236, OpenCV 900, all three giving the same
pixels (libjpeg-turbo, accurate DCT and upsampling).  So simplejpeg when it is installed
(requirements.txt pins it), PIL otherwise and for anything but a YCbCr or grayscale
JPEG (simplejpeg decodes a CMYK JPEG without PIL's Adobe inversion: other colours).
The encoded datasets' image features are RGB, so every image comes out uint8 HW3.
"""

from __future__ import annotations

import io

import numpy as np

_JPEG_MAGIC = b"\xff\xd8"


def _simplejpeg():
    try:
        import simplejpeg
    except ImportError:
        return None
    return simplejpeg


def decoder_name() -> str:
    """'simplejpeg' or 'pil': what `decode_image` uses for JPEGs here."""
    return "simplejpeg" if _simplejpeg() is not None else "pil"


def decode_pil(raw: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(raw)) as img:
        return np.asarray(img.convert("RGB"))


def decode_image(raw: bytes) -> np.ndarray:
    """uint8 HW3 RGB from JPEG or PNG bytes (the pixels PIL gives)."""
    sj = _simplejpeg()
    if sj is not None and raw[:2] == _JPEG_MAGIC:
        try:
            if sj.decode_jpeg_header(raw)[2] in ("YCbCr", "Gray"):
                return sj.decode_jpeg(raw, colorspace="RGB")
        except ValueError:  # a header it cannot read: PIL handles every case
            pass
    return decode_pil(raw)
