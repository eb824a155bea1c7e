"""Small tokenizers built with the `tokenizers` library, saved as a model directory would hold them.

- `byte_level_dir`: GPT-2 style byte-level BPE; emoji and CJK characters are split across tokens.
- `llama_like_dir`: Llama-2 style BPE with byte fallback (`<0xE2>` tokens for characters outside
  the vocabulary), `▁` for spaces, a `<s> $A` post-processor and a decoder that strips one
  leading space.
Both are trained in milliseconds on a few sentences; tests import the fixtures by name.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world, hello there! How are you today?",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
    "Über café naïve résumé — 日本語のテキスト 😀🎉 emoji!",
]
# Texts with multi-byte characters: accents, CJK, emoji (4 bytes), a ZWJ sequence, an unpaired mark.
TEXTS = [
    "The capital of France is",
    "  leading spaces\n\ttabs and trailing  ",
    "Émile aime les crêpes 🥞 et le café.",
    "日本語のテキスト、中文文本",
    "👩‍👩‍👧 family, 🎉🎉 party, e\u0301 combining",
    *CORPUS,
]


def write_model_dir(directory: Path, tokenizer: RustTokenizer, tokenizer_config: dict, **extra_files: dict) -> Path:
    """`tokenizer.json`, `tokenizer_config.json` and any `name_json=...` as `name.json`."""
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    for name, content in extra_files.items():
        (directory / f"{name.removesuffix('_json')}.json").write_text(json.dumps(content))
    return directory


def byte_level_tokenizer() -> RustTokenizer:
    tokenizer = RustTokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    return tokenizer


def llama_like_tokenizer() -> RustTokenizer:
    """Vocabulary laid out as Llama-2's: <unk>, <s>, </s>, the 256 byte tokens, then merges."""
    trained = RustTokenizer(models.BPE())
    trained.normalizer = normalizers.Replace(" ", "▁")
    trained.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    ascii_corpus = [text.encode("ascii", "ignore").decode() for text in CORPUS]
    trained.train_from_iterator(ascii_corpus, trainers.BpeTrainer(vocab_size=200, show_progress=False))
    learned = json.loads(trained.to_str())["model"]
    specials = ["<unk>", "<s>", "</s>"]
    vocab = {token: i for i, token in enumerate(specials + [f"<0x{b:02X}>" for b in range(256)])}
    for token in sorted(learned["vocab"], key=learned["vocab"].get):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(merge) for merge in learned["merges"]]
    tokenizer = RustTokenizer(models.BPE(vocab, merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tokenizer.add_special_tokens(specials)
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tokenizer


@pytest.fixture(scope="session")
def byte_level_dir(tmp_path_factory) -> Path:
    config = {
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "unk_token": "<|endoftext|>",
        "pad_token": "<|im_end|>", "model_max_length": 64,
    }
    return write_model_dir(tmp_path_factory.mktemp("byte_level"), byte_level_tokenizer(), config)


@pytest.fixture(scope="session")
def llama_like_dir(tmp_path_factory) -> Path:
    config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True,
              "add_eos_token": False, "model_max_length": 4096}
    return write_model_dir(
        tmp_path_factory.mktemp("llama_like"), llama_like_tokenizer(), config,
        generation_config_json={"bos_token_id": 1, "eos_token_id": [2, 0]},
    )
