#!/usr/bin/env python3
"""Plots `llama32 bench --json-out FILE` results: decode tok/s vs batch per tensor-parallel degree, and energy per
generated token (J/token, all GPUs of a run together) where the lines carry NVML telemetry.

Usage: scripts/plot_bench.py results.jsonl [--out bench.png]

With matplotlib the figure is written to --out (default: the input's name with .png); without it, or with --table,
the same figures are printed as a table. Lines that are not bench results (no `batch`/`decode_tok_per_s`) are
skipped; a line without `tp` (older benches) counts as tp 1.
"""

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path


def load(path):
    rows = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        try:
            v = json.loads(line)
        except json.JSONDecodeError as e:
            sys.exit(f"{path}:{n}: not JSON ({e})")
        if not isinstance(v, dict) or "batch" not in v or v.get("decode_tok_per_s") is None:
            continue
        tele = v.get("telemetry") or {}
        rows.append(
            {
                "device": v.get("device", "?"),
                "tp": int(v.get("tp", 1)),
                "batch": int(v["batch"]),
                "decode_tok_per_s": float(v["decode_tok_per_s"]),
                "decode_ms_per_step": float(v.get("decode_ms_per_step", float("nan"))),
                "j_per_token": tele.get("j_per_token"),
                "decode_j_per_token": tele.get("decode_j_per_token"),
                "power_w": sum(g.get("power_mean_w") or 0.0 for g in tele.get("gpus", [])) or None,
            }
        )
    return rows


def series(rows, key):
    """{tp: [(batch, value)]} sorted by batch, last line winning for a repeated (tp, batch)."""
    by_tp = defaultdict(dict)
    for r in rows:
        if r[key] is not None:
            by_tp[r["tp"]][r["batch"]] = r[key]
    return {tp: sorted(d.items()) for tp, d in sorted(by_tp.items())}


def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def table(rows):
    print(f"{'tp':>3} {'batch':>6} {'decode tok/s':>13} {'ms/step':>9} {'J/token':>9} {'decode J/tok':>12} {'power W':>8}")
    for r in sorted(rows, key=lambda r: (r["tp"], r["batch"])):
        print(
            f"{r['tp']:>3} {r['batch']:>6} {r['decode_tok_per_s']:>13.1f} {r['decode_ms_per_step']:>9.2f} "
            f"{fmt(r['j_per_token'], '9.3f'):>9} {fmt(r['decode_j_per_token'], '12.3f'):>12} "
            f"{fmt(r['power_w'], '8.0f'):>8}"
        )


def plot(rows, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    energy = series(rows, "j_per_token")
    fig, axes = plt.subplots(1, 2 if energy else 1, figsize=(12 if energy else 6, 4.5), squeeze=False)
    ax = axes[0][0]
    for tp, pts in series(rows, "decode_tok_per_s").items():
        ax.plot([b for b, _ in pts], [y for _, y in pts], marker="o", label=f"tp={tp}")
    ax.set(xscale="log", xlabel="batch (sequences)", ylabel="decode tokens/s", title="Decode throughput")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    if energy:
        ax = axes[0][1]
        for tp, pts in energy.items():
            ax.plot([b for b, _ in pts], [y for _, y in pts], marker="o", label=f"tp={tp}")
        ax.set(xscale="log", yscale="log", xlabel="batch (sequences)", ylabel="J per generated token",
               title="Energy per token (all GPUs)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    devices = sorted({r["device"] for r in rows})
    fig.suptitle("; ".join(devices), fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", help="JSON lines from llama32 bench --json-out")
    p.add_argument("--out", help="figure path (default: RESULTS with .png)")
    p.add_argument("--table", action="store_true", help="print the table only")
    a = p.parse_args()
    rows = load(a.results)
    if not rows:
        sys.exit(f"{a.results}: no bench result lines")
    table(rows)
    if a.table:
        return
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("matplotlib is not installed: table only", file=sys.stderr)
        return
    plot(rows, a.out or str(Path(a.results).with_suffix(".png")))


if __name__ == "__main__":
    main()
