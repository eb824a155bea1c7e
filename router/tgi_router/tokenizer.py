"""The model's tokenizer for the router, from `tokenizer.json` with the Rust `tokenizers` library.

transformers would import torch, which the router never does; everything needed here is in the
JSON files HF writes next to a model. The aim is the ids and text of transformers 5's
`AutoTokenizer` for the same directory (the tests check this against it), with one exception: a
BOS that tokenizer_config.json asks for and the post-processor lacks is added (`_is_bos_missing`).

A long text is tokenized in pieces on several threads when the tokenizer's pre-tokenizer makes that
exact (`_cuts_before_spaces`): its prompt is on the path to the first token, and a 1,000-token prompt
takes a Llama 3 tokenizer 1-3 ms on one core.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from tokenizers import Encoding
from tokenizers import Tokenizer as RustTokenizer

# transformers writes int(1e30) as model_max_length when the model declares none.
_NO_MAX_LENGTH = 10**18
# The named special tokens of transformers' tokenizers (`SPECIAL_TOKENS_ATTRIBUTES`).
_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# transformers' `clean_up_tokenization`, applied on decode when the tokenizer config asks for it.
_CLEAN_UP_PAIRS = (
    (" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
    (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"),
)
# Texts are cut into pieces of this many characters at least, and as many pieces as cores at most.
MIN_PIECE_CHARS = 1_000
MAX_PIECES = min(8, len(os.sched_getaffinity(0)))
# Pre-tokenizer regexes (with byte-level BPE) of which no match holds a non-space character followed by
# a space: a space is only ever a match's first character or in a run of whitespace. So every space
# after a non-space starts a pre-token, and the text before it tokenizes alone as it does in the whole.
# Llama 3's, and Qwen 2's and 3's (one digit a pre-token); GPT-2's is ByteLevel's own (`use_regex`).
_CUT_SAFE_PATTERNS = frozenset({
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
})


@dataclass(frozen=True)
class Tokenizer:
    """Encodes prompts and decodes ids; built once by `from_dir` and shared by all requests.

    `special_ids` are transformers' `all_special_ids` (the named special tokens plus the extra ones),
    which is what TGI reports as `Token.special`. `eos_token_ids` end generation.
    """

    backend: RustTokenizer = field(repr=False)
    bos_token: str | None
    eos_token: str | None
    bos_token_id: int | None
    eos_token_ids: frozenset[int]
    special_ids: frozenset[int]
    chat_template: str | None
    model_max_length: int | None
    # True when tokenizer_config.json asks for a BOS that the post-processor does not write.
    is_bos_prepended: bool = False
    is_cleaning_up_spaces: bool = False
    # Long texts may be cut before a space that follows a non-space (`_cuts_before_spaces`).
    is_cut_before_spaces: bool = False

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        root = Path(path)
        tokenizer_json = (root / "tokenizer.json").read_text()
        backend = RustTokenizer.from_str(tokenizer_json)
        # Length limits are the router's job (validation), never the tokenizer's.
        backend.no_padding()
        backend.no_truncation()
        config = {**_read_json(root / "special_tokens_map.json"), **_read_json(root / "tokenizer_config.json")}
        bos_token = _token_content(config.get("bos_token"))
        bos_id = backend.token_to_id(bos_token) if bos_token else None
        max_length = config.get("model_max_length")
        return cls(
            backend=backend,
            bos_token=bos_token,
            eos_token=_token_content(config.get("eos_token")),
            bos_token_id=bos_id,
            eos_token_ids=_eos_token_ids(root, config, backend),
            special_ids=_special_ids(config, backend),
            chat_template=_chat_template(root, config),
            model_max_length=max_length if isinstance(max_length, int) and max_length < _NO_MAX_LENGTH else None,
            is_bos_prepended=_is_bos_missing(config, backend, bos_id),
            is_cleaning_up_spaces=_is_cleaning_up_spaces(config, backend),
            is_cut_before_spaces=_cuts_before_spaces(json.loads(tokenizer_json)),
        )

    @property
    def vocab_size(self) -> int:
        """Every id the tokenizer knows, added tokens included (`len(tokenizer)` in transformers)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def added_token_id(self, text: str) -> int | None:
        """The id of `text` when the tokenizer holds it as one added token (`<tool_call>` in Qwen's),
        else None."""
        token_id = self.backend.token_to_id(text)
        return token_id if token_id is not None and token_id in self.backend.get_added_tokens_decoder() else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self._encoding(text, add_special_tokens).ids
        return [self.bos_token_id, *ids] if add_special_tokens and self.is_bos_prepended else ids

    def encode_with_offsets(
        self, text: str, add_special_tokens: bool = True, max_tokens: int | None = None
    ) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and, for each, the `(start, stop)` character span of `text` it covers. Past `max_tokens`
        tokens raises TooManyTokensError, before building lists of a million offsets.

        Special tokens the post-processor adds cover `(0, 0)`. (TGI's /tokenize reports byte offsets;
        convert with `len(text[:start].encode())`.)
        """
        encoding = self._encoding(text, add_special_tokens)
        is_bos_added = add_special_tokens and self.is_bos_prepended
        num_tokens = len(encoding) + is_bos_added
        if max_tokens is not None and num_tokens > max_tokens:
            raise TooManyTokensError(num_tokens)
        ids, offsets = encoding.ids, encoding.offsets
        if is_bos_added:
            ids, offsets = [self.bos_token_id, *ids], [(0, 0), *offsets]
        return ids, offsets

    def _encoding(self, text: str, add_special_tokens: bool) -> Encoding:
        # encode_batch lets go of the GIL while it works (encode holds it): tokenizing a long text in a
        # worker thread then leaves the event loop free. Its pieces are tokenized on several threads.
        pieces = self._pieces(text)
        if len(pieces) == 1:
            return self.backend.encode_batch([text], add_special_tokens=add_special_tokens)[0]
        encodings = self.backend.encode_batch(pieces, add_special_tokens=False)
        return self.backend.post_process(Encoding.merge(encodings, growing_offsets=True),
                                         add_special_tokens=add_special_tokens)

    def _pieces(self, text: str) -> list[str]:
        """`text` cut, where the tokenizer allows, into up to MAX_PIECES pieces of similar length
        (MIN_PIECE_CHARS at least), each cut just before a space that follows a non-space ASCII
        character (the piece's last token then ends where the piece does, under NFC too: an ASCII
        character composes with nothing before it, and merged offsets grow from that end)."""
        count = min(MAX_PIECES, len(text) // MIN_PIECE_CHARS)
        if not self.is_cut_before_spaces or count < 2:
            return [text]
        cuts = [0]
        for k in range(1, count):
            cut = text.find(" ", max(len(text) * k // count, cuts[-1] + MIN_PIECE_CHARS))
            while cut > 0 and not _ends_piece(text[cut - 1]):
                cut = text.find(" ", cut + 1)
            if cut < 0 or len(text) - cut < MIN_PIECE_CHARS:
                break
            cuts.append(cut)
        cuts.append(len(text))
        return [text[start:stop] for start, stop in zip(cuts, cuts[1:])]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        text = self.backend.decode(ids, skip_special_tokens=skip_special_tokens)
        if self.is_cleaning_up_spaces:
            for old, new in _CLEAN_UP_PAIRS:
                text = text.replace(old, new)
        return text


class TooManyTokensError(ValueError):
    def __init__(self, num_tokens: int):
        super().__init__(f"{num_tokens} tokens")
        self.num_tokens = num_tokens


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _token_content(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    return value.get("content") if isinstance(value, dict) else value


def _is_bos_missing(config: dict, backend: RustTokenizer, bos_id: int | None) -> bool:
    """The config asks for a BOS (`add_bos_token: true`) that the post-processor does not write.

    transformers 5 ignores `add_bos_token` when tokenizer.json exists, but transformers 4's Llama
    tokenizers (and so TGI) honour it, and a model trained with a BOS needs it.
    """
    if config.get("add_bos_token") is not True or bos_id is None:
        return False
    return backend.encode("", add_special_tokens=True).ids[:1] != [bos_id]


def _ends_piece(char: str) -> bool:
    return char.isascii() and not char.isspace()


def _cuts_before_spaces(config: dict) -> bool:
    """Whether tokenizing the text before a space that follows a non-space, and the text from that
    space on, gives the whole text's tokens (the tokenizer.json `config` then merges them exactly).

    The pre-tokenizer must be byte-level BPE splitting by a regex of `_CUT_SAFE_PATTERNS` (lookahead
    only, no lookbehind: a piece's regex matches are the whole text's); the normalizer none or NFC
    (a space composes with nothing); and no added token may hold whitespace or strip it around it (one
    could then reach across the cut).
    """
    if (config.get("normalizer") or {"type": "NFC"}).get("type") != "NFC":
        return False
    for token in config.get("added_tokens", []):
        if any(char.isspace() for char in token["content"]) or token["lstrip"] or token["rstrip"] or token["single_word"]:
            return False
    pre = config.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel":
        return pre.get("use_regex", True) and not pre.get("add_prefix_space")
    if pre.get("type") != "Sequence" or len(pre.get("pretokenizers", [])) != 2:
        return False
    split, byte_level = pre["pretokenizers"]
    return (
        split.get("type") == "Split" and split.get("pattern", {}).get("Regex") in _CUT_SAFE_PATTERNS
        and split.get("behavior") == "Isolated" and not split.get("invert")
        and byte_level.get("type") == "ByteLevel" and not byte_level.get("use_regex") and not byte_level.get("add_prefix_space")
    )


def _is_cleaning_up_spaces(config: dict, backend: RustTokenizer) -> bool:
    """transformers applies `clean_up_tokenization_spaces` on decode, except to BPE models."""
    if not config.get("clean_up_tokenization_spaces"):
        return False
    is_forced = bool(config.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output"))
    return type(backend.model).__name__ != "BPE" or is_forced


def _eos_token_ids(root: Path, config: dict, backend: RustTokenizer) -> frozenset[int]:
    """generation_config.json's eos_token_id (int or list), else config.json's, else the tokenizer's."""
    for name in ("generation_config.json", "config.json"):
        value = _read_json(root / name).get("eos_token_id")
        if value is not None:
            return frozenset(value if isinstance(value, list) else [value])
    eos = _token_content(config.get("eos_token"))
    eos_id = backend.token_to_id(eos) if eos else None
    return frozenset() if eos_id is None else frozenset([eos_id])


