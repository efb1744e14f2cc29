"""Two real processes (gloo, CPU, DDP) x B/2 rows give the loss, gradients and state of one process x B.

One spawn runs every loss: each rank feeds its half of a fixed global batch
through a tiny two-tower linear model wrapped in DistributedDataParallel, then
takes two SGD steps (model and loss parameters). Rank 0 saves what it saw; the
test process runs the same steps alone on the whole batch and compares.
"""

from __future__ import annotations

import datetime
import os
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from clipstudy.core import distributed as dist_utils
from clipstudy.core.losses import available_losses, make_loss

GLOBAL_BATCH, FEATURES, DIM, NUM_SAMPLES, LR = 8, 4, 5, 12, 0.1
# Global indices of the two steps; the second batch revisits samples 2, 5, 6, 7, 0.
STEP_INDICES = [[3, 0, 7, 5, 1, 6, 2, 4], [6, 10, 2, 8, 5, 11, 7, 0]]


class TwoTower(nn.Module):
    def __init__(self):
        super().__init__()
        self.image = nn.Linear(FEATURES, DIM)
        self.text = nn.Linear(FEATURES, DIM)

    def forward(self, image_x, text_x):
        return self.image(image_x), self.text(text_x)


def global_batch(step):
    g = torch.Generator().manual_seed(100 + step)
    image_x = torch.randn(GLOBAL_BATCH, FEATURES, generator=g, dtype=torch.float64)
    text_x = image_x + 0.5 * torch.randn(GLOBAL_BATCH, FEATURES, generator=g, dtype=torch.float64)
    return image_x, text_x, torch.tensor(STEP_INDICES[step])


def run_steps(name, rank, world_size):
    """Two training steps of ``name`` on this rank's rows; returns what to compare."""
    torch.manual_seed(0)
    model = TwoTower().double()
    if world_size > 1:
        model = nn.parallel.DistributedDataParallel(model)
    loss = make_loss(name, temperature=0.02, num_samples=NUM_SAMPLES).double()
    rows = slice(rank * GLOBAL_BATCH // world_size, (rank + 1) * GLOBAL_BATCH // world_size)
    record = {"values": [], "grads": [], "loss_grads": []}
    for step in range(2):
        image_x, text_x, index = global_batch(step)
        image_emb, text_emb = model(image_x[rows], text_x[rows])
        value = loss(image_emb, text_emb, index[rows])
        model.zero_grad()
        loss.zero_grad()
        value.backward()
        record["values"].append(value.detach())
        record["grads"].append({k.removeprefix("module."): p.grad.clone() for k, p in model.named_parameters()})
        record["loss_grads"].append({k: p.grad.clone() for k, p in loss.named_parameters()})
        with torch.no_grad():
            for p in list(model.parameters()) + list(loss.parameters()):
                p -= LR * p.grad
    record["state"] = {k: v.clone() for k, v in loss.state_dict().items()}
    return record


def _worker(rank, world_size, store, path):
    torch.set_num_threads(1)
    if os.path.exists("/sys/class/net/lo"):  # both ranks on this machine: loopback, whatever the hostname resolves to
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    # a file store: no port to pick, so no race with another process taking it
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=60)
    )
    try:
        assert dist_utils.is_distributed() and dist_utils.get_rank() == rank
        results = {name: run_steps(name, rank, world_size) for name in available_losses()}
        if rank == 0:
            torch.save(results, path)
        dist.barrier()  # neither rank tears the group down while the other still uses it
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    # A rank has (rarely, only inside the whole suite, cause not found) aborted in gloo with "terminate called
    # without an active exception". That is the launcher, not the losses: one more launch in a fresh folder;
    # the comparisons below stay exact.
    for attempt in (1, 2):
        folder = tmp_path_factory.mktemp("ddp")
        path = folder / "rank0.pt"
        try:
            mp.spawn(_worker, args=(2, str(folder / "store"), str(path)), nprocs=2, join=True)
            break
        except mp.ProcessExitedException as err:
            if attempt == 2:
                raise
            warnings.warn(f"two-rank launch aborted ({err}); launching again", stacklevel=2)
    return torch.load(path)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("name", available_losses())
def test_two_ranks_equal_one_process(two_rank_results, name):
    assert not dist_utils.is_distributed() and dist_utils.get_world_size() == 1
    single = run_steps(name, 0, 1)
    ranks = two_rank_results[name]
    for step in range(2):
        torch.testing.assert_close(ranks["values"][step], single["values"][step], rtol=1e-10, atol=1e-12)
        assert ranks["grads"][step].keys() == single["grads"][step].keys()
        for key, grad in single["grads"][step].items():
            assert grad.abs().max() > 0, key  # the comparison is not trivially between zeros
            torch.testing.assert_close(ranks["grads"][step][key], grad, rtol=1e-9, atol=1e-12)
        for key, grad in single["loss_grads"][step].items():
            torch.testing.assert_close(ranks["loss_grads"][step][key], grad, rtol=1e-9, atol=1e-12)
    assert ranks["state"].keys() == single["state"].keys()
    for key, value in single["state"].items():
        torch.testing.assert_close(ranks["state"][key], value, rtol=1e-9, atol=1e-12)


def test_helpers_are_no_ops_without_a_process_group():
    x = torch.randn(3, 2, requires_grad=True)
    gathered = dist_utils.gather_with_grad(x)
    assert gathered is x and dist_utils.gather_no_grad(x) is x
    (2 * gathered).sum().backward()  # alone, the gradient reaches the input unchanged
    assert torch.equal(x.grad, torch.full((3, 2), 2.0))
    assert (dist_utils.is_distributed(), dist_utils.get_rank(), dist_utils.get_world_size()) == (False, 0, 1)
