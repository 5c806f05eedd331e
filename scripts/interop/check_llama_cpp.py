"""llama.cpp itself (through the llama-cpp-python package) loads GGUF exports and decodes greedily
what `llama generate` decodes. Run by scripts/interop/check_llama_cpp.sh, which builds llama.cpp when
missing; not in the default test run (the build takes minutes).

    python scripts/interop/check_llama_cpp.py --llama BIN --checkpoint DIR --tokenizer tokenizer.json \
        --gguf f32=a.gguf --gguf f16=b.gguf --gguf q8_0=c.gguf --prompt "The jury" --tokens 24

For each prompt: llama.cpp's tokenization of it must equal the `tokenizers` package's (our
tokenizer, BOS first); f32 and f16 files must give the same greedy tokens as `llama generate
--temperature 0` (compared as text, since `llama generate` prints text); Q8_0 is reported: how
many first tokens agree with f32, and the largest difference of the next-token logits over the
prompt against the f32 file's.
"""

import argparse
import subprocess
import sys

import numpy as np
from llama_cpp import Llama
from tokenizers import Tokenizer

p = argparse.ArgumentParser()
p.add_argument("--llama", required=True, help="our `llama` binary")
p.add_argument("--checkpoint", required=True)
p.add_argument("--tokenizer", required=True)
p.add_argument("--gguf", action="append", required=True, help="TYPE=PATH")
p.add_argument("--prompt", action="append", required=True)
p.add_argument("--tokens", type=int, default=24)
args = p.parse_args()
files = dict(g.split("=", 1) for g in args.gguf)
tok = Tokenizer.from_file(args.tokenizer)
bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
failed = False


def greedy(llm, ids, n):
    out = []
    llm.reset()
    for t in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
        out.append(t)
        if t == eos or len(out) == n:
            break
    return out


def prompt_logits(path, ids):
    llm = Llama(model_path=path, n_ctx=256, logits_all=True, verbose=False, n_threads=2, seed=0)
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


models = {ty: Llama(model_path=path, n_ctx=256, verbose=False, n_threads=2, seed=0) for ty, path in files.items()}
for prompt in args.prompt:
    ours_ids = [bos] + tok.encode(prompt, add_special_tokens=False).ids
    ours = subprocess.run([args.llama, "generate", "--checkpoint", args.checkpoint, "--tokenizer", args.tokenizer, "--prompt", prompt,
                           "--temperature", "0", "--max-new-tokens", str(args.tokens)], capture_output=True, text=True, check=True).stdout
    ours_text = ours.split("\n---")[0]
    print(f"prompt {prompt!r}: ours {ours_text!r}")
    greedy_of = {}
    for ty, llm in models.items():
        ids = llm.tokenize(prompt.encode(), add_bos=True, special=False)
        if ids != ours_ids:
            print(f"  {ty}: llama.cpp tokenizes the prompt as {ids}, ours {ours_ids}")
            failed = True
        out = greedy(llm, ours_ids, args.tokens)
        greedy_of[ty] = out
        head = tok.decode(ours_ids, skip_special_tokens=True)
        whole = tok.decode(ours_ids + out, skip_special_tokens=True)
        text = prompt + (whole[len(head):] if whole.startswith(head) else tok.decode(out, skip_special_tokens=True))
        same = text == ours_text
        print(f"  {ty}: llama.cpp {text!r} ({len(out)} tokens) {'equal' if same else 'DIFFERENT'}")
        if ty in ("f32", "f16") and not same:
            failed = True
    if "q8_0" in greedy_of and "f32" in greedy_of:
        a, b = greedy_of["f32"], greedy_of["q8_0"]
        agree = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        la, lb = prompt_logits(files["f32"], ours_ids), prompt_logits(files["q8_0"], ours_ids)
        print(f"  q8_0 vs f32: first {agree} of {len(a)} tokens agree; next-token logits over the prompt differ by up to "
              f"{np.abs(la - lb).max():.4f} (logit range {la.min():.2f}..{la.max():.2f})")
sys.exit(1 if failed else 0)
