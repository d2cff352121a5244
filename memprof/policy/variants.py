"""Step variants: the levers that change how the whole step runs rather than one unit — loss-head chunking,
micro-batches, the optimizer step in backward, bf16 optimizer moments — as one value the planner enumerates.

A :class:`StepVariant` names one combination; :func:`weighed_variants` lists those a set of levers lets the
planner weigh (with the reasons others are left out), and :func:`variant_source` makes the estimate source
of the model run that way (:meth:`EstimateSource.derived`: the model transformed after it is built, the step
wrapped), so each variant's memory comes from the same fake-tensor estimate as every other configuration.

Which combinations are weighed: micro-batches only with the default step (a custom step, e.g. DPO's, owns
its own loop); the optimizer step in backward not with micro-batches (gradient accumulation), not with fp16
(a gradient scaler in the loop), not with sharding or offload (FSDP reduces gradients after backward); bf16
moments only for Adam/AdamW with fp32 state (a ``bf16`` plan's moments are bf16 already).
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass

from ..plans import step_lever_words

__all__ = ["StepVariant", "PLAIN", "weighed_variants", "variant_source", "variant_allowed", "model_transform",
           "step_wrapper", "MICRO_BATCHES"]

MICRO_BATCHES = (2, 4)  # the micro-batch counts the "micro-batches" lever weighs


@dataclass(frozen=True, order=True)
class StepVariant:
    """How the step runs beside checkpointing, precision and sharding. The default is the step as written."""

    loss_head_chunk_tokens: int = 0  # > 0: the loss head computed this many tokens at a time
    micro_batches: int = 1  # > 1: the batch split in this many slices, gradients accumulated
    optimizer_in_backward: bool = False  # each parameter stepped in its post-accumulate-grad hook
    bf16_moments: bool = False  # Adam/AdamW moments kept in bf16

    @property
    def plain(self) -> bool:
        return self == PLAIN

    @property
    def levers(self) -> tuple[str, ...]:
        """The levers this variant uses (names from :data:`memprof.vocab.LEVERS`)."""
        out = []
        if self.loss_head_chunk_tokens:
            out.append("loss-head")
        if self.micro_batches > 1:
            out.append("micro-batches")
        if self.optimizer_in_backward:
            out.append("optimizer-in-backward")
        if self.bf16_moments:
            out.append("bf16-moments")
        return tuple(out)

    def without(self, lever: str) -> StepVariant:
        """This variant less ``lever`` (a name from :attr:`levers`)."""
        return dataclasses.replace(self, **_OFF[lever])

    def without_each(self) -> list[StepVariant]:
        """This variant less one of its levers, for each lever it uses."""
        return [self.without(lever) for lever in self.levers]

    def words(self) -> list[str]:
        return step_lever_words(self.loss_head_chunk_tokens, self.micro_batches, self.optimizer_in_backward,
                                self.bf16_moments)

    def describe(self) -> str:
        return ", ".join(self.words()) or "the step as written"


PLAIN = StepVariant()
_OFF = {"loss-head": {"loss_head_chunk_tokens": 0}, "micro-batches": {"micro_batches": 1},
        "optimizer-in-backward": {"optimizer_in_backward": False}, "bf16-moments": {"bf16_moments": False}}


def variant_allowed(v: StepVariant, precision: str, sharding: str, offload: bool) -> bool:
    """Whether ``v`` combines with this precision and sharding (see the module's docstring)."""
    if v.optimizer_in_backward and (precision == "fp16-autocast" or sharding != "none" or offload):
        return False
    if v.bf16_moments and precision == "bf16":
        return False
    return True


def weighed_variants(levers, *, chunk_tokens: int, custom_step: bool, optimizer: str) -> tuple[list[StepVariant], list[str]]:
    """The variants ``levers`` let the planner weigh (the plain step first) and why any asked for are not."""
    notes = []
    heads = [0, chunk_tokens] if "loss-head" in levers else [0]
    micro = [1]
    if "micro-batches" in levers:
        if custom_step:
            notes.append("micro-batches not weighed: the step is the caller's own (a custom step owns its loop)")
        else:
            micro += list(MICRO_BATCHES)
    in_backward = [False, True] if "optimizer-in-backward" in levers else [False]
    moments = [False]
    if "bf16-moments" in levers:
        if optimizer.startswith("adam"):
            moments.append(True)
        else:
            notes.append(f"bf16 moments not weighed: the optimizer is {optimizer}, not Adam/AdamW")
    out = []
    for h, k, oib, m in itertools.product(heads, micro, in_backward, moments):
        if oib and k > 1:
            continue  # the step in backward cannot accumulate gradients over micro-batches
        out.append(StepVariant(h, k, oib, m))
    return out, notes


def variant_source(source, v: StepVariant):
    """The estimate source of the model run as ``v`` (``source`` itself for the plain step)."""
    if v.plain:
        return source
    return source.derived(model_transform(v), v.describe(), step=step_wrapper(v))


def model_transform(v: StepVariant):
    """The model-side part of ``v`` as ``transform(model) -> model`` (None when it has none)."""
    if not v.loss_head_chunk_tokens:
        return None

    def transform(model):
        from .loss_head import chunk_loss_head

        chunk_loss_head(model, chunk_tokens=v.loss_head_chunk_tokens)
        return model
    return transform


def step_wrapper(v: StepVariant):
    """A function of the source's step (None: the default step) giving the step run as ``v``, or None."""
    if v.micro_batches == 1 and not v.optimizer_in_backward and not v.bf16_moments:
        return None

    def wrap(inner):
        from ..training import default_step
        from .microbatch import MicrobatchError, microbatched

        if v.micro_batches > 1 and inner is not None:
            raise MicrobatchError("micro-batches slice the batch around the default step; a custom step owns its loop")
        base = microbatched(v.micro_batches) if v.micro_batches > 1 else (inner or default_step)

        def step(model, batch, optimizer, precision="fp32", scaler=None, device_type="cpu"):
            if v.optimizer_in_backward and getattr(optimizer, "_memprof_step_in_backward", None) is None:
                from .step_in_backward import step_in_backward

                step_in_backward(model, optimizer)
            if v.bf16_moments and getattr(optimizer, "_memprof_state_precision", None) is None:
                from .state_precision import low_precision_state

                low_precision_state(optimizer)
            return base(model, batch, optimizer, precision, scaler, device_type)
        return step
    return wrap
