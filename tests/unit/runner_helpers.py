"""Drives a ModelRunner the way the router does, for the runner's tests on GPU and CPU: a batch of
prompts prefilled in chunks, decoding until each has its number of tokens, a late joiner, optional
lookahead; an HF reference check; and a stand-in for the decode CUDA graphs that runs on CPU."""

import torch

from tgi_server.attention_metadata import AttentionMetadata
from tgi_server.forward_context import forward_context
from tgi_server.model_runner import ModelRunner, NewSequence, ScheduledSequence
from tgi_server.sampler import SamplingParams

BLOCK_SIZE = 16
PROMPTS = [[5, 9, 2], [17] * 40, list(range(3, 80)), [100, 4], [7, 7, 8, 9, 10, 11], list(range(60, 5, -1))]
# Different lengths, so requests leave the batch at different steps.
NEW_TOKENS = [24, 10, 24, 5, 24, 17]


def generate_greedy(
    runner: ModelRunner, prefill_chunk: int, lookahead: bool = False, late_join_step: int = 0,
    sampling: SamplingParams = SamplingParams(), allowed=None,
) -> list[list[int]]:
    """Continuations of PROMPTS (greedy unless `sampling` says otherwise), batched the way the router batches them: prompts prefilled
    `prefill_chunk` tokens a step, the last prompt joining at `late_join_step`, requests finishing at
    their NEW_TOKENS; with `lookahead`, steps where nobody waits to join say so. With `allowed`, the
    k-th token of request i is sampled under a grammar mask of the token ids `allowed(i, k)` (None: no mask)."""
    blocks_per_seq = -(-(max(map(len, PROMPTS)) + max(NEW_TOKENS) + 1) // BLOCK_SIZE)
    outputs: list[list[int]] = [[] for _ in PROMPTS]
    computed = [0] * len(PROMPTS)
    joined, finished, step = set(), [], 0
    while len(joined) < len(PROMPTS) or any(len(outputs[i]) < NEW_TOKENS[i] for i in joined):
        new, scheduled = [], []
        for i, prompt in enumerate(PROMPTS):
            if i not in joined and (i < len(PROMPTS) - 1 or step >= late_join_step):
                joined.add(i)
                new.append(NewSequence(i, prompt, sampling, 0))
                blocks = list(range(1 + i * blocks_per_seq, 1 + (i + 1) * blocks_per_seq))
            elif i in joined and len(outputs[i]) < NEW_TOKENS[i]:
                blocks = []
            else:
                continue
            n = min(prefill_chunk, len(prompt) - computed[i]) if computed[i] < len(prompt) else 1
            samples = computed[i] + n >= len(prompt)
            last_token = samples and len(outputs[i]) + 1 == NEW_TOKENS[i]
            ids = allowed(i, len(outputs[i])) if samples and allowed else None
            mask = bitmask(ids) if ids else b""
            scheduled.append(ScheduledSequence(i, n, blocks, last_token, mask))
            computed[i] += n
        out = runner.step(finished, new, scheduled, lookahead=lookahead and len(joined) == len(PROMPTS))
        finished = []
        for sample in out.samples:
            outputs[sample.request_id].extend(t.token_id for t in sample.tokens)
            if len(outputs[sample.request_id]) == NEW_TOKENS[sample.request_id]:
                finished.append(sample.request_id)
        step += 1
    return outputs


def every_fifth_token(i: int, k: int) -> set[int] | None:
    """A grammar for generate_greedy's `allowed`: even requests may pick only ids t with t % 5 == (i + k) % 5
    (which usually excludes the unconstrained best token), odd ones anything."""
    return {t for t in range(251) if t % 5 == (i + k) % 5} if i % 2 == 0 else None


def bitmask(token_ids: set[int]) -> bytes:
    """The proto's packing of allowed tokens: bit t % 32 of little-endian 32-bit word t // 32."""
    words = [0] * (max(token_ids) // 32 + 1)
    for token in token_ids:
        words[token // 32] |= 1 << (token % 32)
    return b"".join(word.to_bytes(4, "little") for word in words)


def assert_greedy_under_transformers(
    hf_model, outputs: list[list[int]], slack: float = 1e-3, exact_share: float = 0.95, allowed=None
) -> None:
    """Each token's logit is within `slack` of HF's best; `exact_share` of them are HF's argmax. With
    `allowed` (as generate_greedy's), the best among the allowed tokens."""
    num_exact = 0
    for i, (prompt, tokens) in enumerate(zip(PROMPTS, outputs)):
        with torch.no_grad():
            logits = hf_model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1 : -1]  # [len(tokens), vocab]
        if allowed:
            masked = torch.full_like(logits, float("-inf"))
            for k in range(len(tokens)):
                ids = allowed(i, k)
                masked[k, sorted(ids) if ids else slice(None)] = logits[k, sorted(ids) if ids else slice(None)]
            logits = masked
        chosen = logits.gather(1, torch.tensor(tokens)[:, None]).squeeze(1)
        assert torch.all(chosen >= logits.max(dim=1).values - slack), (prompt, tokens)
        num_exact += sum(a == b for a, b in zip(tokens, logits.argmax(dim=1).tolist()))
    assert num_exact >= exact_share * sum(NEW_TOKENS)  # near ties are rare


def assert_lookahead_gives_the_plain_tokens(
    runner: ModelRunner, sampling: SamplingParams = SamplingParams(), chains: bool = True
) -> list[list[int]]:
    """Generates with plain steps, then with lookahead (requests finishing, a late joiner, chunked
    prefill): the same tokens, most rows served by started steps, chained steps only if `chains`."""
    plain = generate_greedy(runner, prefill_chunk=32, late_join_step=6, sampling=sampling)
    assert runner.num_lookahead_rows_used == 0
    runner.clear()
    with_lookahead = generate_greedy(runner, prefill_chunk=32, lookahead=True, late_join_step=6, sampling=sampling)
    assert with_lookahead == plain
    assert runner.num_lookahead_rows_used > 50
    assert (runner.num_chained_steps > 10) == chains
    return with_lookahead


class EagerDecodeSteps:
    """`DecodeGraphs`' interface, run op by op on any device: with it in `runner.decode_graphs`, the
    runner's graph-decode, lookahead and chaining paths run on CPU, where no graph can be captured."""

    def __init__(self, model, kv_caches: list[torch.Tensor], max_batch_size: int, max_blocks_per_seq: int, device):
        self.model, self.kv_caches, self.device = model, kv_caches, device
        self.max_batch_size, self.max_blocks_per_seq = max_batch_size, max_blocks_per_seq
        self.lora = False  # adapter rows stay on the runner's eager path

    def padded_size(self, num_seqs: int) -> int | None:
        return num_seqs if num_seqs <= self.max_batch_size else None

    @torch.inference_mode()
    def run(self, input_ids, positions, slots, block_tables, device_input_ids=None, adapter_slots=None) -> torch.Tensor:
        assert not any(adapter_slots or ()), "adapter rows in eager decode steps without LoRA"
        num_seqs = len(positions)
        ids = device_input_ids if device_input_ids is not None else torch.tensor(input_ids, device=self.device)
        tables = [table + [0] * (self.max_blocks_per_seq - len(table)) for table in block_tables]
        attn = AttentionMetadata.from_host(slots, list(range(num_seqs + 1)), [p + 1 for p in positions], tables, self.device)
        with forward_context(attn, self.kv_caches):
            hidden = self.model(ids, torch.tensor(positions, device=self.device))
        return self.model.compute_logits(hidden)


def with_eager_decode_steps(runner: ModelRunner, num_blocks: int, max_batch_size: int = 8) -> ModelRunner:
    """Allocates `runner`'s cache and gives it `EagerDecodeSteps` in place of captured graphs."""
    runner.allocate_kv_cache(num_blocks)
    runner.decode_graphs = EagerDecodeSteps(runner.model, runner.kv_caches, max_batch_size, num_blocks, runner.device)
    return runner


def assert_a_cached_prefix_gives_the_tokens_of_a_whole_prompt(runner: ModelRunner, num_new_tokens: int = 8) -> None:
    """A sequence that joins with another's three computed blocks as its cached prefix
    (`NewSequence.num_cached_tokens`) decodes the tokens of the same prompt computed in full."""
    size = runner.block_size
    num_cached = 3 * size
    donor = list(range(3, 3 + num_cached + 5))
    prompt = donor[:num_cached] + [7, 8, 9]
    blocks_per_seq = -(-(len(prompt) + num_new_tokens) // size)
    donor_blocks = list(range(1, 1 + blocks_per_seq))
    runner.step([], [NewSequence(1, donor, SamplingParams(), 0)], [ScheduledSequence(1, len(donor), donor_blocks, True)])

    def decode(request_id: int, cached: int, blocks: list[int]) -> list[int]:
        new = [NewSequence(request_id, prompt, SamplingParams(), 0, num_cached_tokens=cached)]
        tokens = []
        for k in range(num_new_tokens):
            out = runner.step([1] if k == 0 else [], new if k == 0 else [], [ScheduledSequence(
                request_id, len(prompt) - cached if k == 0 else 1, blocks if k == 0 else [], k == num_new_tokens - 1)])
            tokens.append(out.samples[0].tokens[0].token_id)
        return tokens

    whole = decode(2, 0, list(range(1 + blocks_per_seq, 1 + 2 * blocks_per_seq)))
    fresh = list(range(1 + 2 * blocks_per_seq, 1 + 3 * blocks_per_seq))
    from_cache = decode(3, num_cached, donor_blocks[:3] + fresh[: blocks_per_seq - 3])
    assert from_cache == whole
    assert runner.sequences[3].block_table[:3] == donor_blocks[:3]


def assert_verified_proposals_give_the_plain_tokens(runner, sampling) -> None:
    """Speculative steps: the proposals that agree with the samples before them are kept, plus the
    token sampled after the last kept one; decoding then goes on over the rejected ones' stale KV.
    The tokens equal plain one-at-a-time decoding's (greedy, and seeded sampling with penalties)."""
    prompt, num_new = [11, 12, 13, 14, 15], 9
    blocks = list(range(1, 5))  # 16 slots: the prompt, the tokens and the proposals
    first = runner.step([], [NewSequence(1, prompt, sampling, 0)], [ScheduledSequence(1, 5, blocks)])
    plain = [first.samples[0].tokens[0].token_id]
    while len(plain) < num_new:
        plain.append(runner.step([], [], [ScheduledSequence(1, 1, [])]).samples[0].tokens[0].token_id)

    blocks = list(range(5, 9))
    out = [runner.step([1], [NewSequence(2, prompt, sampling, 0)], [ScheduledSequence(2, 5, blocks)]).samples[0].tokens]
    # two right proposals then a wrong one; all right; none right
    for drafts in ([plain[1], plain[2], plain[3] + 1], plain[4:7], [plain[7] + 1]):
        out.append(runner.step([], [], [ScheduledSequence(2, 1 + len(drafts), [], draft_token_ids=drafts)]).samples[0].tokens)
    assert [len(tokens) for tokens in out] == [1, 3, 4, 1]
    assert [t.token_id for tokens in out for t in tokens] == plain
    assert runner.sequences[2].num_computed_tokens == len(prompt) + len(plain) - 1


def generate_with_draft_model(runner: ModelRunner, prompts: list[list[int]], num_new: int, sampling: SamplingParams,
                              num_drafts: int) -> tuple[list[list[int]], list[list[int]]]:
    """`num_new` tokens after each of `prompts`, decoded together as the router plans speculative
    steps: every decoding step verifies `num_drafts` draft-model proposals per sequence (fewer near
    its last token; none with 0). Returns the tokens, and for each sequence the tokens each step gave."""
    block_size = runner.block_size
    blocks_per_seq = -(-(max(map(len, prompts)) + num_new + num_drafts) // block_size)
    new = [NewSequence(i, prompt, sampling, 0) for i, prompt in enumerate(prompts)]
    scheduled = [ScheduledSequence(i, len(prompt), list(range(1 + i * blocks_per_seq, 1 + (i + 1) * blocks_per_seq)))
                 for i, prompt in enumerate(prompts)]
    outputs: list[list[int]] = [[] for _ in prompts]
    per_step: list[list[int]] = [[] for _ in prompts]
    finished: list[int] = []
    while scheduled:
        out = runner.step(finished, new, scheduled)
        for sample in out.samples:
            outputs[sample.request_id] += [t.token_id for t in sample.tokens]
            per_step[sample.request_id].append(len(sample.tokens))
        finished = [item.id for item in scheduled if len(outputs[item.id]) == num_new]
        new, scheduled = [], []
        for i, output in enumerate(outputs):
            room = num_new - len(output)
            if room > 0:
                drafts = min(num_drafts, room - 1)
                scheduled.append(ScheduledSequence(i, 1 + drafts, [], last_token=room == 1, num_model_drafts=drafts))
    return outputs, per_step
