"""DPO training throughput: this project vs TRL's ``DPOTrainer`` on the embedded SmolLM2-135M.

    python -m benchmarks.dpo [--steps 2] [--warmup 1] [--pairs 8] [--seq-len 512]

Both sides train on the same token ids: ``pairs`` pairs per step, every chosen and rejected
sequence exactly ``seq_len`` tokens (a 128-token prompt then the response), float32, with the
same precomputed reference log-probs (constants by default, or ours from
``compute_reference_logps``; TRL's precompute pass is replaced by these columns), so neither
side's timed steps run a reference model. We split each step into ``--grad-accum`` micro-batches
(identical gradient; peak memory here: 10 GB with 4, 16 GB with 2, and all 16 x 512 tokens
at once would not fit this 24 GB machine); TRL runs the whole batch at once.
Timed: full optimizer steps after ``warmup`` untimed ones (compilation for us, first-touch
allocation for torch).

``pair-tokens/s`` = ``pairs * 2 * seq_len / step time``. MFU = model FLOPs/s over the machine's
measured float32 matmul rate (``jnp`` ``n x n @ n x n``, best of several, in this run); model FLOPs
per token = 3 x the forward matmul FLOPs of ``LlamaConfig.flops_per_token(context=seq_len)``
(PaLM's convention: attention over the full length, no causal discount), less the LM head over the
prompt positions before ``first_loss_position``, which carry no loss and which we skip (counting
them would raise our MFU by the work we do not do).

TRL comes with the ``bench`` extra (``make bench`` installs it).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

import models
from benchmarks.results import emit
from benchmarks.timing import timings
from metajudge.train import compute_reference_logps, first_loss_position, make_dpo_step
from metajudge.train_state import TrainConfig, init_train_state
from models.llama import get_config
from models.loading import embedded_gguf_path

PROMPT_LEN = 128


def load_line() -> str:
    return "load average %.2f %.2f %.2f on %d cores" % (*os.getloadavg(), os.cpu_count())


def matmul_flops(n: int = 2048, reps: int = 5) -> float:
    """Best float32 matmul rate of this machine through XLA, FLOP/s."""
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
    return 2 * n**3 / min(timings(jax.jit(jnp.matmul), a, b, n=reps))


def make_pairs(n_pairs: int, seq_len: int, vocab: int, seed: int = 0) -> list[dict]:
    """``seq_len + 1`` token ids per side (one extra so the shifted rows hold ``seq_len`` inputs)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_pairs):
        prompt = rng.integers(3, vocab, size=PROMPT_LEN)
        resp = lambda: rng.integers(3, vocab, size=seq_len + 1 - PROMPT_LEN)
        out.append({"prompt": prompt.tolist(), "chosen": resp().tolist(), "rejected": resp().tolist()})
    return out


def our_rows(pairs: list[dict], seq_len: int) -> list[dict]:
    rows = []
    for p in pairs:
        row = {}
        for side in ("chosen", "rejected"):
            seq = np.asarray(p["prompt"] + p[side], np.int32)
            mask = np.zeros(seq_len, np.float32)
            mask[PROMPT_LEN - 1 : seq_len - 1] = 1.0  # response targets; TRL's max_length cut drops the last
            row.update({
                f"{side}_inputs": seq[:-1], f"{side}_targets": seq[1:], f"{side}_loss_mask": mask,
                f"{side}_positions": np.arange(seq_len, dtype=np.int32),
                f"{side}_segment_ids": np.ones(seq_len, np.int32),
            })
        rows.append(row)
    return rows


