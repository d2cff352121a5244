"""Well-known architectures as data: their public Hugging Face config values, built with ``transformers``.

Each entry builds the model from its config only (no weights are downloaded: under the estimator every
tensor is fake). ``transformers`` is the optional extra ``hf``.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import MemprofError

__all__ = ["Architecture", "CATALOG", "get_architecture", "architecture_from_config_file", "require_transformers"]


def require_transformers():
    try:
        import transformers
    except ImportError:
        raise MemprofError("this needs Hugging Face transformers: pip install 'memprof[hf]'") from None
    return transformers


@dataclass(frozen=True)
class Architecture:
    """A model family member: which transformers classes build it, from which config values."""

    name: str
    model_class: str  # e.g. "LlamaForCausalLM"
    config_class: str  # e.g. "LlamaConfig"
    config: dict = field(default_factory=dict)
    task: str = "causal-lm"  # causal-lm | masked-lm | image-classification
    seq_len: int = 1024  # a typical training sequence length (tokens)
    source: str = ""  # where the values come from

    def build_config(self):
        tf = require_transformers()
        cfg = getattr(tf, self.config_class)(**self.config)
        cfg._attn_implementation = "sdpa"
        return cfg

    def build_model(self):
        tf = require_transformers()
        return getattr(tf, self.model_class)(self.build_config())

    def make_batch(self, batch_size: int, seq_len: int | None = None) -> dict:
        if self.task == "image-classification":
            size = self.config.get("image_size", 224)
            return {
                "pixel_values": torch.randn(batch_size, self.config.get("num_channels", 3), size, size),
                "labels": torch.randint(0, self.config.get("num_labels", 1000), (batch_size,)),
            }
        T = seq_len or self.seq_len
        vocab = self.config.get("vocab_size", 32000)
        ids = torch.randint(0, vocab, (batch_size, T))
        return {"input_ids": ids, "labels": ids}

    def parameters(self) -> int:
        """Parameter count, from building the model on the meta device (no memory)."""
        with torch.device("meta"):
            model = self.build_model()
        seen, n = set(), 0
        for p in model.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                n += p.numel()
        return n


_LLAMA = "LlamaForCausalLM", "LlamaConfig"
CATALOG: dict[str, Architecture] = {a.name: a for a in [
    Architecture("gpt2", "GPT2LMHeadModel", "GPT2Config",
                 dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12), seq_len=1024,
                 source="openai-community/gpt2"),
    Architecture("gpt2-xl", "GPT2LMHeadModel", "GPT2Config",
                 dict(vocab_size=50257, n_positions=1024, n_embd=1600, n_layer=48, n_head=25), seq_len=1024,
                 source="openai-community/gpt2-xl"),
    Architecture("llama-2-7b", *_LLAMA,
                 dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                      rms_norm_eps=1e-5), seq_len=4096, source="meta-llama/Llama-2-7b-hf"),
    Architecture("llama-3.2-1b", *_LLAMA,
                 dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                      num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                      rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True, head_dim=64),
                 seq_len=4096, source="meta-llama/Llama-3.2-1B"),
    Architecture("llama-3-8b", *_LLAMA,
                 dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                      rms_norm_eps=1e-5, rope_theta=500000.0), seq_len=8192, source="meta-llama/Meta-Llama-3-8B"),
    Architecture("llama-3-70b", *_LLAMA,
                 dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                      num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=8192,
                      rms_norm_eps=1e-5, rope_theta=500000.0), seq_len=8192, source="meta-llama/Meta-Llama-3-70B"),
    Architecture("mistral-7b", "MistralForCausalLM", "MistralConfig",
                 dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768,
                      rms_norm_eps=1e-5, rope_theta=10000.0, sliding_window=4096),
                 seq_len=4096, source="mistralai/Mistral-7B-v0.1"),
    Architecture("qwen2.5-7b", "Qwen2ForCausalLM", "Qwen2Config",
                 dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                      num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768,
                      rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=False),
                 seq_len=4096, source="Qwen/Qwen2.5-7B"),
    Architecture("bert-base", "BertForMaskedLM", "BertConfig",
                 dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                      intermediate_size=3072, max_position_embeddings=512),
                 task="masked-lm", seq_len=512, source="google-bert/bert-base-uncased"),
    Architecture("vit-base", "ViTForImageClassification", "ViTConfig",
                 dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                      image_size=224, patch_size=16, num_labels=1000),
                 task="image-classification", seq_len=197, source="google/vit-base-patch16-224"),
]}


def get_architecture(name: str) -> Architecture:
    try:
        return CATALOG[name]
    except KeyError:
        close = difflib.get_close_matches(name.lower(), list(CATALOG), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see memprof estimate --list-models"
        raise MemprofError(f"unknown model {name!r}{hint}") from None


_TASKS = {"ForCausalLM": "causal-lm", "LMHeadModel": "causal-lm", "ForMaskedLM": "masked-lm",
          "ForImageClassification": "image-classification"}


def architecture_from_config_file(path: str | Path) -> Architecture:
    """An architecture from a Hugging Face ``config.json`` (its ``architectures`` field picks the class)."""
    tf = require_transformers()
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise MemprofError(f"{path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MemprofError(f"{path}: not a JSON config ({e})") from None
    archs = data.get("architectures") or []
    if not archs:
        raise MemprofError(f"{path}: the config has no 'architectures' entry naming the model class")
    model_class = archs[0]
    if not hasattr(tf, model_class):
        raise MemprofError(f"{path}: transformers {tf.__version__} has no model class {model_class!r}")
    task = next((t for suffix, t in _TASKS.items() if model_class.endswith(suffix)), None)
    if task is None:
        raise MemprofError(f"{path}: cannot train {model_class} (supported heads: {', '.join(_TASKS)})")
    model_type = data.get("model_type")
    try:
        cfg_class = type(tf.AutoConfig.for_model(model_type)).__name__
    except (ValueError, KeyError):
        raise MemprofError(f"{path}: unknown model_type {model_type!r}") from None
    config = {k: v for k, v in data.items() if k not in ("architectures", "model_type", "transformers_version")}
    return Architecture(path.stem, model_class, cfg_class, config, task=task,
                        seq_len=int(config.get("max_position_embeddings", 1024)), source=str(path))
