"""The held-out tool-use set (data/eval/tools.jsonl: one-digit and two-digit word problems for the
calculator, capital look-ups for search) answered by a SmolLM2 checkpoint, with the tools running
and with them off, greedy, batched through `llama generate`. Success: the expected answer appears
in the answer. Prompts are rendered in SmolLM2's ChatML, with the default system prompt its
template adds (what `sft` trained on). Used by scripts/interop/smollm2.sh; the `eval` binary does this for
any template, but it also needs reward models of the same vocabulary.

    python scripts/interop/smollm2_tools.py LLAMA_BIN CHECKPOINT OUT.json
"""

import json
import subprocess
import sys

llama, checkpoint, out = sys.argv[1:4]
rows = [json.loads(line) for line in open("data/eval/tools.jsonl")]
system = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
report = {}
for tools in (True, False):
    args = [llama, "generate", "--checkpoint", checkpoint, "--temperature", "0", "--max-new-tokens", "48"]
    if tools:
        args += ["--tools", "--search-corpus", "data/tools/search.jsonl"]
    for r in rows:
        args += ["--prompt", f"{system}<|im_start|>user\n{r['messages'][0]['content']}<|im_end|>\n<|im_start|>assistant\n"]
    text = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    answers = [a.split("<|im_start|>assistant\n", 1)[-1].strip() for a in text.split("\n---")[:-1]]
    assert len(answers) == len(rows), (len(answers), len(rows))
    success, example = {}, {}
    for r, a in zip(rows, answers):
        success.setdefault(r["group"], []).append(r["expected"] in a)
        example.setdefault(r["group"], {"question": r["messages"][0]["content"], "expected": r["expected"], "answer": a[:200]})
    key = "tools on" if tools else "tools off"
    report[key] = {g: round(sum(v) / len(v), 3) for g, v in success.items()}
    report[f"first answer per group, {key}"] = example
json.dump(report, open(out, "w"), indent=1)
print(json.dumps({k: v for k, v in report.items() if not k.startswith("first")}))
