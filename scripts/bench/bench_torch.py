#!/usr/bin/env python3
"""The PyTorch side of the benchmark: the same Llama model (transformers' LlamaForCausalLM built from
our config), AdamW, batch, sequence length and thread count, f32 eager; then Hugging Face `generate`
with its KV cache (greedy). Prints and writes the same JSON fields as `llama bench`.

Usage: python scripts/bench/bench_torch.py --config configs/bench-small.toml --batch 8 --seq-len 256 --steps 5 --gen-tokens 64 [--threads 2] [--device cuda --dtype bf16] [--compile] [--json out.json]
"""
import argparse
import contextlib
import json
import resource
import time
import tomllib

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def ffn_hidden(m):
    if "ffn_hidden_dim" in m:
        return m["ffn_hidden_dim"]
    h = int(2 * 4 * m["dim"] / 3)
    if "ffn_dim_multiplier" in m:
        h = int(m["ffn_dim_multiplier"] * h)
    mo = m.get("multiple_of", 256)
    return mo * ((h + mo - 1) // mo)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--dtype", default="f32", choices=["f32", "bf16", "f16"], help="autocast dtype (mixed precision, f32 weights)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model (training steps only; generation stays eager)")
    ap.add_argument("--json")
    a = ap.parse_args()
    dev = torch.device(a.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    half = {"bf16": torch.bfloat16, "f16": torch.float16}.get(a.dtype)
    autocast = (lambda: torch.autocast(dev.type, dtype=half)) if half else contextlib.nullcontext
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    m = tomllib.load(open(a.config, "rb"))["model"]
    cfg = LlamaConfig(vocab_size=m.get("vocab_size", 32000), hidden_size=m["dim"], intermediate_size=ffn_hidden(m),
                      num_hidden_layers=m["n_layers"], num_attention_heads=m["n_heads"],
                      num_key_value_heads=m.get("n_kv_heads", m["n_heads"]), max_position_embeddings=m.get("max_seq_len", 4096),
                      rms_norm_eps=m.get("norm_eps", 1e-5), rope_theta=m.get("rope_theta", 10000.0), tie_word_embeddings=False,
                      attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg).to(dev)
    params = sum(p.numel() for p in model.parameters())
    train_model = torch.compile(model) if a.compile else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    ids = torch.randint(0, cfg.vocab_size, (a.batch, a.seq_len + 1)).to(dev)
    inputs, targets = ids[:, :-1], ids[:, 1:]
    fwd = bwd = step_t = 0.0
    for step in range(a.steps + 1):
        sync()
        t0 = time.perf_counter()
        with autocast():
            logits = train_model(inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, cfg.vocab_size), targets.reshape(-1))
        sync()
        t1 = time.perf_counter()
        loss.backward()
        sync()
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        t3 = time.perf_counter()
        if step > 0:
            fwd += t1 - t0
            bwd += t2 - t1
            step_t += t3 - t2
    n = max(a.steps, 1)
    step_s = (fwd + bwd + step_t) / n
    tok_s = a.batch * a.seq_len / step_s
    out = {"config": a.config, "device": a.device, "dtype": a.dtype, "compiled": a.compile, "params": params, "batch": a.batch, "seq_len": a.seq_len, "steps": a.steps,
           "train_tokens_per_s": tok_s, "forward_s": fwd / n, "backward_s": bwd / n, "optimizer_s": step_t / n}
    print(f"model {a.config} ({params} parameters), batch {a.batch} x seq {a.seq_len}, torch {torch.__version__}, {a.threads} threads")
    print(f"train  {tok_s:10.1f} tokens/s | step {step_s:.3f} s = forward {fwd / n:.3f} + backward {bwd / n:.3f} + AdamW {step_t / n:.3f}")
    if a.gen_tokens > 0:
        model.eval()
        prompts = torch.randint(0, cfg.vocab_size, (a.batch, 16)).to(dev)
        with torch.no_grad():
            model.generate(prompts, max_new_tokens=2, min_new_tokens=2, do_sample=False, pad_token_id=0)
            sync()
            t = time.perf_counter()
            res = model.generate(prompts, max_new_tokens=a.gen_tokens, min_new_tokens=a.gen_tokens, do_sample=False, pad_token_id=0)
            sync()
            secs = time.perf_counter() - t
        produced = (res.shape[1] - 16) * a.batch
        out["decode_tokens_per_s"] = produced / secs
        print(f"decode {produced / secs:10.1f} tokens/s | {produced} tokens in {secs:.3f} s, KV cache")
    out["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 * 1024)
    print(f"peak RSS {out['peak_rss_gib']:.3f} GiB")
    if dev.type == "cuda":
        out["device_peak_gib"] = torch.cuda.max_memory_reserved() / 2**30
        print(f"GPU memory reserved at peak {out['device_peak_gib']:.3f} GiB")
    if a.json:
        json.dump(out, open(a.json, "w"), indent=2)


if __name__ == "__main__":
    main()
