"""Learning-rate schedules: our warmup + decay multipliers, against transformers' schedules as the oracle.

qlora keeps its own ``lr_lambda`` because its warmup starts at ``1/warmup``
(transformers' starts at 0, a step that trains nothing); after warmup the
decay must be exactly transformers'.
"""

import math

import pytest
import torch
from transformers import get_cosine_with_min_lr_schedule_with_warmup, get_linear_schedule_with_warmup

from qlora.train.optim import build_scheduler, lr_lambda
from quant.errors import InputError


def _oracle(factory, total, warmup, **kw) -> list[float]:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = factory(opt, num_warmup_steps=warmup, num_training_steps=total, **kw)
    out = []
    for _ in range(total):
        out.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize("min_lr", [0.0, 0.1])
def test_cosine_matches_transformers_after_warmup(min_lr):
    total, warmup = 40, 5
    ref = _oracle(get_cosine_with_min_lr_schedule_with_warmup, total, warmup, min_lr_rate=min_lr)
    ours = [lr_lambda(s, total, warmup, "cosine", min_lr) for s in range(total)]
    assert ours[:warmup] == pytest.approx([(s + 1) / warmup for s in range(warmup)])
    assert ours[warmup:] == pytest.approx(ref[warmup:], abs=1e-12)
    assert lr_lambda(total, total, warmup, "cosine", min_lr) == pytest.approx(min_lr)  # ends at the floor


def test_linear_matches_transformers_after_warmup():
    total, warmup = 30, 3
    ref = _oracle(get_linear_schedule_with_warmup, total, warmup)
    ours = [lr_lambda(s, total, warmup, "linear") for s in range(total)]
    assert ours[warmup:] == pytest.approx(ref[warmup:], abs=1e-12)
    assert lr_lambda(10, 10, 0, "linear", 0.2) == pytest.approx(0.2)


def test_constant_and_past_the_end_and_bad_names():
    assert [lr_lambda(s, 10, 2, "constant") for s in range(4)] == [0.5, 1.0, 1.0, 1.0]
    assert lr_lambda(50, 10, 0, "cosine") == pytest.approx(0.0)  # never negative or rising past the last step
    assert not math.isnan(lr_lambda(0, 1, 0, "cosine"))
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(InputError, match="'cosine', 'linear' or 'constant'"):
        build_scheduler(opt, 10, 0, "step")


def test_scheduler_state_resumes_exactly():
    def run(split: int | None):
        p = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.SGD([p], lr=0.1)
        sched = build_scheduler(opt, 20, 4, "cosine", 0.05)
        lrs = []
        for s in range(20):
            if s == split:
                state = sched.state_dict()
                opt = torch.optim.SGD([p], lr=0.1)
                sched = build_scheduler(opt, 20, 4, "cosine", 0.05)
                sched.load_state_dict(state)
            lrs.append(sched.get_last_lr()[0])
            opt.step()
            sched.step()
        return lrs

    assert run(None) == run(7)
