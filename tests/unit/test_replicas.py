"""Which data-parallel replica a request goes to: the least loaded, unless one caches a longer prefix of
its prompt and is at most BALANCE_SLACK requests busier. Real schedulers, driven by hand-built steps."""

from tgi_router.block_manager import BlockManager
from tgi_router.engine import Engine, GenerationInput
from tgi_router.metrics import Metrics
from tgi_router.replicas import BALANCE_SLACK, Replicas
from tgi_router.request import Request, Sample, SampledToken, SamplingParams, StepResult
from tgi_router.scheduler import Scheduler, SchedulerConfig

BLOCK_SIZE = 4
PROMPT = list(range(100, 130))  # 7 whole blocks before its last token


def make_replicas(num_replicas: int = 2) -> Replicas:
    metrics = Metrics(64, 128, 1024)
    engines = [Engine(Scheduler(SchedulerConfig(max_batch_prefill_tokens=64, max_batch_size=64),
                                BlockManager(256, BLOCK_SIZE)), None, None, metrics, replica)
               for replica in range(num_replicas)]
    return Replicas(engines)


def generation(prompt: list[int]) -> GenerationInput:
    return GenerationInput(input_ids=prompt, max_new_tokens=4, sampling=SamplingParams(), stop_sequences=())


def serve_prompt(scheduler: Scheduler, request_id: int, prompt: list[int]) -> None:
    """Runs a request through its prefill and finishes it: its blocks stay in the prefix cache."""
    scheduler.add(Request(id=request_id, prompt_token_ids=list(prompt), max_new_tokens=1))
    plan = scheduler.schedule()
    scheduler.update(plan, StepResult([Sample(request_id, (SampledToken(7, 0.0),))]))
    scheduler.finish(request_id)


def load(scheduler: Scheduler, num_requests: int, first_id: int = 1000) -> None:
    for request_id in range(first_id, first_id + num_requests):
        scheduler.add(Request(id=request_id, prompt_token_ids=[1, 2, 3], max_new_tokens=4))


def test_a_prompt_goes_to_the_least_loaded_replica_when_none_caches_it():
    replicas = make_replicas(3)
    load(replicas.engines[0].scheduler, 2)
    load(replicas.engines[1].scheduler, 1)
    load(replicas.engines[2].scheduler, 3)
    assert replicas.choose(generation(PROMPT)).replica == 1


def test_a_conversations_next_turn_goes_where_its_prefix_is_cached():
    replicas = make_replicas()
    serve_prompt(replicas.engines[1].scheduler, 1, PROMPT)
    load(replicas.engines[1].scheduler, BALANCE_SLACK)  # busier, within the slack
    assert replicas.choose(generation(PROMPT + [5, 6, 7, 8, 9])).replica == 1
    assert replicas.choose(generation(list(range(30)))).replica == 0  # another prompt: the least loaded


def test_a_cached_prefix_does_not_pile_requests_onto_a_replica_beyond_the_slack():
    replicas = make_replicas()
    serve_prompt(replicas.engines[1].scheduler, 1, PROMPT)
    load(replicas.engines[1].scheduler, BALANCE_SLACK + 1)
    assert replicas.choose(generation(PROMPT + [5, 6, 7, 8, 9])).replica == 0
