"""LoRA adapters in the shard's runner against peft: tiny PEFT adapters built here on a tiny model,
greedy tokens equal to peft's merged model, adapters and the base model mixed in one batch."""

import pytest
import torch
from model_helpers import save_tiny_model, tiny_config
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from tgi_server.distributed import SINGLE
from tgi_server.lora import AdapterStore, LoraAdapterError, read_adapter
from tgi_server.model_runner import ModelRunner, NewSequence, ScheduledSequence
from tgi_server.models.registry import load_model
from tgi_server.sampler import SamplingParams

BLOCK_SIZE = 4
PROMPTS = [[11, 12, 13, 14, 15], list(range(30, 52)), [7, 8]]
ADAPTERS = {  # name: (rank, alpha, target modules, rsLoRA)
    "attention": (4, 8, ["q_proj", "k_proj", "v_proj", "o_proj"], False),
    "everything": (8, 4, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], True),
}


def save_adapter(base_dir, out, rank, alpha, targets, rslora, seed):
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, use_rslora=rslora, init_lora_weights=False)
    model = get_peft_model(base, config)
    with torch.no_grad():  # large enough to change the greedy tokens
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.normal_(0.0, 0.3)
    model.save_pretrained(out)


def peft_greedy(base_dir, adapter_dir, prompt, num_new):
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    out = model.generate(torch.tensor([prompt]), max_new_tokens=num_new, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def generate(runner, prompts, slots, num_new, lookahead=False):
    """Greedy tokens of each prompt through its adapter slot; with `lookahead`, every step tells the
    runner to start the next one (but for rows at their last token)."""
    blocks = -(-(max(map(len, prompts)) + num_new + 1) // BLOCK_SIZE)  # + the lookahead token
    new = [NewSequence(i, p, SamplingParams(), 0, adapter_slot=slot) for i, (p, slot) in enumerate(zip(prompts, slots))]
    scheduled = [ScheduledSequence(i, len(p), list(range(1 + i * blocks, 1 + (i + 1) * blocks))) for i, p in enumerate(prompts)]
    outputs = [[] for _ in prompts]
    while scheduled:
        for sample in runner.step([], new, scheduled, lookahead=lookahead).samples:
            outputs[sample.request_id] += [t.token_id for t in sample.tokens]
        new, scheduled = [], [ScheduledSequence(i, 1, [], last_token=len(out) + 1 == num_new)
                              for i, out in enumerate(outputs) if len(out) < num_new]
    return outputs


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    save_tiny_model(tiny_config("llama3_biased"), root / "base")
    for seed, (name, spec) in enumerate(ADAPTERS.items(), 1):
        save_adapter(root / "base", root / name, *spec, seed=seed)
    return root


def runner_with_adapters(root, names, tp=SINGLE):
    model, config = load_model(str(root / "base"), tp, torch.float32, torch.device("cpu"))
    store = AdapterStore(model, num_slots=len(names), max_rank=8)
    for slot, name in enumerate(names, 1):  # adapter ids 11, 12, ... in slots 1, 2, ...
        store.add(10 + slot, read_adapter(name, root / name))
        store.place(slot, 10 + slot)
    runner = ModelRunner(model, config, tp, torch.device("cpu"), torch.float32, BLOCK_SIZE)
    runner.allocate_kv_cache(128)
    return runner


def test_a_batch_mixing_adapters_and_the_base_model_gives_each_peft_merged_models_tokens(checkpoints):
    names = list(ADAPTERS)
    runner = runner_with_adapters(checkpoints, names)
    # every prompt through every adapter and none, all in one batch
    prompts = [prompt for prompt in PROMPTS for _ in range(len(names) + 1)]
    slots = [slot for _ in PROMPTS for slot in range(len(names) + 1)]
    outputs = generate(runner, prompts, slots, 10)
    directories = [None] + [checkpoints / name for name in names]
    expected = [peft_greedy(checkpoints / "base", directories[slot], prompt, 10) for prompt, slot in zip(prompts, slots)]
    assert outputs == expected
    assert len({tuple(out) for out in outputs[: len(names) + 1]}) == len(names) + 1  # the adapters change the tokens


def test_a_steps_rows_of_one_adapter_run_side_by_side_whatever_the_plans_order(checkpoints, monkeypatch):
    """The runner groups a step's rows by adapter (one run of rows each), so the LoRA kernels' row
    tiles read each adapter's weights once per tile; the tokens stay peft's."""
    from tgi_server import model_runner

    runs = []
    forward = model_runner.forward_flat
    monkeypatch.setattr(model_runner, "forward_flat", lambda *args: runs.append(args[-1]) or forward(*args))
    names = list(ADAPTERS)
    runner = runner_with_adapters(checkpoints, names)
    slots = [1, 0, 2, 1, 2, 0, 1]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(slots))]
    outputs = generate(runner, prompts, slots, 3)
    assert runs and all([slot for slot, _, _ in segments] == [1, 2] for segments in runs), runs
    directories = [None] + [checkpoints / name for name in names]
    assert outputs == [peft_greedy(checkpoints / "base", directories[slot], prompt, 3) for prompt, slot in zip(prompts, slots)]


