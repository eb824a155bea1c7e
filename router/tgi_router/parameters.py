"""TGI's generate parameters, declared once: each one's JSON type, the range its TGI (Rust) type
accepts, whether JSON null is allowed, the value constraints validation enforces, and a description.

`validation.py` parses request bodies with this table (a value outside its type is a 422 naming the
parameter) and `http/openapi.py` writes the `GenerateParameters` schema from it, so the document says
exactly what a request may hold. The value checks themselves stay in `validate_parameters`, in TGI's
order and with TGI's messages; a test holds each `schema` bound to the check that enforces it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

U32_MAX = 2**32 - 1
U64_MAX = 2**64 - 1
I32 = (-(2**31), 2**31 - 1)


@dataclass(frozen=True)
class Parameter:
    name: str
    kind: str  # JSON type: "integer", "number", "boolean", "string", "strings" (a list), "object"
    description: str
    integer_range: tuple[int, int] | None = None  # integers: what TGI's Rust type holds
    nullable: bool = True  # TGI declares it as an Option: JSON null means "not given"
    schema: dict = field(default_factory=dict)  # the value constraints `validate_parameters` enforces


PARAMETERS: tuple[Parameter, ...] = (
    Parameter("best_of", "integer", "Generate this many sequences (sampling) and return the one with the "
              "highest mean token logprob; at most the server's max_best_of.", (0, U64_MAX), schema={"minimum": 0}),
    Parameter("temperature", "number", "Divides the logits before sampling; implies sampling unless 1.",
              schema={"exclusiveMinimum": 0}),
    Parameter("repetition_penalty", "number", "CTRL's penalty on tokens already in the sequence (1: none).",
              schema={"exclusiveMinimum": 0}),
    Parameter("frequency_penalty", "number", "Subtracts the penalty times each token's share of the sequence.",
              schema={"minimum": -2, "maximum": 2}),
    Parameter("top_k", "integer", "Sample among the k most likely tokens.", I32, schema={"minimum": 1, "maximum": I32[1]}),
    Parameter("top_p", "number", "Sample among the most likely tokens whose probabilities add up to top_p.",
              schema={"exclusiveMinimum": 0, "exclusiveMaximum": 1}),
    Parameter("typical_p", "number", "Locally typical sampling: keep the most typical tokens up to this mass.",
              schema={"exclusiveMinimum": 0, "exclusiveMaximum": 1}),
    Parameter("do_sample", "boolean", "Sample instead of picking the most likely token.", nullable=False),
    Parameter("max_new_tokens", "integer", "The most tokens to generate.", (0, U32_MAX),
              schema={"minimum": 1, "maximum": U32_MAX}),
    Parameter("return_full_text", "boolean", "Put the prompt before the generated text."),
    Parameter("stop", "strings", "Stop when the generated text contains one of these (at most max_stop_sequences).",
              nullable=False),
    Parameter("truncate", "integer", "Keep only the last `truncate` tokens of the prompt.", (0, U64_MAX),
              schema={"minimum": 1}),
    Parameter("watermark", "boolean", "Kirchenbauer et al.'s watermark on the generated tokens.", nullable=False),
    Parameter("details", "boolean", "Return the tokens, their logprobs and the finish reason.", nullable=False),
    Parameter("decoder_input_details", "boolean", "Return the prompt's tokens and their logprobs (not when streaming).",
              nullable=False),
    Parameter("seed", "integer", "The sampling seed: the same seed gives the same text.", (0, U64_MAX),
              schema={"minimum": 0}),
    Parameter("top_n_tokens", "integer", "Return this many most likely tokens at each step (at most max_top_n_tokens).",
              (0, U32_MAX), schema={"minimum": 0}),
    Parameter("grammar", "object", 'Constrain the output: {"type": "json" | "json_schema", "value": <JSON schema>} '
              'or {"type": "regex", "value": <regex>}.'),
    Parameter("ignore_eos", "boolean", "Do not stop at end-of-sequence tokens: generate until max_new_tokens or a "
              "stop sequence, for fixed output lengths in benchmarks (vLLM's extension).", nullable=False),
    Parameter("min_p", "number", "When sampling, drop tokens less likely than min_p times the most likely one "
              "(vLLM's extension).", schema={"minimum": 0, "maximum": 1}),
    Parameter("logit_bias", "object", "Token id (as a string) to a bias in [-100, 100] added to its logit, greedy "
              "decoding included (OpenAI's extension).",
              schema={"additionalProperties": {"type": "number", "minimum": -100, "maximum": 100}}),
    Parameter("adapter_id", "string", "The LoRA adapter (--lora-adapters) to generate with; one not loaded gets 422 naming those that are."),
)
BY_NAME = {parameter.name: parameter for parameter in PARAMETERS}
