"""Tool calling's pieces with real tokenizers and templates: the formats' parser (the same result
whatever the pieces the text arrives in, and OpenAI deltas that add up to the calls), Qwen3's own
chat template given the tools, and the tool-call grammars checked by llguidance against calls that
the real tokenizers encode."""

import json
import random
from pathlib import Path

import pytest

from tgi_router.errors import ValidationError
from tgi_router.grammar import Grammars
from tgi_router.tokenizer import Tokenizer
from tgi_router.tools import HERMES, LLAMA3_JSON, MISTRAL, ParsedOutput, ToolCallParser, ToolRequest, template_format
from tgi_router.chat_template import render_chat

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "tokenizers"
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}},
]
OUTPUTS = [
    (HERMES, 'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "n": [1, {"a": "}\\""}]}}\n'
             '</tool_call>\n<tool_call>\n{"name": "add", "arguments": {}}\n</tool_call>',
     "Let me look.\n", [("get_weather", {"city": "Paris", "n": [1, {"a": '}"'}]}), ("add", {})]),
    (LLAMA3_JSON, ' {"name": "get_weather", "parameters": {"city": "Paris"}}', "", [("get_weather", {"city": "Paris"})]),
    (LLAMA3_JSON, '<|python_tag|>{"name": "add", "parameters": {"a": 1, "b": 2}}', "", [("add", {"a": 1, "b": 2})]),
    (LLAMA3_JSON, '{"city": "Paris"} is JSON, not a call', '{"city": "Paris"} is JSON, not a call', []),
    (MISTRAL, '[TOOL_CALLS][{"name": "add", "arguments": {"a": 1, "b": 2}}, {"arguments": {"city": "Oslo"}, "name": "get_weather"}]',
     "", [("add", {"a": 1, "b": 2}), ("get_weather", {"city": "Oslo"})]),
    (HERMES, "No call here, though <tool is a prefix of the tag", "No call here, though <tool is a prefix of the tag", []),
]


def parse_in_pieces(fmt, text: str, rng: random.Random) -> tuple[ParsedOutput, ToolCallParser]:
    parser, out, position = ToolCallParser(fmt), ParsedOutput(), 0
    while position < len(text):
        size = rng.randint(1, 6)
        out += parser.feed(text[position : position + size])
        position += size
    out += parser.finish()
    return out, parser


@pytest.mark.parametrize("fmt, text, content, calls", OUTPUTS, ids=lambda value: getattr(value, "name", None))
def test_the_parser_finds_the_same_content_and_calls_whatever_the_pieces(fmt, text, content, calls):
    rng = random.Random(0)
    for _ in range(20):
        out, parser = parse_in_pieces(fmt, text, rng)
        assert out.content == content
        assert [(call.name, json.loads(call.arguments)) for call in parser.calls] == calls
        added: dict[int, dict] = {}
        for delta in out.deltas:  # as the openai client adds them up
            call = added.setdefault(delta["index"], {"id": delta.get("id"), "name": "", "arguments": ""})
            call["name"] += delta["function"].get("name") or ""
            call["arguments"] += delta["function"]["arguments"]
        assert [(c["id"], c["name"], c["arguments"]) for c in added.values()] == [(c.id, c.name, c.arguments) for c in parser.calls]


def test_qwen3s_template_gets_the_tools_and_teaches_the_hermes_format():
    tokenizer = Tokenizer.from_dir(ASSETS / "qwen3")
    request = ToolRequest.parse({"tools": TOOLS, "tool_choice": "required"}, tokenizer.chat_template)
    assert request.format == HERMES == template_format(tokenizer.chat_template)
    prompt = render_chat(tokenizer.chat_template, [{"role": "user", "content": "Weather in Paris?"}],
                         tokenizer.bos_token, tokenizer.eos_token, tools=request.template_tools)
    assert '"name": "get_weather"' in prompt and "<tool_call>" in prompt


def test_qwen3s_required_grammar_names_its_added_tokens_and_takes_only_valid_calls():
    tokenizer = Tokenizer.from_dir(ASSETS / "qwen3")
    grammars = Grammars((ASSETS / "qwen3" / "tokenizer.json").read_text(), 151936, sorted(tokenizer.eos_token_ids))
    request = ToolRequest.parse({"tools": TOOLS, "tool_choice": "required"}, tokenizer.chat_template)
    spec = request.grammar(tokenizer.added_token_id)
    assert f"<[{tokenizer.added_token_id('<tool_call>')}]>" in spec.value
    good = '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
    assert follows(grammars, spec, tokenizer.encode(good, add_special_tokens=False))
    for bad in ('<tool_call>\n{"name": "add", "arguments": {"a": "one"', '<tool_call>\n{"name": "fly"',
                '{"name": "add"'):
        assert not follows(grammars, spec, tokenizer.encode(bad, add_special_tokens=False)), bad


@pytest.mark.parametrize("fmt, call", [
    (LLAMA3_JSON, '{"name": "get_weather", "parameters": {"city": "Oslo"}}'),
    (MISTRAL, '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Oslo"}}]'),  # no added token here: text
])
def test_a_named_choice_grammar_takes_that_function_in_the_format_and_no_other(fmt, call):
    tokenizer = Tokenizer.from_dir(ASSETS / "llama3_1")
    grammars = Grammars((ASSETS / "llama3_1" / "tokenizer.json").read_text(), 128256, sorted(tokenizer.eos_token_ids))
    request = ToolRequest.parse({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}, None)
    spec = ToolRequest(request.tools, request.choice, request.parallel, fmt).grammar(tokenizer.added_token_id)
    assert follows(grammars, spec, tokenizer.encode(call, add_special_tokens=False))
    other = call.replace('"get_weather"', '"add"')
    assert not follows(grammars, spec, tokenizer.encode(other, add_special_tokens=False))


def follows(grammars: Grammars, spec, token_ids: list[int]) -> bool:
    constraint = grammars.matcher(spec)
    try:
        for token_id in token_ids:
            constraint.advance(token_id)
    except RuntimeError:
        return False
    return True


def test_tool_choice_none_or_no_tools_is_no_tool_request_and_a_choice_without_tools_is_refused():
    assert ToolRequest.parse({"tools": TOOLS, "tool_choice": "none"}, None) is None
    assert ToolRequest.parse({}, None) is None
    with pytest.raises(ValidationError, match="only allowed when `tools` are given"):
        ToolRequest.parse({"tool_choice": "auto"}, None)
