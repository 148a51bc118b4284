"""Synthetic abdominal CT phantoms in Hounsfield units, with liver and tumour labels.

Numpy only (plus scipy's Gaussian blur). Each case is deterministic in (seed, index). The
anatomy is built in physical millimetres on the canonical (z, y, x) = (superior, anterior,
patient's right) grid, so a model has to learn shape and position: the spleen and kidneys
have HU within ~20 of the liver, the liver sits on the patient's right and changes from
slice to slice, and tumours vary in size, number (0-5) and contrast. Cases vary in slice
count, in-plane size, spacing and stored orientation (RAS, LPS, flipped, permuted).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy.ndimage import distance_transform_edt, gaussian_filter

from .io import write_nifti
from .postprocess import bounding_box

SIZES = (256, 320, 384, 448, 512)
LAYOUTS = ("RAS", "LPS", "LAS", "RAS-zflip", "LPS-permuted")


@dataclass
class Phantom:
    hu: np.ndarray  # file layout, int16
    labels: np.ndarray  # file layout, uint8 (0 background, 1 liver, 2 tumour)
    affine: np.ndarray  # 4x4


@dataclass
class _Grid:
    z: np.ndarray  # (Z, 1, 1) mm, increasing superior
    y: np.ndarray  # (1, Y, 1) mm, increasing anterior
    x: np.ndarray  # (1, 1, X) mm, increasing to the patient's right


def _ellipsoid(g: _Grid, c, r) -> np.ndarray:
    """Normalised squared radius of an axis-aligned ellipsoid (centre c, semi-axes r, mm; z,y,x)."""
    return ((g.z - c[0]) / r[0]) ** 2 + ((g.y - c[1]) / r[1]) ** 2 + ((g.x - c[2]) / r[2]) ** 2


def _ring(g: _Grid, cy: float, cx: float, ry, rx) -> np.ndarray:
    """Normalised squared radius of an in-plane ellipse whose semi-axes may vary with z."""
    return ((g.y - cy) / ry) ** 2 + ((g.x - cx) / rx) ** 2


def _waves(rng: np.random.Generator, g: _Grid, n: int, amp: float, wavelength=(60.0, 160.0)) -> np.ndarray:
    """A smooth random field: a sum of a few plane waves in physical space."""
    field = np.zeros((1, 1, 1), np.float32)
    for _ in range(n):
        k = rng.normal(size=3)
        k *= 2 * np.pi / rng.uniform(*wavelength) / np.linalg.norm(k)
        field = field + np.float32(amp / n) * np.sin(
            k[0] * g.z + k[1] * g.y + k[2] * g.x + rng.uniform(0, 2 * np.pi)
        ).astype(np.float32)
    return field


def _slab(g: _Grid, c, r) -> slice:
    """The slices an ellipsoid (centre c, semi-axes r, mm) can touch."""
    idx = np.nonzero(np.abs(g.z[:, 0, 0] - c[0]) <= r[0] * 1.4)[0]
    return slice(int(idx[0]), int(idx[-1]) + 1) if len(idx) else slice(0, 0)


def _sub(g: _Grid, sl: slice) -> _Grid:
    return _Grid(z=g.z[sl], y=g.y, x=g.x)


def _canonical_case(
    rng: np.random.Generator,
    n: int,
    spacing: float,
    slices: int,
    thickness: float,
    fat_rng: np.random.Generator | None = None,
):
    """(hu, labels) on the canonical (z, y, x) grid; with ``fat_rng``, perihepatic fat too."""
    f32 = np.float32
    top = rng.uniform(10, 50)  # mm above the liver dome (z = 0); z increases superiorly
    z = (top - (slices - 1) * thickness + np.arange(slices) * thickness)[:, None, None]
    half = (n - 1) / 2.0
    ax = (np.arange(n) - half) * spacing
    g = _Grid(z=z.astype(f32), y=ax[None, :, None].astype(f32), x=ax[None, None, :].astype(f32))
    g2 = _Grid(z=np.zeros((1, 1, 1), f32), y=g.y, x=g.x)  # for in-plane (z-independent) shapes
    shape = (slices, n, n)

    # body outline, slowly varying along z
    a = rng.uniform(140, 170) * (1 + 0.04 * np.sin(g.z / 90.0 + rng.uniform(0, 6)))  # left-right
    b = rng.uniform(100, 125) * (1 + 0.03 * np.sin(g.z / 70.0 + rng.uniform(0, 6)))  # antero-posterior
    cy = -rng.uniform(0, 15)
    body = _ring(g, cy, 0.0, b, a) <= 1.0
    fat_t = rng.uniform(10, 25)
    cavity = _ring(g, cy, 0.0, b - fat_t - 10, a - fat_t - 10) <= 1.0

    hu = np.full(shape, -1000.0, f32)
    hu[body] = -100.0  # subcutaneous fat
    hu[(_ring(g, cy, 0.0, b - fat_t, a - fat_t) <= 1.0)] = 50.0  # muscle wall
    bowel = f32(rng.uniform(15, 40)) + _waves(rng, g2, 3, 25.0, (15.0, 40.0)) + _waves(rng, g, 1, 8.0, (30.0, 60.0))
    np.copyto(hu, bowel, where=cavity)
    hu[body & (_ring(g, cy, 0.0, b - 2.5, a - 2.5) > 1.0)] = 40.0  # skin

    # gas pockets in the lower anterior abdomen
    for _ in range(rng.integers(3, 9)):
        c = (rng.uniform(float(g.z.min()), float(g.z.min()) + 120), cy + rng.uniform(0, 60), rng.uniform(-80, 80))
        r = rng.uniform(6, 18, size=3)
        sl = _slab(g, c, r)
        hu[sl][(_ellipsoid(_sub(g, sl), c, r) <= 1.0) & cavity[sl]] = -900.0

    # phase: liver enhancement and aortic contrast
    liver_hu = rng.uniform(55, 110)
    aorta_hu = liver_hu + rng.uniform(40, 150)
    spine_y = cy - float(b.min()) + rng.uniform(52, 62)

    # spine (vertebral body with cortical rim, canal, posterior elements), aorta, IVC: in-plane shapes
    vb = _ring(g2, spine_y, 0.0, 16.0, 19.0)[0]
    plane = np.full((n, n), np.nan, f32)
    plane[vb <= 1.0] = 700.0
    plane[vb <= 0.7] = rng.uniform(180, 280)
    plane[_ring(g2, spine_y - 24, 0.0, 8.0, 8.0)[0] <= 1.0] = 15.0  # canal
    post = (_ring(g2, spine_y - 36, 0.0, 8.0, 20.0)[0] <= 1.0) & (_ring(g2, spine_y - 24, 0.0, 9.0, 9.0)[0] > 1.0)
    plane[post] = 650.0
    plane[_ring(g2, spine_y + 30, -18.0, 11.0, 11.0)[0] <= 1.0] = aorta_hu
    set_plane = ~np.isnan(plane)
    hu[:, set_plane] = plane[set_plane]

    # ribs in the upper slices, lateral and posterolateral in the muscle wall
    bmin, amin = float(b.min()), float(a.min())
    rib_plane = np.zeros((n, n), bool)
    for ang in np.linspace(-1.1, 0.6, 5):
        for side in (1, -1):
            ry, rx = (bmin - fat_t - 4) * np.sin(ang), side * (amin - fat_t - 4) * np.cos(ang)
            r2 = _ring(g2, cy + ry, rx, 6.0, 7.0)[0]
            rib_plane |= (r2 <= 1.0) & (r2 > 0.35)
    upper = g.z[:, 0, 0] > -130
    hu[np.ix_(upper, np.ones(n, bool), np.ones(n, bool))] = np.where(rib_plane, f32(750.0), hu[upper])

    # kidneys (lower, posterior, both sides) and spleen (patient's left, posterior): HU near the liver
    for side, dz in ((1, -15.0), (-1, 0.0)):
        kc = (rng.uniform(-150, -120) + dz, spine_y + 15, side * rng.uniform(60, 75))
        kr = (rng.uniform(45, 60), 28.0, 25.0)
        sl = _slab(g, kc, kr)
        kid = _ellipsoid(_sub(g, sl), kc, kr) <= 1.0
        hu[sl][kid] = liver_hu + rng.uniform(-20, 20)
        hu[sl][kid & (_ellipsoid(_sub(g, sl), kc, (30.0, 10.0, 9.0)) <= 1.0)] = rng.uniform(0, 30)  # pelvis
    sc = (rng.uniform(-70, -40), spine_y + 35, -rng.uniform(70, 95))
    sr = (rng.uniform(45, 65), 45.0, 30.0)
    sl = _slab(g, sc, sr)
    spleen = ((_ellipsoid(_sub(g, sl), sc, sr) + _waves(rng, _sub(g, sl), 3, 0.3)) <= 1.0) & cavity[sl]
    hu[sl][spleen] = liver_hu + rng.uniform(-20, 20)

    # liver: a right lobe and a left-lobe extension, deformed by a smooth field
    rc = (rng.uniform(-75, -50), cy + rng.uniform(-10, 15), rng.uniform(55, 80))
    rr = (rng.uniform(60, 80), rng.uniform(70, 90), rng.uniform(55, 75))
    lc = (rc[0] + rng.uniform(15, 35), cy + rng.uniform(25, 45), rng.uniform(-35, -5))
    lr = (rng.uniform(30, 45), rng.uniform(30, 45), rng.uniform(45, 65))
    sl = _slab(g, (rc[0], 0, 0), (rr[0] * 1.1, 1, 1))
    gs = _sub(g, sl)
    liver_f = np.minimum(_ellipsoid(gs, rc, rr), _ellipsoid(gs, lc, lr)) + _waves(rng, gs, 5, 0.35)
    liver = np.zeros(shape, bool)
    liver[sl] = (liver_f <= 1.0) & cavity[sl] & (vb > 1.4)[None]
    liver_vals = liver_hu + _waves(rng, gs, 3, 6.0, (10.0, 30.0)) + np.zeros(liver_f.shape, f32)
    hu[sl][liver[sl]] = liver_vals[liver[sl]]
    ivc = _ring(g2, spine_y + 32, 22.0, 12.0, 12.0)[0] <= 1.0
    hu[:, ivc] = liver_hu + rng.uniform(0, 25)
    if fat_rng is not None:
        _perihepatic_fat(fat_rng, g, hu, liver, cavity & (hu == bowel), (thickness, spacing, spacing))
    labels = liver.astype(np.uint8)

    # tumours: 0-5, inside the liver, soft-edged, mostly hypodense
    n_tumours = int(rng.choice(6, p=[0.2, 0.25, 0.2, 0.15, 0.1, 0.1]))
    lz, ly, lx = np.nonzero(liver)
    for _ in range(n_tumours if len(lz) else 0):
        i = rng.integers(len(lz))
        c = (float(g.z[lz[i], 0, 0]), float(g.y[0, ly[i], 0]), float(g.x[0, 0, lx[i]]))
        r = rng.uniform(4, 20) * rng.uniform(0.8, 1.2, size=3)
        sl = _slab(g, c, r)
        d = np.sqrt(_ellipsoid(_sub(g, sl), c, r))
        lv = liver[sl]
        delta = -rng.uniform(20, 60) if rng.random() < 0.85 else rng.uniform(20, 40)
        edge = np.clip((1.15 - d) / 0.3, 0, 1).astype(f32)  # soft edge over ~30% of the radius
        hu[sl] += np.where(lv, f32(delta) * edge, f32(0))
        labels[sl][(d <= 1.0) & lv] = 2

    hu = gaussian_filter(hu, sigma=(0, 0.7, 0.7))
    hu += rng.standard_normal(shape, dtype=f32) * f32(rng.uniform(8, 20))
    return np.clip(np.rint(hu), -1024, 3071).astype(np.int16), labels


def _perihepatic_fat(
    rng: np.random.Generator,
    g: _Grid,
    hu: np.ndarray,
    liver: np.ndarray,
    free: np.ndarray,
    sampling: tuple[float, float, float],
) -> None:
    """Fat (about -100 HU) 0-8 mm thick over part of the liver surface, where bowel touches it.

    Without it the liver lies directly against 15-40 HU bowel, the HU of a hypodense lesion, so
    a lesion on the liver surface looks like bowel; in a real abdomen fat and the capsule
    separate the liver from much of its surroundings. The thickness follows a smooth field,
    so some of the surface stays in direct contact, as it does in real scans.
    """
    box = bounding_box(liver, pad=[int(np.ceil(10.0 / s)) for s in sampling])  # room for the thickest fat
    if box is None:
        return
    sub = _Grid(z=g.z[box[0]], y=g.y[:, box[1]], x=g.x[:, :, box[2]])
    dist = distance_transform_edt(~liver[box], sampling=sampling)
    thick = np.clip(3.5 + _waves(rng, sub, 3, 10.0, (40.0, 120.0)), 0.0, 8.0)
    fat = (dist > 0) & (dist <= thick) & free[box]
    hu[box][fat] = (-100.0 + _waves(rng, sub, 2, 20.0, (10.0, 30.0)) + np.zeros(fat.shape, np.float32))[fat]


def _to_layout(arr: np.ndarray, ras_affine: np.ndarray, layout: str):
    """Canonical (z, y, x) array -> (file array, affine) for a storage layout of the same world content."""
    data = arr.transpose(2, 1, 0)  # RAS voxel order (x, y, z)
    aff = ras_affine.copy()

    def flip(data, aff, axis):
        m = np.eye(4)
        m[axis, axis] = -1
        m[axis, 3] = data.shape[axis] - 1
        return np.flip(data, axis), aff @ m

    if layout in ("LPS", "LPS-permuted"):
        data, aff = flip(data, aff, 0)
        data, aff = flip(data, aff, 1)
    elif layout == "LAS":
        data, aff = flip(data, aff, 0)
    elif layout == "RAS-zflip":
        data, aff = flip(data, aff, 2)
    if layout == "LPS-permuted":  # file axes (j, i, k)
        p = np.zeros((4, 4))
        p[1, 0] = p[0, 1] = p[2, 2] = p[3, 3] = 1
        data, aff = data.transpose(1, 0, 2), aff @ p
    return np.ascontiguousarray(data), aff


def make_phantom(
    seed: int, index: int, size: int | None = None, slices: int | None = None, perihepatic_fat: bool = False
) -> Phantom:
    """One synthetic CT case, deterministic in (seed, index).

    ``size`` overrides the in-plane size and ``slices`` the slice count; the physical field
    of view and body size stay realistic, so small phantoms simply have coarser voxels.
    ``perihepatic_fat`` adds fat over part of the liver surface; it draws from its own random
    stream, so the case is otherwise the same anatomy, labels and noise as without it.
    """
    rng = np.random.default_rng([int(seed), int(index), 0x5EC7])
    n = int(size) if size else int(rng.choice(SIZES))
    fov = rng.uniform(360, 430)
    spacing = fov / n
    extent = rng.uniform(200, 300)
    if slices:
        n_slices = int(slices)
        thickness = extent / n_slices
    else:
        thickness = float(rng.choice([1.5, 2.0, 2.5, 3.0, 4.0, 5.0]))
        n_slices = int(np.clip(round(extent / thickness), 40, 120))
    fat_rng = np.random.default_rng([int(seed), int(index), 0xFA7]) if perihepatic_fat else None
    hu, labels = _canonical_case(rng, n, spacing, n_slices, thickness, fat_rng)
    ras = np.diag([spacing, spacing, thickness, 1.0])
    ras[:3, 3] = [-(n - 1) / 2 * spacing, -(n - 1) / 2 * spacing, -rng.uniform(100, 400)]
    layout = LAYOUTS[int(rng.integers(len(LAYOUTS)))]
    hu_f, aff = _to_layout(hu, ras, layout)
    lab_f, _ = _to_layout(labels, ras, layout)
    return Phantom(hu=hu_f, labels=lab_f, affine=aff)


def canonical(ph: Phantom) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """(HU, labels, spacing) of a phantom on the canonical grid, as read_volume would give them."""
    from nibabel.orientations import io_orientation

    from .io import canonical_spacing, to_canonical

    ornt = io_orientation(ph.affine)
    return to_canonical(ph.hu, ornt), to_canonical(ph.labels, ornt), canonical_spacing(ph.affine, ornt)


def phantom_images(ph: Phantom) -> tuple[nib.Nifti1Image, nib.Nifti1Image]:
    """NIfTI images (int16 HU, uint8 labels) with qform and sform set to the affine."""
    out = []
    for arr in (ph.hu, ph.labels):
        img = nib.Nifti1Image(arr, ph.affine)
        img.set_qform(ph.affine, code=1)
        img.set_sform(ph.affine, code=1)
        img.header.set_xyzt_units("mm", "sec")
        out.append(img)
    return out[0], out[1]


def write_phantoms(
    out_dir: str | Path,
    cases: int,
    seed: int,
    start: int = 0,
    size: int | None = None,
    slices: int | None = None,
    preview: bool = False,
    progress: bool = True,
    perihepatic_fat: bool = False,
) -> list[Path]:
    """Write cases start..start+cases-1 as volume-K.nii.gz / segmentation-K.nii.gz (LiTS layout)."""
    from tqdm import tqdm

    from .io import check_creatable_dir

    out = Path(out_dir)
    check_creatable_dir(out, "OUT_DIR")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for k in tqdm(
        range(start, start + cases), desc="phantoms", unit="case", disable=not (progress and sys.stderr.isatty())
    ):
        ph = make_phantom(seed, k, size=size, slices=slices, perihepatic_fat=perihepatic_fat)
        img, seg = phantom_images(ph)
        write_nifti(img, out / f"volume-{k}.nii.gz")
        write_nifti(seg, out / f"segmentation-{k}.nii.gz")
        if preview:
            from .io import read_labels, read_volume
            from .overlay import overlay_panel

            overlay_panel(
                read_volume(out / f"volume-{k}.nii.gz").data,
                read_labels(out / f"segmentation-{k}.nii.gz").data,
                out / f"volume-{k}.png",
            )
        written.append(out / f"volume-{k}.nii.gz")
    return written
