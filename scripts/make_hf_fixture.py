#!/usr/bin/env python3
"""Makes the Hugging Face parity fixtures under tests/fixtures/ (committed; the Rust tests need no Python).

Two tiny random `LlamaForCausalLM`s saved by `transformers` with safetensors:
  hf-tiny-gqa:  4 query heads, 2 key/value heads (GQA), untied output projection
  hf-tiny-tied: 4 heads, tied input/output embeddings
and, beside each, `expected.json` with fixed input ids and the logits transformers computes.

Usage: python scripts/make_hf_fixture.py   (needs torch and transformers; HF_HUB_OFFLINE=1 is fine)
"""
import json
import os
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

ROOT = Path(__file__).resolve().parent.parent / "tests" / "fixtures"


def make(name, tie, n_kv):
    torch.manual_seed(1234 if tie else 42)
    cfg = LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=88,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=n_kv,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=tie,
        bos_token_id=1,
        eos_token_id=2,
        attn_implementation="eager",
    )
    model = LlamaForCausalLM(cfg).eval()
    # Larger-than-default random weights (and non-unit norms) so that logits differ clearly and a
    # wrong permutation or transpose cannot pass by accident.
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))
    out = ROOT / name
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    ids = torch.tensor([[1, 5, 17, 33, 2, 64, 90, 7, 11, 3], [1, 95, 0, 42, 42, 8, 13, 21, 34, 55]])
    with torch.no_grad():
        logits = model(ids).logits
    expected = {"input_ids": ids.tolist(), "logits": logits.tolist(),
                "transformers": __import__("transformers").__version__, "torch": torch.__version__}
    (out / "expected.json").write_text(json.dumps(expected))
    for f in ("generation_config.json",):
        if (out / f).exists():
            os.remove(out / f)
    print(f"wrote {out}: logits {tuple(logits.shape)}")


if __name__ == "__main__":
    make("hf-tiny-gqa", tie=False, n_kv=2)
    make("hf-tiny-tied", tie=True, n_kv=4)