def test_an_adapter_for_modules_the_model_lacks_or_of_too_high_a_rank_is_refused_and_not_kept(checkpoints, tmp_path):
    model, _ = load_model(str(checkpoints / "base"), SINGLE, torch.float32, torch.device("cpu"))
    store = AdapterStore(model, num_slots=1, max_rank=4)
    with pytest.raises(LoraAdapterError, match="rank 8 is above the server's maximum 4"):
        store.add(1, read_adapter("everything", checkpoints / "everything"))
    with pytest.raises(ValueError, match="no adapter has id 1"):
        store.place(1, 1)
    assert all(layer.lora.a.abs().sum() == 0 for layer in store.layers)
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["embed_tokens"]}')
    with pytest.raises(LoraAdapterError, match="target_modules \\['embed_tokens'\\] are not supported"):
        read_adapter("embeddings", tmp_path)


def _two_rank_worker(rank: int, port: int, root: str, out: str) -> None:
    """One of two gloo ranks: the batch of the single-rank test, with half of every adapted linear."""
    from pathlib import Path

    from tgi_server.distributed import init_distributed, shutdown_distributed

    torch.set_num_threads(1)
    tp = init_distributed(rank, 2, "127.0.0.1", port, torch.device("cpu"))
    try:
        runner = runner_with_adapters(Path(root), list(ADAPTERS), tp)
        torch.save(generate(runner, [p for p in PROMPTS for _ in range(3)], [0, 1, 2] * len(PROMPTS), 10), f"{out}/rank{rank}.pt")
    finally:
        shutdown_distributed(tp)


def test_two_ranks_split_the_adapters_with_their_linears_and_give_the_single_rank_tokens(checkpoints, tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_two_rank_worker, args=(port, str(checkpoints), str(tmp_path)), nprocs=2, join=True)
    expected = generate(runner_with_adapters(checkpoints, list(ADAPTERS)), [p for p in PROMPTS for _ in range(3)],
                        [0, 1, 2] * len(PROMPTS), 10)
    assert torch.load(tmp_path / "rank0.pt") == torch.load(tmp_path / "rank1.pt") == expected


@pytest.mark.gpu
def test_on_the_gpu_the_lora_kernels_give_the_portable_products_tokens_in_a_mixed_batch(checkpoints):
    """fp32 on CUDA: the Triton backend (the gather kernels among the model's others) against the
    portable one, every prompt through every adapter and none in one batch."""
    names = list(ADAPTERS)
    prompts = [prompt for prompt in PROMPTS for _ in range(len(names) + 1)]
    slots = [slot for _ in PROMPTS for slot in range(len(names) + 1)]
    outputs = {}
    for backend in ("portable", "triton"):
        model, config = load_model(str(checkpoints / "base"), SINGLE, torch.float32, torch.device("cuda"), backend=backend)
        store = AdapterStore(model, num_slots=len(names), max_rank=8)
        for slot, name in enumerate(names, 1):
            store.add(slot, read_adapter(name, checkpoints / name))
            store.place(slot, slot)
        runner = ModelRunner(model, config, SINGLE, torch.device("cuda"), torch.float32, BLOCK_SIZE, cuda_graph_sizes=())
        runner.allocate_kv_cache(128)
        outputs[backend] = generate(runner, prompts, slots, 10)
    assert outputs["triton"] == outputs["portable"]



