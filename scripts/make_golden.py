#!/usr/bin/env python3
"""Generate tiny random-weight Llama golden checkpoints and HF transformers reference outputs.

Usage:
    python scripts/make_golden.py [--out tests/golden]

Each case directory gets a real HF-layout checkpoint (config.json, generation_config.json,
model.safetensors or sharded model-0000N-of-0000M.safetensors + model.safetensors.index.json)
written by `save_pretrained`, plus:

* reference.json: prompts, greedy continuation and metadata (see tests/golden/README.md);
* logits.npy:  float32 [len(prompt_ids), vocab] logits of the full prompt;
* logits2.npy: float32 [len(prompt2_ids), vocab] logits of the short prompt.

Reference outputs are computed in float32 from exactly the stored weights: the model is
created, cast to the target dtype, saved, then reloaded from disk with dtype=float32 and
attn_implementation="eager".

The script is deterministic (fixed seeds, single thread, weights drawn from an explicit
generator in a fixed order), so rerunning it with the same library versions reproduces
byte-identical files. Versions used are recorded in every reference.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys

import numpy as np
import safetensors
import safetensors.torch
import torch
import transformers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

PROMPT_LEN = 96
PROMPT2_LEN = 5
GREEDY_NEW_TOKENS = 24
MAX_POS = 256
# Greedy steps must beat this top-1/top-2 gap relative to max|logit| (seeds were picked so that
# both prompts clear it; the brief's floor is 1e-3).
MIN_REL_MARGIN = 5e-3
NORM_JITTER = 0.1  # RMSNorm weights are 1 + NORM_JITTER * N(0, 1), so ignoring them is caught.

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def llama3_rope(theta: float, factor: float, orig_max: int) -> dict:
    """Llama 3.x RoPE scaling parameters (transformers-5 `rope_parameters` spelling)."""
    return {
        "rope_type": "llama3",
        "rope_theta": theta,
        "factor": factor,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": orig_max,
    }


# Each case: name, seed, stored dtype, max_shard_size (None = single file), config kwargs.
CASES = [
    {
        "name": "tied-gqa4",
        "seed": 140,
        "dtype": "bfloat16",
        "max_shard_size": None,
        "config": dict(
            vocab_size=512,
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=8,
            num_key_value_heads=2,
            head_dim=16,
            tie_word_embeddings=True,
            rope_parameters=llama3_rope(500000.0, 32.0, 64),
        ),
    },
    {
        "name": "untied-gqa2-sharded",
        "seed": 149,
        "dtype": "bfloat16",
        # Total is ~727 KB (<= 10**6 bytes "1MB"); 400KB splits it into exactly 2 shards.
        "max_shard_size": "400KB",
        "config": dict(
            vocab_size=384,
            hidden_size=96,
            intermediate_size=192,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,  # != hidden_size / num_attention_heads (24)
            tie_word_embeddings=False,
            rope_parameters=llama3_rope(500000.0, 8.0, 48),
        ),
    },
    {
        "name": "gqa3-f16",
        "seed": 121,
        "dtype": "float16",
        "max_shard_size": None,
        "config": dict(
            vocab_size=320,
            hidden_size=96,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=6,
            num_key_value_heads=2,
            head_dim=16,
            tie_word_embeddings=True,
            rope_parameters=llama3_rope(500000.0, 32.0, 64),
        ),
    },
    {
        "name": "mha-f32-norope-scaling",
        "seed": 105,
        "dtype": "float32",
        "max_shard_size": None,
        "config": dict(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            head_dim=16,
            tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        ),
    },
    # The CUDA attention kernels take head_dim 64 and 128 (the real models' sizes): these two run on both backends.
    {
        "name": "cuda-d64-gqa4",
        "seed": 210,
        "dtype": "bfloat16",
        "max_shard_size": None,
        "config": dict(
            vocab_size=384,
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=64,
            tie_word_embeddings=True,
            rope_parameters=llama3_rope(500000.0, 32.0, 64),
        ),
    },
    {
        "name": "cuda-d128-gqa3",
        "seed": 202,
        "dtype": "bfloat16",
        "max_shard_size": None,
        "config": dict(
            vocab_size=320,
            hidden_size=192,
            intermediate_size=192,
            num_hidden_layers=2,
            num_attention_heads=3,
            num_key_value_heads=1,
            head_dim=128,
            tie_word_embeddings=False,
            rope_parameters=llama3_rope(500000.0, 32.0, 64),
        ),
    },
]

COMMON_CONFIG = dict(
    max_position_embeddings=MAX_POS,
    rms_norm_eps=1e-5,
    initializer_range=0.15,
    hidden_act="silu",
    attention_bias=False,
    mlp_bias=False,
    bos_token_id=0,
)


def versions() -> dict:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
        "numpy": np.__version__,
    }


def smooth_band_count(head_dim: int, rope: dict) -> tuple[int, int, int]:
    """(#high-freq kept, #smoothed, #low-freq scaled) RoPE frequencies under llama3 scaling."""
    orig = rope["original_max_position_embeddings"]
    low_wl = orig / rope["low_freq_factor"]
    high_wl = orig / rope["high_freq_factor"]
    hi = mid = lo = 0
    for i in range(0, head_dim, 2):
        wl = 2 * math.pi * rope["rope_theta"] ** (i / head_dim)
        if wl < high_wl:
            hi += 1
        elif wl > low_wl:
            lo += 1
        else:
            mid += 1
    return hi, mid, lo


@torch.no_grad()
def init_weights(model: LlamaForCausalLM, seed: int, std: float) -> None:
    """Overwrite every parameter from an explicit generator, in sorted-name order.

    Independent of transformers' own init code, so weights only depend on the seed.
    Linear/embedding weights ~ N(0, std); RMSNorm weights ~ 1 + NORM_JITTER * N(0, 1).
    """
    gen = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())  # tied lm_head is deduplicated here
    for name in sorted(params):
        p = params[name]
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
        if name.endswith("norm.weight"):
            p.copy_(1.0 + NORM_JITTER * noise)
        else:
            p.copy_(std * noise)


