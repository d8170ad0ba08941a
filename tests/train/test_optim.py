import math

import pytest
import torch
from torch import nn

from zerotune.config import OptimConfig, ScheduleConfig
from zerotune.train.optim import lr_factor, make_optimizer, param_groups


def test_schedules_match_hand_math():
    cos = ScheduleConfig(name="cosine", warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, cos, 110) == pytest.approx(0.1)  # (0+1)/10
    assert lr_factor(9, cos, 110) == pytest.approx(1.0)
    assert lr_factor(10, cos, 110) == pytest.approx(1.0)
    assert lr_factor(60, cos, 110) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(110, cos, 110) == pytest.approx(0.1)
    lin = ScheduleConfig(name="linear")
    assert lr_factor(25, lin, 100) == pytest.approx(0.75)
    step = ScheduleConfig(name="step", step_size=10, gamma=0.5)
    assert [lr_factor(s, step, 100) for s in (0, 9, 10, 25)] == [1, 1, 0.5, 0.25]


def test_weight_decay_skips_biases_norms_and_embeddings():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4), nn.LayerNorm(4))
    decay, no_decay = param_groups(model, 0.1)
    assert [tuple(p.shape) for p in decay["params"]] == [(4, 4)]
    assert len(no_decay["params"]) == 4 and no_decay["weight_decay"] == 0


@pytest.mark.parametrize("name, cls", [("sgd", torch.optim.SGD), ("adam", torch.optim.Adam),
                                       ("adamw", torch.optim.AdamW), ("rmsprop", torch.optim.RMSprop)])
def test_optimizer_names(name, cls):
    opt = make_optimizer(nn.Linear(2, 2), OptimConfig(name=name, lr=0.1, momentum=0.9, nesterov=name == "sgd"))
    assert isinstance(opt, cls)
