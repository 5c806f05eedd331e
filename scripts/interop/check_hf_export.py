#!/usr/bin/env python3
"""Checks that a directory written by `llama convert --to-format hf` loads in transformers and gives
the logits recorded in a fixture's expected.json.

Usage: python scripts/interop/check_hf_export.py EXPORTED_DIR tests/fixtures/hf-tiny-gqa/expected.json
(needs torch and transformers; not part of CI, which has no torch)
"""
import json
import sys

import torch
from transformers import LlamaForCausalLM

model = LlamaForCausalLM.from_pretrained(sys.argv[1], attn_implementation="eager").eval()
expected = json.load(open(sys.argv[2]))
with torch.no_grad():
    logits = model(torch.tensor(expected["input_ids"])).logits
diff = (logits - torch.tensor(expected["logits"])).abs().max().item()
print(f"max |logits - expected| = {diff:.2e}")
sys.exit(0 if diff < 1e-4 else 1)
