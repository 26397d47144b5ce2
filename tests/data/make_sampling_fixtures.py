"""Writes the reference fixtures read by tests/sampling.rs and engine/npy.rs (run with a Python that has
numpy, torch and transformers; e.g. /work/venv-golden/bin/python tests/data/make_sampling_fixtures.py).

sampling_reference.json: penalized logits and filtered distributions computed with Hugging Face
transformers' logits processors (RepetitionPenalty, Temperature, MinP, TopK, TopP, applied in vLLM v1's
order: penalties, temperature, min-p, top-k, top-p) and vLLM's frequency/presence formula in torch float32.
npy_*.npy: small arrays written by numpy's own writer.
"""
import json
import os

import numpy as np
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

HERE = os.path.dirname(os.path.abspath(__file__))
V = 24


def f32_list(t):
    return [float(x) for x in t.to(torch.float32).reshape(-1).tolist()]


def main():
    g = torch.Generator().manual_seed(1234)
    logits = (torch.randn(V, generator=g) * 3.0).to(torch.float32)
    prompt = [3, 5, 5, 17, 20]
    output = [5, 9, 9, 9, 11, 20, 0]

    cases = []

    def add(name, rep, freq, pres, temp, min_p, top_k, top_p):
        scores = logits.clone()[None, :]
        ids = torch.tensor([prompt + output])
        if rep != 1.0:
            scores = RepetitionPenaltyLogitsProcessor(rep)(ids, scores)
        counts = torch.zeros(V, dtype=torch.int64)
        for t in output:
            counts[t] += 1
        # vLLM apply_penalties: logits -= freq * counts; logits -= pres * (counts > 0)
        scores = scores - torch.tensor(freq, dtype=torch.float32) * counts[None, :].to(torch.float32)
        scores = scores - torch.tensor(pres, dtype=torch.float32) * (counts[None, :] > 0).to(torch.float32)
        penalized = scores.clone()
        if temp == 0.0:
            probs = torch.zeros(V)
            probs[int(torch.argmax(penalized))] = 1.0
        else:
            # Softmax in float64 after the masks, to compare probabilities tightly.
            scores = TemperatureLogitsWarper(temp)(ids, scores.to(torch.float64))
            if min_p > 0.0:
                scores = MinPLogitsWarper(min_p)(ids, scores)
            if top_k > 0:
                scores = TopKLogitsWarper(top_k)(ids, scores)
            if top_p < 1.0:
                scores = TopPLogitsWarper(top_p)(ids, scores)
            probs = torch.softmax(scores, dim=-1)[0]
        cases.append(
            {
                "name": name,
                "repetition_penalty": rep,
                "frequency_penalty": freq,
                "presence_penalty": pres,
                "temperature": temp,
                "min_p": min_p,
                "top_k": top_k,
                "top_p": top_p,
                "penalized": f32_list(penalized),
                "probs": [float(x) for x in probs.tolist()],
            }
        )

    add("plain_t1", 1.0, 0.0, 0.0, 1.0, 0.0, 0, 1.0)
    add("temperature_0.7", 1.0, 0.0, 0.0, 0.7, 0.0, 0, 1.0)
    add("top_k_5", 1.0, 0.0, 0.0, 1.0, 0.0, 5, 1.0)
    add("top_p_0.75_t0.8", 1.0, 0.0, 0.0, 0.8, 0.0, 0, 0.75)
    add("min_p_0.08_t1.3", 1.0, 0.0, 0.0, 1.3, 0.08, 0, 1.0)
    add("combined", 1.0, 0.0, 0.0, 0.9, 0.02, 8, 0.9)
    add("repetition_1.3", 1.3, 0.0, 0.0, 1.0, 0.0, 0, 1.0)
    add("repetition_0.7", 0.7, 0.0, 0.0, 1.0, 0.0, 0, 1.0)
    add("frequency_presence", 1.0, 0.45, -0.3, 1.0, 0.0, 0, 1.0)
    add("all_penalties_filters", 1.2, 0.3, 0.5, 0.6, 0.05, 6, 0.8)
    add("greedy_penalized", 1.5, 1.1, 0.7, 0.0, 0.0, 0, 1.0)

    ref = {
        "source": "transformers logits processors + vLLM penalty formula, see make_sampling_fixtures.py",
        "logits": f32_list(logits),
        "prompt_ids": prompt,
        "output_ids": output,
        "cases": cases,
    }
    with open(os.path.join(HERE, "sampling_reference.json"), "w") as f:
        json.dump(ref, f, indent=0)

    # .npy fixtures written by numpy.
    np.save(os.path.join(HERE, "npy_f32_2x3.npy"), np.array([[1.5, -2.25, 3.1415927], [1e-30, -0.0, 65504.0]], "<f4"))
    np.save(os.path.join(HERE, "npy_f16_3.npy"), np.array([0.5, -1.0, 65504.0], "<f2"))
    np.save(os.path.join(HERE, "npy_f64_2x1x2.npy"), np.array([[[0.1, -7.0]], [[1e10, 2.5]]], "<f8"))
    np.save(os.path.join(HERE, "npy_i64_4.npy"), np.array([0, -1, 128000, 2**40], "<i8"))
    np.save(os.path.join(HERE, "npy_i32_2x2.npy"), np.array([[1, -2], [3, 2**31 - 1]], "<i4"))
    np.save(os.path.join(HERE, "npy_f32_scalar.npy"), np.array(42.0, "<f4"))
    with open(os.path.join(HERE, "npy_f32_v2.npy"), "wb") as f:
        np.lib.format.write_array(f, np.arange(4, dtype="<f4"), version=(2, 0))
    with open(os.path.join(HERE, "npy_f32_v3.npy"), "wb") as f:
        np.lib.format.write_array(f, np.arange(3, dtype="<f4") - 1.0, version=(3, 0))
    np.save(os.path.join(HERE, "npy_fortran.npy"), np.asfortranarray(np.ones((2, 2), "<f4")))
    np.save(os.path.join(HERE, "npy_f32_bigendian.npy"), np.ones(2, ">f4"))


if __name__ == "__main__":
    main()
