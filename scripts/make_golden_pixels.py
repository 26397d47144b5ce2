#!/usr/bin/env python3
"""Golden pixel values for Llama 3.2 Vision image preprocessing (transformers' MllamaImageProcessor, PIL backend).

Usage:
    /work/venv-golden/bin/python scripts/make_golden_pixels.py [--out tests/golden/mllama-pixels]

Writes into the output folder:

* small deterministic test images (PNG: RGB, RGBA, LA, L, 1-bit, palette with and without tRNS, RGB with tRNS,
  16-bit RGB and gray; JPEG: 4:2:0, 4:4:4, progressive, grayscale, EXIF-rotated; WebP: lossless RGBA, lossy RGB,
  lossy RGBA), including a 1x1, a wide and a tall image, images that need no resize, upscaling and downscaling;
* `reference.json`: for every image the geometry (canvas, resized size, tiles, aspect_ratio_id, aspect_ratio_mask,
  num_tiles) and the name of its pixel file, plus the library versions;
* `<case>.pil.png` (JPEG cases): Pillow's decoded RGB pixels, lossless, to check the preprocessing apart from the
  JPEG decoder (ours and libjpeg-turbo differ by a few levels on some pixels);
* `<case>.npy`: float32 `pixel_values` of the real tiles, `[num_tiles, 3, T, T]`, as transformers computed them with
  the Llama 3.2 Vision preprocessor config except a small tile size (T = 16) to keep the files small (so most images
  are downscaled onto a canvas of at most 4 tiles, a few are upscaled and a few fit unchanged);
* full-size cases (T = 560, the real config): only statistics (sum, sum of squares, min, max over the real tiles),
  a strided subsample `pixel_values[:n, :, ::20, ::20]` (`<case>.sub.npy`) and a dense 24x24 crop (`<case>.crop.npy`);
* a batch case (two images of one prompt, T = 16): the whole padded `pixel_values` `[1, 2, 4, 3, 16, 16]`,
  `aspect_ratio_ids`, `aspect_ratio_mask`, `num_tiles`;
* `resize_sweep.bin`: PIL `Image.resize` outputs (uint8 RGB, row-major, concatenated) of one noise image to many
  sizes with several filters, for an exact check of the resampler alone.

Images are opened with `PIL.Image.open` and passed to the processor as PIL images, as in the model card example
(so no EXIF transposition; transparency is composited onto white by `convert_to_rgb`).
The script is deterministic: rerunning it with the same library versions gives identical files.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import PIL
import transformers
from PIL import Image
from transformers import MllamaImageProcessorPil
from transformers.image_transforms import convert_to_rgb
from transformers.models.mllama import image_processing_pil_mllama as mp

# Llama 3.2 Vision preprocessor_config.json (11B and 90B are identical).
LLAMA32_VISION = {
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_pad": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "max_image_tiles": 4,
    "resample": 2,
    "rescale_factor": 0.00392156862745098,
    "size": {"height": 560, "width": 560},
}
SMALL_TILE = 16
SUB_STRIDE = 20
CROP = 24


def processor(tile: int) -> MllamaImageProcessorPil:
    cfg = dict(LLAMA32_VISION)
    cfg["size"] = {"height": tile, "width": tile}
    return MllamaImageProcessorPil(**cfg)


# ---------------------------------------------------------------------------------------------------------------
# Deterministic test images


def pattern(w: int, h: int, seed: int, noise: float = 24.0) -> np.ndarray:
    """Gradients, a disc, stripes and some noise: sharp edges and smooth areas (uint8, h x w x 3)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    u, v = x / max(w - 1, 1), y / max(h - 1, 1)
    r = 255 * u
    g = 255 * v
    b = 127.5 + 127.5 * np.sin(2 * np.pi * (3 * u + 2 * v))
    img = np.stack([r, g, b], -1)
    disc = (u - 0.6) ** 2 + (v - 0.4) ** 2 < 0.06
    img[disc] = [250, 30, 60]
    stripes = (np.floor(x / max(w // 12, 1)) % 2 == 0) & (v > 0.75)
    img[stripes] = [10, 10, 10]
    if noise:
        img += rng.normal(0, noise, img.shape)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def alpha_ramp(w: int, h: int) -> np.ndarray:
    """Alpha: transparent left edge, opaque right edge, a fully transparent hole and a fully opaque band."""
    y, x = np.mgrid[0:h, 0:w]
    a = np.round(255 * x / max(w - 1, 1))
    a[(h // 3 <= y) & (y < h // 2) & (w // 4 <= x) & (x < w // 2)] = 0
    a[y >= (4 * h) // 5] = 255
    return a.astype(np.uint8)


def raw_png(w: int, h: int, bit_depth: int, color_type: int, rows: list[bytes], extra: bytes = b"") -> bytes:
    """A minimal PNG (filter 0 on every row) for layouts PIL cannot write (16-bit RGB)."""

    def chunk(t: bytes, d: bytes) -> bytes:
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, bit_depth, color_type, 0, 0, 0)
    idat = zlib.compress(b"".join(b"\x00" + r for r in rows), 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + extra + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def save(img: Image.Image, path: Path, **kw) -> None:
    buf = io.BytesIO()
    img.save(buf, **kw)
    path.write_bytes(buf.getvalue())


def make_images(out: Path) -> list[dict]:
    """Writes the test images; returns [{name, file, note, exact_decode}].

    exact_decode: our decoder is expected to reproduce Pillow's pixels bit-exactly (PNG, WebP); JPEG decoders differ
    slightly (IDCT, chroma upsampling), so JPEG cases also store Pillow's decoded RGB as a PNG (`pil_decoded`).
    """
    cases = []

    def add(name, file, note, exact=True):
        cases.append({"name": name, "file": file, "note": note, "exact_decode": exact})

    save(Image.fromarray(pattern(161, 119, 1, noise=4)), out / "rgb_down.png", format="PNG")
    add("rgb_down", "rgb_down.png", "RGB 161x119, downscaled 5x onto a 2x2 canvas")
    save(Image.fromarray(pattern(40, 38, 25)), out / "rgb_mild_down.png", format="PNG")
    add("rgb_mild_down", "rgb_mild_down.png", "RGB 40x38, downscaled 1.25x onto a 2x2 canvas")
    save(Image.fromarray(np.array([[[200, 100, 50]]], np.uint8)), out / "tiny_1x1.png", format="PNG")
    add("tiny_1x1", "tiny_1x1.png", "RGB 1x1, upscaled to one full tile")
    save(Image.fromarray(pattern(13, 9, 2, noise=40)), out / "rgb_up.png", format="PNG")
    add("rgb_up", "rgb_up.png", "RGB 13x9, upscaled")
    save(Image.fromarray(pattern(150, 12, 3, noise=10)), out / "wide.png", format="PNG")
    add("wide", "wide.png", "RGB 150x12, 1x4 canvas, downscaled")
    save(Image.fromarray(pattern(11, 130, 4, noise=10)), out / "tall.png", format="PNG")
    add("tall", "tall.png", "RGB 11x130, 4x1 canvas, downscaled")
    save(Image.fromarray(pattern(SMALL_TILE, SMALL_TILE, 5)), out / "exact_1x1.png", format="PNG")
    add("exact_1x1", "exact_1x1.png", "RGB exactly one tile: no resize")
    save(Image.fromarray(pattern(SMALL_TILE, 2 * SMALL_TILE, 6)), out / "exact_2x1.png", format="PNG")
    add("exact_2x1", "exact_2x1.png", "RGB exactly 2x1 tiles (tall): no resize")
    save(Image.fromarray(pattern(25, 12, 7)), out / "no_resize_wide.png", format="PNG")
    add("no_resize_wide", "no_resize_wide.png", "RGB 25x12: fits a 1x2 canvas unchanged (padded only)")

    rgba = np.dstack([pattern(90, 70, 8, noise=8), alpha_ramp(90, 70)])
    save(Image.fromarray(rgba, "RGBA"), out / "rgba.png", format="PNG")
    add("rgba", "rgba.png", "RGBA 90x70 with transparency, composited on white, downscaled")
    la = np.dstack([pattern(40, 50, 9)[..., 1], alpha_ramp(40, 50)])
    save(Image.fromarray(la, "LA"), out / "gray_alpha.png", format="PNG")
    add("gray_alpha", "gray_alpha.png", "LA 40x50 with transparency")
    save(Image.fromarray(pattern(11, 7, 10)[..., 0], "L"), out / "gray.png", format="PNG")
    add("gray", "gray.png", "L 11x7, upscaled")
    bits = pattern(33, 20, 11)[..., 0] > 128
    save(Image.fromarray(bits), out / "bilevel.png", format="PNG")
    add("bilevel", "bilevel.png", "1-bit 33x20")
    pal = Image.fromarray(pattern(60, 50, 12)).quantize(colors=16, method=Image.Quantize.MEDIANCUT, dither=0)
    save(pal, out / "palette.png", format="PNG")
    add("palette", "palette.png", "P (16 colours) 60x50, no transparency")
    pal_t = Image.fromarray(pattern(50, 37, 13)).quantize(colors=8, method=Image.Quantize.MEDIANCUT, dither=0)
    save(pal_t, out / "palette_trns.png", format="PNG", transparency=3)
    add("palette_trns", "palette_trns.png", "P (8 colours) 50x37, colour 3 transparent (tRNS)")
    save(Image.fromarray(pattern(29, 41, 14)), out / "rgb_trns.png", format="PNG", transparency=(10, 10, 10))
    add("rgb_trns", "rgb_trns.png", "RGB 29x41 with a tRNS colour key (the stripes)")

    p16 = pattern(37, 29, 15).astype(np.uint32) * 257 + np.random.default_rng(15).integers(0, 257, (29, 37, 3))
    rows = [b"".join(struct.pack(">HHH", *px) for px in row) for row in p16.astype(np.uint16)]
    (out / "rgb16.png").write_bytes(raw_png(37, 29, 16, 2, rows))
    add("rgb16", "rgb16.png", "16-bit RGB 37x29 (PIL keeps the high byte)")
    g16 = (pattern(25, 31, 16)[..., 0].astype(np.uint32) * 3).astype(np.uint16)  # 0..765: both sides of 255
    rows = [b"".join(struct.pack(">H", v) for v in row) for row in g16]
    (out / "gray16.png").write_bytes(raw_png(25, 31, 16, 0, rows))
    add("gray16", "gray16.png", "16-bit gray 25x31, values 0..765 (PIL I;16 -> RGB clamps at 255)")

    photo = Image.fromarray(pattern(120, 90, 17, noise=8))
    save(photo, out / "photo420.jpg", format="JPEG", quality=90, subsampling=2)
    add("photo420", "photo420.jpg", "JPEG 4:2:0 120x90", exact=False)
    save(Image.fromarray(pattern(70, 50, 18, noise=8)), out / "photo444.jpg", format="JPEG", quality=95, subsampling=0)
    add("photo444", "photo444.jpg", "JPEG 4:4:4 70x50", exact=False)
    save(Image.fromarray(pattern(77, 61, 19, noise=8)), out / "progressive.jpg", format="JPEG", quality=85,
         progressive=True)
    add("progressive", "progressive.jpg", "progressive JPEG 4:2:0 77x61", exact=False)
    save(Image.fromarray(pattern(40, 40, 20, noise=8)[..., 1], "L"), out / "gray.jpg", format="JPEG", quality=90)
    add("gray_jpeg", "gray.jpg", "grayscale JPEG 40x40", exact=False)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    save(Image.fromarray(pattern(64, 24, 21, noise=8)), out / "exif_rot.jpg", format="JPEG", quality=90,
         exif=exif.tobytes())
    add("exif_rot", "exif_rot.jpg", "JPEG 64x24 with EXIF orientation 6 (not applied: PIL image path)", exact=False)

    rgba_w = np.dstack([pattern(60, 40, 22), alpha_ramp(60, 40)])
    save(Image.fromarray(rgba_w, "RGBA"), out / "lossless.webp", format="WEBP", lossless=True)
    add("webp_lossless", "lossless.webp", "lossless WebP RGBA 60x40")
    save(Image.fromarray(pattern(50, 70, 23, noise=8)), out / "lossy.webp", format="WEBP", quality=80)
    add("webp_lossy", "lossy.webp", "lossy WebP RGB 50x70")
    rgba_l = np.dstack([pattern(44, 30, 24, noise=8), alpha_ramp(44, 30)])
    save(Image.fromarray(rgba_l, "RGBA"), out / "lossy_alpha.webp", format="WEBP", quality=80)
    add("webp_lossy_alpha", "lossy_alpha.webp", "lossy WebP RGBA 44x30")
    return cases


def make_full_images(out: Path) -> list[dict]:
    cases = []
    save(Image.fromarray(pattern(300, 200, 30, noise=0)), out / "full_up.png", format="PNG", optimize=True)
    cases.append({"name": "full_up", "file": "full_up.png", "note": "RGB 300x200 upscaled to 560x373"})
    save(Image.fromarray(pattern(560, 1120, 31, noise=0)), out / "full_exact.png", format="PNG", optimize=True)
    cases.append({"name": "full_exact", "file": "full_exact.png", "note": "RGB 560x1120: 2x1 tiles, no resize"})
    save(Image.fromarray(pattern(1500, 1000, 32, noise=0)), out / "full_down.png", format="PNG", optimize=True)
    cases.append({"name": "full_down", "file": "full_down.png", "note": "RGB 1500x1000 downscaled to 1120x746"})
    rgba = np.dstack([pattern(700, 300, 33, noise=0), alpha_ramp(700, 300)])
    save(Image.fromarray(rgba, "RGBA"), out / "full_rgba_wide.png", format="PNG", optimize=True)
    cases.append({"name": "full_rgba_wide", "file": "full_rgba_wide.png", "note": "RGBA 700x300: 1x2 tiles"})
    for c in cases:
        c["exact_decode"] = True
    return cases


# ---------------------------------------------------------------------------------------------------------------


def geometry(img: Image.Image, tile: int, max_tiles: int) -> dict:
    w, h = img.size
    ch, cw = mp.get_optimal_tiled_canvas(h, w, max_tiles, tile)
    nh, nw = mp.get_image_size_fit_to_canvas(h, w, int(ch), int(cw), tile)
    return {
        "image_size": [int(h), int(w)],
        "canvas": [int(ch), int(cw)],
        "resized": [int(nh), int(nw)],
        "tiles": [int(ch) // tile, int(cw) // tile],
    }


def run_one(proc, img: Image.Image) -> dict:
    res = proc(images=[[img]], return_tensors="np")
    pv = np.asarray(res["pixel_values"])
    assert pv.dtype == np.float32 and pv.shape[:2] == (1, 1), pv.shape
    n = int(res["num_tiles"][0][0])
    assert not np.any(pv[0, 0, n:]), "transformers pads the tile dimension with zeros"
    return {
        "pixels": np.ascontiguousarray(pv[0, 0, :n]),
        "padded_shape": list(pv.shape[2:]),
        "num_tiles": n,
        "aspect_ratio_id": int(res["aspect_ratio_ids"][0, 0]),
        "aspect_ratio_mask": [int(v) for v in res["aspect_ratio_mask"][0, 0]],
    }


# (width, height) from the 97x61 source: extreme and mild down/up scaling, mixed, one-sided.
SWEEP_SIZES = [
    (1, 1), (2, 1), (1, 3), (5, 4), (13, 9), (31, 20), (48, 30), (40, 70), (64, 40), (97, 20), (20, 61),
    (98, 62), (120, 9), (9, 150), (250, 7), (3, 200),
]
OTHER_FILTER_SIZES = [(5, 4), (13, 9), (31, 20), (40, 70)]
SWEEP_FILTERS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
                 "lanczos": Image.Resampling.LANCZOS, "box": Image.Resampling.BOX, "hamming": Image.Resampling.HAMMING}


def make_sweep(out: Path) -> dict:
    src = np.random.default_rng(40).integers(0, 256, (61, 97, 3), dtype=np.uint8)
    save(Image.fromarray(src), out / "sweep_src.png", format="PNG")
    im = Image.open(out / "sweep_src.png")
    blobs, entries, offset = [], [], 0
    for name, f in SWEEP_FILTERS.items():
        sizes = SWEEP_SIZES if name == "bilinear" else OTHER_FILTER_SIZES
        for w, h in sizes:
            data = np.asarray(im.resize((w, h), resample=f), dtype=np.uint8).tobytes()
            assert len(data) == w * h * 3
            entries.append({"filter": name, "width": w, "height": h, "offset": offset})
            blobs.append(data)
            offset += len(data)
    (out / "resize_sweep.bin").write_bytes(b"".join(blobs))
    return {"source": "sweep_src.png", "data": "resize_sweep.bin", "layout": "uint8 RGB, row-major", "outputs": entries}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "tests/golden/mllama-pixels"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for f in out.iterdir():
        if f.is_file():
            f.unlink()

    max_tiles = LLAMA32_VISION["max_image_tiles"]
    ref = {
        "generator": "scripts/make_golden_pixels.py",
        "versions": {
            "transformers": transformers.__version__,
            "pillow": PIL.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
        },
        "processor": "transformers.MllamaImageProcessorPil (images opened with PIL.Image.open, passed as [[image]])",
        "config": LLAMA32_VISION,
        "small_tile": SMALL_TILE,
        "cases": [],
        "full_size": [],
    }

    proc = processor(SMALL_TILE)
    for c in make_images(out):
        img = Image.open(out / c["file"])
        r = run_one(proc, img)
        npy = c["name"] + ".npy"
        np.save(out / npy, r["pixels"])
        if not c["exact_decode"]:
            # Pillow's decoded, RGB-converted pixels, to check the preprocessing apart from the JPEG decoder.
            rgb = convert_to_rgb(Image.open(out / c["file"]), return_numpy=True)
            c["pil_decoded"] = c["name"] + ".pil.png"
            save(Image.fromarray(rgb), out / c["pil_decoded"], format="PNG")
        ref["cases"].append({
            **c, "pil_mode": img.mode, "tile": SMALL_TILE, **geometry(img, SMALL_TILE, max_tiles),
            "num_tiles": r["num_tiles"], "aspect_ratio_id": r["aspect_ratio_id"],
            "aspect_ratio_mask": r["aspect_ratio_mask"], "padded_shape": r["padded_shape"], "pixel_values": npy,
        })

    proc = processor(560)
    rng = np.random.default_rng(50)
    for c in make_full_images(out):
        img = Image.open(out / c["file"])
        r = run_one(proc, img)
        px = r["pixels"].astype(np.float64)
        sub = np.ascontiguousarray(r["pixels"][:, :, ::SUB_STRIDE, ::SUB_STRIDE])
        np.save(out / (c["name"] + ".sub.npy"), sub)
        geo = geometry(img, 560, max_tiles)
        # A crop across the bottom/right edge of the resized image (where it meets the padding) when there is one.
        rh, rw = geo["resized"]
        t = int(rng.integers(0, r["num_tiles"]))
        y0 = min(max(rh - (t // geo["tiles"][1]) * 560 - CROP // 2, 0), 560 - CROP)
        x0 = min(max(rw - (t % geo["tiles"][1]) * 560 - CROP // 2, 0), 560 - CROP)
        crop = np.ascontiguousarray(r["pixels"][t, :, y0:y0 + CROP, x0:x0 + CROP])
        np.save(out / (c["name"] + ".crop.npy"), crop)
        ref["full_size"].append({
            **c, "pil_mode": img.mode, "tile": 560, **geo, "num_tiles": r["num_tiles"],
            "aspect_ratio_id": r["aspect_ratio_id"], "aspect_ratio_mask": r["aspect_ratio_mask"],
            "padded_shape": r["padded_shape"],
            "stats": {"sum": float(px.sum()), "sum_sq": float((px * px).sum()), "min": float(px.min()),
                      "max": float(px.max())},
            "subsample": {"file": c["name"] + ".sub.npy", "stride": SUB_STRIDE},
            "crop": {"file": c["name"] + ".crop.npy", "tile": t, "y": int(y0), "x": int(x0), "size": CROP},
        })

    proc = processor(SMALL_TILE)
    files = ["rgb_down.png", "palette_trns.png"]
    res = proc(images=[[Image.open(out / f) for f in files]], return_tensors="np")
    np.save(out / "batch.npy", np.asarray(res["pixel_values"], dtype=np.float32))
    ref["batch"] = {
        "files": files, "tile": SMALL_TILE, "pixel_values": "batch.npy",
        "shape": list(res["pixel_values"].shape),
        "aspect_ratio_ids": [int(v) for v in res["aspect_ratio_ids"][0]],
        "aspect_ratio_mask": [[int(v) for v in row] for row in res["aspect_ratio_mask"][0]],
        "num_tiles": [int(v) for v in res["num_tiles"][0]],
    }

    ref["resize_sweep"] = make_sweep(out)
    (out / "reference.json").write_text(json.dumps(ref, indent=1) + "\n")
    (out / "README.md").write_text(
        "# Golden pixel values for Llama 3.2 Vision image preprocessing\n\n"
        "Generated by `scripts/make_golden_pixels.py` (do not edit by hand); checked by `tests/vision_image.rs`.\n"
        + __doc__.split("\n", 1)[1].replace("Usage:\n", "Regenerate with:\n")
    )
    total = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"wrote {len(list(out.iterdir()))} files, {total / 1024:.0f} KiB, to {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
