"""Reads a `llama convert --to-format gguf` file with the `gguf` Python package (llama.cpp's own
reader) and checks what llama.cpp needs of a `llama` model: every tensor name and shape the
metadata implies, the ggml types (norms f32, matrices the file type), the hyper-parameters and
the tokenizer. Prints a summary; exits non-zero on the first problem.

    python scripts/interop/check_gguf.py model.gguf [--type f32|f16|q8_0]     # needs `pip install gguf`
"""

import argparse
import sys

import gguf

p = argparse.ArgumentParser()
p.add_argument("path")
p.add_argument("--type", choices=["f32", "f16", "q8_0"])
args = p.parse_args()
r = gguf.GGUFReader(args.path)


def field(key):
    f = r.fields.get(key)
    if f is None:
        sys.exit(f"{args.path}: missing metadata {key}")
    if f.types[0] == gguf.GGUFValueType.STRING:
        return bytes(f.parts[f.data[0]]).decode()
    if f.types[0] == gguf.GGUFValueType.ARRAY:
        return [f.parts[i] for i in f.data]
    return f.parts[f.data[0]][0]


assert field("general.architecture") == "llama", field("general.architecture")
dim, layers = int(field("llama.embedding_length")), int(field("llama.block_count"))
heads, kv = int(field("llama.attention.head_count")), int(field("llama.attention.head_count_kv"))
ffn, vocab = int(field("llama.feed_forward_length")), int(field("llama.vocab_size"))
head_dim = dim // heads
assert int(field("llama.rope.dimension_count")) == head_dim
tensors = {t.name: t for t in r.tensors}
want = {"token_embd.weight": (dim, vocab), "output_norm.weight": (dim,)}
if "output.weight" in tensors:
    want["output.weight"] = (dim, vocab)
for l in range(layers):
    b = f"blk.{l}."
    want |= {b + "attn_norm.weight": (dim,), b + "ffn_norm.weight": (dim,), b + "attn_q.weight": (dim, heads * head_dim),
             b + "attn_k.weight": (dim, kv * head_dim), b + "attn_v.weight": (dim, kv * head_dim),
             b + "attn_output.weight": (heads * head_dim, dim), b + "ffn_gate.weight": (dim, ffn),
             b + "ffn_up.weight": (dim, ffn), b + "ffn_down.weight": (ffn, dim)}
assert set(tensors) == set(want), sorted(set(tensors) ^ set(want))
matrix_type = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16, "q8_0": gguf.GGMLQuantizationType.Q8_0}
for name, shape in want.items():
    t = tensors[name]
    assert tuple(int(x) for x in t.shape) == shape, (name, t.shape, shape)
    if len(shape) == 1:
        assert t.tensor_type == gguf.GGMLQuantizationType.F32, (name, t.tensor_type)
    elif args.type:
        assert t.tensor_type in (matrix_type[args.type], gguf.GGMLQuantizationType.F16), (name, t.tensor_type)
tokens = field("tokenizer.ggml.tokens")
assert len(tokens) == vocab, (len(tokens), vocab)
assert len(field("tokenizer.ggml.scores")) == vocab and len(field("tokenizer.ggml.token_type")) == vocab
bos, eos = int(field("tokenizer.ggml.bos_token_id")), int(field("tokenizer.ggml.eos_token_id"))
token = lambda i: bytes(r.fields["tokenizer.ggml.tokens"].parts[r.fields["tokenizer.ggml.tokens"].data[i]]).decode()
print(f"{args.path}: GGUF v{r.fields['GGUF.version'].parts[-1][0]}, llama, dim {dim}, {layers} layers, {heads} heads ({kv} kv), "
      f"ffn {ffn}, vocab {vocab}, context {int(field('llama.context_length'))}, rope theta {float(field('llama.rope.freq_base'))}, "
      f"eps {float(field('llama.attention.layer_norm_rms_epsilon')):.3g}; {len(tensors)} tensors "
      f"({', '.join(sorted({t.tensor_type.name for t in r.tensors}))}); tokenizer {field('tokenizer.ggml.model')} with "
      f"bos {token(bos)!r} eos {token(eos)!r}; chat template {len(field('tokenizer.chat_template'))} chars")