@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton"])
def test_on_the_gpu_adapter_rows_in_cuda_graphs_and_lookahead_give_each_peft_merged_models_tokens(checkpoints, backend):
    """fp32 on CUDA, decode and prompt steps replayed from the graphs captured with the adapter
    kernels (and the plain ones for base-only steps), chained lookahead: every prompt through every
    adapter and none in one batch equals peft's merged models, as on the CPU. (Not the portable
    backend: its attention cannot replay in a graph, `ops.portable.CAPTURE_SAFE`.)"""
    names = list(ADAPTERS)
    prompts = [prompt for prompt in PROMPTS for _ in range(len(names) + 1)]
    slots = [slot for _ in PROMPTS for slot in range(len(names) + 1)]
    model, config = load_model(str(checkpoints / "base"), SINGLE, torch.float32, torch.device("cuda"), backend=backend)
    store = AdapterStore(model, num_slots=len(names), max_rank=8)
    for slot, name in enumerate(names, 1):
        store.add(slot, read_adapter(name, checkpoints / name))
        store.place(slot, slot)
    runner = ModelRunner(model, config, SINGLE, torch.device("cuda"), torch.float32, BLOCK_SIZE, cuda_graph_sizes=(1, 2, 4, 8, 16))
    runner.allocate_kv_cache(256)
    runner.capture_cuda_graphs(max_total_tokens=64, max_batch_size=16, max_batch_tokens=128)
    assert runner.decode_graphs.lora and runner.mixed_graphs.lora
    mixed_steps = []  # whether each mixed-step graph replay had adapter rows
    replay = runner.mixed_graphs.run
    runner.mixed_graphs.run = lambda flat, segments=(): mixed_steps.append(bool(segments)) or replay(flat, segments)
    outputs = generate(runner, prompts, slots, 10, lookahead=True)
    assert runner.num_lookahead_rows_used > 0 and True in mixed_steps
    directories = [None] + [checkpoints / name for name in names]
    assert outputs == [peft_greedy(checkpoints / "base", directories[slot], prompt, 10) for prompt, slot in zip(prompts, slots)]
    # base-only decode steps replay the plain graphs: the same tokens
    assert generate(runner, PROMPTS, [0] * len(PROMPTS), 10, lookahead=True) == [outputs[i * 3] for i in range(len(PROMPTS))]
    assert mixed_steps[-1] is False


def test_adapter_rows_known_on_the_device_only_get_the_same_portable_delta_as_runs_of_rows():
    """The portable product under a CUDA graph (slots per row, no runs) equals its per-run product."""
    from tgi_server.forward_context import LoraRows
    from tgi_server.ops import portable

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(7, 12, generator=generator)
    a, b = torch.randn(3, 4, 12, generator=generator), torch.randn(3, 10, 4, generator=generator)
    a[0], b[0] = 0, 0
    segments = ((2, 0, 3), (1, 4, 6))
    runs = LoraRows.from_segments(segments, 7, torch.device("cpu"))
    expected = portable.lora_delta(x, a, b, runs, torch.zeros(7, 10))
    actual = portable.lora_delta(x, a, b, LoraRows(None, runs.token_slots), torch.zeros(7, 10))
    torch.testing.assert_close(actual, expected)
    assert expected[3].abs().sum() == 0 and expected[0].abs().sum() > 0


def test_a_model_with_dummy_weights_takes_the_adapters_a_checkpoint_would(checkpoints):
    """`--load-format dummy` (benchmarks) still learns each projection's checkpoint name: the adapter
    loads and changes the tokens."""
    model, config = load_model(str(checkpoints / "base"), SINGLE, torch.float32, torch.device("cpu"), load_format="dummy")
    store = AdapterStore(model, num_slots=1, max_rank=8)
    store.add(1, read_adapter("everything", checkpoints / "everything"))
    store.place(1, 1)
    runner = ModelRunner(model, config, SINGLE, torch.device("cpu"), torch.float32, BLOCK_SIZE)
    runner.allocate_kv_cache(128)
    # random weights this small give flat logits; the adapter's large ones still move the argmax
    base, adapted = generate(runner, [PROMPTS[1], PROMPTS[1]], [0, 1], 4)
    assert base != adapted
