"""The example tasks: they build, learn, evaluate deterministically, and agree across peers."""

from __future__ import annotations

import pytest
import torch

from gossiptrain.tasks import TASKS
from gossiptrain.tasks.charlm import stdlib_corpus


@pytest.fixture(scope="module")
def charlm():
    return TASKS["charlm"]()


def _flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_charlm_parameter_count_is_between_one_and_five_million(charlm):
    assert 1_000_000 <= sum(p.numel() for p in charlm.model.parameters()) <= 5_000_000


def test_charlm_corpus_is_the_standard_library_and_bytes_are_its_vocabulary():
    corpus = stdlib_corpus()
    assert 2**20 <= len(corpus) <= 4 * 2**20
    assert b"def " in corpus and b"import " in corpus
    assert stdlib_corpus(2**16) == corpus[: 2**16]  # a smaller cap is a prefix: file order is fixed


@pytest.mark.parametrize("name", sorted(TASKS))
def test_same_model_seed_gives_the_same_initial_model(name):
    a, b, c = TASKS[name](model_seed=0), TASKS[name](model_seed=0), TASKS[name](model_seed=1)
    assert torch.equal(_flat(a.model), _flat(b.model))
    assert not torch.equal(_flat(a.model), _flat(c.model))


@pytest.mark.parametrize("name", sorted(TASKS))
def test_batches_depend_only_on_the_seed(name, charlm):
    task = charlm if name == "charlm" else TASKS[name]()
    first, again, other = task.batches(3, 8), task.batches(3, 8), task.batches(4, 8)
    for _ in range(3):
        x, y = next(first)
        x2, y2 = next(again)
        assert torch.equal(x, x2) and torch.equal(y, y2)
        assert len(x) == len(y) == 8
    assert not torch.equal(next(first)[0], next(other)[0])


def test_charlm_targets_are_the_inputs_shifted_by_one_byte(charlm):
    x, y = next(charlm.batches(0, 4))
    assert x.shape == y.shape == (4, charlm.model.context)
    assert x.dtype == y.dtype == torch.long and int(x.max()) < 256
    assert torch.equal(x[:, 1:], y[:, :-1])


@pytest.mark.parametrize("name", sorted(TASKS))
def test_a_few_steps_reduce_the_loss_on_a_fixed_batch(name):
    torch.manual_seed(0)
    task = TASKS[name]()
    batch = next(task.batches(0, 16))
    optimizer = torch.optim.Adam(task.model.parameters(), lr=1e-3)
    with torch.no_grad():
        before = task.loss(task.model, batch).item()
    for _ in range(8):
        optimizer.zero_grad()
        task.loss(task.model, batch).backward()
        optimizer.step()
    with torch.no_grad():
        after = task.loss(task.model, batch).item()
    assert after < 0.9 * before


def test_charlm_evaluation_is_deterministic_and_starts_near_uniform(charlm):
    first, second = charlm.evaluate(charlm.model), charlm.evaluate(charlm.model)
    assert first == second
    assert set(first) >= {"loss", "accuracy"}  # the CLI prints both
    assert abs(first["loss"] - torch.log(torch.tensor(256.0)).item()) < 0.5  # an untrained model: ~ln(256)
    assert 0.0 <= first["accuracy"] <= 1.0
