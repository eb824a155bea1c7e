"""The router's grammar engine with a real tokenizer (Llama 3.1's, 128k ids): masks computed together
for a batch equal each request's own, and a matcher follows the tokens it is fed."""

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from tgi_router.errors import ValidationError
from tgi_router.grammar import Grammars, GrammarSpec, compute_masks

TOKENIZER_JSON = Path(__file__).resolve().parents[1] / "assets" / "tokenizers" / "llama3_1" / "tokenizer.json"
VOCAB_SIZE, EOS = 128256, 128009
SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"]}


@pytest.fixture(scope="module")
def grammars():
    return Grammars(TOKENIZER_JSON.read_text(), VOCAB_SIZE, [EOS])


def allowed(mask: bytes) -> set[int]:
    return {t for t in range(VOCAB_SIZE) if mask[t // 8] >> (t % 8) & 1}


def test_batched_masks_equal_each_requests_own_in_its_row(grammars):
    tokenizer = Tokenizer.from_file(str(TOKENIZER_JSON))
    prefixes = ['{"name": "Jo', '{"name": "x", "age": 1', "", '{"name": "x", "age": 12}']  # the last is complete
    constraints = []
    for prefix in prefixes:
        constraint = grammars.matcher(GrammarSpec.json_schema(SCHEMA))
        for token in tokenizer.encode(prefix, add_special_tokens=False).ids:
            constraint.advance(token)
        constraints.append(constraint)
    batched = compute_masks(constraints)
    for constraint, mask in zip(constraints, batched):
        assert allowed(mask) == allowed(constraint.mask())
    assert allowed(batched[3]) == {EOS}  # a complete object: only the end
    word = tokenizer.token_to_id("hello")
    assert word in allowed(batched[0]) and word not in allowed(batched[1])  # inside a string / after a number


def test_a_token_the_grammar_forbids_is_an_error_not_a_silent_skip(grammars):
    constraint = grammars.matcher(GrammarSpec.json_schema(SCHEMA))
    with pytest.raises(RuntimeError, match="violates the request's grammar"):
        constraint.advance(Tokenizer.from_file(str(TOKENIZER_JSON)).token_to_id("hello"))


def test_schema_property_order_is_kept_in_the_grammar_key():
    spec = GrammarSpec.from_tgi({"type": "json", "value": {"properties": {"b": {}, "a": {}}}})
    assert list(json.loads(spec.value)["properties"]) == ["b", "a"]


def test_an_unclosed_regex_group_is_a_validation_error(grammars):
    with pytest.raises(ValidationError, match="invalid regex grammar"):
        grammars.matcher(GrammarSpec.from_tgi({"type": "regex", "value": "(ab"}))


def test_a_grammar_spelling_an_added_tokens_text_allows_only_tokens_its_matcher_takes():
    """llguidance 1.9 offers Qwen3's added token `<think>` where a regex forces the text "<think>",
    then refuses it: the mask must offer the same text spelled in ordinary tokens instead."""
    qwen3 = TOKENIZER_JSON.parents[1] / "qwen3" / "tokenizer.json"
    grammars = Grammars(qwen3.read_text(), 151936, [151645])
    tokenizer = Tokenizer.from_file(str(qwen3))
    for batched in (False, True):
        constraint, tokens = grammars.matcher(GrammarSpec.from_tgi({"type": "regex", "value": "<think>\nHi</think>"})), []
        while not constraint.is_finished:
            mask = compute_masks([constraint, grammars.matcher(GrammarSpec.json_schema(SCHEMA))])[0] if batched else constraint.mask()
            for token in sorted(allowed_in(mask, 151936)):  # every token offered is taken by the matcher
                assert constraint._matcher.validate_tokens([token]) == 1, tokenizer.decode([token])
            tokens.append(min(allowed_in(mask, 151936)))
            constraint.advance(tokens[-1])
        assert tokenizer.decode(tokens) == "<think>\nHi</think>"


def allowed_in(mask: bytes, vocab_size: int) -> set[int]:
    return {t for t in range(vocab_size) if mask[t // 8] >> (t % 8) & 1}
