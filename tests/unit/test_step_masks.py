"""A step whose grammar masks follow it (StepRequest.masks_follow): the shard's service runs the
forward, waits for the step's StepMasks call (which may come before or after), and samples under
the masks; masks that never come fail the step naming it, instead of hanging the shard."""

import threading
import time

import pytest
import torch
from model_helpers import save_tiny_model, tiny_config
from runner_helpers import bitmask

from tgi_proto.generate.v1 import generate_pb2 as pb
from tgi_server.distributed import SINGLE
from tgi_server.model_runner import ModelRunner
from tgi_server.models.registry import load_model
from tgi_server.service import TextGenerationService

PROMPT = [11, 12, 13, 14, 15]


class Aborted(Exception):
    pass


class Context:
    def abort(self, code, details):
        raise Aborted(f"{code}: {details}")


@pytest.fixture
def service(tmp_path):
    save_tiny_model(tiny_config("llama"), tmp_path)
    model, config = load_model(str(tmp_path), SINGLE, torch.float32, torch.device("cpu"))
    runner = ModelRunner(model, config, SINGLE, torch.device("cpu"), torch.float32, 4)
    runner.allocate_kv_cache(32)
    return TextGenerationService(runner, pb.InfoResponse(), rank=0)


def step_request(step_id: int, request_id: int) -> pb.StepRequest:
    return pb.StepRequest(
        step_id=step_id,
        new_requests=[pb.NewRequest(id=request_id, token_ids=PROMPT, sampling=pb.SamplingParameters())],
        scheduled=[pb.ScheduledRequest(id=request_id, num_tokens=len(PROMPT), new_block_ids=[1, 2], mask_follows=True)],
        masks_follow=True,
    )


def send_masks(service, step_id: int, request_id: int, token: int, delay: float) -> threading.Thread:
    def run():
        time.sleep(delay)
        service.StepMasks(pb.StepMasksRequest(step_id=step_id, allowed_tokens={request_id: bitmask({token})}), Context())

    thread = threading.Thread(target=run)
    thread.start()
    return thread


@pytest.mark.parametrize("delay", [0.0, 0.3], ids=["masks first", "masks during the step"])
def test_the_sample_follows_masks_sent_before_or_during_the_step(service, delay):
    for token in (7, 200):  # two different one-token masks: the sample is each time the allowed token
        step_id = token
        thread = send_masks(service, step_id, request_id=token, token=token, delay=delay)
        if delay == 0.0:
            thread.join()
        response = service.Step(step_request(step_id, request_id=token), Context())
        thread.join()
        assert [(s.request_id, [t.token_id for t in s.tokens]) for s in response.samples] == [(token, [token])]
    assert service._masks == {}  # nothing left behind


def test_masks_that_never_come_fail_the_step_naming_it(service):
    service.masks_timeout = 0.2
    with pytest.raises(Aborted, match="the grammar masks of step 9 did not come"):
        service.Step(step_request(9, request_id=1), Context())
