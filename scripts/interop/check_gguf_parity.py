"""llama.cpp (through llama-cpp-python) and we read the same GGUF file alike: its tokenizer and its
greedy generation. Run by scripts/interop/get_smollm2.sh on SmolLM2-135M-Instruct (Q4_1); any GGUF of the
`llama` architecture works.

    python scripts/interop/check_gguf_parity.py --llama BIN --gguf model.gguf --checkpoint DIR [--tokens 16]

DIR is `llama convert --from model.gguf --to DIR`: its tokenizer.json is the one our reader built
from the file's `tokenizer.ggml.*` metadata.

- Tokenization: 30 varied strings (whitespace runs, digits, punctuation, accents, emoji, code,
  special tokens inside text), with special tokens parsed and not, must equal llama.cpp's
  `tokenize` (no BOS added) token for token.
- Generation: for each prompt, `llama generate --temperature 0 --print-ids` against llama.cpp's
  greedy decoding from the same prompt ids. Equal ids pass; where they part, the script prints
  the position and llama.cpp's logit gap between its token and ours (a quantized file is read by
  two different dequantize-and-multiply paths, so a near-tie can flip).
- Chat: three questions through llama.cpp's chat API (the template from the file's metadata) and
  `llama chat --chat-template tokenizer`, greedy: the answers' text must be equal.
Exit status 1 if a tokenization or a chat answer differs, or a generation parts where llama.cpp's
gap is over 0.05. With `--quantized` (a file of quantized weights, which llama.cpp multiplies with
activations rounded to 8 bits, so its logits move by a few hundredths to tenths) the generation
and chat answers are compared and printed but only the tokenization can fail.
"""

import argparse
import json
import os
import subprocess
import sys

import numpy as np
from llama_cpp import Llama
from tokenizers import Tokenizer

STRINGS = [
    "Hello world", " leading space", "two  spaces and   three", "tabs\tand\nnewlines\n\n\nruns", "trailing spaces   ",
    "1234567890", "3.14159 and 2,718,281", "year 1999, 2024; 10:45pm", "Don't! Won't? I'll've.",
    "He said: \"quote\" (parens) [brackets] {braces}", "naïve café résumé Ångström", "Straße, Ærø, Łódź", "日本語のテキスト",
    "Привет, мир", "emoji 😀🎉 and 👩‍👩‍👧", "fn main() { println!(\"{}\", x + 1); }", "def f(x):\n    return x ** 2  # square",
    "not at <s>the start</s>", "a<|im_start|>b<|im_end|>c", "CamelCaseIdentifiersLikeThis", "snake_case_and-kebab-case",
    "https://example.com/path?query=1&b=2", "email@example.org", "$100.00 + 15% = €115", "ALL CAPS SENTENCE",
    "'s 't 're 've 'm 'll 'd", "\u00a0non-breaking\u2003em space", "mixed 12abc34 digits", "<|im_start|>user\nHi<|im_end|>\n", "    ",
]

p = argparse.ArgumentParser()
p.add_argument("--llama", required=True, help="our `llama` binary")
p.add_argument("--gguf", required=True)
p.add_argument("--checkpoint", required=True, help="the GGUF converted by `llama convert`")
p.add_argument("--prompt", action="append", help="default: three chat prompts in the file's template")
p.add_argument("--tokens", type=int, default=16)
p.add_argument("--quantized", action="store_true", help="report generation and chat differences without failing")
args = p.parse_args()

tok = Tokenizer.from_file(f"{args.checkpoint}/tokenizer.json")
vocab_llm = Llama(model_path=args.gguf, vocab_only=True, verbose=False)
failed = False

for special in (True, False):
    tok.encode_special_tokens = not special
    differ = 0
    for s in STRINGS:
        ours = tok.encode(s, add_special_tokens=False).ids
        theirs = vocab_llm.tokenize(s.encode(), add_bos=False, special=special)
        if ours != theirs:
            differ += 1
            print(f"  tokenize{' (special)' if special else ''} {s!r}: ours {ours}, llama.cpp {theirs}")
    print(f"tokenization, special tokens {'parsed' if special else 'as text'}: {len(STRINGS) - differ}/{len(STRINGS)} equal")
    failed |= differ > 0
tok.encode_special_tokens = False

prompts = args.prompt or [
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nWrite a haiku about the sea.<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nHow many legs does a spider have?<|im_end|>\n<|im_start|>assistant\n",
]
llm = Llama(model_path=args.gguf, n_ctx=512, logits_all=True, verbose=False, n_threads=2, seed=0)
eos = llm.token_eos()
for prompt in prompts:
    out = subprocess.run([args.llama, "generate", "--checkpoint", args.checkpoint, "--prompt", prompt, "--temperature", "0",
                          "--max-new-tokens", str(args.tokens), "--print-ids"], capture_output=True, text=True, check=True).stdout
    ids = json.loads(next(line for line in out.splitlines() if line.startswith('{"')))
    prompt_ids, ours = ids["prompt_ids"], ids["new_ids"]
    theirs_prompt = llm.tokenize(prompt.encode(), add_bos=True, special=True)
    if theirs_prompt != prompt_ids:
        print(f"prompt {prompt!r}: llama.cpp tokenizes it as {theirs_prompt}, ours {prompt_ids}")
        failed = True
    llm.reset()
    llm.eval(prompt_ids)
    theirs, gap_at = [], None
    for i in range(len(ours)):
        logits = np.array(llm.scores[llm.n_tokens - 1])
        best = int(logits.argmax())
        theirs.append(best)
        if best != ours[i] and gap_at is None:
            gap_at = (i, float(logits[best] - logits[ours[i]]))
        if best == eos:
            break
        llm.eval([ours[i]])  # follow our tokens, so that every later position is compared too
    same = theirs == ours
    print(f"prompt {prompt!r}\n  ours      {tok.decode(ours)!r}\n  llama.cpp {tok.decode(theirs)!r}\n  "
          f"{len(ours)} tokens: {'equal' if same else f'first difference at token {gap_at[0]}, llama.cpp logit gap {gap_at[1]:.4f}'}")
    if not same and gap_at[1] > 0.05 and not args.quantized:
        failed = True
# Chat: llama.cpp's chat API with the template from the file's metadata, against `llama chat`
# with the template from the converted tokenizer_config.json; both greedy.
has_template = "chat_template" in json.load(open(f"{args.checkpoint}/tokenizer_config.json")) if os.path.exists(f"{args.checkpoint}/tokenizer_config.json") else False
if not has_template:
    print("chat: skipped (the checkpoint's tokenizer_config.json has no chat_template)")
for question in ["What is the capital of France?", "Name three colours.", "What is 12 plus 30?"] if has_template else []:
    llm.reset()
    theirs = llm.create_chat_completion(messages=[{"role": "user", "content": question}], temperature=0.0, top_k=1,
                                        max_tokens=args.tokens, repeat_penalty=1.0)["choices"][0]["message"]["content"]
    ours = subprocess.run([args.llama, "chat", "--checkpoint", args.checkpoint, "--chat-template", "tokenizer", "--temperature", "0",
                           "--max-new-tokens", str(args.tokens)], input=question + "\n", capture_output=True, text=True, check=True).stdout
    same = ours.strip() == theirs.strip()
    print(f"chat {question!r}\n  ours      {ours.strip()!r}\n  llama.cpp {theirs.strip()!r}\n  {'equal' if same else 'DIFFERENT'}")
    failed |= not same and not args.quantized
sys.exit(1 if failed else 0)
