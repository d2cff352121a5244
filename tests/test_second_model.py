"""A second model run in the step (DPO's frozen reference beside the policy) is its own named subtree."""

import copy

import torch
import torch.nn as nn

import memprof


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(torch.relu(self.body(x)))


def test_a_frozen_reference_model_is_named_as_such_and_a_trained_second_model_by_its_class():
    torch.manual_seed(0)
    policy = Net()
    reference = copy.deepcopy(policy).requires_grad_(False).eval()
    critic = Net()
    opt = torch.optim.SGD([*policy.parameters(), *critic.parameters()], lr=0.1)
    x = torch.randn(8, 16)
    with memprof.track() as tracker:  # the roots are found as they run
        with torch.no_grad():
            ref = reference(x)
        loss = (policy(x) - ref).square().mean() + critic(x).mean()
        loss.backward()
        opt.step()
    names = set(tracker.profile.modules)
    assert {"", "body", "head"} <= names  # the first model to run is the root
    assert {"frozen-Net", "frozen-Net.body", "frozen-Net.head"} <= names
    assert {"Net#2", "Net#2.body"} <= names or {"Net", "Net.body"} <= names
    frozen = tracker.profile.modules["frozen-Net"]
    assert frozen.grad_bytes == 0 and frozen.param_bytes == sum(p.numel() * 4 for p in reference.parameters())
