#!/usr/bin/env python3
"""Generate tiny random-weight Llama 3.2 Vision (MllamaForConditionalGeneration) golden cases.

Usage:
    python scripts/make_golden_mllama.py [--out tests/golden] [--case NAME] [--verify]

Each case directory `tests/golden/mllama-<case>/` gets a real HF-layout checkpoint (config.json,
generation_config.json, model.safetensors in bfloat16, written by `save_pretrained`), the input
images as PNG, everything the model was fed, and float32 reference outputs:

* image0.png, image1.png, ...: the RGB input images (generated here, deterministic);
* pixel_values.npy: float32 [1, images, max_num_tiles, 3, image_size, image_size], from
  `MllamaImageProcessorPil` (the PIL backend) with the tiny tile size and CLIP mean/std;
* aspect_ratio_ids.npy: int64 [1, images]; aspect_ratio_mask.npy: int64 [1, images, max_num_tiles];
* cross_attention_mask.npy: int64 [1, len(input_ids), images, max_num_tiles], built by transformers'
  processor functions (`get_cross_attention_token_mask` + `convert_sparse_cross_attention_mask_to_dense`);
* logits.npy: float32 [len(input_ids), vocab] logits of the whole prompt in one forward pass;
* vision_output.npy: float32 [1, images, max_num_tiles, patches + 1, vision_output_dim], the vision model's
  last_hidden_state (the padding to a multiple of 8 is already stripped); cross_attention_states.npy: float32
  [images * max_num_tiles, patches + 1, text hidden], the projector output the text model receives (to test the
  encoder and the decoder separately);
* reference.json: input ids (with the `<|image|>` id), greedy continuation, image geometry, versions.

Reference outputs come from the saved checkpoint reloaded with dtype=float32 and
attn_implementation="eager". Weights are drawn from an explicit generator (norm weights near 1,
gates non-zero so every gated path - cross-attention, the global encoder, the tile and position
embeddings - changes the logits). The script is deterministic (fixed seeds, one thread).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys

import numpy as np
import PIL
import safetensors
import safetensors.torch
import torch
import transformers
from PIL import Image
from transformers import GenerationConfig, MllamaConfig, MllamaForConditionalGeneration
from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil
from transformers.models.mllama.processing_mllama import (
    convert_sparse_cross_attention_mask_to_dense,
    get_cross_attention_token_mask,
)

GREEDY_NEW_TOKENS = 12
MIN_REL_MARGIN = 5e-3  # greedy top-1/top-2 gap relative to max |logit|, as in make_golden.py
NORM_JITTER = 0.1
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]  # preprocessor_config.json of the published models
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
VOCAB = 256
IMAGE_TOKEN = VOCAB  # like the real models: image_token_index == vocab_size, a row of the 8 extra embeddings
BOS, PAD, EOS = 0, VOCAB - 3, [VOCAB - 2, VOCAB - 1]


def llama3_rope(orig: int) -> dict:
    return {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": orig,
    }


# prompt: a list of ids where "I" marks an <|image|> token, "B" the bos id, and an int n that many random ids.
CASES = [
    {
        # 28x56 fits the 1x2-tile canvas exactly: no resampling, no padding inside the image, 2 padding tiles.
        "name": "mllama-noresize",
        "seed": 7,
        "images": [(28, 56)],
        "prompt": ["I", "B", 14],
        "vision": dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_global_layers=1,
            attention_heads=4,
            image_size=28,
            patch_size=14,
            max_num_tiles=4,
            intermediate_layers_indices=[0, 1],
            vision_output_dim=96,
        ),
        "text": dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            cross_attention_layers=[1],
            rope_parameters=llama3_rope(8),
        ),
    },
    {
        # 250x40 is larger than every canvas of 56-pixel tiles: bilinear downscale to 224x35 on a 4x1 canvas.
        # Text tokens before the image token have a fully masked cross-attention row.
        "name": "mllama-resize",
        "seed": 11,
        "images": [(250, 40)],
        "prompt": ["B", 3, "I", 13],
        "vision": dict(
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=3,
            num_global_layers=1,
            attention_heads=2,
            image_size=56,
            patch_size=14,
            max_num_tiles=4,
            intermediate_layers_indices=[1],
            vision_output_dim=64,
        ),
        "text": dict(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=3,
            num_attention_heads=8,
            num_key_value_heads=2,
            cross_attention_layers=[2],
            rope_parameters=llama3_rope(8),
        ),
    },
    {
        # Two images: 20x24 is upscaled to 23x28 (one tile), 60x50 downscaled to 56x46 (2x2 tiles).
        "name": "mllama-two-images",
        "seed": 5,
        "images": [(20, 24), (60, 50)],
        "prompt": ["B", 2, "I", 5, "I", 8],
        "vision": dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_global_layers=2,
            attention_heads=4,
            image_size=28,
            patch_size=14,
            max_num_tiles=4,
            intermediate_layers_indices=[0, 1],
            vision_output_dim=96,
        ),
        "text": dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=1,
            cross_attention_layers=[1, 3],
            rope_parameters=llama3_rope(8),
        ),
    },
]

COMMON_TEXT = dict(
    vocab_size=VOCAB,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    initializer_range=0.15,
    bos_token_id=BOS,
    eos_token_id=EOS,
    pad_token_id=PAD,
)


def versions() -> dict:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
        "numpy": np.__version__,
        "pillow": PIL.__version__,
    }


def make_config(case: dict) -> MllamaConfig:
    return MllamaConfig(
        vision_config=dict(case["vision"], norm_eps=1e-5, initializer_range=0.15),
        text_config=dict(COMMON_TEXT, **case["text"]),
        image_token_index=IMAGE_TOKEN,
    )


@torch.no_grad()
def init_weights(model, seed: int) -> None:
    """Overwrite every parameter from an explicit generator, in sorted-name order.

    Matrices, embeddings and linear biases ~ N(0, std) with std 0.15 (0.05 for the patch embedding,
    whose fan-in is 588); norm weights ~ 1 + 0.1 N(0, 1); LayerNorm biases ~ 0.1 N(0, 1); every gate
    +-(0.3 .. 0.9), so tanh(gate) is far from 0 and from 1.
    """
    gen = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
        leaf = name.rsplit(".", 1)[-1]
        is_gate = leaf in ("gate", "gate_attn", "gate_ffn") or leaf.endswith("_gate")
        is_norm = "norm" in name and "embedding" not in name
        if is_gate:
            mag = 0.3 + 0.6 * torch.rand(p.shape, generator=gen)
            p.copy_(torch.where(noise < 0, -mag, mag))
        elif is_norm and leaf == "weight":
            p.copy_(1.0 + NORM_JITTER * noise)
        elif is_norm and leaf == "bias":
            p.copy_(NORM_JITTER * noise)
        elif "patch_embedding" in name:
            p.copy_(0.05 * noise)
        else:
            p.copy_(0.15 * noise)


def make_image(h: int, w: int, seed: int) -> np.ndarray:
    """A smooth RGB pattern with mild noise, uint8 [h, w, 3]."""
    rng = np.random.RandomState(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    chans = []
    for _ in range(3):
        fx, fy, ph = rng.uniform(0.05, 0.35), rng.uniform(0.05, 0.35), rng.uniform(0, 2 * np.pi)
        chans.append(127.5 + 95 * np.sin(fx * x + fy * y + ph) + 20 * np.cos(0.02 * x * y + ph))
    img = np.stack(chans, -1) + rng.randint(-10, 11, size=(h, w, 3))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def build_prompt(spec: list, rng: np.random.RandomState) -> list[int]:
    ids: list[int] = []
    for item in spec:
        if item == "I":
            ids.append(IMAGE_TOKEN)
        elif item == "B":
            ids.append(BOS)
        else:
            ids.extend(rng.randint(1, PAD, size=item).tolist())
    return ids


def processor_for(cfg: MllamaConfig) -> MllamaImageProcessorPil:
    s = cfg.vision_config.image_size
    return MllamaImageProcessorPil(
        size={"height": s, "width": s},
        max_image_tiles=cfg.vision_config.max_num_tiles,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )


def model_inputs(case_dir: str, cfg: MllamaConfig, n_images: int, ids: list[int]) -> tuple[dict, list[int]]:
    """Preprocess the PNGs in `case_dir` and build the cross-attention mask, as MllamaProcessor does."""
    images = [Image.open(os.path.join(case_dir, f"image{k}.png")).convert("RGB") for k in range(n_images)]
    proc = processor_for(cfg)
    out = proc(images=[images], return_tensors="np")
    num_tiles = out["num_tiles"]
    token_mask = [get_cross_attention_token_mask(ids, IMAGE_TOKEN)]
    xmask = convert_sparse_cross_attention_mask_to_dense(
        token_mask, num_tiles=num_tiles, max_num_tiles=proc.max_image_tiles, length=len(ids)
    )
    feed = {
        "input_ids": torch.tensor([ids], dtype=torch.long),
        "pixel_values": torch.from_numpy(np.asarray(out["pixel_values"], dtype=np.float32)),
        "aspect_ratio_ids": torch.from_numpy(np.asarray(out["aspect_ratio_ids"], dtype=np.int64)),
        "aspect_ratio_mask": torch.from_numpy(np.asarray(out["aspect_ratio_mask"], dtype=np.int64)),
        "cross_attention_mask": torch.from_numpy(np.asarray(xmask, dtype=np.int64)),
    }
    return feed, list(num_tiles[0])


def extend_mask(mask: torch.Tensor, total: int) -> torch.Tensor:
    """Repeat the last row for generated tokens, as `_update_model_kwargs_for_generation` does."""
    extra = total - mask.shape[1]
    return torch.cat([mask, mask[:, -1:].expand(-1, extra, -1, -1)], dim=1) if extra > 0 else mask


@torch.no_grad()
def greedy(model, feed: dict) -> tuple[list[int], list[float], float]:
    ids = feed["input_ids"]
    out = model.generate(
        **feed,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=GREEDY_NEW_TOKENS,
        eos_token_id=EOS,
        pad_token_id=PAD,
        output_logits=True,
        return_dict_in_generate=True,
    )
    new = out.sequences[0, ids.shape[1] :].tolist()
    assert len(new) == GREEDY_NEW_TOKENS and not set(new) & set(EOS), new
    margins, max_abs = [], 0.0
    for lg in out.logits:
        top = torch.topk(lg.reshape(-1).float(), 2).values
        margins.append(float(top[0] - top[1]))
        max_abs = max(max_abs, float(lg.abs().max()))
    assert min(margins) > MIN_REL_MARGIN * max_abs, f"top-2 margin too small: {min(margins)} vs {max_abs}"
    # Cross-check the cached generation against one uncached forward over prompt + continuation.
    full = torch.tensor([ids[0].tolist() + new], dtype=torch.long)
    f = dict(feed, input_ids=full, cross_attention_mask=extend_mask(feed["cross_attention_mask"], full.shape[1]))
    lg = model(**f, use_cache=False).logits[0]
    argmax = lg[ids.shape[1] - 1 : -1].argmax(-1).tolist()
    assert argmax == new, f"cached vs uncached greedy mismatch: {argmax} vs {new}"
    return new, margins, max_abs


def check_saved_tensors(case_dir: str, model) -> list[str]:
    """The file holds bf16 tensors in the original layout, and the float32 reload holds exactly them."""
    tensors = safetensors.torch.load_file(os.path.join(case_dir, "model.safetensors"))
    prefixes = ("vision_model.", "language_model.model.", "language_model.lm_head.", "multi_modal_projector.")
    assert all(k.startswith(prefixes) for k in tensors), sorted(tensors)[:5]
    sd = model.state_dict()
    remap = [
        ("language_model.lm_head.", "lm_head."),
        ("language_model.model.", "model.language_model."),
        ("vision_model.", "model.vision_model."),
        ("multi_modal_projector.", "model.multi_modal_projector."),
    ]
    for k, t in tensors.items():
        assert t.dtype == torch.bfloat16, (k, t.dtype)
        mem = next(to + k[len(frm) :] for frm, to in remap if k.startswith(frm))
        assert torch.equal(sd[mem], t.float()), f"reloaded {k} differs from the file"
    assert len(tensors) == len(sd), (len(tensors), len(sd))
    return sorted(tensors)


@torch.no_grad()
def make_case(case: dict, out_dir: str) -> dict:
    name = case["name"]
    case_dir = os.path.join(out_dir, name)
    if os.path.isdir(case_dir):
        shutil.rmtree(case_dir)
    os.makedirs(case_dir)
    cfg = make_config(case)
    torch.manual_seed(case["seed"])
    model = MllamaForConditionalGeneration(cfg)
    init_weights(model, case["seed"])
    model.generation_config = GenerationConfig(bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    model.to(torch.bfloat16).save_pretrained(case_dir)
    del model

    for k, (h, w) in enumerate(case["images"]):
        Image.fromarray(make_image(h, w, case["seed"] * 100 + k)).save(os.path.join(case_dir, f"image{k}.png"))
    rng = np.random.RandomState(case["seed"])
    ids = build_prompt(case["prompt"], rng)

    ref_model = MllamaForConditionalGeneration.from_pretrained(
        case_dir, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    names = check_saved_tensors(case_dir, ref_model)
    feed, num_tiles = model_inputs(case_dir, ref_model.config, len(case["images"]), ids)
    for key in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask", "cross_attention_mask"):
        arr = feed[key].numpy()
        np.save(os.path.join(case_dir, f"{key}.npy"), np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")))

    if name == "mllama-noresize":  # the image really went through unresampled
        img = np.asarray(Image.open(os.path.join(case_dir, "image0.png")), dtype=np.float64) / 255.0
        want = ((img - CLIP_MEAN) / CLIP_STD).transpose(2, 0, 1)  # [3, 28, 56] -> two 28x28 tiles
        got = feed["pixel_values"][0, 0, :2].numpy()
        assert np.abs(got[0] - want[:, :, :28]).max() < 1e-5 and np.abs(got[1] - want[:, :, 28:]).max() < 1e-5

    logits = ref_model(**feed).logits[0].float().numpy()
    assert logits.shape == (len(ids), VOCAB)
    np.save(os.path.join(case_dir, "logits.npy"), np.ascontiguousarray(logits, dtype="<f4"))
    # Intermediate references for testing the vision encoder and the text decoder separately:
    # vision_output.npy: the vision model's last_hidden_state [batch, images, tiles, patches + 1, vision_output_dim];
    # cross_attention_states.npy: the projector output as the text model receives it [batch * images * tiles,
    # patches + 1, hidden].
    with torch.no_grad():
        vis = ref_model.model.vision_model(
            pixel_values=feed["pixel_values"],
            aspect_ratio_ids=feed["aspect_ratio_ids"],
            aspect_ratio_mask=feed["aspect_ratio_mask"],
        ).last_hidden_state
        cross = ref_model.model.multi_modal_projector(vis).reshape(-1, vis.shape[-2], cfg.text_config.hidden_size)
    np.save(os.path.join(case_dir, "vision_output.npy"), np.ascontiguousarray(vis.float().numpy(), dtype="<f4"))
    np.save(os.path.join(case_dir, "cross_attention_states.npy"), np.ascontiguousarray(cross.float().numpy(), dtype="<f4"))

    # The image must matter: the same prompt with other pixels changes every logit row (rows before the
    # first image token too: HF lets fully masked rows attend uniformly to all vision tokens).
    other = dict(feed, pixel_values=torch.flip(feed["pixel_values"], dims=[-1]))
    flipped = ref_model(**other).logits[0].float().numpy()
    scale = float(np.abs(logits).max())
    image_effect = float(np.abs(flipped - logits).max()) / scale
    assert image_effect > 1e-2, f"{name}: the image barely changes the logits ({image_effect})"

    new, margins, max_abs = greedy(ref_model, feed)

    bf16_model = MllamaForConditionalGeneration.from_pretrained(
        case_dir, dtype=torch.bfloat16, attn_implementation="eager"
    ).eval()
    bf16_feed = dict(feed, pixel_values=feed["pixel_values"].to(torch.bfloat16))
    bf16_logits = bf16_model(**bf16_feed).logits[0].float().numpy()
    del bf16_model

    v, t = ref_model.config.vision_config, ref_model.config.text_config
    ref = {
        "case": name,
        "seed": case["seed"],
        "dtype": "bfloat16",
        "image_token_index": IMAGE_TOKEN,
        "vocab_size": VOCAB,
        "bos_token_id": BOS,
        "eos_token_id": EOS,
        "pad_token_id": PAD,
        "input_ids": ids,
        "images": [
            {"file": f"image{k}.png", "height": h, "width": w, "num_tiles": int(n)}
            for k, ((h, w), n) in enumerate(zip(case["images"], num_tiles))
        ],
        "aspect_ratio_ids": feed["aspect_ratio_ids"][0].tolist(),
        "image_processor": {
            "class": "MllamaImageProcessorPil",
            "size": {"height": v.image_size, "width": v.image_size},
            "max_image_tiles": v.max_num_tiles,
            "image_mean": CLIP_MEAN,
            "image_std": CLIP_STD,
            "resample": "bilinear",
        },
        "cross_attention_layers": list(t.cross_attention_layers),
        "vision_tokens_per_image": v.max_num_tiles * ((v.image_size // v.patch_size) ** 2 + 1),
        "greedy_new_tokens": GREEDY_NEW_TOKENS,
        "greedy_ids": new,
        "greedy_top2_margins": margins,
        "min_top2_margin": min(margins),
        "greedy_max_abs_logit": max_abs,
        "logits_max_abs": scale,
        "image_flip_max_rel_change": image_effect,
        "hf_bf16_max_rel_err": float(np.abs(bf16_logits - logits).max()) / scale,
        "hf_bf16_mean_rel_err": float(np.abs(bf16_logits - logits).mean()) / scale,
        "num_tensors": len(names),
        "files": ["model.safetensors"],
        "versions": versions(),
    }
    with open(os.path.join(case_dir, "reference.json"), "w") as f:
        json.dump(ref, f, indent=1)
        f.write("\n")
    for fn in os.listdir(case_dir):  # safetensors writes 0600; normalise
        os.chmod(os.path.join(case_dir, fn), 0o644)
    size = sum(os.path.getsize(os.path.join(case_dir, fn)) for fn in os.listdir(case_dir))
    assert size < 1_000_000, f"{name}: {size} bytes"
    ref["_bytes"] = size
    return ref


@torch.no_grad()
def verify_case(case: dict, out_dir: str) -> None:
    """Recompute everything from the files on disk in a fresh model and compare."""
    case_dir = os.path.join(out_dir, case["name"])
    with open(os.path.join(case_dir, "reference.json")) as f:
        ref = json.load(f)
    model = MllamaForConditionalGeneration.from_pretrained(
        case_dir, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    check_saved_tensors(case_dir, model)
    feed, _ = model_inputs(case_dir, model.config, len(ref["images"]), ref["input_ids"])
    for key in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask", "cross_attention_mask"):
        want = np.load(os.path.join(case_dir, f"{key}.npy"))
        assert want.dtype == feed[key].numpy().dtype and np.array_equal(want, feed[key].numpy()), key
    want = np.load(os.path.join(case_dir, "logits.npy"))
    err = float(np.abs(model(**feed).logits[0].numpy() - want).max())
    assert err < 1e-5, f"{case['name']}: logits differ by {err}"
    assert greedy(model, feed)[0] == ref["greedy_ids"]
    print(f"  logits diff {err:.2e}, greedy ids equal")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", default=os.path.join("tests", "golden"))
    ap.add_argument("--case", action="append", help="only this case (repeatable)")
    ap.add_argument("--verify", action="store_true", help="check existing files instead of regenerating")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    transformers.logging.set_verbosity_error()
    os.makedirs(args.out, exist_ok=True)
    for case in CASES:
        if args.case and case["name"] not in args.case:
            continue
        if args.verify:
            verify_case(case, args.out)
            print(f"{case['name']}: verified")
            continue
        ref = make_case(case, args.out)
        print(
            f"{ref['case']}: greedy={ref['greedy_ids']} min_margin={ref['min_top2_margin']:.4f} "
            f"max|logit|={ref['greedy_max_abs_logit']:.2f} image effect={ref['image_flip_max_rel_change']:.3f} "
            f"tiles={[im['num_tiles'] for im in ref['images']]} bf16 err={ref['hf_bf16_max_rel_err']:.2e} "
            f"bytes={ref['_bytes']}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
