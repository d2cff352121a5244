"""Fine-tuning methods as factories and steps for the estimator (and for real runs that check it).

* LoRA: :func:`lora_factory` wraps a model factory with PEFT's ``get_peft_model`` (rank ``r``; the target
  modules are PEFT's defaults for the model's family, the attention projections, unless given). Only the
  adapters train: gradients and optimizer state are theirs; the frozen base weights stay as parameters.
* DPO: :class:`DPOPair` holds the policy beside its reference, and :func:`dpo_step` is one step of the DPO
  loss on chosen/rejected pairs in the classic recipe (TRL's DPOTrainer before its fused LM head): chosen and
  rejected sequences in one concatenated forward (``2 x pairs`` sequences, chosen first), per-sequence
  log-probabilities from the logits by ``log_softmax`` and ``gather``, the reference's under ``no_grad``,
  then ``-logsigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))).mean()``. The reference is a frozen copy of
  the policy in eval mode (``reference="model"``; with LoRA the policy itself with its adapters disabled, as
  TRL does, so no second copy), or log-probabilities precomputed into the batch (``reference="precomputed"``).
  TRL 1.16 computes the log-probabilities in a fused LM head without the full logits: for it this step's
  estimate is an upper bound (the logits and their ``log_softmax`` are what it saves).

The batch of a DPO step is :func:`dpo_batch`: the model's ordinary batch for ``2 x pairs`` sequences (without
``labels``: DPO computes its own loss from the logits), plus ``reference_logps`` when precomputed.

PEFT is optional (``pip install peft``, or the ``hf`` extra): it is imported only when LoRA is asked for.
Limits: the sequences' log-probabilities are over all positions (no prompt mask; the memory is the same);
``beta`` does not change memory.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import MemprofError
from ..training import call_model
from ..vocab import DPO_REFERENCES, FINETUNE_METHODS

__all__ = ["require_peft", "default_targets", "lora_factory", "DPOPair", "dpo_factory",
           "dpo_batch", "dpo_step", "finetune_source", "finetune_spec", "finetuned_source", "parse_targets"]

PEFT_DEFAULTS = "PEFT's default targets for the family (its attention projections)"


def require_peft():
    try:
        import peft
    except ImportError:
        raise MemprofError("LoRA needs Hugging Face peft: pip install peft (or pip install 'memprof[hf]')") from None
    return peft


def parse_targets(targets: str | None) -> list[str] | None:
    """``"q_proj,v_proj"`` -> ``["q_proj", "v_proj"]``; None or empty -> None (PEFT's defaults)."""
    names = [t.strip() for t in (targets or "").split(",") if t.strip()]
    return names or None


def lora_factory(build_model: Callable[[], nn.Module], r: int, targets: list[str] | None = None,
                 alpha: int | None = None, dropout: float = 0.0) -> Callable[[], nn.Module]:
    """A factory of ``build_model()`` wrapped by ``peft.get_peft_model`` with LoRA of rank ``r``."""
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise MemprofError(f"the LoRA rank must be a positive integer, got {r!r}")
    require_peft()

    def build():
        peft = require_peft()
        model = build_model()
        names = list(targets) if targets else default_targets(model)
        cfg = peft.LoraConfig(r=r, lora_alpha=alpha or 2 * r, lora_dropout=dropout, target_modules=names,
                              fan_in_fan_out=_transposed(model, names))
        try:
            return peft.get_peft_model(model, cfg)
        except ValueError as e:
            raise MemprofError(f"PEFT cannot put LoRA on {type(model).__name__}: {e}; name the modules to adapt "
                               "(--lora-targets q_proj,v_proj, or targets=[...])") from None
    return build


def default_targets(model: nn.Module) -> list[str]:
    """PEFT's default LoRA target modules for the model's family (``config.model_type``): the attention
    projections (``q_proj``/``v_proj`` for Llama, Mistral, Qwen2, Gemma; ``c_attn`` for GPT-2; ...)."""
    require_peft()
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as defaults

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    names = defaults.get(model_type) if isinstance(model_type, str) else None
    if not names:
        raise MemprofError(f"PEFT has no default LoRA targets for {type(model).__name__}"
                           f"{f' (model_type {model_type!r})' if model_type else ''}; name the modules to adapt "
                           "(--lora-targets q_proj,v_proj, or targets=[...])")
    return [names] if isinstance(names, str) else list(names)


def _transposed(model: nn.Module, names: list[str]) -> bool:
    """Whether the targets are GPT-2-style ``Conv1D`` layers (weights stored transposed: PEFT's fan_in_fan_out)."""
    return any(type(m).__name__ == "Conv1D" for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in names)


def _is_peft(model) -> bool:
    return callable(getattr(model, "disable_adapter", None)) and hasattr(model, "peft_config")


class DPOPair(nn.Module):
    """The policy being trained and the reference its log-probabilities are compared with.

    ``reference`` is a frozen module (kept in eval mode by :meth:`train`), or None: the policy with its
    adapters disabled (``adapter_reference``, PEFT models) or precomputed log-probabilities in the batch.
    """

    def __init__(self, policy: nn.Module, reference: nn.Module | None = None, adapter_reference: bool = False):
        super().__init__()
        self.policy = policy
        self.reference = reference
        self.adapter_reference = adapter_reference
        if reference is not None:
            reference.requires_grad_(False)
            reference.eval()

    def train(self, mode: bool = True):
        self.training = mode
        self.policy.train(mode)
        return self

    def forward(self, *args, **kwargs):
        return self.policy(*args, **kwargs)


def dpo_factory(build_model: Callable[[], nn.Module], reference: str = "model", lora: bool = False
                ) -> Callable[[], DPOPair]:
    """A factory of :class:`DPOPair` for ``build_model`` (already LoRA-wrapped when ``lora``)."""
    if reference not in DPO_REFERENCES:
        raise MemprofError(f"unknown DPO reference {reference!r}; choose one of {', '.join(DPO_REFERENCES)}")

    def build():
        policy = build_model()
        if reference == "precomputed":
            return DPOPair(policy)
        if lora:
            if not _is_peft(policy):
                raise MemprofError("a LoRA DPO reference is the policy with its adapters disabled: the model must "
                                   "be a PEFT model")
            return DPOPair(policy, adapter_reference=True)
        return DPOPair(policy, build_model())
    return build


def _without_labels(batch):
    if isinstance(batch, Mapping):
        return {k: v for k, v in batch.items() if k != "labels"}
    return batch


def _token_ids(batch) -> torch.Tensor:
    if isinstance(batch, Mapping):
        ids = batch.get("input_ids")
    elif isinstance(batch, (tuple, list)):
        ids = batch[0] if batch else None
    else:
        ids = batch
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.is_floating_point():
        raise MemprofError("DPO needs token ids (a [sequences, tokens] integer tensor: the batch's input_ids or "
                           "its first element)")
    return ids


def dpo_batch(make_batch: Callable[[int], object], pairs: int, reference: str = "model") -> dict:
    """The batch of :func:`dpo_step` for ``pairs`` chosen/rejected pairs (``make_batch(n)``: n sequences)."""
    if reference not in DPO_REFERENCES:
        raise MemprofError(f"unknown DPO reference {reference!r}; choose one of {', '.join(DPO_REFERENCES)}")
    sequences = _without_labels(make_batch(2 * pairs))
    batch = {"sequences": sequences}
    if reference == "precomputed":
        batch["reference_logps"] = torch.zeros(2 * pairs)
    return batch


def _logits(output) -> torch.Tensor:
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, Mapping) and isinstance(output.get("logits"), torch.Tensor):
        return output["logits"]
    for x in (output if isinstance(output, (tuple, list)) else (output,)):
        if isinstance(x, torch.Tensor) and x.dim() == 3:
            return x
    raise MemprofError(f"DPO needs per-token logits [sequences, tokens, vocab] from the model; its output of type "
                       f"{type(output).__name__} has none")


