"""Greedy generation speed of `models.sampler` vs Hugging Face `generate`, and the decode roofline.

Embedded SmolLM2-135M-Instruct, float32 on both sides, the same chat prompts (token ids) for both,
128 new tokens per row with no stop ids (HF: ``min_new_tokens=128``), so both do the same work.
Tokens/s count generated tokens over the whole call (prefill included), best of two timed calls
after a warm-up call, on each side.

Roofline of one decode step at batch B: ``max(B * FLOPs/token / matmul peak, weight bytes / read
bandwidth)``, both measured here; the fraction reached is that time over the measured decode step
(the call minus a prefill-only call, over 127 steps).

    python -m benchmarks.sampler [--batches 64,16] [--new 128]

Last line: ``sampler_tok_s=<n> hf_tok_s=<n> ratio_vs_hf=<x> roofline_frac=<x>`` for the first batch.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

import models
from benchmarks.results import emit
from benchmarks.timing import timings
from models import sampler
from models.buckets import Buckets
from models.loading import embedded_gguf_path

QUESTIONS = [
    "What is the capital of France?", "Explain photosynthesis in simple terms.", "Write a haiku about the sea.",
    "How do I reverse a list in Python?", "What causes the seasons on Earth?", "Give me three tips for better sleep.",
    "What is a prime number?", "Summarize the plot of Romeo and Juliet.", "Why is the sky blue?",
    "How does a bicycle stay upright?", "What is the difference between weather and climate?",
    "Name five fruits that are rich in vitamin C.", "How do vaccines work?", "What is machine learning?",
    "Describe the water cycle.", "Write a short poem about autumn leaves.", "What is the Pythagorean theorem?",
    "How can I improve my writing skills?", "What are black holes?", "Explain what an API is.",
    "What is the boiling point of water at sea level?", "Tell me a fun fact about octopuses.",
    "How do airplanes fly?", "What is inflation in economics?", "Suggest a name for a pet turtle.",
    "What is the tallest mountain in the world?", "How do I make a cup of green tea?", "What is DNA?",
    "Why do cats purr?", "Explain recursion to a beginner.", "What are the primary colors?",
    "How many continents are there?",
]


class BackgroundLoad:
    """Cores used by *other* processes while the block runs (from /proc/stat minus our own CPU time)."""

    @staticmethod
    def _read():
        import resource

        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        r = resource.getrusage(resource.RUSAGE_SELF)
        return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK"), r.ru_utime + r.ru_stime, time.perf_counter()

    def __enter__(self):
        self.start = self._read()
        return self

    def __exit__(self, *exc):
        busy, mine, wall = (b - a for a, b in zip(self.start, self._read()))
        self.cores = max(0.0, busy - mine) / max(wall, 1e-9)


def machine_peaks() -> dict:
    """Large fp32 matmul rate, decode-shaped matmul rate and memory read bandwidth, via XLA."""
    def best(f, *args, n=5):
        return min(timings(f, *args, n=n))

    a = jnp.ones((2048, 2048), jnp.float32)
    peak = 2 * 2048**3 / best(jax.jit(lambda x: x @ x), a)
    # Decode-shaped matmuls in both layouts the sampler knows: rows x @ W, and W^T @ x (feature-major).
    xs, ws = jnp.ones((64, 576), jnp.float32), [jnp.full((576, 1536), 1e-3, jnp.float32) for _ in range(40)]
    rows = 40 * 2 * 64 * 576 * 1536 / best(jax.jit(lambda x, ws: sum(jnp.sum(x @ w) for w in ws)), xs, ws)
    del ws
    xs, ws = jnp.ones((576, 64), jnp.float32), [jnp.full((1536, 576), 1e-3, jnp.float32) for _ in range(40)]
    cols = 40 * 2 * 64 * 576 * 1536 / best(jax.jit(lambda x, ws: sum(jnp.sum(w @ x) for w in ws)), xs, ws)
    del ws
    big = jnp.ones((1 << 28,), jnp.float32)  # 1 GiB
    bandwidth = big.nbytes / best(jax.jit(jnp.sum), big, n=3)
    return dict(matmul_flops=peak, decode_matmul_flops=max(rows, cols), decode_rows_flops=rows, decode_cols_flops=cols,
                read_bytes_s=bandwidth)


def prompts_for(tokenizer, n: int) -> list[list[int]]:
    return [tokenizer.apply_chat_template([{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)] + (" Be brief." if i >= len(QUESTIONS) else "")}]) for i in range(n)]


def run_ours(model, prompts, new: int, repeats: int = 2, **options) -> tuple[float, float, np.ndarray]:
    """(best seconds for the full call, best seconds for a prefill-only call, tokens)."""
    kw = dict(temperature=0.0, stop_ids=(), **options)
    sampler.generate(model, prompts, max_new_tokens=new, **kw)  # warm-up: compiles every bucket
    sampler.generate(model, prompts, max_new_tokens=1, **kw)
    total = prefill = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        toks, lens, _ = sampler.generate(model, prompts, max_new_tokens=new, **kw)
        total = min(total, time.perf_counter() - t)
        t = time.perf_counter()
        sampler.generate(model, prompts, max_new_tokens=1, **kw)
        prefill = min(prefill, time.perf_counter() - t)
    assert (lens == new).all()  # no stop ids: every row generates exactly `new` tokens
    return total, prefill, toks


def run_hf(hf_model, prompts, new: int, pad_id: int, repeats: int = 2) -> tuple[float, np.ndarray]:
    """(best seconds for HF ``generate``, tokens), left-padded prompts, greedy, exactly ``new`` tokens."""
    import torch

    width = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    kw = dict(attention_mask=mask, do_sample=False, max_new_tokens=new, min_new_tokens=new, pad_token_id=pad_id)
    total = float("inf")
    with torch.no_grad():
        hf_model.generate(ids[:2], attention_mask=mask[:2], do_sample=False, max_new_tokens=4, pad_token_id=pad_id)
        for _ in range(repeats):
            t = time.perf_counter()
            out = hf_model.generate(ids, **kw)
            total = min(total, time.perf_counter() - t)
    gen = out[:, width:].numpy()
    assert gen.shape[1] == new
    return total, gen


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="64,16")
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--no-hf", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count() or 1)
    print(f"machine: {os.cpu_count()} cpus; 'other load' below = cores used by other processes meanwhile")
    with BackgroundLoad() as load:
        peaks = machine_peaks()
    print(f"peaks: matmul {peaks['matmul_flops'] / 1e9:.0f} GFLOP/s (2048^3), decode-shaped matmul "
          f"{peaks['decode_rows_flops'] / 1e9:.0f} GFLOP/s as x[64,576] @ W[576,1536], "
          f"{peaks['decode_cols_flops'] / 1e9:.0f} as W^T[1536,576] @ x^T[576,64]; read {peaks['read_bytes_s'] / 1e9:.1f} GB/s; "
          f"other load {load.cores:.2f}")
    config, model = models.load_model(models.EMBEDDED_NAME)
    tokenizer = models.load_tokenizer(models.EMBEDDED_NAME)
    hf_model = None
    if not args.no_hf:
        transformers.utils.logging.set_verbosity_error()
        path = embedded_gguf_path()
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(
            os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()
    new = args.new
    results = []
    for batch in [int(b) for b in args.batches.split(",")]:
        prompts = prompts_for(tokenizer, batch)
        with BackgroundLoad() as load:
            total, prefill, toks = run_ours(model, prompts, new)
        ours = batch * new / total
        step = (total - prefill) / (new - 1)
        context = float(np.mean([len(p) for p in prompts])) + new / 2
        flops = batch * config.flops_per_token(context=int(context))
        weight_bytes = config.num_params * 4
        roof = max(flops / peaks["matmul_flops"], weight_bytes / peaks["read_bytes_s"])
        frac = roof / step
        frac_decode_rate = max(flops / peaks["decode_matmul_flops"], weight_bytes / peaks["read_bytes_s"]) / step
        line = (f"batch {batch}: sampler {ours:.0f} tok/s ({total:.2f}s; prefill {prefill:.2f}s; decode step "
                f"{step * 1e3:.1f} ms = {flops / step / 1e9:.0f} GFLOP/s; roofline step {roof * 1e3:.1f} ms -> "
                f"frac {frac:.2f}, vs decode-shaped matmul rate {frac_decode_rate:.2f}; other load {load.cores:.2f})")
        hf = float("nan")
        if hf_model is not None:
            with BackgroundLoad() as load:
                hf_total, hf_toks = run_hf(hf_model, prompts, new, tokenizer.pad_token_id or 0)
            hf = batch * new / hf_total
            first = min(8, new)
            agree = float(np.mean(hf_toks[:, :first] == toks[:, :first]))
            line += f"\n  hf {hf:.0f} tok/s ({hf_total:.2f}s); first-{first}-token agreement {agree:.2f}; other load {load.cores:.2f}"
        print(line, flush=True)
        if not results:  # the same without prefilling the shared system prompt once (HF cannot)
            with BackgroundLoad() as load:
                total2, _, _ = run_ours(model, prompts, new, repeats=1, buckets=Buckets(min_shared_prefix=1 << 30))
            print(f"  sampler without shared-prefix prefill: {batch * new / total2:.0f} tok/s ({total2:.2f}s); "
                  f"other load {load.cores:.2f}", flush=True)
        results.append((ours, hf, ours / hf, frac))
    ours, hf, ratio, frac = results[0]
    emit("sampler", {"sampler_tok_s": ours, "hf_tok_s": hf, "ratio_vs_hf": ratio, "roofline_frac": frac},
         digits={"sampler_tok_s": 1, "hf_tok_s": 1})


if __name__ == "__main__":
    main()