def bench_ours(pairs: list[dict], args) -> tuple[float, object, list[dict]]:
    config, model = models.load_model(models.EMBEDDED_NAME)
    models.save_hf(config, model, args.hf_dir)  # the same weights for TRL
    rows = our_rows(pairs, args.seq_len)
    if args.ref == "compute":
        t = time.perf_counter()
        rows = compute_reference_logps(model, rows, batch_size=args.pairs // args.grad_accum)
        print(f"ours: reference log-probs of {len(rows)} pairs in {time.perf_counter() - t:.1f}s", file=sys.stderr)
    else:  # the values do not change the cost of a step; both sides get the same ones
        rows = [dict(r, ref_chosen_logp=np.float32(-3000.0), ref_rejected_logp=np.float32(-3000.0)) for r in rows]
    cfg = TrainConfig(learning_rate=1e-6, warmup_steps=0, total_steps=100, grad_accum_steps=args.grad_accum)
    state = init_train_state(model, cfg)
    step = make_dpo_step(cfg, state, loss_from=first_loss_position(rows))  # as the DPO entry point does
    times = []
    for i in range(args.warmup + args.steps):
        batch = {k: np.stack([r[k] for r in rows[i * args.pairs : (i + 1) * args.pairs]]) for k in rows[0]}
        t = time.perf_counter()
        state, m = step(state, batch)
        times.append(time.perf_counter() - t)
        print(f"ours: step {i + 1} {times[-1]:.2f}s loss={m['loss']:.4f}", file=sys.stderr)
    del state, step, model
    gc.collect()
    return float(np.mean(times[args.warmup :])), config, rows


def bench_trl(pairs: list[dict], rows: list[dict], hf_dir: str, args) -> float:
    import torch
    import transformers
    from datasets import Dataset
    from transformers.utils import logging as hf_logging
    from trl import DPOConfig, DPOTrainer

    hf_logging.set_verbosity_error()
    path = embedded_gguf_path()
    tok = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    # The weights we trained, exported to safetensors: Trainer refuses models loaded from a quantized GGUF.
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    n = (args.warmup + args.steps) * args.pairs
    data = Dataset.from_dict({
        "prompt_ids": [p["prompt"] for p in pairs[:n]],
        "chosen_ids": [p["chosen"] for p in pairs[:n]],
        "rejected_ids": [p["rejected"] for p in pairs[:n]],
        "ref_chosen_logps": [float(r["ref_chosen_logp"]) for r in rows[:n]],  # the same reference values
        "ref_rejected_logps": [float(r["ref_rejected_logp"]) for r in rows[:n]],
    })

    class PreTokenized(DPOTrainer):  # the data is already token ids with reference log-probs
        def _prepare_dataset(self, dataset, *a, **k):
            return dataset

        def _precompute_ref_logps(self, dataset, *a, **k):
            return dataset

    times: list[float] = []

    class Timer(transformers.TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t)
            print(f"trl: step {len(times)} {times[-1]:.2f}s", file=sys.stderr)

    with tempfile.TemporaryDirectory() as out:
        cfg = DPOConfig(
            output_dir=out, per_device_train_batch_size=args.pairs, max_length=args.seq_len, beta=0.1,
            learning_rate=1e-6, max_steps=args.warmup + args.steps, precompute_ref_log_probs=True,
            use_cpu=True, bf16=False, fp16=False, report_to=[], save_strategy="no", logging_steps=1,
            dataloader_num_workers=0, seed=0, lr_scheduler_type="constant", warmup_steps=0,
        )
        trainer = PreTokenized(model=model, args=cfg, train_dataset=data, processing_class=tok, callbacks=[Timer()])
        trainer.train_dataset = data
        trainer.train()
    return float(np.mean(times[args.warmup :]))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.dpo", description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=2, help="timed steps per side")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per side")
    ap.add_argument("--pairs", type=int, default=8, help="pairs per step")
    ap.add_argument("--seq-len", type=int, default=512, help="tokens per chosen/rejected sequence")
    ap.add_argument("--grad-accum", type=int, default=4,
                    help="our micro-batches per step (same math, less activation memory)")
    ap.add_argument("--ref", choices=("constant", "compute"), default="constant",
                    help="reference log-probs: fixed values (default, saves a forward pass over all pairs) or computed")
    ap.add_argument("--matmul-n", type=int, default=2048)
    args = ap.parse_args(argv)
    print(f"start: {load_line()}; jax {jax.__version__} on {jax.devices()[0].platform}", file=sys.stderr)
    peak = matmul_flops(args.matmul_n)
    print(f"matmul: {peak / 1e9:.1f} GFLOP/s (float32, n={args.matmul_n})", file=sys.stderr)
    pairs = make_pairs((args.warmup + args.steps) * args.pairs, args.seq_len, get_config("smollm2-135m").vocab_size)
    tmp = tempfile.TemporaryDirectory()
    args.hf_dir = os.path.join(tmp.name, "smollm2")
    ours_s, config, rows = bench_ours(pairs, args)
    print(f"after ours: {load_line()}", file=sys.stderr)
    trl_s = bench_trl(pairs, rows, args.hf_dir, args)
    print(f"after trl: {load_line()}", file=sys.stderr)

    import trl

    tokens = args.pairs * 2 * args.seq_len
    no_loss = args.pairs * 2 * first_loss_position(rows)  # positions whose LM head no loss needs
    flops = 3 * (config.flops_per_token(context=args.seq_len) * tokens - 2.0 * config.hidden_size * config.vocab_size * no_loss)
    mfu = flops / ours_s / peak
    print(f"ours {ours_s:.2f}s/step, trl {trl_s:.2f}s/step (trl {trl.__version__}); "
          f"model {flops / 1e12:.2f} TFLOP/step, ours {flops / ours_s / 1e9:.1f} GFLOP/s, trl MFU {flops / trl_s / peak:.3f}",
          file=sys.stderr)
    emit("dpo", {"dpo_tok_s": tokens / ours_s, "trl_tok_s": tokens / trl_s, "ratio_vs_trl": trl_s / ours_s, "mfu": mfu},
         digits={"dpo_tok_s": 1, "trl_tok_s": 1, "mfu": 3})


if __name__ == "__main__":
    main()