def sequence_logps(model, sequences) -> torch.Tensor:
    """Each sequence's summed log-probability of its own next tokens under ``model``."""
    ids = _token_ids(sequences)
    logits = _logits(call_model(model, sequences))
    logp = logits[:, :-1].float().log_softmax(-1)
    return logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1).sum(-1)


def dpo_loss(pair: DPOPair, batch: dict, beta: float = 0.1) -> torch.Tensor:
    sequences = batch["sequences"]
    policy = sequence_logps(pair.policy, sequences)
    if "reference_logps" in batch:
        ref = batch["reference_logps"]
    else:
        with torch.no_grad():
            if pair.reference is not None:
                ref = sequence_logps(pair.reference, sequences)
            elif pair.adapter_reference:
                with pair.policy.disable_adapter():
                    ref = sequence_logps(pair.policy, sequences)
            else:
                raise MemprofError("this DPO batch has no reference_logps and the pair no reference model")
    n = policy.shape[0] // 2
    margin = (policy[:n] - ref[:n]) - (policy[n:] - ref[n:])
    return -F.logsigmoid(beta * margin).mean()


def dpo_step(model: DPOPair, batch: dict, optimizer) -> None:
    """One DPO training step: the loss (:func:`dpo_loss`), backward, optimizer step, ``zero_grad``."""
    dpo_loss(model, batch).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


