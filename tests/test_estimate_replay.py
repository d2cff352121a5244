"""Fake ops replayed by signature give the profile FakeTensorMode's own dispatch gives, to the byte."""

import pytest
import torch
import torch.nn as nn

from memprof.estimation import core, replay

_HOST_TIMED = ("forward_op_ms", "recompute_fraction", "estimate_seconds", "created", "scratch")


def _strip(d):
    if isinstance(d, dict):
        return {k: _strip(v) for k, v in d.items() if k not in _HOST_TIMED}
    if isinstance(d, list):
        return [_strip(x) for x in d]
    return d


def _llama():
    tf = pytest.importorskip("transformers")
    cfg = tf.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    cfg._attn_implementation = "sdpa"
    return tf.LlamaForCausalLM(cfg)


def _ids():
    ids = torch.randint(0, 512, (2, 32))
    return {"input_ids": ids, "labels": ids}


class _Conv(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                 nn.Conv2d(16, 16, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                 nn.Linear(16, 10))

    def forward(self, x):
        return self.net(x)


@pytest.mark.parametrize("build,batch,config", [
    (_llama, _ids, dict(precision="bf16-autocast", device="cuda", device_memory="H100-80GB")),
    (_llama, _ids, dict(precision="fp32", device="cuda", world_size=2, sharding="full")),
    (_llama, _ids, dict(precision="fp16-autocast", device="cpu")),
    (_Conv, lambda: torch.randn(4, 3, 16, 16), dict(precision="fp32", device="cpu")),
], ids=["llama-bf16-autocast-cuda", "llama-fsdp-2", "llama-fp16-autocast-cpu", "cnn-cpu"])
def test_replayed_fake_ops_give_the_dispatched_profile_to_the_byte(build, batch, config, monkeypatch):
    core.estimate(build, batch, **config)  # both runs below start from the same warm caches
    with monkeypatch.context() as m:
        m.setattr(replay.OpReplay, "key", lambda self, func, args, kwargs: None)  # every op dispatched
        dispatched = core.estimate(build, batch, **config)
    replayed = core.estimate(build, batch, **config)
    assert any(v and v[0] for v in replay._ENTRIES.values())  # some ops were replayed
    assert _strip(replayed.to_dict()) == _strip(dispatched.to_dict())
