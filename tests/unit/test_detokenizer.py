"""Tokenizer files read without transformers; incremental detokenization; stop sequences."""

import json
import random

import pytest
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from tgi_router.detokenizer import IncrementalDetokenizer, StopSequenceMatcher
from tgi_router.tokenizer import Tokenizer

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Über café naïve résumé — 日本語のテキスト 😀🎉 emoji!",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
]


def save(tokenizer: RustTokenizer, directory, config: dict, generation_config: dict | None = None):
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    if generation_config is not None:
        (directory / "generation_config.json").write_text(json.dumps(generation_config))
    return Tokenizer.from_dir(str(directory))


@pytest.fixture
def byte_level(tmp_path):
    """GPT-2 style byte-level BPE: multi-byte characters are often split across tokens."""
    tokenizer = RustTokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS, trainer)
    return save(tokenizer, tmp_path, {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True})


@pytest.fixture
def byte_fallback(tmp_path):
    """Llama-2 style BPE with byte fallback: unknown characters become <0xNN> byte tokens."""
    tokenizer = RustTokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Replace(" ", "▁")
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>", *byte_tokens])
    tokenizer.train_from_iterator([c.encode("ascii", "ignore").decode() for c in CORPUS], trainer)
    return save(tokenizer, tmp_path, {"bos_token": "<s>", "eos_token": "</s>"}, {"eos_token_id": [2, 1]})


def pushed_text(tokenizer, prompt_ids, generated_ids):
    detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids)
    pieces = [detokenizer.push(token_id) for token_id in generated_ids]
    assert "".join(pieces) == detokenizer.text
    return detokenizer.text


@pytest.mark.parametrize("fixture", ["byte_level", "byte_fallback"])
def test_streamed_pieces_join_to_the_full_decode_including_split_characters(fixture, request):
    tokenizer = request.getfixturevalue(fixture)
    prompt = tokenizer.encode("Hello")
    for text in ["Über café — 日本語 😀🎉!", "naïve résumé", "🎉🎉 fox"]:
        generated = tokenizer.encode(text, add_special_tokens=False)
        assert pushed_text(tokenizer, prompt, generated) == tokenizer.decode(generated)


def test_random_byte_level_ids_stream_to_the_full_decode(byte_level):
    rng = random.Random(0)
    for _ in range(50):
        generated = [rng.randrange(2, byte_level.vocab_size) for _ in range(rng.randint(1, 30))]
        full = byte_level.decode(generated)
        streamed = pushed_text(byte_level, [5, 6], generated)
        # Only a trailing incomplete character may be held back.
        assert full.startswith(streamed)
        assert full[len(streamed):].strip("\ufffd") == ""


def test_incomplete_character_is_held_back_until_its_last_byte(byte_fallback):
    emoji_bytes = [byte_fallback.backend.token_to_id(f"<0x{b:02X}>") for b in "😀".encode()]
    detokenizer = IncrementalDetokenizer(byte_fallback, byte_fallback.encode("Hi"))
    assert [detokenizer.push(t) for t in emoji_bytes] == ["", "", "", "😀"]


def test_bos_is_added_when_the_config_asks_and_the_post_processor_does_not(byte_level):
    ids = byte_level.encode("fox")
    assert ids[0] == byte_level.bos_token_id
    assert byte_level.encode("fox", add_special_tokens=False)[0] != byte_level.bos_token_id


def test_eos_ids_come_from_generation_config_before_the_tokenizer_config(byte_level, byte_fallback):
    assert byte_level.eos_token_ids == {byte_level.backend.token_to_id("</s>")}
    assert byte_fallback.eos_token_ids == {2, 1}


def test_special_ids_are_the_added_special_tokens(byte_level):
    assert byte_level.special_ids == {byte_level.backend.token_to_id("<s>"), byte_level.backend.token_to_id("</s>")}


def test_stop_sequence_spanning_tokens_is_found_and_kept():
    matcher = StopSequenceMatcher(["END"])
    assert matcher.feed("it is the E") is None
    assert matcher.feed("N") is None
    assert matcher.feed("D of it") == len("it is the END")


def test_stop_sequence_inside_one_token_drops_what_follows_it():
    matcher = StopSequenceMatcher(["\n\n", "."])
    assert matcher.feed("Paris") is None
    assert matcher.feed(". Then") == len("Paris.")


def test_earliest_of_several_stop_sequences_wins():
    matcher = StopSequenceMatcher(["world", "lo"])
    assert matcher.feed("hello world") == len("hello")


def test_no_stop_sequences_never_stops():
    matcher = StopSequenceMatcher([])
    assert matcher.feed("anything at all") is None


def test_smollm2_tokenizer_matches_transformers_and_streams_its_text(smollm2_tokenizer_dir):
    from transformers import AutoTokenizer

    ours = Tokenizer.from_dir(str(smollm2_tokenizer_dir))
    theirs = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    for text in ["The capital of France is", "  leading spaces\n\ttabs", "Émile aime les crêpes 🥞", *CORPUS]:
        ids = ours.encode(text)
        assert ids == theirs(text)["input_ids"]
        assert ours.decode(ids) == theirs.decode(ids)
        assert pushed_text(ours, ours.encode("Q:"), ids) == theirs.decode(ids)
    assert ours.eos_token_ids == {theirs.eos_token_id}
    assert ours.chat_template and "<|im_start|>" in ours.chat_template
