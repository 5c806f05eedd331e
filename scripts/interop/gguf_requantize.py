"""Rewrites a GGUF file with its 2-D weights quantized to TYPE by the `gguf` Python package
(llama.cpp's own quantizer), metadata and the other tensors copied: a quantized model file for
the reader's end-to-end test, as llama.cpp's presets make them.

    python scripts/interop/gguf_requantize.py IN.gguf OUT.gguf q4_0|q4_1|q5_0|q5_1|q8_0
"""

import sys

import gguf
import numpy as np
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import quantize

src, dst, name = sys.argv[1], sys.argv[2], sys.argv[3].upper()
qtype = gguf.GGMLQuantizationType[name]
block = GGML_QUANT_SIZES[qtype][0]
reader = gguf.GGUFReader(src)
arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
writer = gguf.GGUFWriter(dst, arch)
for field in reader.fields.values():
    if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
        continue
    sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
    writer.add_key_value(field.name, field.contents(), field.types[0], sub_type=sub_type)
tensors = []
for t in reader.tensors:
    data = np.asarray(t.data)
    if t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16) and data.ndim == 2 and data.shape[-1] % block == 0:
        q = quantize(data.astype(np.float32), qtype)
        tensors.append((t.name, q, qtype))
    else:
        tensors.append((t.name, data, t.tensor_type))
for tensor_name, data, ty in tensors:
    writer.add_tensor_info(tensor_name, data.shape, data.dtype, data.nbytes, ty)
writer.write_header_to_file()
writer.write_kv_data_to_file()
writer.write_ti_data_to_file()
for _, data, _ in tensors:
    writer.write_tensor_data(data)
writer.close()
print(f"{dst}: {sum(ty == qtype for _, _, ty in tensors)} of {len(tensors)} tensors in {name}")
