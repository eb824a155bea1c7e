"""Incremental detokenization (TGI's `decode_token`) and stop sequences."""

import random

import pytest
from tokenizer_fixtures import TEXTS, byte_level_dir, llama_like_dir  # noqa: F401 (fixtures)

from tgi_router.detokenizer import IncrementalDetokenizer, StopSequenceMatcher
from tgi_router.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def byte_level(byte_level_dir):
    return Tokenizer.from_dir(byte_level_dir)


@pytest.fixture(scope="module")
def llama_like(llama_like_dir):
    return Tokenizer.from_dir(llama_like_dir)


@pytest.fixture(scope="module")
def smollm2(smollm2_tokenizer_dir):
    return Tokenizer.from_dir(smollm2_tokenizer_dir)


def stream(tokenizer, prompt_ids, generated_ids) -> list[str]:
    """Every push's text, then the flush's; checks that `text` is their concatenation."""
    detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids)
    pieces = [detokenizer.push(token_id) for token_id in generated_ids] + [detokenizer.flush()]
    assert detokenizer.text == "".join(pieces)
    return pieces


def test_random_byte_level_ids_stream_to_exactly_the_full_decode(byte_level):
    rng = random.Random(0)
    prompt = byte_level.encode("Hello there")
    for _ in range(300):
        generated = [rng.randrange(byte_level.vocab_size) for _ in range(rng.randint(1, 40))]
        pieces = stream(byte_level, prompt, generated)
        assert "".join(pieces) == byte_level.decode(generated)
        # Only text made of complete characters is pushed; a partial one waits for flush.
        assert not any(piece.endswith("\ufffd") for piece in pieces[:-1])


@pytest.mark.parametrize("name", ["byte_level", "smollm2"])
def test_real_text_streams_to_the_full_decode(name, request):
    tokenizer = request.getfixturevalue(name)
    prompt = tokenizer.encode("Question: say it again.")
    for text in TEXTS:
        generated = tokenizer.encode(text, add_special_tokens=False)
        pieces = stream(tokenizer, prompt, generated)
        assert pieces[-1] == ""  # nothing held back at the end of complete text
        assert "".join(pieces) == tokenizer.decode(generated) == text


def test_byte_fallback_text_streams_as_decoded_after_the_prompt(llama_like):
    # The decoder strips one leading space from a decode; in context it is kept, as in TGI.
    prompt = llama_like.encode("Hello")
    for text in TEXTS:
        generated = llama_like.encode(text, add_special_tokens=False)
        in_context = llama_like.decode(prompt + generated)[len(llama_like.decode(prompt)) :]
        assert "".join(stream(llama_like, prompt, generated)) == in_context
        assert in_context.removeprefix(" ") == llama_like.decode(generated)


def test_byte_fallback_character_is_held_back_until_its_last_byte(llama_like):
    emoji_bytes = [llama_like.backend.token_to_id(f"<0x{b:02X}>") for b in "😀".encode()]
    detokenizer = IncrementalDetokenizer(llama_like, llama_like.encode("Hi"))
    assert [detokenizer.push(t) for t in emoji_bytes] == ["", "", "", "😀"]
    assert detokenizer.flush() == ""


def test_byte_level_emoji_split_over_tokens_comes_out_whole(byte_level):
    generated = byte_level.encode("a🥞b", add_special_tokens=False)
    assert len(generated) > 3  # the emoji's 4 bytes are not one token
    pieces = stream(byte_level, [], generated)
    assert "🥞" in pieces and "".join(pieces) == "a🥞b"


def test_incomplete_character_at_the_end_is_flushed_as_replacement_char(llama_like):
    detokenizer = IncrementalDetokenizer(llama_like, [])
    assert detokenizer.push(llama_like.backend.token_to_id("<0xE2>")) == ""
    assert detokenizer.flush() == "\ufffd"
    assert detokenizer.text == "\ufffd"


def test_special_tokens_are_streamed_as_text(smollm2):
    im_end = smollm2.backend.token_to_id("<|im_end|>")
    pieces = stream(smollm2, smollm2.encode("Hi"), smollm2.encode("Bye", add_special_tokens=False) + [im_end])
    assert pieces[-2:] == ["<|im_end|>", ""]


