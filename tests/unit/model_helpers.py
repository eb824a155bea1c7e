"""Shared by the model tests: tiny HF checkpoints, a paged-KV batch driver, and a TP rank worker."""

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3Config,
    Gemma3TextConfig,
    GemmaConfig,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    OPTConfig,
    Phi3Config,
    PretrainedConfig,
    Qwen2Config,
    Qwen3Config,
    Qwen3MoeConfig,
    SiglipVisionConfig,
)

from tgi_server.attention_metadata import AttentionMetadata
from tgi_server.forward_context import forward_context
from tgi_server.distributed import init_distributed, shutdown_distributed
from tgi_server.models.registry import load_model

TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=251,  # odd, so a 2-way vocab split is uneven
    max_position_embeddings=256,
)

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}


def tiny_config(variant: str) -> PretrainedConfig:
    """A small config exercising one family's switches (bias, tying, rope scaling, window, head_dim)."""
    if variant == "llama":
        return LlamaConfig(**TINY, tie_word_embeddings=True)
    if variant == "llama3_biased":
        return LlamaConfig(
            **TINY, rope_scaling=LLAMA3_ROPE, rope_theta=500000.0, head_dim=32,
            attention_bias=True, mlp_bias=True, tie_word_embeddings=False,
        )
    if variant == "qwen2":
        return Qwen2Config(**TINY, tie_word_embeddings=False)
    if variant == "odd_heads":  # like SmolLM2: 9 query heads in 3 groups do not halve evenly
        return LlamaConfig(**{**TINY, "hidden_size": 48, "num_attention_heads": 6, "num_key_value_heads": 3})
    if variant == "one_kv_head":  # multi-query attention: more ranks than KV heads, each rank a copy of it
        return LlamaConfig(**{**TINY, "num_key_value_heads": 1}, tie_word_embeddings=False)
    if variant == "mistral_windowed":
        return MistralConfig(**TINY, sliding_window=6, head_dim=16, tie_word_embeddings=False)
    if variant == "qwen3":
        return Qwen3Config(**TINY, head_dim=24, tie_word_embeddings=False)
    if variant == "phi3":  # fused qkv / gate_up tensors; Phi-4-mini's partial rotary (12 of 16 dims)
        return Phi3Config(**TINY, partial_rotary_factor=0.75, sliding_window=7, tie_word_embeddings=False, pad_token_id=0)
    if variant == "phi3_longrope":  # LongRoPE, context 4x the original 64
        return Phi3Config(**{**TINY, "max_position_embeddings": 256}, original_max_position_embeddings=64, pad_token_id=0,
                          rope_scaling={"rope_type": "longrope", "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5, 3.0, 3.5],
                                        "long_factor": [1.0, 2.0, 4.0, 8.0, 12.0, 16.0, 24.0, 32.0]})
    if variant == "mixtral":  # 4 experts, top 2, renormalised
        return MixtralConfig(**TINY, num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False)
    if variant == "qwen3_moe":  # 6 experts of width 40, top 3 not renormalised; layer 0 dense
        return Qwen3MoeConfig(
            **TINY, head_dim=24, num_experts=6, num_experts_per_tok=3, moe_intermediate_size=40,
            norm_topk_prob=False, mlp_only_layers=[0], tie_word_embeddings=False,
        )
    if variant == "gemma3_multimodal":  # Gemma3ForConditionalGeneration: we serve its language model
        vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                    image_size=28, patch_size=14)
        return Gemma3Config(text_config=tiny_config("gemma3").to_dict(), vision_config=vision.to_dict(),
                            mm_tokens_per_image=4, boi_token_index=248, eoi_token_index=249, image_token_index=250)
    if variant == "gpt_neox":  # transformers fallback: partial rotary, parallel residual
        return GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             vocab_size=251, max_position_embeddings=256, rotary_pct=0.5, tie_word_embeddings=False)
    if variant == "opt":  # transformers fallback: learned positions, pre-scaled queries, biases
        return OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=251,
                         max_position_embeddings=256, word_embed_proj_dim=64)
    if variant == "gemma":  # q width (4 x 32) differs from hidden_size
        return GemmaConfig(**TINY, head_dim=32)
    if variant == "gemma2":  # layers alternate sliding (window 6) and global; both soft-caps bite
        return Gemma2Config(
            **TINY, head_dim=32, sliding_window=6, query_pre_attn_scalar=20,
            attn_logit_softcapping=1.5, final_logit_softcapping=2.0, tie_word_embeddings=False,
        )
    if variant == "gemma3":  # QK-norm; local layers rotate with base 10k, global ones with linear scaling
        return Gemma3TextConfig(
            **TINY, head_dim=32, sliding_window=6, query_pre_attn_scalar=20,
            layer_types=["sliding_attention", "full_attention"],
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1000000.0},
            },
        )
    raise ValueError(variant)


@torch.no_grad()
def save_tiny_model(config: PretrainedConfig, directory, seed: int = 0):
    """Build an HF model with weights large enough to matter (norm scales, biases), save it, return it."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    for name, param in model.named_parameters():
        if "norm" in name:
            param.copy_(1.0 + 0.1 * torch.randn_like(param))
        else:
            param.normal_(0.0, 0.15)
    model.save_pretrained(directory)
    return model


@torch.no_grad()
def hf_logits(hf_model, token_ids: list[int]) -> torch.Tensor:
    """The HF model's logits at every position of one unpadded sequence: [len, vocab_size]."""
    return hf_model(torch.tensor([token_ids])).logits[0].float()


