"""Resolves a model id to local files before any shard starts (TGI's `download-weights` step).

- a local directory with `config.json` is used in place;
- a `.gguf` file (or a directory holding exactly one) is used in place for the weights, and its
  tokenizer and config are exported once to a cache directory, so the router can read a plain
  `tokenizer.json` without transformers;
- anything else is a hub id, fetched with huggingface_hub (revision, HF_TOKEN, HF_HUB_OFFLINE and the
  cache directory are honoured by huggingface_hub itself).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.jinja", "*.txt"]


@dataclass(frozen=True)
class PreparedModel:
    # What shards load: a directory with config.json and safetensors, or a .gguf file.
    model_path: str
    # A directory with tokenizer.json (and tokenizer_config.json, generation_config.json).
    tokenizer_path: str


def prepare(model_id: str, revision: str | None = None, cache_dir: str | None = None) -> PreparedModel:
    path = Path(model_id).expanduser()
    gguf = _gguf_file(path)
    if gguf is not None:
        return PreparedModel(str(gguf), str(_export_gguf_metadata(gguf, cache_dir)))
    if path.is_dir():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path} has no config.json and no .gguf file")
        return PreparedModel(str(path), str(path))
    from huggingface_hub import snapshot_download

    local = snapshot_download(model_id, revision=revision, cache_dir=cache_dir, allow_patterns=HUB_PATTERNS)
    return PreparedModel(local, local)


def _gguf_file(path: Path) -> Path | None:
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {path} does not exist")
        return path
    if path.is_dir() and not (path / "config.json").exists():
        candidates = sorted(path.glob("*.gguf"))
        if len(candidates) > 1:
            raise ValueError(f"{path} holds several .gguf files; pass one of them: {[c.name for c in candidates]}")
        return candidates[0] if candidates else None
    return None


def _export_gguf_metadata(gguf: Path, cache_dir: str | None) -> Path:
    """Writes tokenizer and config files for `gguf` once; later calls reuse them."""
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
