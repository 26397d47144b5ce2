#!/usr/bin/env python3
"""Golden files for the 4-bit quantizer (engine/quant): torchao's own outputs, and packed HF int4 fixtures.

Usage:
    /work/venv-golden/bin/python scripts/make_golden_quant.py [--out tests/golden]

Writes two cases (small .npy files; floats are float32, integers int32):

tests/golden/quant-torchao/ - computed by torchao 0.18 itself (no re-implementation):
* w_edge.npy / w_rand.npy: bf16-valued weights [n, k] (as float32); w_*_q.npy int4 values [n, k] and
  w_*_scales.npy [n, k/32] from `Int8DynActInt4WeightQuantizer(groupsize=32, precision=torch.bfloat16)`
  (default scales_precision float32) applied to an nn.Linear holding the weight. w_edge rows hold exact ties
  (w / scale = m + 0.5), an all-zero group, tiny (down to 1e-39, below the smallest normal) and huge (1e30)
  magnitudes, a lone outlier, negative maxima (-7.5 * scale -> -8) and +7.5 * scale (clamped to 7).
  w_*_q_bf16scales.npy: the same with scales_precision=torch.bfloat16 (recorded to document the difference;
  the engine follows the float32-reciprocal variant).
* emb.npy, emb_q.npy [n, k] int8, emb_scales.npy [n]: `quantize_(nn.Embedding(bf16),
  IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=PerAxis(0), mapping_type=SYMMETRIC,
  scale_dtype=torch.float32))`.
* act_x.npy [rows, 64] float32 activations (random, all-positive, all-negative, zero, constant, exact ties of
  x / scale and of the zero point, tiny, huge); act_q.npy int8 values, act_scales.npy [rows],
  act_zeros.npy [rows]: torchao's `choose_qparams_affine(ASYMMETRIC, per token, int8, -128..127,
  scale_dtype=f32, zero_point_dtype=f32, eps=finfo(f32).eps)` + `quantize_affine`, the two calls of
  `per_token_dynamic_quant` inside `linear_forward_8da4w` (checked here against per_token_dynamic_quant).
* linear_x.npy [5, 96], linear_w.npy [40, 96] (bf16 values), linear_w_q.npy, linear_w_scales.npy, and
  linear_w4a8_out.npy = torchao `linear_forward_8da4w(x, q, None, scales, zeros, 40, 32, torch.float32)`,
  linear_w4a16_out.npy = F.linear(x, dequantize_affine(q, scales)) in float32.
* reference.json: versions and the formulas.

tests/golden/quant-hf/<format>/ - packed fixtures of the Hugging Face int4 formats, one projection
`model.layers.0.self_attn.q_proj` of shape [n, k] per directory (config.json with its quantization_config +
model.safetensors), packed here from known integers with each format's documented packing:
* GPTQ: AutoGPTQ `auto_gptq/nn_modules/qlinear/qlinear_cuda_old.py` `QuantLinear.pack` (qweight [k/8, n] packed
  along k, qzeros [k/g, n/8] packed along n, stored zero minus one in v1 `checkpoint_format: gptq`;
  GPTQModel's `gptq_v2` stores the zero as is), scales F16 [k/g, n], g_idx I32 [k].
* AWQ GEMM: AutoAWQ `awq/modules/linear/gemm.py` `WQLinear_GEMM.from_linear` (qweight [k, n/8] and qzeros
  [k/g, n/8] packed along n in the order [0, 2, 4, 6, 1, 3, 5, 7]), scales F16 [k/g, n].
* compressed-tensors: `compressed_tensors/compressors/quantized_compressors/pack_quantized.py` `pack_to_int32`
  (values + 8, packed along k: weight_packed I32 [n, k/8]; asymmetric zero points packed along n with
  packed_dim=0: weight_zero_point I32 [n/8, k/g]), weight_scale BF16 [n, k/g], weight_shape I64 [2].
Expected values: q.npy int32 [n, k] = u - 8, scales.npy float32 [n, k/g], zeros.npy int32 [n, k/g] = z - 8
(z the real zero point, i.e. the v1 stored value + 1), absent for symmetric formats.

Deterministic (fixed seeds, one thread).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil

import numpy as np
import torch
import torch.nn.functional as F

torch.set_num_threads(1)

GROUP = 32


def save(d, name, arr, dtype):
    np.save(os.path.join(d, name), np.ascontiguousarray(np.asarray(arr, dtype=dtype)))


def bf16(t):
    return t.to(torch.bfloat16)


# ---------------------------------------------------------------------------------------------- torchao weights
def torchao_8da4w(w_bf16: torch.Tensor, scales_precision=torch.float32):
    """Int8DynActInt4WeightQuantizer on a one-layer model; returns (int values, scales as float32)."""
    from torchao.quantization.linear_quant_modules import Int8DynActInt4WeightQuantizer

    n, k = w_bf16.shape
    model = torch.nn.Sequential(torch.nn.Linear(k, n, bias=False, dtype=torch.bfloat16))
    with torch.no_grad():
        model[0].weight.copy_(w_bf16)
    q = Int8DynActInt4WeightQuantizer(groupsize=GROUP, precision=torch.bfloat16, scales_precision=scales_precision)
    state = q._create_quantized_state_dict(model)
    qw, sc, zs = state["0.weight"], state["0.scales"], state["0.zeros"]
    assert qw.dtype == torch.int8 and torch.all(zs == 0)
    return qw.to(torch.int32), sc.to(torch.float32)


def edge_weights() -> torch.Tensor:
    """[12, 96] bf16 rows exercising ties, zeros, tiny/huge magnitudes and outliers (3 groups of 32 per row)."""
    g = torch.Generator().manual_seed(1)
    rows = []
    # 0: exact ties with scale 1 (max 7.5): m + 0.5 for every m, and +-7.5.
    r = torch.zeros(96)
    ties = torch.arange(-8, 8, dtype=torch.float32) + 0.5  # -7.5 .. 7.5
    r[: len(ties)] = ties
    r[32 : 32 + len(ties)] = ties * 0.25  # scale 0.25 (7.5 * 0.25 = 1.875 is the max)
    r[64 : 64 + len(ties)] = -ties * 2.0  # scale 2
    rows.append(r)
    # 1: an all-zero group in the middle, random elsewhere.
    r = torch.randn(96, generator=g)
    r[32:64] = 0
    rows.append(r)
    # 2: tiny magnitudes (the middle group's max is below the bf16 smallest normal, the scale clamps).
    r = torch.randn(96, generator=g) * 1e-30
    r[32:64] = torch.randn(32, generator=g) * 1e-39
    r[64:96] = torch.randn(32, generator=g) * 1e-36
    rows.append(r)
    # 3: huge magnitudes.
    rows.append(torch.randn(96, generator=g) * 1e30)
    # 4: one outlier per group.
    r = torch.randn(96, generator=g) * 0.01
    r[5], r[40], r[90] = 3.0, -5.0, 0.9
    rows.append(r)
    # 5: negative max -> -8; the positive side never reaches 7.
    r = torch.rand(96, generator=g) * 0.3 - 0.1
    r[0], r[33], r[70] = -1.5, -0.75, -3.0
    rows.append(r)
    # 6-11: random with various spreads, some ties at other scales.
    for i in range(6):
        r = torch.randn(96, generator=g) * (0.02 * (i + 1))
        if i % 2 == 0:
            s = 2.0 ** -(i + 3)
            r[0] = 7.5 * s
            r[1:9] = (torch.arange(8, dtype=torch.float32) - 4 + 0.5) * s
            r[9:32] = r[9:32].clamp(-7.0 * s, 7.0 * s)
        rows.append(r)
    return bf16(torch.stack(rows))


def recip_rows() -> torch.Tensor:
    """[8, 32] groups where torchao's w * (1/scale) rounds differently from w / scale (pins the reciprocal)."""
    g = torch.Generator().manual_seed(4)
    w = bf16(torch.randn(40000, 32, generator=g) * 0.05)
    q, s = torchao_8da4w(w)
    q_div = (w.float() / s).round().clamp(-8, 7).to(torch.int32)
    rows = torch.nonzero((q != q_div).any(dim=1)).flatten()[:8]
    assert len(rows) == 8
    return w[rows]