def top2_margins(step_logits: list[torch.Tensor]) -> tuple[list[float], float]:
    margins, max_abs = [], 0.0
    for lg in step_logits:
        lg = lg.reshape(-1).float()
        top = torch.topk(lg, 2).values
        margins.append(float(top[0] - top[1]))
        max_abs = max(max_abs, float(lg.abs().max()))
    return margins, max_abs


@torch.no_grad()
def greedy(model, prompt: list[int], eos: list[int]) -> tuple[list[int], list[float], float]:
    ids = torch.tensor([prompt], dtype=torch.long)
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=GREEDY_NEW_TOKENS,
        eos_token_id=eos,
        pad_token_id=eos[0],
        output_logits=True,
        return_dict_in_generate=True,
    )
    new = out.sequences[0, len(prompt) :].tolist()
    assert len(new) == GREEDY_NEW_TOKENS, f"generation stopped early ({len(new)} tokens): {new}"
    assert not set(new) & set(eos), f"greedy produced an eos id: {new}"
    margins, max_abs = top2_margins(list(out.logits))
    assert min(margins) > MIN_REL_MARGIN * max_abs, f"top-2 margin too small: {min(margins)} vs {max_abs}"
    # Cross-check the KV-cached generation against full no-cache forwards.
    full = torch.tensor([prompt + new], dtype=torch.long)
    lg = model(full, use_cache=False).logits[0]
    argmax = lg[len(prompt) - 1 : -1].argmax(-1).tolist()
    assert argmax == new, f"cached vs uncached greedy mismatch: {argmax} vs {new}"
    return new, margins, max_abs


