"""Golden JPEG files and Pillow's decoded pixels for tests/vision_jpeg.rs (the libjpeg-turbo-exact JPEG decoder).

Usage:
    /work/venv-golden/bin/python scripts/make_golden_jpeg.py [--out tests/golden/jpeg]

Writes `<case>.jpg` and `<case>.pil.png` (Pillow's decoded pixels, mode L or RGB, lossless) for small deterministic
images covering: 4:4:4, 4:2:2 (h2v1), 4:2:0 (h2v2) at odd sizes, quality 100 and 10, restart intervals, optimized
Huffman tables, progressive (4:2:0, 4:4:4, gray), gray at an odd size, an Adobe RGB JPEG (`keep_rgb`), tiny images
(widths 1-3, where libjpeg-turbo does not use fancy upsampling), and JPEGs whose frame header was patched to other
sampling factors (4:4:0 = h1v2, 4:1:1 = h4v1, 1x4 luma, ...): the entropy-coded data keeps the same number of blocks
per MCU, so the files stay valid (with scrambled content) and Pillow decodes them; these exercise the h1v2 fancy
upsampler and the replication upsampler. Deterministic for fixed Pillow/numpy versions.
"""

import argparse
import io
import os

import numpy as np
import PIL
from PIL import Image, features


def test_image(w, h, seed):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    r = 128 + 100 * np.sin(x / 5.0) * np.cos(y / 7.0)
    g = 255 * (x + y) / (w + h)
    b = np.where(((x // 6) + (y // 5)) % 2 == 0, 230.0, 20.0)
    img = np.stack([r, g, b], axis=-1) + rng.normal(0, 12, (h, w, 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def save(im, **kw):
    buf = io.BytesIO()
    im.save(buf, "JPEG", **kw)
    return buf.getvalue()


def find_sof(data):
    """Offset of the SOF segment's first component spec (after the marker, length, P, Y, X, Nf)."""
    i = 2
    while i < len(data):
        assert data[i] == 0xFF
        m = data[i + 1]
        n = (data[i + 2] << 8) | data[i + 3]
        if m in (0xC0, 0xC1, 0xC2):
            return i
        i += 2 + n
    raise ValueError("no SOF")


def patch(data, width, height, factors):
    """Rewrites the frame size and the sampling factors (one byte per component)."""
    b = bytearray(data)
    s = find_sof(b)
    b[s + 5 : s + 7] = height.to_bytes(2, "big")
    b[s + 7 : s + 9] = width.to_bytes(2, "big")
    for k, f in enumerate(factors):
        b[s + 11 + 3 * k] = f
    return bytes(b)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/golden/jpeg")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    cases = {}
    cases["s444_q90"] = save(test_image(33, 21, 1), quality=90, subsampling=0)
    cases["s422_q75"] = save(test_image(37, 19, 2), quality=75, subsampling=1)
    cases["s420_17x9"] = save(test_image(17, 9, 3), quality=80, subsampling=2)
    cases["s420_q100"] = save(test_image(40, 30, 4), quality=100, subsampling=2)
    cases["s420_q10"] = save(test_image(41, 31, 5), quality=10, subsampling=2)
    cases["s420_restart"] = save(test_image(50, 34, 6), quality=85, subsampling=2, restart_marker_blocks=3)
    cases["s422_restart_rows"] = save(test_image(45, 20, 7), quality=85, subsampling=1, restart_marker_rows=1)
    cases["s420_optimized"] = save(test_image(29, 27, 8), quality=70, subsampling=2, optimize=True)
    cases["prog420"] = save(test_image(43, 35, 9), quality=85, subsampling=2, progressive=True)
    cases["prog444_q100"] = save(test_image(26, 18, 10), quality=100, subsampling=0, progressive=True)
    cases["prog_gray"] = save(test_image(23, 29, 11).convert("L"), quality=60, progressive=True)
    cases["gray_13x7"] = save(test_image(13, 7, 12).convert("L"), quality=95)
    cases["adobe_rgb"] = save(test_image(21, 14, 13), quality=90, keep_rgb=True, subsampling=0)
    cases["s420_2x5"] = save(test_image(2, 5, 14), quality=90, subsampling=2)
    cases["s422_3x4"] = save(test_image(3, 4, 15), quality=90, subsampling=1)
    cases["s420_1x1"] = save(test_image(1, 1, 16), quality=90, subsampling=2)
    # Patched sampling factors (same blocks per MCU as the source).
    src422 = save(test_image(32, 16, 17), quality=90, subsampling=1)  # Y 2x1: 2x2 MCUs of 16x8
    cases["patch_h1v2_440"] = patch(src422, 16, 32, [0x12, 0x11, 0x11])  # 2x2 MCUs of 8x16
    cases["patch_h1v2_odd"] = patch(src422, 15, 29, [0x12, 0x11, 0x11])
    src420 = save(test_image(32, 32, 18), quality=90, subsampling=2)  # Y 2x2: 2x2 MCUs of 16x16
    cases["patch_h4v1_411"] = patch(src420, 64, 16, [0x41, 0x11, 0x11])  # 2x2 MCUs of 32x8
    cases["patch_h1v4"] = patch(src420, 15, 61, [0x14, 0x11, 0x11])  # 2x2 MCUs of 8x32
    for name, data in cases.items():
        with open(os.path.join(args.out, f"{name}.jpg"), "wb") as f:
            f.write(data)
        im = Image.open(io.BytesIO(data))
        im.load()
        assert im.mode in ("L", "RGB"), (name, im.mode)
        im.save(os.path.join(args.out, f"{name}.pil.png"))
    with open(os.path.join(args.out, "README.md"), "w") as f:
        f.write(
            "# Golden JPEGs for the libjpeg-turbo-exact decoder\n\n"
            "Generated by `scripts/make_golden_jpeg.py` (do not edit by hand); checked by `tests/vision_jpeg.rs`.\n"
            f"Pillow {PIL.__version__} (libjpeg-turbo "
            f"{features.version('libjpeg_turbo')}). Each `<case>.jpg` has Pillow's decoded pixels in "
            "`<case>.pil.png`.\n"
        )
    print(f"wrote {len(cases)} cases to {args.out}")


if __name__ == "__main__":
    main()
