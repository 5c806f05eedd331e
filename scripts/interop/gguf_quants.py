"""Blocks of every quantized type `llama convert --from x.gguf` reads, and their values as the
`gguf` Python package (llama.cpp's own) dequantizes them, for the Rust test that must decode the
same bits (`crates/model/tests/checkpoint.rs`). For each type writes OUT/TYPE.blocks (raw
blocks) and OUT/TYPE.f32 (little-endian f32 values). Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 are made by
the package's quantizer from normal values; the K-quants, which it cannot quantize, are random
bytes with finite f16 scales (any such block is valid).

    python scripts/interop/gguf_quants.py OUT        # needs `pip install gguf` (scripts/test.sh does)
"""

import sys
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import dequantize, quantize

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
rng = np.random.default_rng(0)
# Where each K-quant block keeps its f16 scales (byte offsets).
F16_AT = {T.Q2_K: [80, 82], T.Q3_K: [108], T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208]}
for ty in [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.BF16]:
    block, size = GGML_QUANT_SIZES[ty]
    n = 4096
    if ty in F16_AT:
        blocks = rng.integers(0, 256, size=(n // block, size), dtype=np.uint8)
        for at in F16_AT[ty]:
            scale = (rng.standard_normal(n // block) * 0.05).astype(np.float16)
            blocks[:, at : at + 2] = scale.view(np.uint8).reshape(-1, 2)
        data = blocks.reshape(-1)
    else:
        values = (rng.standard_normal(n) * 0.1).astype(np.float32)
        values[::97] *= 20  # outliers, as real weights have
        data = quantize(values.reshape(1, n), ty).reshape(-1)
    values = dequantize(data, ty).astype(np.float32).reshape(-1)
    assert values.size == n and np.isfinite(values).all(), ty.name
    (out / f"{ty.name}.blocks").write_bytes(data.tobytes())
    (out / f"{ty.name}.f32").write_bytes(values.astype("<f4").tobytes())
    print(ty.name, n, "values")