def check_checkpoint(case_dir: str, cfg: LlamaConfig, dtype: torch.dtype, model) -> list[str]:
    """Check tensor names/dtypes/shapes in the saved files and that the reload matches them."""
    index = os.path.join(case_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    tensors = {}
    for fn in files:
        part = safetensors.torch.load_file(os.path.join(case_dir, fn))
        assert not set(part) & set(tensors), "tensor stored twice"
        tensors.update(part)
    h, kv, hd, inter = (
        cfg.hidden_size,
        cfg.num_key_value_heads,
        cfg.head_dim,
        cfg.intermediate_size,
    )
    q = cfg.num_attention_heads * hd
    expect = {"model.embed_tokens.weight": (cfg.vocab_size, h), "model.norm.weight": (h,)}
    if not cfg.tie_word_embeddings:
        expect["lm_head.weight"] = (cfg.vocab_size, h)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        expect.update(
            {
                p + "self_attn.q_proj.weight": (q, h),
                p + "self_attn.k_proj.weight": (kv * hd, h),
                p + "self_attn.v_proj.weight": (kv * hd, h),
                p + "self_attn.o_proj.weight": (h, q),
                p + "mlp.gate_proj.weight": (inter, h),
                p + "mlp.up_proj.weight": (inter, h),
                p + "mlp.down_proj.weight": (h, inter),
                p + "input_layernorm.weight": (h,),
                p + "post_attention_layernorm.weight": (h,),
            }
        )
    assert set(tensors) == set(expect), f"tensor names differ: {set(tensors) ^ set(expect)}"
    sd = model.state_dict()
    for name, t in tensors.items():
        assert tuple(t.shape) == expect[name], (name, t.shape, expect[name])
        assert t.dtype == dtype, (name, t.dtype)
        assert torch.equal(sd[name], t.float()), f"reloaded {name} differs from file"
    if cfg.tie_word_embeddings:
        assert torch.equal(sd["lm_head.weight"], tensors["model.embed_tokens.weight"].float())
    return files


@torch.no_grad()
def make_case(case: dict, out_dir: str) -> dict:
    name = case["name"]
    case_dir = os.path.join(out_dir, name)
    if os.path.isdir(case_dir):
        shutil.rmtree(case_dir)
    os.makedirs(case_dir)
    dtype = DTYPES[case["dtype"]]
    kw = dict(COMMON_CONFIG, **case["config"])
    vocab = kw["vocab_size"]
    eos = [vocab - 2, vocab - 1]
    kw["eos_token_id"] = eos
    cfg = LlamaConfig(**kw)
    assert cfg.head_dim == kw["head_dim"]

    rope = case["config"]["rope_parameters"]
    if rope["rope_type"] == "llama3":
        hi, mid, lo = smooth_band_count(cfg.head_dim, rope)
        assert hi and mid and lo, f"{name}: llama3 bands not all populated ({hi}, {mid}, {lo})"
        assert rope["original_max_position_embeddings"] < PROMPT_LEN

    torch.manual_seed(case["seed"])
    model = LlamaForCausalLM(cfg)
    init_weights(model, case["seed"], cfg.initializer_range)
    model.generation_config = GenerationConfig(
        bos_token_id=0, eos_token_id=eos, do_sample=True, temperature=0.6, top_p=0.9
    )
    model = model.to(dtype)
    save_kw = {}
    if case["max_shard_size"]:
        save_kw["max_shard_size"] = case["max_shard_size"]
    model.save_pretrained(case_dir, **save_kw)
    del model

    ref_model = LlamaForCausalLM.from_pretrained(
        case_dir, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    files = check_checkpoint(case_dir, cfg, dtype, ref_model)
    if case["max_shard_size"]:
        assert len(files) == 2, f"{name}: expected 2 shards, got {files}"

    rng = np.random.RandomState(case["seed"])
    # ids in [1, vocab - 2): never bos (0) nor an eos id.
    prompt = rng.randint(1, vocab - 2, size=PROMPT_LEN).tolist()
    prompt2 = rng.randint(1, vocab - 2, size=PROMPT2_LEN).tolist()

    logits = ref_model(torch.tensor([prompt])).logits[0].float().numpy()
    logits2 = ref_model(torch.tensor([prompt2])).logits[0].float().numpy()
    assert logits.shape == (PROMPT_LEN, vocab) and logits2.shape == (PROMPT2_LEN, vocab)
    np.save(os.path.join(case_dir, "logits.npy"), np.ascontiguousarray(logits, dtype="<f4"))
    np.save(os.path.join(case_dir, "logits2.npy"), np.ascontiguousarray(logits2, dtype="<f4"))

    new, margins, max_abs = greedy(ref_model, prompt, eos)
    new2, margins2, max_abs2 = greedy(ref_model, prompt2, eos)

    # How far transformers' own bf16 forward lands from the f32 reference: the yardstick for bf16 backends.
    bf16_model = LlamaForCausalLM.from_pretrained(
        case_dir, dtype=torch.bfloat16, attn_implementation="eager"
    ).eval()
    bf16_logits = bf16_model(torch.tensor([prompt])).logits[0].float().numpy()
    del bf16_model
    scale = float(np.abs(logits).max())
    bf16_max_rel = float(np.abs(bf16_logits - logits).max()) / scale
    bf16_mean_rel = float(np.abs(bf16_logits - logits).mean()) / scale

    ref = {
        "case": name,
        "prompt_ids": prompt,
        "prompt2_ids": prompt2,
        "greedy_new_tokens": GREEDY_NEW_TOKENS,
        "greedy_ids": new,
        "min_top2_margin": min(margins),
        "dtype": case["dtype"],
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "vocab_size": vocab,
        "eos_token_id": eos,
        "bos_token_id": 0,
        "greedy_max_abs_logit": max_abs,
        "greedy_top2_margins": margins,
        "greedy2_ids": new2,
        "min_top2_margin2": min(margins2),
        "logits_max_abs": float(np.abs(logits).max()),
        "hf_bf16_max_rel_err": bf16_max_rel,
        "hf_bf16_mean_rel_err": bf16_mean_rel,
        "seed": case["seed"],
        "files": files,
        "versions": versions(),
    }
    with open(os.path.join(case_dir, "reference.json"), "w") as f:
        json.dump(ref, f, indent=1)
        f.write("\n")
    for fn in os.listdir(case_dir):  # safetensors writes 0600; normalise
        os.chmod(os.path.join(case_dir, fn), 0o644)
    return ref


def numpy_forward(case_dir: str, cfg: dict, ids: list[int]) -> np.ndarray:
    """Independent float64 numpy Llama forward from the stored files (no transformers code).

    Uses the HF checkpoint convention: rotate-half RoPE over the two halves of each head.
    """
    tensors = {}
    index = os.path.join(case_dir, "model.safetensors.index.json")
    files = ["model.safetensors"]
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    for fn in files:
        for k, v in safetensors.torch.load_file(os.path.join(case_dir, fn)).items():
            tensors[k] = v.double().numpy()
    w = tensors.__getitem__
    nh, nkv, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    eps, t = cfg["rms_norm_eps"], len(ids)
    rp = cfg["rope_parameters"]
    inv = 1.0 / rp["rope_theta"] ** (np.arange(0, hd, 2, dtype=np.float64) / hd)
    if rp["rope_type"] == "llama3":
        orig, fac = rp["original_max_position_embeddings"], rp["factor"]
        lo, hi = rp["low_freq_factor"], rp["high_freq_factor"]
        wl = 2 * math.pi / inv
        smooth = (orig / wl - lo) / (hi - lo)
        mid = (1 - smooth) * inv / fac + smooth * inv
        inv = np.where(wl > orig / lo, inv / fac, np.where(wl < orig / hi, inv, mid))
    ang = np.arange(t, dtype=np.float64)[:, None] * inv[None, :]
    cos, sin = np.cos(np.concatenate([ang, ang], 1)), np.sin(np.concatenate([ang, ang], 1))

    def rope(x):  # [heads, t, hd]
        rot = np.concatenate([-x[..., hd // 2 :], x[..., : hd // 2]], -1)
        return x * cos + rot * sin

    def rms(x, g):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * g

    x = w("model.embed_tokens.weight")[ids]
    mask = np.triu(np.full((t, t), -np.inf), 1)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms(x, w(p + "input_layernorm.weight"))
        q = (h @ w(p + "self_attn.q_proj.weight").T).reshape(t, nh, hd).transpose(1, 0, 2)
        k = (h @ w(p + "self_attn.k_proj.weight").T).reshape(t, nkv, hd).transpose(1, 0, 2)
        v = (h @ w(p + "self_attn.v_proj.weight").T).reshape(t, nkv, hd).transpose(1, 0, 2)
        q, k = rope(q), rope(k)
        rep = nh // nkv  # query head j uses kv head j // rep
        k, v = np.repeat(k, rep, 0), np.repeat(v, rep, 0)
        s = q @ k.transpose(0, 2, 1) / math.sqrt(hd) + mask
        s = np.exp(s - s.max(-1, keepdims=True))
        a = (s / s.sum(-1, keepdims=True)) @ v
        x = x + a.transpose(1, 0, 2).reshape(t, nh * hd) @ w(p + "self_attn.o_proj.weight").T
        h = rms(x, w(p + "post_attention_layernorm.weight"))
        g = h @ w(p + "mlp.gate_proj.weight").T
        u = h @ w(p + "mlp.up_proj.weight").T
        x = x + (g / (1 + np.exp(-g)) * u) @ w(p + "mlp.down_proj.weight").T
    x = rms(x, w("model.norm.weight"))
    head = tensors.get("lm_head.weight", tensors["model.embed_tokens.weight"])
    return x @ head.T


SAFETENSORS_DTYPE = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}


def read_safetensors_header(path: str) -> dict:
    """Parse the raw safetensors header and check offsets tile the data section exactly."""
    with open(path, "rb") as f:
        raw = f.read()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    spans = sorted(tuple(v["data_offsets"]) for k, v in header.items() if k != "__metadata__")
    pos = 0
    for a, b in spans:
        assert a == pos, f"{path}: gap/overlap at {a} (expected {pos})"
        pos = b
    assert 8 + n + pos == len(raw), f"{path}: data section size mismatch"
    return header


@torch.no_grad()
def verify_case(case: dict, out_dir: str) -> None:
    """Re-check a generated case from disk in a fresh model: headers, logits, greedy ids."""
    case_dir = os.path.join(out_dir, case["name"])
    with open(os.path.join(case_dir, "reference.json")) as f:
        ref = json.load(f)
    with open(os.path.join(case_dir, "config.json")) as f:
        cfg_json = json.load(f)
    assert cfg_json["dtype"] == case["dtype"] == ref["dtype"]
    assert cfg_json["rope_parameters"] == case["config"]["rope_parameters"]
    st_dtype = SAFETENSORS_DTYPE[case["dtype"]]
    names = set()
    for fn in ref["files"]:
        header = read_safetensors_header(os.path.join(case_dir, fn))
        assert header.get("__metadata__") == {"format": "pt"}, header.get("__metadata__")
        for k, v in header.items():
            if k != "__metadata__":
                assert v["dtype"] == st_dtype, (fn, k, v["dtype"])
                names.add(k)
    index = os.path.join(case_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            idx = json.load(f)
        assert set(idx["weight_map"]) == names
        for k, fn in idx["weight_map"].items():
            assert fn in ref["files"]
        sizes = sum(os.path.getsize(os.path.join(case_dir, fn)) for fn in ref["files"])
        assert idx["metadata"]["total_size"] < sizes
    assert ("lm_head.weight" in names) == (not ref["tie_word_embeddings"])
    model = LlamaForCausalLM.from_pretrained(
        case_dir, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    cfg = model.config
    assert cfg.num_attention_heads == ref["num_attention_heads"]
    assert cfg.num_key_value_heads == ref["num_key_value_heads"]
    assert cfg.tie_word_embeddings == ref["tie_word_embeddings"]
    check_checkpoint(case_dir, cfg, DTYPES[case["dtype"]], model)
    for key, ids in (("logits.npy", ref["prompt_ids"]), ("logits2.npy", ref["prompt2_ids"])):
        want = np.load(os.path.join(case_dir, key))
        assert want.dtype == np.float32 and want.shape == (len(ids), cfg.vocab_size)
        got = model(torch.tensor([ids])).logits[0].numpy()
        err = float(np.abs(got - want).max())
        assert err < 1e-5, f"{case['name']}/{key}: max abs diff {err}"
        err_np = float(np.abs(numpy_forward(case_dir, cfg_json, ids) - want).max())
        assert err_np < 1e-4, f"{case['name']}/{key}: numpy forward differs by {err_np}"
        print(f"  {key}: transformers diff {err:.2e}, numpy float64 diff {err_np:.2e}")
    eos = ref["eos_token_id"]
    assert greedy(model, ref["prompt_ids"], eos)[0] == ref["greedy_ids"]
    assert greedy(model, ref["prompt2_ids"], eos)[0] == ref["greedy2_ids"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", default=os.path.join("tests", "golden"))
    ap.add_argument("--case", action="append", help="only this case (repeatable)")
    ap.add_argument(
        "--verify", action="store_true", help="check existing files instead of regenerating"
    )
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
            f"{ref['case']}: greedy={ref['greedy_ids'][:8]}... "
            f"min_margin={ref['min_top2_margin']:.4f} max|logit|={ref['greedy_max_abs_logit']:.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