class PagedBatchDriver:
    """Feeds a model flat batches the way the runner does, with blocks handed out in shuffled order."""

    def __init__(self, model, num_blocks: int = 64, block_size: int = 4):
        self.model = model
        self.block_size = block_size
        self.kv_caches = [torch.zeros(spec.shape(num_blocks, block_size)) for spec in model.kv_cache_specs]
        self.free_blocks = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(0)).tolist()
        self.seq_to_blocks: dict[str, list[int]] = {}
        self.seq_to_len: dict[str, int] = {}

    @torch.no_grad()
    def step(self, batch: list[tuple[str, list[int]]]) -> dict[str, torch.Tensor]:
        """Run every (seq_id, new token_ids) in one flat batch; per sequence, logits [num_new, vocab]."""
        input_ids, positions, slots, starts = [], [], [], [0]
        for seq_id, token_ids in batch:
            first = self.seq_to_len.get(seq_id, 0)
            self.seq_to_len[seq_id] = first + len(token_ids)
            input_ids += token_ids
            positions += range(first, first + len(token_ids))
            slots += [self._slot(seq_id, pos) for pos in range(first, first + len(token_ids))]
            starts.append(len(input_ids))
        attn = self._metadata([seq_id for seq_id, _ in batch], slots, starts)
        with forward_context(attn, self.kv_caches):
            hidden = self.model(torch.tensor(input_ids), torch.tensor(positions))
        logits = self.model.compute_logits(hidden)  # [num_tokens, vocab_size]
        return {seq_id: logits[starts[i] : starts[i + 1]] for i, (seq_id, _) in enumerate(batch)}

    def _slot(self, seq_id: str, position: int) -> int:
        blocks = self.seq_to_blocks.setdefault(seq_id, [])
        if position // self.block_size == len(blocks):
            blocks.append(self.free_blocks.pop())
        return blocks[position // self.block_size] * self.block_size + position % self.block_size

    def _metadata(self, seq_ids: list[str], slots: list[int], starts: list[int]) -> AttentionMetadata:
        seq_lens = [self.seq_to_len[s] for s in seq_ids]
        max_blocks = max(len(self.seq_to_blocks[s]) for s in seq_ids)
        block_tables = torch.zeros(len(seq_ids), max_blocks, dtype=torch.int32)  # [num_seqs, max_blocks]
        for i, seq_id in enumerate(seq_ids):
            blocks = self.seq_to_blocks[seq_id]
            block_tables[i, : len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        return AttentionMetadata.from_host(slots, starts, seq_lens, block_tables, torch.device("cpu"))


def mixed_schedule(vocab_size: int, seed: int = 0) -> list[list[tuple[str, list[int]]]]:
    """Steps of (seq_id, new tokens): a mixed-length prefill, then decodes mixed with a fresh prefill
    and a prefill split in two chunks, then an all-decode step, a two-sequence and a one-sequence decode
    step (the skinny linear kernel's size)."""
    generator = torch.Generator().manual_seed(seed)

    def tokens(n: int) -> list[int]:
        return torch.randint(vocab_size, (n,), generator=generator).tolist()

    f_prompt = tokens(13)
    return [
        [("a", tokens(5)), ("b", tokens(11)), ("c", tokens(1)), ("d", tokens(8))],
        [("a", tokens(1)), ("e", tokens(7)), ("f", f_prompt[:6]), ("b", tokens(1))],
        [("a", tokens(1)), ("f", f_prompt[6:]), ("e", tokens(1)), ("c", tokens(1))],
        [(seq_id, tokens(1)) for seq_id in "abcdef"],
        [("a", tokens(1)), ("d", tokens(1))],
        [("a", tokens(1))],
    ]


def run_schedule(driver: PagedBatchDriver, schedule) -> tuple[dict, dict]:
    """Drive every step; returns each sequence's tokens and its logits [len, vocab] at every position."""
    seq_to_tokens, seq_to_logits = {}, {}
    for batch in schedule:
        for seq_id, logits in driver.step(batch).items():
            seq_to_logits.setdefault(seq_id, []).append(logits)
        for seq_id, token_ids in batch:
            seq_to_tokens.setdefault(seq_id, []).extend(token_ids)
    return seq_to_tokens, {seq_id: torch.cat(parts) for seq_id, parts in seq_to_logits.items()}


def tp_rank_worker(rank: int, world_size: int, port: int, model_dirs: dict, out_dir: str, quantize: str | None = None) -> None:
    """One tensor-parallel rank: load each model (quantized so), run the mixed schedule, save its logits per rank."""
    torch.set_num_threads(1)
    tp = init_distributed(rank, world_size, "127.0.0.1", port, torch.device("cpu"))
    try:
        for name, model_dir in model_dirs.items():
            model, config = load_model(model_dir, tp, torch.float32, torch.device("cpu"), quantize=quantize)
            driver = PagedBatchDriver(model)
            _, seq_to_logits = run_schedule(driver, mixed_schedule(config.vocab_size))
            torch.save(seq_to_logits, f"{out_dir}/{name}_rank{rank}.pt")
    finally:
        shutdown_distributed(tp)
