"""Which levers ``memprof run --budget`` and ``@memprof.auto`` apply to a loop that is already running.

The live path applies a plan between two optimizer steps of the user's own loop, removes it again to time
plain steps beside it (:mod:`memprof.policy.live_check`), and removes it for good when the loop ends. A
lever belongs there only if it can be put on and taken off the *model* between steps without touching what
the loop owns:

* ``checkpoint`` and ``precision`` (autocast) wrap module forwards;
* ``loss-head`` swaps the head's ``forward`` (:mod:`memprof.policy.loss_head`): no parameter, gradient or
  optimizer state changes, and the loss and gradients are those of the head as written up to float
  summation order. It is one of :data:`DEFAULT_LIVE_LEVERS`: on a language model whose peak is the loss
  head (nanoGPT: the logits and their float copies hold most of it) checkpointing alone cannot reach half the
  peak and chunking can, so a user who names no lever still gets a plan that fits. It is safe to try because
  the plan is measured in the loop before it is kept: when the loop needs the full logits (a metric, a
  sampler) they are computed after all, the step is still right but saves nothing, the live check measures
  the peak over budget and plans again without the lever (or restores the plain step);
* ``sharding`` replaces the parameters the optimizer holds; ``micro-batches`` needs the loop to split its
  batch; ``optimizer-in-backward`` and ``bf16-moments`` change the optimizer: refused, with the way to use
  each (:func:`check_live_levers`, :func:`check_script_plan` for ``run --policy``).

The live path weighs, measures and applies the chunk :func:`memprof.policy.loss_head.chunk_tokens_for` picks
for the step, as the offline planner does.
"""

from __future__ import annotations

from ..errors import MemprofError

__all__ = ["LIVE_LEVERS", "DEFAULT_LIVE_LEVERS", "check_live_levers", "check_script_plan"]

LIVE_LEVERS = ("checkpoint", "precision", "loss-head")
DEFAULT_LIVE_LEVERS = ("checkpoint", "precision", "loss-head")

_OPTIMIZER_LEVER = ("{where} cannot apply {lever} to a running script: it changes the optimizer, which only the "
                    "script holds; plan it with `memprof plan PROFILE --levers checkpoint,{lever} --model "
                    "PKG.MOD:FACTORY` and apply it in code with memprof.apply(model, plan, optimizer=opt)")
_REFUSALS = {
    "sharding": ("{where} cannot shard a running script (FSDP replaces the parameters its optimizer holds): plan "
                 "with `memprof plan --levers sharding` and apply before building the optimizer"),
    "micro-batches": ("{where} cannot split the batch of a running script: the script owns its loop; set its "
                      "gradient accumulation instead (nanoGPT: --gradient_accumulation_steps=N with the batch size "
                      "divided by N; HF Trainer: gradient_accumulation_steps), or apply the plan's handle.step in "
                      "your own loop"),
    "activation-offload": ("{where} does not weigh activation-offload: it is weighed on an estimate of the model "
                           "with its units offloaded (CUDA); plan it with `memprof plan PROFILE --levers "
                           "checkpoint,activation-offload --model PKG.MOD:FACTORY` and apply that plan with "
                           "`memprof run --policy PLAN.toml` or memprof.apply"),
    "optimizer-in-backward": _OPTIMIZER_LEVER,
    "bf16-moments": _OPTIMIZER_LEVER,
}


def check_live_levers(levers, where: str = "--budget") -> tuple[str, ...]:
    """``levers`` as a tuple, or a :class:`MemprofError` (one line) for the first one the live path cannot
    apply, saying how to use it instead."""
    levers = tuple(levers)
    for lever in levers:
        if lever not in LIVE_LEVERS:
            words = _REFUSALS.get(lever)
            if words is None:
                raise MemprofError(f"unknown lever {lever!r}; {where} applies {', '.join(LIVE_LEVERS)}")
            raise MemprofError(words.format(lever=lever, where=where))
    return levers


def check_script_plan(plan, path: str) -> None:
    """Refuse, before the script runs, a plan ``run --policy`` cannot apply to it: one whose levers belong to
    the script's loop (micro-batches) or optimizer (the step in backward, bf16 moments)."""
    if plan.micro_batches > 1:
        raise MemprofError(f"{path}: runs each batch as {plan.micro_batches} micro-batches, which belongs to the "
                           "script's loop, not its model: set the script's gradient accumulation to "
                           f"{plan.micro_batches} (batch size divided by {plan.micro_batches}) and apply a plan "
                           "without micro-batches, or call the plan's handle.step in your own loop")
    needs = [w for w, on in (("the optimizer step in backward", plan.optimizer_in_backward),
                             ("bf16 optimizer moments", plan.bf16_moments)) if on]
    if needs:
        raise MemprofError(f"{path}: uses {' and '.join(needs)}, which change the script's optimizer and "
                           "--policy reaches only its model: apply it in code with memprof.apply(model, "
                           "memprof.load(PLAN), optimizer=opt)")
