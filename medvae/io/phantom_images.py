"""What the phantoms look like: abdominal CT volumes (HU + tissue map) and fluorescence stacks.

CT anatomy is painted in patient millimetres (x toward patient Left, y toward Posterior, z
toward Superior, relative to the body centre and the pancreas level), so a smaller ``size``
keeps the anatomy and coarsens the pixels (the field of view stays 360-460 mm). Everything is
deterministic per ``(seed, index)``. ``medvae.io.phantoms`` writes them in the real formats.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import scipy.fft
from scipy import ndimage

# Tissue codes of CTPhantom.tissue. Codes >= CAVITY lie inside the abdominal cavity; organs are
# painted only there, so no jitter pushes an organ through the body wall.
AIR, SUBCUT_FAT, MUSCLE, CAVITY, BOWEL, GAS, STOMACH = 0, 1, 2, 3, 4, 5, 6
LIVER, SPLEEN, KIDNEY, PANCREAS, AORTA, IVC, BONE, CANAL, DISC = 7, 8, 9, 10, 11, 12, 13, 14, 15
TISSUES = {
    "air": AIR,
    "subcutaneous_fat": SUBCUT_FAT,
    "muscle": MUSCLE,
    "visceral_fat": CAVITY,
    "bowel": BOWEL,
    "gas": GAS,
    "stomach": STOMACH,
    "liver": LIVER,
    "spleen": SPLEEN,
    "kidney": KIDNEY,
    "pancreas": PANCREAS,
    "aorta": AORTA,
    "ivc": IVC,
    "bone": BONE,
    "spinal_canal": CANAL,
    "disc": DISC,
}


@dataclass
class CTPhantom:
    """One synthetic abdominal CT volume.

    Attributes:
        hu: int16 ``(Z, Y, X)`` HU; z toward Superior, rows toward Posterior, columns toward Left.
        tissue: uint8 ``(Z, Y, X)`` tissue codes (TISSUES), before blur and noise.
        spacing: ``(dz, dy, dx)`` mm.
        origin: LPS position (x, y, z) mm of voxel ``[0, 0, 0]`` (ImagePositionPatient of slice 0).
        noise_sigma: standard deviation of the added correlated noise, HU.
    """

    hu: np.ndarray
    tissue: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    noise_sigma: float

    @property
    def label(self) -> np.ndarray:
        return (self.tissue == PANCREAS).astype(np.uint8)


def phantom_rng(seed: int, kind: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, int(hashlib.sha256(kind.encode()).hexdigest()[:8], 16), index])


class _Painter:
    """Paints elliptical cross-sections slice by slice inside their bounding box (no per-pixel loops)."""

    def __init__(self, hu: np.ndarray, tissue: np.ndarray, x: np.ndarray, y: np.ndarray):
        self.hu, self.tissue, self.x, self.y = hu, tissue, x, y
        self.dx, self.dy = float(x[1] - x[0]), float(y[1] - y[0])

    def paint(self, cx, cy, ax, ay, hu: float, code: int, theta: float = 0.0, harmonics=(), within=None):
        """Paint where ``rho <= 1 + sum a cos(k phi + p)`` in each slice with ``ax > 0``.

        Args:
            cx, cy, ax, ay: centre and semi-axes in mm, ``(Z,)`` per slice or scalars (ax = 0: absent).
            harmonics: ``(k, amplitude, phase)`` contour perturbations (organ shape).
            within: tissue codes the paint may replace (None: anything), or an int: codes >= it.
        Returns: ``(box, mask)`` of what was painted, or None.
        """
        nz = self.hu.shape[0]
        cx, cy, ax, ay = (np.broadcast_to(np.asarray(v, np.float32), (nz,)) for v in (cx, cy, ax, ay))
        present = np.nonzero(ax > 0)[0]
        if present.size == 0:
            return None
        z0, z1 = int(present[0]), int(present[-1]) + 1
        reach = float(np.max(np.maximum(ax, ay)[z0:z1])) * (1 + sum(abs(a) for _, a, _ in harmonics)) + 2
        xs = self._span(self.x, np.min(cx[z0:z1]) - reach, np.max(cx[z0:z1]) + reach, self.dx)
        ys = self._span(self.y, np.min(cy[z0:z1]) - reach, np.max(cy[z0:z1]) + reach, self.dy)
        if xs.stop <= xs.start or ys.stop <= ys.start:
            return None
        sl = (slice(z0, z1), ys, xs)
        cx, cy, ax, ay = cx[z0:z1], cy[z0:z1], ax[z0:z1], ay[z0:z1]
        amax, bmax = float(ax.max()), float(ay.max())
        if np.ptp(cx) == 0 and np.ptp(cy) == 0 and np.allclose(ay * amax, ax * bmax):
            # Fixed centre and aspect: one 2D contour, scaled per slice (the common, cheap case).
            cx, cy, a, b, scale = cx[:1], cy[:1], amax, bmax, (ax / amax)[:, None, None]
        else:
            a, b, scale = np.maximum(ax, 1e-3)[:, None, None], np.maximum(ay, 1e-3)[:, None, None], 1.0
        X = self.x[xs][None, None, :] - cx[:, None, None]
        Y = self.y[ys][None, :, None] - cy[:, None, None]
        c, s = np.float32(np.cos(theta)), np.float32(np.sin(theta))
        u, v = (X * c + Y * s) / a, (Y * c - X * s) / b
        limit = scale
        if harmonics:
            phi = np.arctan2(v, u)
            limit = limit * (1 + sum(np.float32(amp) * np.cos(k * phi + ph) for k, amp, ph in harmonics))
        mask = u * u + v * v <= limit * limit
        mask = mask & (ax > 0)[:, None, None]
        if within is not None:
            t = self.tissue[sl]
            if isinstance(within, int):
                mask &= t >= within
            else:
                allowed = np.zeros(256, bool)
                allowed[list(within)] = True
                mask &= allowed[t]
        self.hu[sl][mask] = hu
        self.tissue[sl][mask] = code
        return sl, mask

    @staticmethod
    def _span(axis: np.ndarray, lo: float, hi: float, step: float) -> slice:
        i0 = int(np.floor((lo - axis[0]) / step))
        i1 = int(np.ceil((hi - axis[0]) / step)) + 1
        return slice(max(i0, 0), min(max(i1, 0), axis.size))


def _profile(z: np.ndarray, zc: float, hz: float, q: float = 2.0) -> np.ndarray:
    """Cross-section scale along z: superellipse ``(1 - |t|^q)^(1/q)``, 0 outside ``|t| < 1``."""
    t = np.abs((z - zc) / hz)
    return np.where(t < 1, np.power(np.clip(1 - t**q, 0, 1), 1 / q), 0.0).astype(np.float32)


def make_ct_phantom(seed: int = 0, index: int = 0, size: int = 512, n_slices: int | None = None) -> CTPhantom:
    """Build patient ``index`` of cohort ``seed``: anatomy, partial-volume blur, CT-like noise.

    Returns a CTPhantom on a ``(n_slices, size, size)`` grid (60-100 slices unless given).
    """
    rng = phantom_rng(seed, "ct", index)
    u = rng.uniform
    fov = float(np.round(u(360, 460)))  # mm; fov/512 gives 0.70-0.90 mm pixels
    dxy = fov / size
    dz = float(np.round(u(1.5, 2.5) * 4) / 4)
    nz = int(n_slices) if n_slices else int(rng.integers(60, 101))
    origin = (
        round(-(size - 1) / 2 * dxy, 4),
        round(-(size - 1) / 2 * dxy + u(-10, 10), 3),
        float(np.round(u(-250, -50), 1)),
    )
    bx, by = u(-15, 15), u(-5, 15)  # body centre relative to the isocentre
    zp = origin[2] + (nz - 1) * dz / 2 + u(-8, 8)  # pancreas level
    x = (origin[0] + dxy * np.arange(size) - bx).astype(np.float32)  # anatomical mm
    y = (origin[1] + dxy * np.arange(size) - by).astype(np.float32)
    z = (origin[2] + dz * np.arange(nz) - zp).astype(np.float32)  # 0 at the pancreas level

    hu = np.full((nz, size, size), -1000, np.float32)
    tissue = np.zeros((nz, size, size), np.uint8)
    paint = _Painter(hu, tissue, x, y).paint
    soft = [CAVITY, BOWEL, GAS]  # what a solid organ may displace

    def j(v, r):  # value with relative jitter
        return v * (1 + u(-r, r))

    def shape():  # contour harmonics: each organ its own outline
        return ((2, u(0.02, 0.08), u(0, 6.3)), (3, u(0.02, 0.06), u(0, 6.3)))

    # Body wall: subcutaneous fat, muscle, then the cavity (visceral fat); slowly varying along z.
    AX, AY, fat, wall = u(140, 175), u(100, 125), u(8, 30), u(8, 14)
    b = (1 + 0.04 * np.sin(z / 90 + u(0, 6.3))).astype(np.float32)
    paint(0, 0, AX * b, AY * b, u(-110, -90), SUBCUT_FAT)
    paint(0, fat * 0.3, (AX - fat) * b, (AY - fat) * b, u(40, 55), MUSCLE, within=[SUBCUT_FAT])
    cax, cay = (AX - fat - wall) * b, (AY - fat - wall) * b * 0.9
    paint(0, fat * 0.3, cax, cay, u(-100, -85), CAVITY, within=[MUSCLE])
    # Bowel loops (some gas-filled) and the stomach with an air-fluid level.
    for _ in range(int(rng.integers(6, 12))):
        r, gas = u(10, 20) * _profile(z, u(-90, 30), u(15, 40)), rng.random() < 0.35
        hu_, code = (-900, GAS) if gas else (u(15, 35), BOWEL)
        paint(u(-0.6, 0.6) * AX, u(-0.7, 0) * AY, r, r * u(0.7, 1), hu_, code, u(0, 3.1), within=[CAVITY])
    st, scx, scy = _profile(z, j(55, 0.15), j(45, 0.2)), j(45, 0.2), -0.45 * AY
    paint(scx, scy, j(50, 0.2) * st, j(35, 0.2) * st, u(5, 20), STOMACH, 0.4, within=CAVITY)
    paint(scx, scy - 20, 35 * st, 14 * st, -950, GAS, 0.4, within=[STOMACH])
    # Pancreas: head (right, lower), body (across the aorta), tail (left, higher, toward the spleen).
    for cx, cy, a, c, th, zc, hz in (
        (-40, -2, 20, 16, 0.3, -8, 20),
        (0, -22, 30, 10, 0.05, 0, 15),
        (55, 8, 28, 9, -0.5, 10, 15),
    ):
        pr = _profile(z, zc + u(-4, 4), j(hz, 0.2))
        cx, cy, th, lobes = (
            cx + u(-6, 6),
            cy + u(-5, 5),
            th + u(-0.15, 0.15),
            ((3, u(0.03, 0.08), u(0, 6.3)),),
        )
        paint(cx, cy, j(a, 0.2) * pr, j(c, 0.2) * pr, u(35, 45), PANCREAS, th, lobes, within=CAVITY)
    # Solid organs around it: liver (patient right, drifting with z), spleen (left, posterior), kidneys.
    lv = _profile(z, j(70, 0.15), j(100, 0.1), q=3)
    lx, ly = j(-72, 0.1) + 0.12 * z, j(-5, 1)
    paint(lx, ly, j(68, 0.12) * lv, j(80, 0.12) * lv, u(55, 65), LIVER, u(-0.3, 0.3), shape(), soft)
    sp = _profile(z, j(50, 0.2), j(45, 0.2))
    paint(j(85, 0.1), j(45, 0.15), j(45, 0.15) * sp, j(26, 0.15) * sp, u(45, 55), SPLEEN, -0.7, shape(), soft)
    for side in (-1, 1):
        kd = _profile(z, j(-25, 0.3) + 8 * side, j(55, 0.15))
        kx, ky, ka = side * j(70, 0.1), j(45, 0.15), j(30, 0.12)
        paint(kx, ky, ka * kd, j(22, 0.12) * kd, u(140, 170), KIDNEY, side * 0.5, shape(), soft)
        sinus = 0.35 * ka * kd  # renal sinus fat, medial
        paint(kx - side * 0.45 * ka, ky, sinus, sinus * 1.15, -40, CAVITY, side * 0.5, within=[KIDNEY])
    # Spine (vertebral bodies with discs), canal, posterior elements, paraspinal muscles.
    sy, vr = 0.45 * AY, j(20, 0.1)
    for side in (-1, 1):
        paint(side * 32, sy + 32, j(22, 0.1), j(16, 0.1), u(45, 55), MUSCLE, within=MUSCLE)
    paint(0, sy + 36, 7, 22, u(650, 850), BONE, within=MUSCLE)  # spinous process
    paint(0, sy, vr, vr * 0.85, u(850, 1000), BONE)  # cortex
    paint(0, sy, vr * 0.85, vr * 0.7, u(420, 520), BONE, within=[BONE])  # cancellous
    disc = ((z - u(0, 30)) % 30) < 7
    paint(0, sy, np.where(disc, vr, 0), vr * 0.85, u(80, 100), DISC, within=[BONE])
    paint(0, sy + vr * 0.85 + 9, 9, 8, u(5, 20), CANAL)
    # Vessels (contrast): aorta left-anterior of the spine, IVC to the right.
    paint(j(14, 0.2) + 0.03 * z, sy - vr - 14, j(12, 0.12), j(12, 0.12), u(180, 290), AORTA)
    paint(j(-28, 0.15), sy - vr - 10, j(13, 0.15), j(9, 0.15), u(150, 220), IVC)
    # Ribs above the pancreas level: small bone ovals travelling along the inner body wall with z.
    rx, ry = (AX - fat - wall * 0.5) * 0.97, (AY - fat - wall * 0.5) * 0.97
    for k, level in enumerate(np.arange(u(0, 25), 200, 25)):
        for side in (-1, 1):
            on = _profile(z, level + 6 * side, 10) > 0
            ang = (0.3 + 0.15 * (k % 4)) * np.pi + 0.004 * (z - level)  # from posterior (0) to anterior (pi)
            paint(
                side * rx * np.sin(ang),
                ry * np.cos(ang),
                5.5 * on,
                4.5 * on,
                u(600, 900),
                BONE,
                within=[MUSCLE, SUBCUT_FAT, CAVITY],
            )

    # Partial-volume blur and correlated (CT-like) noise, both in Fourier space, slice by slice.
    fy = scipy.fft.fftfreq(size)[:, None].astype(np.float32)
    fx = scipy.fft.rfftfreq(size)[None, :].astype(np.float32)
    f = np.sqrt(fx**2 + fy**2)
    blur = np.exp(-2 * (np.pi * 0.6 * f) ** 2)  # Gaussian, sigma 0.6 px
    nps = (f + 0.03) * np.exp(-((f / 0.3) ** 2))  # ramp x apodisation, as filtered back-projection
    sigma = float(u(10, 20))
    # White noise through the filter has variance mean(|H|^2) over the full spectrum (Parseval).
    full = np.sqrt(scipy.fft.fftfreq(size)[:, None] ** 2 + scipy.fft.fftfreq(size)[None, :] ** 2)
    nps *= np.float32(sigma / np.sqrt(np.mean(((full + 0.03) * np.exp(-((full / 0.3) ** 2))) ** 2)))
    spectrum = scipy.fft.rfft2(hu, workers=-1)
    spectrum *= blur
    spectrum += scipy.fft.rfft2(rng.standard_normal(hu.shape, dtype=np.float32), workers=-1) * nps
    out = scipy.fft.irfft2(spectrum, s=(size, size), workers=-1)
    out = np.clip(np.rint(out, out=out), -1024, 3071, out=out).astype(np.int16)
    return CTPhantom(out, tissue, (dz, dxy, dxy), origin, sigma)


def make_microscopy_stack(seed: int = 0, index: int = 0, shape=(24, 256, 256)):
    """Fluorescent nuclei: textured ellipsoids, anisotropic Gaussian PSF, Poisson-Gaussian noise.

    Returns ``(stack uint16 (Z, Y, X), nuclei uint16 (Z, Y, X) instance labels, spacing (z, y, x) µm)``.
    """
    rng = phantom_rng(seed, "microscopy", index)
    u = rng.uniform
    nz, ny, nx = shape
    dxy, dz = round(float(u(0.3, 0.5)), 3), round(float(u(1.0, 2.0)), 2)
    zz = (np.arange(nz, dtype=np.float32) * dz)[:, None, None]
    yy = (np.arange(ny, dtype=np.float32) * dxy)[None, :, None]
    xx = (np.arange(nx, dtype=np.float32) * dxy)[None, None, :]
    img = np.zeros(shape, np.float32)
    nuclei = np.zeros(shape, np.uint16)
    texture = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), (0.7, 2.0, 2.0))
    texture /= texture.std() + 1e-6
    n = int(rng.integers(25, 45) * ny * nx / 256**2)
    for i in range(1, n + 1):  # one bounding box per nucleus, vectorised inside
        r = np.array([u(3.5, 6.5), u(4, 8), u(4, 8)], np.float32)  # µm semi-axes (z, y, x)
        c = np.array([u(0.15, 0.85) * nz * dz, u(0, ny * dxy), u(0, nx * dxy)], np.float32)
        lo = np.maximum(((c - r) / (dz, dxy, dxy)).astype(int), 0)
        hi = np.minimum(((c + r) / (dz, dxy, dxy)).astype(int) + 2, shape)
        box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
        th = u(0, np.pi)
        Y, X = yy[:, lo[1] : hi[1]] - c[1], xx[..., lo[2] : hi[2]] - c[2]
        Yr, Xr = Y * np.cos(th) + X * np.sin(th), X * np.cos(th) - Y * np.sin(th)
        rho2 = ((zz[lo[0] : hi[0]] - c[0]) / r[0]) ** 2 + (Yr / r[1]) ** 2 + (Xr / r[2]) ** 2
        inside = (rho2 <= 1) & (nuclei[box] == 0)
        # Brightness per nucleus, chromatin texture, dimmer rim.
        bright = u(0.4, 1.4) * np.clip(1 + u(0.1, 0.4) * texture[box], 0.2, None) * (1 - 0.3 * rho2)
        img[box] = np.where(inside, bright, img[box])
        nuclei[box][inside] = i
    img = ndimage.gaussian_filter(img, (0.3 / dz * 2.5, 0.25 / dxy, 0.25 / dxy))  # PSF: long along z
    photons = u(300, 1200)
    # Photons: signal + background, attenuated with depth; then camera gain, offset and read noise.
    expected = photons * (np.clip(img, 0, None) + u(0.02, 0.06)) * np.exp(-0.01 * zz)
    counts = rng.poisson(expected).astype(np.float32) * u(1.5, 3.0) + 100 + rng.normal(0, u(2, 6), shape)
    return np.clip(np.rint(counts), 0, 65535).astype(np.uint16), nuclei, (dz, dxy, dxy)
