"""PACS's supervised loss, pinned by hand-computed numbers; its surrogate gradient equals the gradient of the
paper's cross-entropy at the sampling parameters (autograd on the paper's loss)."""

import pytest
import torch

from mmgrpo.core import advantages as adv
from mmgrpo.core import losses as loss_lib
from mmgrpo.core.errors import UserError
from mmgrpo.train.config import load_config

BANDIT = {
    "pipeline": "bandit",
    "data": {"options": {"num_prompts": 6, "num_arms": 5}},
    "rewards": [{"name": "bandit_arm_value"}],
    "trainer": {"max_steps": 2, "prompts_per_step": 3, "group_size": 4, "progress": False},
}


def test_pacs_coefficients_are_hand_computed():
    pacs = adv.get_estimator("pacs")
    # labels [1, 0, 0, 0]: e = 1/2 - r = [-1/2, 1/2, 1/2, 1/2]; c_0 = -1/2 - 1/2 = -1, c_j = 1/2 - 1/6 = 1/3;
    # A = -c = [1, -1/3, -1/3, -1/3] (= the RLOO advantage r_i - mean_{j != i} r_j)
    a = pacs(torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    assert torch.allclose(a, torch.tensor([[1.0, -1 / 3, -1 / 3, -1 / 3]]), atol=1e-6)
    assert torch.allclose(pacs(torch.tensor([[1.0, 0.0, 0.0, 0.0]]), beta=2.0), 2 * a)
    # class-balanced weights: w+ = 4 / (2 * 1) = 2, w- = 4 / (2 * 3) = 2/3 -> e = [-1, 1/3, 1/3, 1/3]
    # c_0 = -1 - 1/3 = -4/3, c_j = 1/3 - (-1 + 1/3 + 1/3) / 3 = 4/9 -> A = [4/3, -4/9, -4/9, -4/9]
    a = pacs(torch.tensor([[1.0, 0.0, 0.0, 0.0]]), balance=True)
    assert torch.allclose(a, torch.tensor([[4 / 3, -4 / 9, -4 / 9, -4 / 9]]), atol=1e-6)
    assert torch.equal(pacs(torch.tensor([[1.0, 1.0]])), torch.zeros(1, 2))  # a unanimous group: 0
    with pytest.raises(UserError, match=r"\[0, 1\]"):
        pacs(torch.tensor([[2.0, 0.0]]))


@pytest.mark.parametrize("balance", [False, True])
def test_the_pacs_surrogate_has_the_gradient_of_the_papers_cross_entropy(balance):
    torch.manual_seed(0)
    G, K, beta = 4, 3, 0.7
    labels = torch.tensor([1.0, 0.0, 1.0, 0.0 if balance else 1.0])
    mask = torch.ones(G, K, dtype=torch.bool)
    mask[1, 2] = False  # a padding unit: out of rhat and of the loss
    theta = torch.randn(G, K, requires_grad=True)
    logp = torch.log_softmax(theta, -1)  # any differentiable log-probs
    old = logp.detach()
    # the paper: rhat_i = beta sum_t log(pi / pi_old), psi_i = rhat_i - mean_{j != i} rhat_j, BCE(sigmoid(psi), r)
    rhat = beta * torch.where(mask, logp - old, 0.0).sum(-1)
    psi = rhat - (rhat.sum() - rhat) / (G - 1)
    w = torch.ones(G)
    if balance:
        n_pos = labels.sum()
        w = torch.where(labels > 0, G / (2 * n_pos), G / (2 * (G - n_pos)))
    ce = torch.nn.functional.binary_cross_entropy_with_logits(psi, labels, weight=w, reduction="sum")
    (want,) = torch.autograd.grad(ce, theta, retain_graph=True)
    a = adv.get_estimator("pacs")(labels[None], beta=beta, balance=balance)[0]  # [G]
    per_unit, _ = loss_lib.get_loss("pacs")(logp, old, a, mask)
    surrogate = torch.where(mask, per_unit, 0.0).sum()
    assert surrogate.item() == 0.0  # log(pi / pi_old) = 0 at the sampling parameters
    (got,) = torch.autograd.grad(surrogate, theta)
    assert torch.allclose(got, want, atol=1e-6)


def test_pacs_is_refused_with_several_optimizer_steps_or_another_estimator(tmp_path):
    base = {**BANDIT, "advantage": {"estimator": "pacs"}, "loss": {"name": "pacs"}}
    cfg = load_config(None, [f"run.output_dir={tmp_path}"], base=base)
    assert cfg.loss.name == "pacs"
    with pytest.raises(UserError, match="one optimizer step.*trainer.epochs=2"):
        load_config(None, ["trainer.epochs=2"], base=base)
    with pytest.raises(UserError, match="trainer.minibatches=2"):
        load_config(None, ["trainer.minibatches=2"], base=base)
    with pytest.raises(UserError, match="advantage.estimator=pacs"):
        load_config(None, ["advantage.estimator=grpo"], base=base)
