"""Thoughts apart from the answer (`reasoning_content`): the same split whatever pieces the output
arrives in, from a prompt that opened the thoughts or not, and unfinished thoughts kept as thoughts."""

import random

import pytest

from tgi_router.reasoning import ReasoningParser, prompt_opens_reasoning


@pytest.mark.parametrize(
    "opened, output, reasoning, content",
    [
        (False, "<think>\nLet me add.\n</think>\n\nFour.", "\nLet me add.\n", "Four."),
        (True, "Let me add.</think>\n\nFour.", "Let me add.", "Four."),
        (False, "Four, without thinking.", "", "Four, without thinking."),
        (False, "<thin is not a tag", "", "<thin is not a tag"),
        (False, "<think>cut short by max_tokens</thi", "cut short by max_tokens</thi", ""),
    ],
)
def test_thoughts_and_answer_split_alike_whatever_the_pieces(opened, output, reasoning, content):
    rng = random.Random(0)
    for _ in range(30):
        parser, got, position = ReasoningParser(opened), ["", ""], 0
        while position < len(output):
            size = rng.randint(1, 5)
            for i, part in enumerate(parser.feed(output[position : position + size])):
                got[i] += part
            position += size
        for i, part in enumerate(parser.finish()):
            got[i] += part
        assert got == [reasoning, content]


def test_a_prompt_ending_in_an_open_think_tag_starts_the_output_in_thoughts():
    assert prompt_opens_reasoning("<|im_start|>assistant\n<think>\n")
    assert not prompt_opens_reasoning("<|im_start|>assistant\n<think>\n\n</think>\n\n")
