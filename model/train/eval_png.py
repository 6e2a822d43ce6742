"""The example dialogue's timeline as a PNG, drawn with numpy and written with zlib.

Why not matplotlib: it is not a dependency of the project (a plotting stack for one
debugging picture), and this way the picture is made, and tested, on every install.
The price is a 3x5 pixel font of our own (upper case, digits, common punctuation).
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = ["Canvas", "write_png", "timeline"]

# 3x5 glyphs, rows top to bottom, '#' lit. Lower case is drawn as upper case.
_GLYPHS = {
    "A": ".#. #.# ### #.# #.#", "B": "##. #.# ##. #.# ##.", "C": ".## #.. #.. #.. .##",
    "D": "##. #.# #.# #.# ##.", "E": "### #.. ##. #.. ###", "F": "### #.. ##. #.. #..",
    "G": ".## #.. #.# #.# .##", "H": "#.# #.# ### #.# #.#", "I": "### .#. .#. .#. ###",
    "J": "..# ..# ..# #.# .#.", "K": "#.# #.# ##. #.# #.#", "L": "#.. #.. #.. #.. ###",
    "M": "#.# ### ### #.# #.#", "N": "##. #.# #.# #.# #.#", "O": ".#. #.# #.# #.# .#.",
    "P": "##. #.# ##. #.. #..", "Q": ".#. #.# #.# ##. .##", "R": "##. #.# ##. #.# #.#",
    "S": ".## #.. .#. ..# ##.", "T": "### .#. .#. .#. .#.", "U": "#.# #.# #.# #.# ###",
    "V": "#.# #.# #.# #.# .#.", "W": "#.# #.# ### ### #.#", "X": "#.# #.# .#. #.# #.#",
    "Y": "#.# #.# .#. .#. .#.", "Z": "### ..# .#. #.. ###",
    "0": "### #.# #.# #.# ###", "1": ".#. ##. .#. .#. ###", "2": "##. ..# .#. #.. ###",
    "3": "##. ..# .#. ..# ##.", "4": "#.# #.# ### ..# ..#", "5": "### #.. ##. ..# ##.",
    "6": ".## #.. ### #.# ###", "7": "### ..# .#. .#. .#.", "8": "### #.# ### #.# ###",
    "9": "### #.# ### ..# ##.", " ": "... ... ... ... ...", ".": "... ... ... ... .#.",
    ",": "... ... ... .#. #..", "?": "##. ..# .#. ... .#.", "!": ".#. .#. .#. ... .#.",
    "'": ".#. .#. ... ... ...", '"': "#.# #.# ... ... ...", "-": "... ... ### ... ...",
    "+": "... .#. ### .#. ...", "=": "... ### ... ### ...", ":": "... .#. ... .#. ...",
    "/": "..# ..# .#. #.. #..", "(": ".#. #.. #.. #.. .#.", ")": ".#. ..# ..# ..# .#.",
    "<": "..# .#. #.. .#. ..#", ">": "#.. .#. ..# .#. #..", "%": "#.# ..# .#. #.. #.#",
    "_": "... ... ... ... ###", "#": "#.# ### #.# ### #.#", "@": "### #.# ### #.. ###",
}
_FONT = {c: np.array([[ch == "#" for ch in row] for row in g.split()], dtype=bool) for c, g in _GLYPHS.items()}
SCALE = 2  # font pixels per glyph pixel
ADVANCE = 4 * SCALE  # 3 columns and a gap
LINE = 6 * SCALE

WHITE, BLACK, GREY, LIGHT = (255, 255, 255), (0, 0, 0), (150, 150, 150), (225, 225, 225)
BLUE, ORANGE, GREEN, RED = (40, 100, 200), (230, 120, 20), (30, 150, 60), (200, 40, 40)


def write_png(path: str | Path, rgb: np.ndarray) -> Path:
    """An 8-bit RGB image (height, width, 3) as a PNG file: filter 0 on every row."""
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    h, w, _ = rgb.shape
    raw = np.concatenate([np.zeros((h, 1), np.uint8), rgb.reshape(h, w * 3)], axis=1).tobytes()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))
    path = Path(path)
    path.write_bytes(png)
    return path


class Canvas:
    def __init__(self, width: int, height: int) -> None:
        self.px = np.full((height, width, 3), WHITE, dtype=np.uint8)

    def rect(self, x0: float, y0: float, x1: float, y1: float, color: tuple[int, int, int]) -> None:
        h, w, _ = self.px.shape
        a, b = max(0, int(round(x0))), min(w, max(int(round(x1)), int(round(x0)) + 1))
        c, d = max(0, int(round(y0))), min(h, max(int(round(y1)), int(round(y0)) + 1))
        if a < b and c < d:
            self.px[c:d, a:b] = color

    def text(self, x: float, y: float, s: str, color: tuple[int, int, int] = BLACK) -> float:
        """Draws `s` from (x, y), its top left; returns the x after it."""
        for ch in s:
            glyph = _FONT.get(ch.upper(), _FONT["?"])
            for r, c in zip(*np.nonzero(glyph)):
                self.rect(x + c * SCALE, y + r * SCALE, x + (c + 1) * SCALE, y + (r + 1) * SCALE, color)
            x += ADVANCE
        return x


def timeline(path: str | Path, *, title: str, duration: float, user: np.ndarray, sample_rate: int,
             chunk_seconds: float, speaking: Sequence[bool], texts: Sequence[str],
             turns: Sequence[tuple[str, float, float, bool]], turn_ends: Sequence[float] = (),
             onsets: Sequence[float] = (), px_per_s: float = 100.0, max_width: int = 4000) -> Path:
    """Rows: the caller's energy (dB over -60..0 per pixel column); the manifest's turns
    (caller blue, the recorded assistant grey, backchannels light); the assistant's
    speaking chunks (orange); its text, each chunk's at the chunk's time, in up to three
    lanes. Green lines: user ends it should answer; red: interruption onsets."""
    left, right = 120, 10
    px_per_s = min(px_per_s, (max_width - left - right) / max(duration, 1e-3))
    width = int(left + right + duration * px_per_s)
    rows = {"caller": (30, 60), "turns": (100, 20), "assistant": (130, 40), "text": (180, 3 * (LINE + 2))}
    axis = rows["text"][0] + rows["text"][1] + 8
    cv = Canvas(width, axis + LINE + 14)
    X = lambda t: left + t * px_per_s  # noqa: E731
    cv.text(8, 8, title[: (width - 16) // ADVANCE])
    for name, (y, h) in rows.items():
        cv.text(8, y + (h - LINE) / 2, name.upper(), GREY)
        cv.rect(left, y + h, width - right, y + h + 1, LIGHT)
    y, h = rows["caller"]
    cols = int(duration * px_per_s)
    edges = np.minimum(len(user), np.round(np.arange(cols + 1) / px_per_s * sample_rate).astype(int))
    for c in range(cols):
        seg = user[edges[c]:max(edges[c + 1], edges[c] + 1)]
        db = 10 * np.log10(np.mean(np.square(seg, dtype=np.float64)) + 1e-12) if len(seg) else -120.0
        frac = min(1.0, max(0.0, (db + 60) / 60))
        cv.rect(left + c, y + h * (1 - frac), left + c + 1, y + h, BLUE)
    y, h = rows["turns"]
    for speaker, start, end, backchannel in turns:
        color = (BLUE if speaker == "user" else GREY) if not backchannel else LIGHT
        top = y if speaker == "user" else y + h / 2
        cv.rect(X(start), top + 1, X(end), top + h / 2 - 1, color)
    y, h = rows["assistant"]
    for k, on in enumerate(speaking):
        if on and k * chunk_seconds < duration:
            cv.rect(X(k * chunk_seconds), y, X(min(duration, (k + 1) * chunk_seconds)), y + h, ORANGE)
    y, _ = rows["text"]
    lanes = [0.0, 0.0, 0.0]  # where each lane's last text ends
    for k, s in enumerate(texts):
        if not s or k * chunk_seconds >= duration:
            continue
        x = X(k * chunk_seconds)
        lane = next((i for i, end in enumerate(lanes) if end <= x), int(np.argmin(lanes)))
        lanes[lane] = cv.text(max(x, lanes[lane]), y + lane * (LINE + 2), s) + SCALE
    for t, color in [(t, GREEN) for t in turn_ends] + [(t, RED) for t in onsets]:
        cv.rect(X(t), rows["caller"][0], X(t) + 2, rows["assistant"][0] + rows["assistant"][1], color)
    every = max(1, int(np.ceil(40 / px_per_s)))  # a label at least 40 px from the next
    for s in range(0, int(duration) + 1, every):
        cv.rect(X(s), axis - 4, X(s) + 1, axis, BLACK)
        cv.text(X(s) - 2, axis + 2, f"{s}")
    cv.text(8, axis + 2, "TIME S", GREY)
    return write_png(path, cv.px)
