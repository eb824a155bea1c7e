"""The architectures with in-project model code, by name only: `prepare` checks a checkpoint against
this without importing torch (`registry.ARCHITECTURES` maps each to its class, and must list exactly these)."""

IN_PROJECT_ARCHITECTURES = frozenset({
    "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Phi3ForCausalLM",
    "MixtralForCausalLM", "Qwen3MoeForCausalLM", "GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM",
    "Gemma3ForConditionalGeneration",
})