def _special_ids(config: dict, backend: RustTokenizer) -> frozenset[int]:
    """transformers' `all_special_ids`: the named special tokens, model-specific `*_token` entries,
    and `extra_special_tokens` (formerly `additional_special_tokens`)."""
    tokens = [config.get(key) for key in _SPECIAL_TOKEN_KEYS]
    tokens += [value for key, value in config.items() if key.endswith("_token") and isinstance(value, (str, dict))]
    extra = config.get("extra_special_tokens", config.get("additional_special_tokens")) or []
    tokens += list(extra.values()) if isinstance(extra, dict) else list(extra)
    ids = (backend.token_to_id(content) for content in map(_token_content, tokens) if content)
    return frozenset(token_id for token_id in ids if token_id is not None)


def _chat_template(root: Path, config: dict) -> str | None:
    """`chat_template.jinja` (transformers 5), else `chat_template.json`, else tokenizer_config.json's;
    of a list of named templates, the one named `default` (as TGI picks)."""
    template_file = root / "chat_template.jinja"
    if template_file.exists():
        return template_file.read_text()
    template = _read_json(root / "chat_template.json").get("chat_template", config.get("chat_template"))
    if isinstance(template, list):
        named = {entry.get("name"): entry.get("template") for entry in template if isinstance(entry, dict)}
        return named.get("default")
    return template if isinstance(template, str) else None
