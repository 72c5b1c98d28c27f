"""What an uploaded file is, from its content, and what needle stores of it.

* The type comes from the magic bytes, never from the Content-Type header: JPEG (``FF D8 FF``), PNG
  (``89 50 4E 47 0D 0A 1A 0A``) and WebP (``RIFF....WEBP``). The header must agree with the content.
* The image is decoded once by Pillow (a well-kept imaging library) to check it is one, to read its size
  and to make the thumbnail (the longer side ``thumb_px``, JPEG).
* EXIF location: with ``strip`` the GPS block of the EXIF data (and any XMP packet, which may repeat it) is
  removed by saving the image again (lossless for PNG; JPEG and WebP at quality 95), only when it has one;
  with ``keep`` the bytes are stored as sent.
* The id is the sha256 of the bytes stored, so the same upload (and the same photo after stripping, which
  is deterministic) is the same medium.

Runs in a worker thread: files in, files out, nothing held twice in memory.
"""
from __future__ import annotations

import hashlib
import io
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from shared.domain.errors import Invalid, UnsupportedMediaType

TYPES = {"image/jpeg": "JPEG", "image/png": "PNG", "image/webp": "WEBP"}
MAX_PIXELS = 50_000_000  # 50 MP: a larger image is refused before it is decoded (decompression bombs)
GPS_IFD = 0x8825


def sniff(head: bytes) -> str | None:
    """The content type the first bytes say, or None when they are none of the accepted ones."""
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if len(head) >= 12 and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    return None


def check_declared(declared: str | None, head: bytes) -> str:
    """The content type of the upload: what its bytes say, which must be what its header says."""
    found = sniff(head)
    if found is None:
        raise UnsupportedMediaType("the content is not a JPEG, PNG or WebP image (checked from its bytes)",
                                   field="Content-Type", accepted=sorted(TYPES))
    if declared is not None and declared != found:
        raise UnsupportedMediaType(f"the content is {found}, but it was sent as {declared}", field="Content-Type",
                                   detected=found)
    return found


@dataclass(frozen=True, slots=True)
class Prepared:
    path: Path  # the bytes to store (the upload itself, or its stripped copy)
    sha256: str
    size: int
    content_type: str
    width: int
    height: int
    thumb: bytes  # JPEG
    location_stripped: bool


def _sha256(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
            size += len(block)
    return h.hexdigest(), size


def prepare(upload: Path, content_type: str, *, strip_location: bool, thumb_px: int, workdir: Path) -> Prepared:
    """Check ``upload`` decodes as ``content_type``; strip its EXIF location if asked; make the thumbnail."""
    fmt = TYPES[content_type]
    stored, stripped = upload, False
    try:
        with Image.open(upload, formats=[fmt]) as im:
            width, height = im.size
            if width * height > MAX_PIXELS:
                raise Invalid(f"the image has {width}x{height} pixels, more than {MAX_PIXELS:,}", field="body")
            im.load()
            exif = im.getexif()
            if strip_location and (GPS_IFD in exif or "xmp" in im.info or "XML:com.adobe.xmp" in im.info):
                exif.pop(GPS_IFD, None)
                fd, name = tempfile.mkstemp(dir=workdir, suffix=".stripped")
                os.close(fd)
                stored, stripped = Path(name), True
                im.info.pop("xmp", None)
                im.info.pop("XML:com.adobe.xmp", None)
                options: dict[str, object] = {"exif": exif.tobytes()}
                if im.info.get("icc_profile"):
                    options["icc_profile"] = im.info["icc_profile"]
                if fmt in ("JPEG", "WEBP"):
                    options["quality"] = 95
                im.save(stored, fmt, **options)
            thumb_image = ImageOps.exif_transpose(im)
            thumb_image.thumbnail((thumb_px, thumb_px))
            if thumb_image.mode not in ("RGB", "L"):
                thumb_image = thumb_image.convert("RGB")
            buf = io.BytesIO()
            thumb_image.save(buf, "JPEG", quality=80)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as e:
        raise Invalid(f"the body is not a readable {fmt} image: {e}", field="body") from None
    digest, size = _sha256(stored)
    return Prepared(stored, digest, size, content_type, width, height, buf.getvalue(), stripped)
