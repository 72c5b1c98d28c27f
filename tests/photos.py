"""Small photos made in code for the tests (no binary files in the repository)."""
from __future__ import annotations

import io

from PIL import Image


def png_bytes(size: tuple[int, int] = (48, 32), color: tuple[int, int, int] = (200, 40, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def noise_png(side: int) -> bytes:
    """A PNG that does not compress (random pixels): about 3 * side² bytes."""
    import os

    buf = io.BytesIO()
    Image.frombytes("RGB", (side, side), os.urandom(side * side * 3)).save(buf, "PNG")
    return buf.getvalue()


def jpeg_with_gps(color: tuple[int, int, int] = (30, 120, 200)) -> bytes:
    """A JPEG whose EXIF carries a GPS position (30°N 122°E) and a camera make."""
    exif = Image.Exif()
    exif[0x010F] = "needle-test-camera"  # Make
    exif[0x8825] = {1: "N", 2: (30.0, 0.0, 0.0), 3: "E", 4: (122.0, 0.0, 0.0)}
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), color).save(buf, "JPEG", exif=exif.tobytes())
    return buf.getvalue()