def tgi_decode_token_texts(hf, prompt: list[int], generated: list[int]) -> list[str]:
    """Each token's text by TGI's server-side algorithm (`decode_token`), written out with transformers."""
    ids, prefix_offset, read_offset, texts = list(prompt), max(len(prompt) - 5, 0), len(prompt), []
    for token_id in generated:
        ids.append(token_id)
        prefix_text = hf.decode(ids[prefix_offset:read_offset], skip_special_tokens=False)
        new_text = hf.decode(ids[prefix_offset:], skip_special_tokens=False)
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            texts.append(new_text[len(prefix_text) :])
            prefix_offset, read_offset = read_offset, len(ids)
        else:
            texts.append("")
    return texts


def test_per_token_texts_match_tgi_decode_token_with_transformers(smollm2_tokenizer_dir, smollm2):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    prompt = hf("The menu:")["input_ids"]
    generated = hf(" Émile aime les crêpes 🥞🎉 日本語 — fin", add_special_tokens=False)["input_ids"]
    detokenizer = IncrementalDetokenizer(smollm2, prompt)
    assert [detokenizer.push(token_id) for token_id in generated] == tgi_decode_token_texts(hf, prompt, generated)


@pytest.mark.parametrize("name", ["llama3_1", "qwen3", "gemma3"])
def test_real_tokenizers_per_token_texts_match_tgi_decode_token_for_text_and_random_ids(name):
    from transformers import AutoTokenizer

    directory = f"{__file__.rsplit('/', 2)[0]}/assets/tokenizers/{name}"
    ours, hf = Tokenizer.from_dir(directory), AutoTokenizer.from_pretrained(directory)
    rng = random.Random(0)
    prompts = [hf("The menu:")["input_ids"], hf("Un café 🥞")["input_ids"][:-1]]  # the second ends inside 🥞
    for trial in range(40):
        prompt = prompts[trial % 2]
        if trial % 4 < 2:  # text, whole characters
            text = "".join(rng.choice([" Émile", " crêpes", " 🥞🎉", " 日本語", "\n\n", " —", " fin.", "  x"]) for _ in range(12))
            generated = hf(text, add_special_tokens=False)["input_ids"]
        else:  # any ids: byte tokens that end inside characters, special tokens
            generated = [rng.randrange(len(hf)) for _ in range(30)]
        detokenizer = IncrementalDetokenizer(ours, prompt)
        assert [detokenizer.push(token_id) for token_id in generated] == tgi_decode_token_texts(hf, prompt, generated)


def test_stop_sequence_spanning_tokens_is_found_and_kept():
    matcher = StopSequenceMatcher(["END"])
    assert matcher.feed("it is the E") is None
    assert matcher.feed("N") is None
    assert matcher.feed("D of it") == len("it is the END")


def test_stop_sequence_inside_one_token_drops_what_follows_it():
    matcher = StopSequenceMatcher(["\n\n", "."])
    assert matcher.feed("Paris") is None
    assert matcher.feed(". Then") == len("Paris.")


def test_earliest_ending_stop_sequence_wins():
    assert StopSequenceMatcher(["world", "lo"]).feed("hello world") == len("hello")


def test_no_stop_sequences_never_stops():
    matcher = StopSequenceMatcher([])
    assert matcher.feed("anything at all") is None
    assert matcher.feed("") is None


def test_empty_stop_sequence_stops_after_the_first_token_as_tgi_does():
    assert StopSequenceMatcher(["", "x"]).feed("Hello") == len("Hello")


def test_a_match_is_reported_once_and_only_for_new_text():
    matcher = StopSequenceMatcher(["ab", "abcdef"])
    assert matcher.feed("xab") == 3
    # The caller stops at the first match; were it to go on, the old match is not reported again.
    assert matcher.feed("z") is None


def test_stop_matching_agrees_with_a_full_scan_on_random_splits():
    rng = random.Random(1)
    for _ in range(500):
        text = "".join(rng.choice("ab c\n") for _ in range(rng.randint(0, 40)))
        stops = ["".join(rng.choice("ab c\n") for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
        ends = [text.find(s) + len(s) for s in stops if s in text]
        expected = min(ends) if ends else None
        matcher, fed, result = StopSequenceMatcher(stops), 0, None
        while fed < len(text) and result is None:
            size = rng.randint(1, 6)
            result = matcher.feed(text[fed : fed + size])
            fed += size
        assert result == expected, (text, stops)
