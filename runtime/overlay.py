"""Overlay PNGs of CT slices with label outlines, in numpy + zlib (no imaging library needed)."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
from scipy.ndimage import binary_erosion

from .io import write_bytes_atomic

COLOURS = {1: (0, 220, 0), 2: (255, 40, 40)}  # liver green, tumour red
REF_COLOURS = {1: (255, 220, 0), 2: (0, 200, 255)}  # reference: yellow, cyan


def png_bytes(rgb: np.ndarray) -> bytes:
    """Encode an (H, W, 3) uint8 image as PNG."""
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    h, w, _ = rgb.shape
    raw = np.concatenate([np.zeros((h, 1), np.uint8), rgb.reshape(h, w * 3)], axis=1).tobytes()

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw, 6))
        + chunk(b"IEND", b"")
    )


def write_png(path: str | Path, rgb: np.ndarray) -> Path:
    return write_bytes_atomic(path, png_bytes(rgb))


def to_display(slice_canonical: np.ndarray) -> np.ndarray:
    """Canonical (y=anterior, x=patient's right) -> radiological view: anterior up, patient's right on the left."""
    return slice_canonical[::-1, ::-1]


def _outline(mask: np.ndarray) -> np.ndarray:
    return mask & ~binary_erosion(mask)


def overlay(
    slice_hu: np.ndarray, labels: np.ndarray | None = None, window=(-200, 250), ref_labels: np.ndarray | None = None
) -> np.ndarray:
    """A canonical slice in HU as radiological-view RGB with label outlines."""
    lo, hi = window
    grey = (np.clip((slice_hu.astype(np.float32) - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)
    rgb = np.repeat(to_display(grey)[..., None], 3, axis=2)
    for labs, colours in ((ref_labels, REF_COLOURS), (labels, COLOURS)):
        if labs is None:
            continue
        shown = to_display(labs)
        for cls, colour in colours.items():
            rgb[_outline(shown >= cls if cls == 1 else shown == cls)] = colour
    return rgb


def representative_slices(labels: np.ndarray, n: int = 3) -> list[int]:
    """Slices with the largest tumour area, the largest liver area, and mid-liver (distinct)."""
    liver = (labels >= 1).reshape(labels.shape[0], -1).sum(1)
    tumour = (labels == 2).reshape(labels.shape[0], -1).sum(1)
    picks = []
    if tumour.max() > 0:
        picks.append(int(tumour.argmax()))
    if liver.max() > 0:
        picks.append(int(liver.argmax()))
        idx = np.nonzero(liver)[0]
        picks.append(int(idx[len(idx) // 2]))
    picks += [labels.shape[0] // 2, labels.shape[0] // 3, 2 * labels.shape[0] // 3]
    out = list(dict.fromkeys(picks))
    return out[:n]


def overlay_panel(
    volume_hu: np.ndarray, labels: np.ndarray, path: str | Path, n: int = 3, ref: np.ndarray | None = None
) -> Path:
    """Representative canonical slices side by side with outlines (prediction and optional reference)."""
    return write_bytes_atomic(path, panel_png(volume_hu, labels, n, ref))


def panel_png(volume_hu: np.ndarray, labels: np.ndarray, n: int = 3, ref: np.ndarray | None = None) -> bytes:
    """overlay_panel's PNG as bytes, for writers that commit several files together."""
    picks = representative_slices(ref if ref is not None else labels, n)
    tiles = [overlay(volume_hu[k], labels[k], ref_labels=None if ref is None else ref[k]) for k in picks]
    gap = np.zeros((tiles[0].shape[0], 4, 3), np.uint8)
    panel = tiles[0]
    for t in tiles[1:]:
        panel = np.concatenate([panel, gap, t], axis=1)
    return png_bytes(panel)
