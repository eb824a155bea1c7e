"""n-gram prompt lookup: what it proposes, against the continuation a person reads off the sequence."""

import pytest

from tgi_router.speculation import propose_ngram


@pytest.mark.parametrize("token_ids, num_tokens, expected", [
    ([1, 2, 3, 4, 5, 9, 2, 3], 2, [4, 5]),  # the last 2 tokens (2, 3) occurred before: what followed
    ([1, 2, 3, 4, 9, 2, 3, 4, 8, 3, 4], 3, [8, 3, 4]),  # the latest occurrence of the longest suffix (2 tokens: 3 4)
    ([7, 1, 2, 3, 5, 1, 2, 3, 6, 1, 2, 3], 1, [6]),  # 3-gram 1 2 3: its latest earlier occurrence wins
    ([5, 6, 7, 8], 3, []),  # nothing repeats
    ([4, 4, 4, 4], 2, [4]),  # the continuation stops at the sequence's end
    ([1, 2, 1, 2], 0, []),
    ([1], 3, []),
])
def test_ngram_proposals_continue_the_latest_earlier_occurrence_of_the_longest_suffix(token_ids, num_tokens, expected):
    assert propose_ngram(token_ids, num_tokens) == expected


def test_a_byte_level_match_across_token_boundaries_is_not_an_occurrence():
    # 0x0100 followed by 0x02 shares bytes with 0x01, 0x0002...: only whole-token matches count
    token_ids = [256, 2, 1, 512, 7, 2]
    assert propose_ngram(token_ids, 2, max_ngram=1) == [1, 512]
