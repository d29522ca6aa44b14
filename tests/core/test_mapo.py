"""MAPO's mixed advantage, pinned by hand-computed numbers."""

import math

import torch

from mmgrpo.core import advantages as adv


def test_mapo_mixes_std_and_percent_deviation_by_certainty():
    mapo = adv.get_estimator("mapo")
    # r = [1, 1, 1, 0]: p = 3/4, lambda = 1 - 4 (3/4)(1/4) = 1/4; mu = 3/4, sigma = 1/2
    # A_std = [0.5, 0.5, 0.5, -1.5], A_apd = (r - 3/4) / (3/4) = [1/3, 1/3, 1/3, -1]
    # A = 3/4 A_std + 1/4 A_apd = [0.458333, 0.458333, 0.458333, -1.375]
    a = mapo(torch.tensor([[1.0, 1.0, 1.0, 0.0]]))
    assert torch.allclose(a, torch.tensor([[0.458333, 0.458333, 0.458333, -1.375]]), atol=1e-5)
    # p = 1/2: lambda = 0, plain GRPO: +-0.5 / sqrt(1/3) = +-0.866025
    a = mapo(torch.tensor([[1.0, 0.0, 1.0, 0.0]]))
    assert torch.allclose(a, torch.tensor([[0.866025, -0.866025, 0.866025, -0.866025]]), atol=1e-5)
    # continuous rewards, success >= 0.5: p = 1/4, lambda = 1/4; mu = 0.4, sigma = sqrt(0.38 / 3) = 0.355903
    # A = 3/4 (r - mu) / sigma + 1/4 (r - mu) / mu = [1.36616, -0.54646, 0, -0.81969]
    a = mapo(torch.tensor([[0.9, 0.2, 0.4, 0.1]]), success=0.5)
    assert torch.allclose(a, torch.tensor([[1.36616, -0.54646, 0.0, -0.81969]]), atol=1e-4)
    # all-equal groups: 0; NaN rows: 0 and out of the statistics ([1, NaN, 0]: p = 1/2, plain GRPO on [1, 0])
    assert torch.equal(mapo(torch.ones(1, 4)), torch.zeros(1, 4))
    a = mapo(torch.tensor([[1.0, float("nan"), 0.0]]))
    assert torch.allclose(a, torch.tensor([[1 / math.sqrt(2), 0.0, -1 / math.sqrt(2)]]), atol=1e-5)
    # rewards of both signs around 0: mu = 0 and the percent deviation +-1e-3 / 1e-6 = +-1000 is clamped to G - 1 = 3
    # (p = 0, lambda = 1: A = A_apd); rewards >= 0 never reach the bound
    a = mapo(torch.tensor([[1e-3, -1e-3, 0.0, 0.0]]))
    assert torch.allclose(a, torch.tensor([[3.0, -3.0, 0.0, 0.0]]))
