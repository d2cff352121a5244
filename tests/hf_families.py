"""Tiny members of the common Hugging Face families and of the catalog's architectures, for comparing the
estimator with real CPU runs.

Each case keeps its family's HF config defaults (dropout, activation, rotary, residual layout, tying) apart
from the sizes: 2 layers, hidden 64-128, vocab 1000, sequence 64, batch 2, SDPA attention. The catalog's
architectures are shrunk the same way (:func:`tiny_catalog_config`), keeping their non-size values (grouped
query ratio, rope theta, tied embeddings, head dim, sliding window).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

VOCAB, SEQ, BATCH = 1000, 64, 2
_SIZES = dict(vocab_size=VOCAB, num_hidden_layers=2, max_position_embeddings=128)


@dataclass(frozen=True)
class Family:
    """A tiny model of one family: its transformers classes, config values and batch."""

    name: str
    model_class: str
    config_class: str
    config: dict = field(default_factory=dict)
    task: str = "causal-lm"  # causal-lm | masked-lm
    padding_mask: bool = True  # the batch carries an attention_mask, as real training scripts pass
    padded: int = 0  # positions at the end of the second row that are padding (mask 0, label -100)

    def build_model(self):
        import transformers as tf

        cfg = getattr(tf, self.config_class)(**self.config)
        cfg._attn_implementation = "sdpa"  # as the catalog builds its models
        return getattr(tf, self.model_class)(cfg)

    def make_batch(self) -> dict:
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
        if self.task == "masked-lm":
            masked = torch.rand(BATCH, SEQ, generator=g) < 0.15  # BERT's pre-training share
            masked[:, 0] = True  # at least one label per row
            labels = torch.where(masked, ids, torch.full_like(ids, -100))
            ids = torch.where(masked, torch.full_like(ids, 4), ids)  # a [MASK]-like token id
        else:
            labels = ids
        batch = {"input_ids": ids, "labels": labels}
        if self.padding_mask:
            mask = torch.ones(BATCH, SEQ, dtype=torch.long)
            if self.padded:
                mask[1, SEQ - self.padded:] = 0
                batch["labels"] = labels.masked_fill(mask == 0, -100)
            batch["attention_mask"] = mask
        return batch


_LLAMA_LIKE = dict(_SIZES, hidden_size=128, intermediate_size=344, num_attention_heads=4, num_key_value_heads=2)

_GPT2 = dict(vocab_size=VOCAB, n_positions=128, n_embd=128, n_layer=2, n_head=4, bos_token_id=VOCAB - 1,
             eos_token_id=VOCAB - 1)

FAMILIES: dict[str, Family] = {f.name: f for f in [
    Family("llama", "LlamaForCausalLM", "LlamaConfig", _LLAMA_LIKE),
    Family("llama-padded", "LlamaForCausalLM", "LlamaConfig", _LLAMA_LIKE, padded=16),
    Family("mistral", "MistralForCausalLM", "MistralConfig", dict(_LLAMA_LIKE, sliding_window=32)),
    Family("qwen2", "Qwen2ForCausalLM", "Qwen2Config", _LLAMA_LIKE),
    Family("gemma", "GemmaForCausalLM", "GemmaConfig", dict(_LLAMA_LIKE, head_dim=32)),
    Family("phi3", "Phi3ForCausalLM", "Phi3Config", dict(_LLAMA_LIKE, eos_token_id=2, pad_token_id=0)),
    Family("phi", "PhiForCausalLM", "PhiConfig", dict(_SIZES, hidden_size=128, intermediate_size=512,
                                                      num_attention_heads=4)),
    Family("gpt2", "GPT2LMHeadModel", "GPT2Config", _GPT2),
    Family("gpt2-padded", "GPT2LMHeadModel", "GPT2Config", _GPT2, padded=16),
    Family("gpt-neox", "GPTNeoXForCausalLM", "GPTNeoXConfig", dict(_SIZES, hidden_size=128, intermediate_size=512,
                                                                   num_attention_heads=4)),
    Family("opt", "OPTForCausalLM", "OPTConfig", dict(vocab_size=VOCAB, hidden_size=128, ffn_dim=512,
                                                      num_hidden_layers=2, num_attention_heads=4,
                                                      max_position_embeddings=128, word_embed_proj_dim=128)),
    Family("falcon", "FalconForCausalLM", "FalconConfig", dict(vocab_size=VOCAB, hidden_size=128,
                                                               num_hidden_layers=2, num_attention_heads=4)),
    Family("bert", "BertForMaskedLM", "BertConfig", dict(_SIZES, hidden_size=128, intermediate_size=512,
                                                         num_attention_heads=4), task="masked-lm"),
]}


def tiny_catalog_config(config: dict) -> dict:
    """A catalog config at test size: the sizes shrunk (token ids inside the vocabulary), the grouped-query and
    head-dim/hidden ratios kept, a sliding window (if any) half the sequence, every other value as it is."""
    cfg = dict(config)
    if "n_embd" in cfg:  # GPT-2 names
        return dict(cfg, **_GPT2)
    heads, kv = cfg.get("num_attention_heads", 4), cfg.get("num_key_value_heads") or cfg.get("num_attention_heads", 4)
    cfg.update(_SIZES, hidden_size=128, intermediate_size=344, num_attention_heads=4,
               num_key_value_heads=max(1, 4 * kv // heads))
    if "head_dim" in config:
        cfg["head_dim"] = max(8, config["head_dim"] * 128 // config["hidden_size"])
    if config.get("sliding_window"):
        cfg["sliding_window"] = SEQ // 2  # shorter than the sequence, so that the window is used
    return cfg


def catalog_families() -> dict[str, Family]:
    """The catalog's causal-LM architectures at test size (batches as the catalog makes them: no mask)."""
    from memprof.estimation.catalog import CATALOG

    return {f"catalog:{a.name}": Family(f"catalog:{a.name}", a.model_class, a.config_class,
                                        tiny_catalog_config(a.config), padding_mask=False)
            for a in CATALOG.values() if a.task == "causal-lm"}


def all_cases() -> dict[str, Family]:
    return {**FAMILIES, **catalog_families()}
