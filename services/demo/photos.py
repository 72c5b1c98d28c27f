"""The demo's evidence photos, drawn in code with Pillow (no binary files in the repository): a slope
under dust before the work, the same slope clean and sprayed after it."""
from __future__ import annotations

import io

from PIL import Image, ImageDraw


def slope_photo(after: bool) -> bytes:
    """A 320x200 PNG: sky, a hillside cut by works, dust (before) or water spray and a clean road (after)."""
    im = Image.new("RGB", (320, 200), (150, 190, 230))
    draw = ImageDraw.Draw(im)
    draw.polygon([(0, 200), (0, 90), (120, 40), (320, 110), (320, 200)], fill=(90, 130, 70))
    draw.polygon([(100, 200), (150, 70), (230, 95), (250, 200)], fill=(170, 140, 100))  # the cut slope
    draw.rectangle([(0, 175), (320, 200)], fill=(80, 80, 85))  # the road
    if after:
        for x in range(110, 250, 12):  # spray against dust
            draw.line([(x, 60), (x + 6, 170)], fill=(200, 225, 255), width=2)
    else:
        for i in range(40):  # dust over the slope and the road
            x, y = 90 + (i * 37) % 180, 50 + (i * 53) % 130
            draw.ellipse([(x, y), (x + 18, y + 12)], fill=(205, 190, 160))
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()