def recip_act_rows(k: int) -> torch.Tensor:
    """Activation rows where x * (1/scale) rounds differently from x / scale."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(40000, k, generator=g) * 2
    q, scale, zp = torchao_act(x)
    q_div = ((x / scale[:, None]).round() + zp[:, None]).clamp(-128, 127).to(torch.int32)
    rows = torch.nonzero((q != q_div).any(dim=1)).flatten()[:4]
    assert len(rows) >= 1
    return x[rows]


def torchao_rows_int8(w_bf16: torch.Tensor):
    from torchao.quantization.granularity import PerAxis
    from torchao.quantization.quant_api import IntxWeightOnlyConfig, MappingType, quantize_

    n, k = w_bf16.shape
    emb = torch.nn.Embedding(n, k, dtype=torch.bfloat16)
    with torch.no_grad():
        emb.weight.copy_(w_bf16)
    cfg = IntxWeightOnlyConfig(
        weight_dtype=torch.int8, granularity=PerAxis(0), mapping_type=MappingType.SYMMETRIC, scale_dtype=torch.float32
    )
    quantize_(emb, cfg, lambda m, fqn: isinstance(m, torch.nn.Embedding))
    t = emb.weight
    assert torch.all(t.zero_point == 0)
    return t.qdata.to(torch.int32), t.scale.to(torch.float32).reshape(n)


def activation_rows() -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    k = 64
    rows = [
        torch.randn(k, generator=g),
        torch.rand(k, generator=g) + 0.5,  # all positive
        -(torch.rand(k, generator=g) + 0.25),  # all negative
        torch.zeros(k),
        torch.full((k,), 0.3),
        torch.full((k,), -2.0),
        torch.randn(k, generator=g) * 1e-9,  # tiny: the scale clamps to eps
        torch.randn(k, generator=g) * 1e6,
    ]
    # Exact ties of x / scale: lo = 0, hi = 255/16 -> scale = 1/16, 1/scale = 16.
    r = torch.zeros(k)
    r[0] = 255.0 / 16
    r[1:20] = (torch.arange(19, dtype=torch.float32) + 0.5) / 16
    rows.append(r)
    # Tie of the zero point: lo = -2.5/16, hi = 252.5/16 -> scale 1/16, lo/scale = -2.5.
    r = (torch.arange(k, dtype=torch.float32) - 2.5) / 16
    r[-1] = 252.5 / 16
    r[1:10] = (torch.arange(9, dtype=torch.float32) - 1.5) / 16
    rows.append(r)
    rows.append(torch.randn(k, generator=g) * 3 + 1)
    return torch.stack(rows).to(torch.float32)


def torchao_act(x: torch.Tensor):
    from torchao.quantization.quant_primitives import MappingType, choose_qparams_affine, dequantize_affine, quantize_affine
    from torchao.quantization.utils import per_token_dynamic_quant

    block = [1, x.shape[-1]]
    eps = torch.finfo(torch.float32).eps
    scale, zp = choose_qparams_affine(
        x, MappingType.ASYMMETRIC, block, torch.int8, -128, 127, eps=eps,
        scale_dtype=torch.float32, zero_point_dtype=torch.float32,
    )
    q = quantize_affine(x, block, scale, zp, torch.int8, -128, 127)
    dq = dequantize_affine(q, block, scale, zp, torch.int8, -128, 127, output_dtype=torch.float32)
    ref = per_token_dynamic_quant(x, scale_dtype=torch.float32, zero_point_dtype=torch.float32, eps=eps)
    assert torch.equal(dq, ref), "choose_qparams_affine + quantize_affine differ from per_token_dynamic_quant"
    assert torch.equal(zp, zp.round())
    return q.to(torch.int32), scale.reshape(-1), zp.reshape(-1).to(torch.int32)


def make_torchao(out: str) -> dict:
    import torchao
    from torchao.quantization.linear_quant_modules import linear_forward_8da4w
    from torchao.quantization.quant_primitives import dequantize_affine

    d = os.path.join(out, "quant-torchao")
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    info = {}
    g = torch.Generator().manual_seed(0)
    mats = {"edge": edge_weights(), "rand": bf16(torch.randn(24, 128, generator=g) * 0.05), "recip": recip_rows()}
    for name, w in mats.items():
        q, s = torchao_8da4w(w)
        q16, s16 = torchao_8da4w(w, torch.bfloat16)
        assert torch.equal(s, s16), "scales differ between scales_precision f32 and bf16"
        assert torch.equal(s, s.to(torch.bfloat16).to(torch.float32)), "scales are not bf16 values"
        save(d, f"w_{name}.npy", w.float().numpy(), np.float32)
        save(d, f"w_{name}_q.npy", q.numpy(), np.int32)
        save(d, f"w_{name}_scales.npy", s.numpy(), np.float32)
        save(d, f"w_{name}_q_bf16scales.npy", q16.numpy(), np.int32)
        info[f"w_{name}"] = {"shape": list(w.shape), "q_differs_with_bf16_scales": int((q != q16).sum())}

    emb = edge_weights()[:, :]
    emb = torch.cat([emb, bf16(torch.zeros(1, 96)), bf16(torch.randn(3, 96, generator=g) * 0.02)])
    eq, es = torchao_rows_int8(emb)
    save(d, "emb.npy", emb.float().numpy(), np.float32)
    save(d, "emb_q.npy", eq.numpy(), np.int32)
    save(d, "emb_scales.npy", es.numpy(), np.float32)
    info["emb"] = {"shape": list(emb.shape)}

    x = torch.cat([activation_rows(), recip_act_rows(64)])
    aq, ascale, azp = torchao_act(x)
    save(d, "act_x.npy", x.numpy(), np.float32)
    save(d, "act_q.npy", aq.numpy(), np.int32)
    save(d, "act_scales.npy", ascale.numpy(), np.float32)
    save(d, "act_zeros.npy", azp.numpy(), np.int32)
    info["act"] = {"shape": list(x.shape)}

    lx = torch.randn(5, 96, generator=g).to(torch.float32)
    lx[3] = lx[3].abs() + 0.1  # an all-positive token
    lw = bf16(torch.randn(40, 96, generator=g) * 0.1)
    lq, ls = torchao_8da4w(lw)
    zeros = torch.zeros_like(ls)
    out_w4a8 = linear_forward_8da4w(lx, lq.to(torch.int8), None, ls, zeros, 40, GROUP, torch.float32)
    w_dq = dequantize_affine(lq.to(torch.int8), (1, GROUP), ls, zeros, torch.int8, -8, 7, output_dtype=torch.float32)
    out_w4a16 = F.linear(lx, w_dq)
    save(d, "linear_x.npy", lx.numpy(), np.float32)
    save(d, "linear_w.npy", lw.float().numpy(), np.float32)
    save(d, "linear_w_q.npy", lq.numpy(), np.int32)
    save(d, "linear_w_scales.npy", ls.numpy(), np.float32)
    save(d, "linear_w4a8_out.npy", out_w4a8.numpy(), np.float32)
    save(d, "linear_w4a16_out.npy", out_w4a16.numpy(), np.float32)

    ref = {
        "generator": "scripts/make_golden_quant.py",
        "torch": torch.__version__,
        "torchao": torchao.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "weights_int4": "Int8DynActInt4WeightQuantizer(groupsize=32, precision=torch.bfloat16) "
        "[scales_precision float32]: scale = bf16(max|w| / 7.5) clamped to 2^-126, "
        "q = clamp(round_half_even(w * (1/scale)), -8, 7) in float32",
        "weights_int8_rows": "quantize_(Embedding(bf16), IntxWeightOnlyConfig(int8, PerAxis(0), SYMMETRIC, "
        "scale_dtype=float32)): scale = bf16(max|w| / 127.5) clamped to 2^-126, "
        "q = clamp(round_half_even(w * (1/scale)), -128, 127)",
        "activations": "per_token_dynamic_quant(x, float32, float32, eps=finfo(float32).eps): "
        "scale = max((max(x,0) - min(x,0)) / 255, eps), zp = clamp(-128 - round(min(x,0) / scale)), "
        "q = clamp(round(x * (1/scale)) + zp, -128, 127)",
        "linear": "linear_forward_8da4w(x, q, None, scales, zeros, 40, 32, torch.float32); w4a16 = "
        "F.linear(x, dequantize_affine(q, (1, 32), scales, zeros, int8, -8, 7, float32))",
        "cases": info,
    }
    with open(os.path.join(d, "reference.json"), "w") as f:
        json.dump(ref, f, indent=2)
        f.write("\n")
    return ref


# ------------------------------------------------------------------------------------------------ HF fixtures
def pack_words(u: np.ndarray, axis: int, order=None) -> np.ndarray:
    """Packs unsigned 4-bit values eight to an int32 along `axis`; nibble i takes element 8p + order[i]."""
    order = list(range(8)) if order is None else order
    u = np.moveaxis(u.astype(np.uint32), axis, -1)
    assert u.shape[-1] % 8 == 0
    words = np.zeros(u.shape[:-1] + (u.shape[-1] // 8,), dtype=np.uint32)
    for i in range(8):
        words |= u[..., order[i] :: 8] << (4 * i)
    return np.moveaxis(words, -1, axis).view(np.int32)


def write_fixture(d, quant_config, tensors, expected):
    from safetensors.torch import save_file

    os.makedirs(d)
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "quantization_config": quant_config}
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")
    tensors = {k: v if isinstance(v, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(v)) for k, v in tensors.items()}
    save_file(tensors, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
    for name, arr in expected.items():
        save(d, f"{name}.npy", arr, np.float32 if name == "scales" else np.int32)


def make_hf(out: str) -> None:
    root = os.path.join(out, "quant-hf")
    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(3)
    p = "model.layers.0.self_attn.q_proj"
    for group, n, k in [(32, 16, 64), (128, 16, 128)]:
        u = rng.integers(0, 16, size=(n, k))  # unsigned values, [n, k]
        scales = (rng.random((n, k // group)) * 0.02 + 0.001).astype(np.float16)
        z = rng.integers(1, 16, size=(n, k // group))  # real zero points (>= 1 so that v1's z - 1 fits)
        g_idx = (np.arange(k) // group).astype(np.int32)
        s32 = scales.astype(np.float32)
        for v2, sym in [(False, True), (False, False), (True, False)]:
            zz = np.full_like(z, 8) if sym else z
            stored = zz if v2 else zz - 1
            name = f"gptq-{'v2' if v2 else 'v1'}-{'sym' if sym else 'asym'}-g{group}"
            cfg = {"quant_method": "gptq", "bits": 4, "group_size": group, "desc_act": False, "sym": sym,
                   "checkpoint_format": "gptq_v2" if v2 else "gptq"}
            tensors = {
                f"{p}.qweight": pack_words(u.T, 0),  # [k/8, n]
                f"{p}.qzeros": pack_words(stored.T, 1),  # [k/g, n/8]
                f"{p}.scales": scales.T.copy(),  # [k/g, n]
                f"{p}.g_idx": g_idx,
            }
            exp = {"q": u - 8, "scales": s32}
            if not sym:
                exp["zeros"] = zz - 8
            write_fixture(os.path.join(root, name), cfg, tensors, exp)
        # AWQ GEMM
        cfg = {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True, "version": "gemm"}
        order = [0, 2, 4, 6, 1, 3, 5, 7]
        tensors = {
            f"{p}.qweight": pack_words(u.T, 1, order),  # [k, n/8]
            f"{p}.qzeros": pack_words(z.T, 1, order),  # [k/g, n/8]
            f"{p}.scales": scales.T.copy(),
        }
        write_fixture(os.path.join(root, f"awq-g{group}"), cfg, tensors, {"q": u - 8, "scales": s32, "zeros": z - 8})
        # compressed-tensors pack-quantized
        ct_scales = torch.from_numpy(s32).to(torch.bfloat16)
        for sym in [True, False]:
            zs = z - 8  # signed zero points in [-7, 7]
            cfg = {
                "quant_method": "compressed-tensors",
                "format": "pack-quantized",
                "config_groups": {"group_0": {
                    "targets": ["Linear"], "input_activations": None, "output_activations": None,
                    "weights": {"num_bits": 4, "type": "int", "symmetric": sym, "strategy": "group",
                                "group_size": group, "actorder": None, "dynamic": False, "observer": "minmax"},
                }},
                "ignore": ["lm_head"],
                "quantization_status": "compressed",
            }
            tensors = {
                f"{p}.weight_packed": pack_words(u, 1),  # [n, k/8], values already unsigned (q + 8)
                f"{p}.weight_scale": ct_scales,
                f"{p}.weight_shape": np.array([n, k], dtype=np.int64),
            }
            exp = {"q": u - 8, "scales": ct_scales.float().numpy()}
            if not sym:
                tensors[f"{p}.weight_zero_point"] = pack_words(zs + 8, 0)  # [n/8, k/g], packed_dim=0
                exp["zeros"] = zs
            write_fixture(os.path.join(root, f"ct-{'sym' if sym else 'asym'}-g{group}"), cfg, tensors, exp)


# ---------------------------------------------------------------------------------------------- end to end
E2E_CASES = ["tied-gqa4", "untied-gqa2-sharded", "gqa3-f16"]
E2E_ROWS = 32


def make_e2e(golden: str) -> None:
    """Whole quantized models through transformers (float32 eager): every `*_proj` weight rounded to bf16 and
    quantized by torchao's `Int8DynActInt4WeightQuantizer`; W4A16 runs `F.linear` over the dequantized weights,
    W4A8 runs torchao's `linear_forward_8da4w`. Saves the logits of the first E2E_ROWS prompt positions."""
    from transformers import AutoModelForCausalLM
    from torchao.quantization.linear_quant_modules import linear_forward_8da4w

    out = os.path.join(golden, "quant-e2e")
    os.makedirs(out, exist_ok=True)
    meta = {"torch": torch.__version__, "torchao": torchao_version(), "rows": E2E_ROWS, "cases": {}}
    for case in E2E_CASES:
        d = os.path.join(golden, case)
        ids = json.load(open(os.path.join(d, "reference.json")))["prompt_ids"][:E2E_ROWS]
        for scheme in ["w4a16-g32", "w4a8-g32"]:
            model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
            for name, mod in model.named_modules():
                if not name.endswith("_proj"):
                    continue
                q, sc = torchao_8da4w(bf16(mod.weight.data))
                n, k = q.shape
                if scheme == "w4a16-g32":
                    dq = (q.float().reshape(n, k // GROUP, GROUP) * sc.reshape(n, k // GROUP, 1)).reshape(n, k)
                    mod.weight.data.copy_(dq)
                else:
                    q8, zeros = q.to(torch.int8), torch.zeros_like(sc)
                    mod.forward = lambda x, q8=q8, sc=sc, zeros=zeros, n=n: linear_forward_8da4w(
                        x, q8, None, sc, zeros, n, GROUP, torch.float32
                    )
            with torch.no_grad():
                logits = model(torch.tensor([ids])).logits[0].float().numpy()
            save(out, f"{case}-{scheme}.npy", logits, np.float32)
        meta["cases"][case] = {"prompt_ids": ids}
    with open(os.path.join(out, "reference.json"), "w") as f:
        json.dump(meta, f, indent=1)


def torchao_version() -> str:
    import torchao

    return torchao.__version__


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "golden"))
    a = ap.parse_args()
    ref = make_torchao(a.out)
    make_hf(a.out)
    make_e2e(a.out)
    print(json.dumps(ref["cases"], indent=1))


if __name__ == "__main__":
    main()
