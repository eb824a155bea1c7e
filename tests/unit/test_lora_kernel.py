"""The LoRA shrink/expand kernels add what the portable per-run products add, for any mix of slots.

On a GPU the kernels run natively; without one, on CPU through Triton's interpreter
(TRITON_INTERPRET=1), so CI checks their arithmetic. The portable backend is the reference; the
model-level check (a mixed batch equal to peft's merged models on the kernel path) is in test_lora.py.
"""

import os

import pytest
import torch

pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("without a GPU the kernels need TRITON_INTERPRET=1 set before triton is imported (conftest.py)", allow_module_level=True)

from tgi_server.forward_context import LoraRows  # noqa: E402
from tgi_server.kernels import lora as lora_kernels  # noqa: E402
from tgi_server.ops import portable, triton_backend  # noqa: E402

DEVICE = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
pytestmark = pytest.mark.usefixtures("triton_interpreter")


def _segments(slots: list[int]) -> tuple[tuple[int, int, int], ...]:
    """Runs of equal non-zero slots, as the runner builds them (one per sequence; here per run)."""
    out, start = [], 0
    for row in range(1, len(slots) + 1):
        if row == len(slots) or slots[row] != slots[start]:
            if slots[start]:
                out.append((slots[start], start, row))
            start = row
    return tuple(out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("slots, k, n, width, is_on_host, path", [
    ([2], 96, 80, 8, True, "per token"),  # one decode row: K and N not multiples of the tiles
    ([1], 4100, 40, 48, True, "per token, split"),  # one decode row: K in 17 slices, the last of 4 columns
    ([1, 0, 3, 3, 2, 0, 1], 300, 200, 48, True, "per token, split"),  # decode rows: three adapters, the base model
    ([0, 0], 32, 16, 4, True, "per token"),  # no adapter at all: the output is untouched
    ([1] * 40 + [2] * 23 + [0] * 5, 200, 150, 48, True, "host tiles, split"),  # two prompts, then base rows
    ([1, 0, 3, 2] + [2] * 18 + [1] * 3, 64, 64, 16, True, "host tiles"),  # decode rows beside a prompt: 1-row tiles
    ([1] * 20 + [0] + [2] * 3, 160, 48, 32, False, "per token, split"),  # rows known on the device only (a CUDA graph)
    ([3, 1, 0, 2] * 9, 130, 70, 8, False, "device tiles, split"),  # many decode rows, in a CUDA graph
    ([2, 0, 1, 3, 3] * 7, 64, 40, 16, True, "device tiles"),  # many short runs (eager decode): the same tiles
])
def test_kernels_add_each_rows_own_adapter_as_the_portable_products_do(dtype, slots, k, n, width, is_on_host, path,
                                                                       monkeypatch):
    taken = []  # the path: grouped (host or device tiles) or per token, then the number of splits
    split, grouped = lora_kernels._split, lora_kernels._grouped_delta
    monkeypatch.setattr(lora_kernels, "_split", lambda *args: taken.append(split(*args)[1]) or split(*args))
    monkeypatch.setattr(lora_kernels, "_grouped_delta", lambda *args: taken.append(
        "host tiles" if args[-1] is not None else "device tiles") or grouped(*args))
    generator = torch.Generator().manual_seed(len(slots) * k + n)
    num_slots = 4
    x = torch.randn(len(slots), k, generator=generator).to(DEVICE, dtype)
    a = (torch.randn(num_slots, width, k, generator=generator) / k**0.5).to(DEVICE, dtype)
    b = torch.randn(num_slots, n, width, generator=generator).to(DEVICE, dtype)
    a[0], b[0] = 0, 0  # slot 0 is never filled
    base = torch.randn(len(slots), n, generator=generator).to(DEVICE, dtype)
    rows = LoraRows.from_segments(_segments(slots), len(slots), DEVICE)
    expected = portable.lora_delta(x.float(), a.float(), b.float(), rows, base.float().clone())
    got = triton_backend.lora_delta(x, a, b, rows if is_on_host else LoraRows(None, rows.token_slots), base.clone())
    tolerance = {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 6e-2, "rtol": 2**-6}
    torch.testing.assert_close(got.float(), expected, **tolerance)
    untouched = [row for row, slot in enumerate(slots) if slot == 0]
    assert torch.equal(got[untouched], base[untouched])
    assert (taken[0] if len(taken) == 2 else "per token") + (", split" if taken[-1] > 1 else "") == path