dpo_step.loss_said = ("the DPO loss: -logsigmoid(beta x the policy's margin over the reference, chosen vs "
                      "rejected), from the policy's logits")  # an estimate's assumptions["loss"]


def finetune_source(build_model: Callable[[], nn.Module], make_batch: Callable[[int], object], *,
                    lora: int | None = None, lora_targets: list[str] | None = None, method: str = "sft",
                    dpo_reference: str = "model"):
    """``(build_model, make_batch(b), step, description)`` of a fine-tuning method on a model and its batches.

    ``method="sft"`` keeps the default step (the model's own loss); ``"dpo"`` makes ``b`` the number of
    chosen/rejected pairs and the step :func:`dpo_step`. ``lora``: the LoRA rank, or None for full training.
    """
    if method not in FINETUNE_METHODS:
        raise MemprofError(f"unknown fine-tuning method {method!r}; choose one of {', '.join(FINETUNE_METHODS)}")
    parts = []
    build = build_model
    if lora is not None:
        build = lora_factory(build, lora, lora_targets)
        parts.append(f"LoRA r={lora} on {','.join(lora_targets) if lora_targets else PEFT_DEFAULTS}")
    elif lora_targets:
        raise MemprofError("LoRA targets given without a rank: add --lora R")
    if method == "sft":
        return build, make_batch, None, "; ".join(parts)
    build = dpo_factory(build, dpo_reference, lora=lora is not None)
    ref = {"model": "a frozen reference model" if lora is None else "the base model (adapters disabled)",
           "precomputed": "precomputed reference log-probs"}[dpo_reference]
    parts.append(f"DPO against {ref}; batch = chosen/rejected pairs")
    return build, (lambda b: dpo_batch(make_batch, b, dpo_reference)), dpo_step, "; ".join(parts)


def finetune_spec(lora: int | None, targets: list[str] | None, method: str, dpo_reference: str) -> str:
    """The fine-tuning part of an estimate's recorded ``source`` (``""`` for full training with the default
    step), so that the planner re-estimates other configurations of the same method."""
    spec = f":lora={lora}" if lora is not None else ""
    if lora is not None and targets:
        spec += f":lora_targets={','.join(targets)}"
    if method != "sft":
        spec += f":method={method}:dpo_reference={dpo_reference}"
    return spec


def finetuned_source(build_model, make_batch, batch_size: int, parts: dict):
    """``(build_model, make_batch(), step)`` from a recorded source's key=value ``parts``
    (:func:`finetune_spec`); the batch factory takes the batch size."""
    lora = int(parts["lora"]) if parts.get("lora") else None
    build, batch_for, step, _ = finetune_source(build_model, make_batch, lora=lora,
                                                lora_targets=parse_targets(parts.get("lora_targets")),
                                                method=parts.get("method", "sft"),
                                                dpo_reference=parts.get("dpo_reference", "model"))
    return build, (lambda: batch_for(batch_size)), step

