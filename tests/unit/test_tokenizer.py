"""The router's tokenizer, read from model files without transformers, against transformers 5's
`AutoTokenizer` on the same directory."""

import json
import random
import shutil

import pytest
from tokenizer_fixtures import (  # noqa: F401 (fixtures)
    TEXTS,
    byte_level_dir,
    byte_level_tokenizer,
    llama_like_dir,
    write_model_dir,
)
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import models, pre_tokenizers

from tgi_router.tokenizer import Tokenizer

TOKENIZER_DIRS = ["byte_level_dir", "llama_like_dir", "smollm2_tokenizer_dir"]


@pytest.fixture(scope="module", params=TOKENIZER_DIRS)
def ours_and_theirs(request):
    from transformers import AutoTokenizer

    directory = request.getfixturevalue(request.param)
    return Tokenizer.from_dir(directory), AutoTokenizer.from_pretrained(directory)


def test_encode_matches_transformers_with_and_without_special_tokens(ours_and_theirs):
    ours, theirs = ours_and_theirs
    for text in TEXTS:
        assert ours.encode(text) == theirs(text)["input_ids"], text
        assert ours.encode(text, add_special_tokens=False) == theirs(text, add_special_tokens=False)["input_ids"]


def test_offsets_are_the_character_spans_transformers_reports(ours_and_theirs):
    ours, theirs = ours_and_theirs
    for text in TEXTS:
        ids, offsets = ours.encode_with_offsets(text)
        expected = theirs(text, return_offsets_mapping=True)
        assert ids == expected["input_ids"]
        assert offsets == [tuple(span) for span in expected["offset_mapping"]], text


def test_decode_matches_transformers_for_random_ids_with_and_without_specials(ours_and_theirs):
    ours, theirs = ours_and_theirs
    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.randrange(ours.vocab_size) for _ in range(rng.randint(1, 20))]
        assert ours.decode(ids) == theirs.decode(ids)
        assert ours.decode(ids, skip_special_tokens=True) == theirs.decode(ids, skip_special_tokens=True)


def test_special_ids_bos_and_vocab_size_match_transformers(ours_and_theirs):
    ours, theirs = ours_and_theirs
    assert ours.special_ids == frozenset(theirs.all_special_ids)
    assert ours.bos_token_id == theirs.bos_token_id
    assert ours.bos_token == theirs.bos_token and ours.eos_token == theirs.eos_token
    assert ours.vocab_size == len(theirs)


def test_smollm2_metadata(smollm2_tokenizer_dir):
    ours = Tokenizer.from_dir(smollm2_tokenizer_dir)
    im_end = ours.backend.token_to_id("<|im_end|>")
    assert ours.eos_token_ids == {im_end}
    assert ours.chat_template is not None and "<|im_start|>" in ours.chat_template
    # transformers' "no limit" sentinel (1e30) means no limit.
    assert ours.model_max_length is None


def test_eos_ids_come_from_generation_config_then_config_then_tokenizer_config(tmp_path, byte_level_dir):
    shutil.copytree(byte_level_dir, tmp_path, dirs_exist_ok=True)
    im_end = Tokenizer.from_dir(tmp_path).backend.token_to_id("<|im_end|>")
    assert Tokenizer.from_dir(tmp_path).eos_token_ids == {im_end}
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 0}))
    assert Tokenizer.from_dir(tmp_path).eos_token_ids == {0}
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 1]}))
    assert Tokenizer.from_dir(tmp_path).eos_token_ids == {1, 2}


def test_llama_like_reads_its_generation_config_and_max_length(llama_like_dir):
    ours = Tokenizer.from_dir(llama_like_dir)
    assert ours.eos_token_ids == {2, 0}
    assert ours.model_max_length == 4096


def test_bos_is_written_once_when_the_post_processor_already_adds_it(llama_like_dir):
    ours = Tokenizer.from_dir(llama_like_dir)
    assert not ours.is_bos_prepended
    assert ours.encode("Hello")[:2].count(ours.bos_token_id) == 1


def test_bos_is_prepended_when_the_config_asks_and_the_post_processor_does_not(tmp_path):
    # transformers 5 ignores add_bos_token when tokenizer.json exists; TGI (through transformers 4's
    # Llama tokenizers) and the model's authors expect the BOS, so the router writes it.
    config = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "add_bos_token": True}
    ours = Tokenizer.from_dir(write_model_dir(tmp_path, byte_level_tokenizer(), config))
    bos = ours.backend.token_to_id("<|im_start|>")
    assert ours.is_bos_prepended
    assert ours.encode("fox")[0] == bos and ours.encode("fox")[1:] == ours.encode("fox", add_special_tokens=False)
    assert ours.encode_with_offsets("fox")[1][0] == (0, 0)
    # A prompt starting with the BOS text still gets the BOS added: two of them, as in transformers 4.
    assert ours.encode("<|im_start|>fox")[:2] == [bos, bos]
    assert ours.encode("fox", add_special_tokens=False)[0] != bos


