#!/usr/bin/env python3
"""PyTorch peers on the shapes llama32 benchmarks, timed in the same device call (CUDA events, median).

Prints one JSON line per figure and a short table last. Needs torch with CUDA (and transformers for the
end-to-end peer); runs on the device machine:  python3 scripts/peers.py [--quick]
"""
import argparse
import json
import os
import statistics
import sys

import torch
import torch.nn.functional as F


def timed(fn, warmup=3, iters=20):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


def emit(rows, name, value, unit, **extra):
    rows.append((name, value, unit))
    print(json.dumps({"peer": name, "value": value, "unit": unit, **extra}), flush=True)


def ceilings(rows):
    n = 1 << 30  # 1 GiB bf16 buffers
    src = torch.randn(n // 2, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    s = timed(lambda: dst.copy_(src))
    emit(rows, "copy d2d", 2 * n / s / 1e9, "GB/s")
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    s = timed(lambda: a @ b)
    emit(rows, "gemm bf16 8192^3", 2 * 8192**3 / s / 1e12, "TFLOP/s")


def sdpa(rows):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = [("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)]
    # Prefill: 4 x 4096 causal, 24 q / 8 kv heads, d128 (3B).
    b, hq, hkv, t, d = 4, 24, 8, 4096, 128
    q = torch.randn(b, hq, t, d, dtype=torch.bfloat16, device="cuda")
    k = torch.randn(b, hq, t, d, dtype=torch.bfloat16, device="cuda")  # expanded GQA: what SDPA kernels take
    v = torch.randn_like(k)
    flops = 4 * b * hq * d * t * (t + 1) / 2
    for name, be in backends:
        try:
            with sdpa_kernel(be):
                s = timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
            emit(rows, f"sdpa prefill {name} 4x4096 24/8 d128 causal", flops / s / 1e12, "TFLOP/s")
        except RuntimeError as e:
            print(f"# sdpa prefill {name}: {e}", file=sys.stderr)
    # Decode: batch 64, one query against 2048 cached tokens, 32 q / 8 kv heads, d64 (1B); bytes = K+V read.
    for hq, hkv, d in [(32, 8, 64), (24, 8, 128)]:
        b, ctx = 64, 2048
        q = torch.randn(b, hq, 1, d, dtype=torch.bfloat16, device="cuda")
        k = torch.randn(b, hkv, ctx, d, dtype=torch.bfloat16, device="cuda")
        v = torch.randn_like(k)
        nbytes = 2 * b * hkv * ctx * d * 2
        for name, be in backends:
            try:
                with sdpa_kernel(be):
                    s = timed(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
                emit(rows, f"sdpa decode {name} b64 ctx2048 {hq}/{hkv} d{d}", nbytes / s / 1e9, "GB/s")
            except RuntimeError as e:
                print(f"# sdpa decode {name} d{d}: {e}", file=sys.stderr)


def vision_peers(rows):
    """The 11B / 90B vision encoder's attention for one 4-tile image (4 x 1608 rows, 16 heads of 80, non-causal):
    SDPA's flash, cuDNN and memory-efficient backends without a mask, and with the padding mask as an additive
    bf16 bias (what transformers' mllama passes; flash takes no mask)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    h, t, d = 16, 4 * 1608, 80
    q, k, v = (torch.randn(1, h, t, d, dtype=torch.bfloat16, device="cuda") for _ in range(3))
    flops = 4 * h * t * t * d
    pad = (torch.arange(t, device="cuda") % 1608 >= 1601).to(torch.bfloat16)
    mask = (pad[:, None] * pad[None, :] * torch.finfo(torch.bfloat16).min)[None, None]
    backends = [("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                ("efficient", SDPBackend.EFFICIENT_ATTENTION)]
    for masked in [False, True]:
        for name, be in backends:
            if masked and name == "flash":
                continue
            try:
                with sdpa_kernel(be):
                    s = timed(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask if masked else None))
                emit(rows, f"sdpa vision {name} 1x6432 16 d80{' masked' if masked else ''}", flops / s / 1e12, "TFLOP/s")
            except RuntimeError as e:
                print(f"# sdpa vision {name} masked={masked}: {e}", file=sys.stderr)


# (name, k, n): gate_up and down of the 1B, 11B and 90B text models (as bench/cuda_kernels.rs group `quant`).
QUANT_SHAPES = [("1b_gate_up", 2048, 16384), ("1b_down", 8192, 2048), ("11b_gate_up", 4096, 28672),
                ("11b_down", 14336, 4096), ("90b_gate_up", 8192, 57344), ("90b_down", 28672, 8192)]
# The m of the quant peers; LLAMA32_PEERS_QUANT_M (comma-separated) picks some, e.g. "256,1024" for the W4A8 rows.
QUANT_MS = [int(v) for v in os.environ.get("LLAMA32_PEERS_QUANT_M", "1,16,64,256,1024").split(",") if v.strip()]


def quant_peers(rows):
    """torch's int4 tinygemm at group 32 (aten._weight_int4pack_mm, torchao's int4 weight-only path) and cuBLAS
    bf16 (torch.matmul) at the shapes of the llama32 quant benches. GB/s count the bytes each reads: tinygemm
    n*k/2 int4 + bf16 scale and zero per 32 (0.625 n k), cuBLAS 2 n k; llama32's W4A16 reads 0.5625 n k."""
    group = 32
    for name, k, n in QUANT_SHAPES:
        w = torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02
        packed = sz = None
        try:
            q = torch.randint(0, 16, (n, k), dtype=torch.int32, device="cuda")
            w_uint8 = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
            packed = torch.ops.aten._convert_weight_to_int4pack(w_uint8, 8)
            sz = torch.ones(k // group, n, 2, dtype=torch.bfloat16, device="cuda")
            sz[:, :, 0] = 0.01
            sz[:, :, 1] = 0.0
        except Exception as e:  # an op missing from this torch build must not hide the other figures
            print(f"# tinygemm {name}: {e}", file=sys.stderr)
        for m in QUANT_MS:
            x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
            flops = 2 * m * n * k
            s = timed(lambda: torch.matmul(x, w.t()))
            if m <= 64:
                emit(rows, f"cublas bf16 m{m} {name}", 2 * n * k / s / 1e9, "GB/s", tflops=flops / s / 1e12)
            else:
                emit(rows, f"cublas bf16 m{m} {name}", flops / s / 1e12, "TFLOP/s")
            if packed is not None:
                try:
                    s = timed(lambda: torch.ops.aten._weight_int4pack_mm(x, packed, group, sz))
                    if m <= 64:
                        emit(rows, f"tinygemm g32 m{m} {name}", 0.625 * n * k / s / 1e9, "GB/s", tflops=flops / s / 1e12)
                    else:
                        emit(rows, f"tinygemm g32 m{m} {name}", flops / s / 1e12, "TFLOP/s")
                except Exception as e:
                    print(f"# tinygemm {name} m{m}: {e}", file=sys.stderr)
        del w, packed, sz
        torch.cuda.empty_cache()


def hf_decode(rows, preset, steps=64):
    from transformers import LlamaConfig, LlamaForCausalLM

    dims = {"1b": (2048, 8192, 16, 32, 64), "3b": (3072, 8192, 28, 24, 128)}[preset]
    h, i, layers, heads, hd = dims
    cfg = LlamaConfig(
        vocab_size=128256, hidden_size=h, intermediate_size=i, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=8, head_dim=hd, tie_word_embeddings=True,
        max_position_embeddings=131072,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    )
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    ids = torch.randint(1, 128000, (1, 128), device="cuda")

    def gen(n):
        return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)

    with torch.no_grad():
        gen(4)
        t_short = timed(lambda: gen(1), warmup=1, iters=3)
        t_long = timed(lambda: gen(steps + 1), warmup=0, iters=3)
    emit(rows, f"hf eager decode {preset} b1", (t_long - t_short) / steps * 1e3, "ms/token")
    del model
    torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="skip the end-to-end HF peers")
    ap.add_argument("--only", help="comma-separated groups to run (ceilings, sdpa, vision, quant, hf); default all")
    args = ap.parse_args()
    groups = set(args.only.split(",")) if args.only else {"ceilings", "sdpa", "vision", "quant", "hf"}
    if args.quick:
        groups.discard("hf")
    rows = []
    print(f"# {torch.cuda.get_device_name()} torch {torch.__version__}", flush=True)
    if "ceilings" in groups:
        ceilings(rows)
    if "sdpa" in groups:
        sdpa(rows)
    if "vision" in groups:
        vision_peers(rows)
    if "quant" in groups:
        quant_peers(rows)
    if "hf" in groups:
        for p in ["1b", "3b"]:
            try:
                hf_decode(rows, p)
            except Exception as e:  # a missing transformers must not hide the other figures
                print(f"# hf decode {p}: {e}", file=sys.stderr)
    for name, value, unit in rows:
        print(f"peer  {name:<44} {value:10.2f} {unit}")


if __name__ == "__main__":
    main()
