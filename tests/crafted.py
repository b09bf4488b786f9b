"""Crafted input files shared by the reader's tests (property tests, the bad-input matrix)."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def crafted_png(path: Path, width: int, height: int) -> Path:
    """A few hundred bytes: an 8 x 8 PNG whose header (CRC fixed) claims ``width`` x ``height``."""
    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path
