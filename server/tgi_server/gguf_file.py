"""GGUF files: their tokenizer and config exported once as HF files, and their tensors read by HF name.

gguf-py's `GGUFReader` turns every metadata value into numpy views (the 49k tokenizer strings of
a small model take seconds), and transformers' `load_gguf_checkpoint` rebuilds the tensor-name map
once per module of a model skeleton; a shard needs neither: its config comes from the export that
`prepare` made, and its tensors are found by skipping the metadata and read with gguf-py's own
dequantizers and transformers' own per-architecture fix-ups (llama's q/k row order, Gemma's norms).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# GGUF metadata value types (gguf-py's GGUFValueType) and the size of the fixed-size ones.
_STRING, _ARRAY = 8, 9
_FIXED_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_DEFAULT_ALIGNMENT = 32


def metadata_dir(gguf: Path, cache_dir: str | None = None) -> Path:
    """The tokenizer and config.json of `gguf`, written once under `cache_dir` (default:
    HF_HOME/tgi-gguf); later calls, from any process, reuse them."""
    from huggingface_hub import constants
    from transformers import AutoConfig, AutoTokenizer

    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    root = Path(cache_dir or os.path.join(constants.HF_HOME, "tgi-gguf"))
    out = root / f"{gguf.stem}-{key}"
    if (out / "tokenizer.json").exists():
        return out
    staging = root / f".{out.name}.{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(staging)
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config.to_json_file(staging / "config.json")
    try:
        staging.rename(out)
    except OSError:  # another process exported it first
        shutil.rmtree(staging, ignore_errors=True)
    return out


@dataclass(frozen=True)
class TensorInfo:
    name: str  # GGUF's name, e.g. blk.0.attn_q.weight
    shape: tuple[int, ...]  # numpy order: outermost dimension first
    qtype: int  # gguf-py's GGMLQuantizationType value
    offset: int  # of its first byte in the file


class _Cursor:
    def __init__(self, buffer):
        self.buffer, self.offset = buffer, 0

    def values(self, fmt: str) -> tuple:
        values = struct.unpack_from("<" + fmt, self.buffer, self.offset)
        self.offset += struct.calcsize("<" + fmt)
        return values

    def unpack(self, fmt: str):
        values = self.values(fmt)
        return values if len(values) > 1 else values[0]

    def string(self) -> str:
        length = self.unpack("Q")
        self.offset += length
        return bytes(self.buffer[self.offset - length:self.offset]).decode("utf-8")

    def skip_value(self, value_type: int) -> None:
        if value_type == _STRING:
            length = self.unpack("Q")
            self.offset += length
        elif value_type == _ARRAY:
            item_type, count = self.unpack("IQ")
            if item_type in _FIXED_SIZES:
                self.offset += count * _FIXED_SIZES[item_type]
            else:
                for _ in range(count):
                    self.skip_value(item_type)
        elif value_type in _FIXED_SIZES:
            self.offset += _FIXED_SIZES[value_type]
        else:
            raise ValueError(f"unknown GGUF metadata value type {value_type} at byte {self.offset}")


def read_tensor_index(data: np.ndarray) -> tuple[str, dict[str, TensorInfo]]:
    """The architecture (`general.architecture`) and the tensors of the GGUF file mapped in `data`
    (uint8), found by walking the header and skipping the metadata values."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    cursor = _Cursor(memoryview(data))
    magic, version = cursor.unpack("4sI")
    if magic != b"GGUF" or version not in (2, 3):
        raise ValueError(f"not a GGUF file of version 2 or 3 (magic {magic!r}, version {version})")
    tensor_count, kv_count = cursor.unpack("QQ")
    architecture, alignment = None, _DEFAULT_ALIGNMENT
    for _ in range(kv_count):
        key = cursor.string()
        value_type = cursor.unpack("I")
        if key == "general.architecture" and value_type == _STRING:
            architecture = cursor.string()
        elif key == "general.alignment" and value_type == 4:  # uint32
            alignment = cursor.unpack("I")
        else:
            cursor.skip_value(value_type)
    infos = []
    for _ in range(tensor_count):
        name = cursor.string()
        n_dims = cursor.unpack("I")
        dims = cursor.values(f"{n_dims}Q")
        qtype, offset = cursor.unpack("IQ")
        infos.append((name, tuple(reversed(dims)), GGMLQuantizationType(qtype), offset))
    data_start = -(-cursor.offset // alignment) * alignment
    tensors = {}
    for name, shape, qtype, offset in infos:
        if qtype not in GGML_QUANT_SIZES:
            raise ValueError(f"tensor {name!r} has GGML type {qtype!r}, which gguf-py cannot read")
        tensors[name] = TensorInfo(name, shape, qtype, data_start + offset)
    if architecture is None:
        raise ValueError("the GGUF file has no general.architecture")
    return architecture, tensors
