"""The model's tokenizer for the router, from `tokenizer.json` with the Rust `tokenizers` library.

transformers would import torch, which the router never does; everything needed here is in the
JSON files HF writes next to a model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer as RustTokenizer

# transformers writes this sentinel as model_max_length when the model declares none.
_NO_MAX_LENGTH = 10**18


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _token_content(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    return value.get("content") if isinstance(value, dict) else value


@dataclass
class Tokenizer:
    backend: RustTokenizer
    eos_token_ids: frozenset[int]
    special_ids: frozenset[int]
    bos_token_id: int | None
    add_bos_token: bool
    # Special token strings, as chat templates use them.
    bos_token: str | None
    eos_token: str | None
    chat_template: str | None
    model_max_length: int | None

    @classmethod
    def from_dir(cls, path: str) -> Tokenizer:
        root = Path(path)
        backend = RustTokenizer.from_file(str(root / "tokenizer.json"))
        config = _read_json(root / "tokenizer_config.json")
        bos = _token_content(config.get("bos_token"))
        bos_id = backend.token_to_id(bos) if bos else None
        special_ids = frozenset(
            token_id for token_id, token in backend.get_added_tokens_decoder().items() if token.special
        )
        max_length = config.get("model_max_length")
        return cls(
            backend=backend,
            eos_token_ids=_eos_token_ids(root, config, backend),
            special_ids=special_ids,
            bos_token_id=bos_id,
            add_bos_token=bool(config.get("add_bos_token")) and bos_id is not None,
            bos_token=bos,
            eos_token=_token_content(config.get("eos_token")),
            chat_template=_chat_template(root, config),
            model_max_length=max_length if isinstance(max_length, int) and max_length < _NO_MAX_LENGTH else None,
        )

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self.add_bos_token and (not ids or ids[0] != self.bos_token_id):
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)


def _eos_token_ids(root: Path, config: dict, backend: RustTokenizer) -> frozenset[int]:
    """generation_config.json's eos_token_id (int or list), else config.json's, else the tokenizer's."""
    for name in ("generation_config.json", "config.json"):
        value = _read_json(root / name).get("eos_token_id")
        if value is not None:
            return frozenset(value if isinstance(value, list) else [value])
    eos = _token_content(config.get("eos_token"))
    eos_id = backend.token_to_id(eos) if eos else None
    return frozenset() if eos_id is None else frozenset([eos_id])


def _chat_template(root: Path, config: dict) -> str | None:
    template_file = root / "chat_template.jinja"
    if template_file.exists():
        return template_file.read_text()
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        named = {entry["name"]: entry["template"] for entry in template}
        return named.get("default")
    return template