def test_padding_and_truncation_in_tokenizer_json_are_ignored(tmp_path):
    tokenizer = byte_level_tokenizer()
    tokenizer.enable_truncation(max_length=3)
    tokenizer.enable_padding(length=50, pad_id=0, pad_token="<|endoftext|>")
    ours = Tokenizer.from_dir(write_model_dir(tmp_path, tokenizer, {}))
    assert len(ours.encode("The quick brown fox jumps")) > 3
    assert 0 not in ours.encode("fox")


def test_chat_template_file_wins_over_the_config_and_named_templates_pick_default(tmp_path):
    named = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    directory = write_model_dir(tmp_path, byte_level_tokenizer(), {"chat_template": named})
    assert Tokenizer.from_dir(directory).chat_template == "D"
    (directory / "chat_template.json").write_text(json.dumps({"chat_template": "J"}))
    assert Tokenizer.from_dir(directory).chat_template == "J"
    (directory / "chat_template.jinja").write_text("{{ messages }}")
    assert Tokenizer.from_dir(directory).chat_template == "{{ messages }}"
    assert Tokenizer.from_dir(write_model_dir(tmp_path / "none", byte_level_tokenizer(), {})).chat_template is None


def test_clean_up_tokenization_spaces_applies_to_non_bpe_models_as_in_transformers(tmp_path):
    from transformers import AutoTokenizer

    vocab = {"[UNK]": 0, "hello": 1, ",": 2, "world": 3, ".": 4, "don": 5, "'": 6, "t": 7, "n't": 8}
    tokenizer = RustTokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    directory = write_model_dir(tmp_path, tokenizer, {"unk_token": "[UNK]", "clean_up_tokenization_spaces": True})
    ours, theirs = Tokenizer.from_dir(directory), AutoTokenizer.from_pretrained(directory)
    ids = [1, 2, 3, 4, 5, 8]
    assert ours.decode(ids) == theirs.decode(ids) == "hello, world. donn't"
    assert ours.backend.decode(ids) == "hello , world . don n't"


REAL_TOKENIZER_DIRS = ["llama3_1", "qwen3", "gemma3"]
# Fragments of long texts, joined by a space, two, a tab, a newline or nothing: words, contractions,
# digits, code, runs of whitespace, accents (composed and combining), CJK, emoji, a special token's text.
FRAGMENTS = [
    "the", "Quick", "brown", "fox's", "don't", "WE'LL", "12345", "3.14159", "x=y+1;", "(a, b)", "  ", "\t",
    "\n\n", " \n ", "naïve", "cafe\u0301", "Ünïcödé", "日本語のテキスト", "中文", "🥞", "👩‍👩‍👧", "<|eot_id|>",
    "<|im_start|>", "--", "...", "'", "\u00a0", "\u3000", "end.",
]


@pytest.mark.parametrize("name", REAL_TOKENIZER_DIRS)
def test_long_texts_tokenized_in_pieces_on_several_threads_give_transformers_ids_and_offsets(name, monkeypatch):
    from transformers import AutoTokenizer

    import tgi_router.tokenizer as tokenizer_module

    monkeypatch.setattr(tokenizer_module, "MAX_PIECES", 8)  # as on a machine of 8 cores or more
    directory = f"{__file__.rsplit('/', 2)[0]}/assets/tokenizers/{name}"
    ours, theirs = Tokenizer.from_dir(directory), AutoTokenizer.from_pretrained(directory)
    # Byte-level BPE under the Llama 3 and Qwen regexes may be cut; Gemma's SentencePiece-style
    # normalizer and whole-text pieces may not (its tokens hold spaces).
    assert ours.is_cut_before_spaces == (name != "gemma3")
    rng = random.Random(0)
    for _ in range(12):
        num_fragments = rng.choice([400, 1500, 4000])
        text = "".join(rng.choice(FRAGMENTS) + rng.choice([" ", " ", " ", "  ", "\t", "\n", ""])
                       for _ in range(num_fragments))
        for add_special_tokens in (True, False):
            ids, offsets = ours.encode_with_offsets(text, add_special_tokens)
            expected = theirs(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
            assert ids == expected["input_ids"]
            assert offsets == [tuple(span) for span in expected["offset_mapping"]]
            assert ours.encode(text, add_special_tokens) == ids
