"""One configuration's answer under a budget (:class:`Candidate`) and the words configurations are named by.

The planner (:mod:`.engine`) makes a candidate per precision x sharding x offload x step-variant
configuration it weighs;
:mod:`.plan_words` turns the chosen one and the others into the plan's explanation and frontier.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..vocab import CHECKPOINT_MODES
from .solver import Solution
from .variants import PLAIN, StepVariant


@dataclass(frozen=True)
class Candidate:
    """One configuration's best answer under the budget (or its smallest peak when nothing fits)."""

    precision: str
    sharding: str
    solution: Solution  # checkpoint choices, chain peak, recompute ms
    peak_bytes: int  # with the floor (optimizer step etc.)
    step_ms: float
    base_ms: float  # without recomputation and communication
    comm_ms: float
    units: tuple[str, ...]
    profile: object
    offload: bool = False  # FSDP2 CPU offload of parameter shards, gradients and optimizer state
    host_copy_ms: float = 0.0  # offload's host <-> device copies not hidden by compute
    cpu_step_ms: float = 0.0  # offload's optimizer step on the CPU
    host_bytes: int = 0  # offload: host memory per rank at its highest (in the optimizer step)
    variant: StepVariant = PLAIN  # the step levers (loss head, micro-batches, optimizer placement and state)

    @property
    def loss_head_chunk_tokens(self) -> int:
        return self.variant.loss_head_chunk_tokens

    @property
    def offload_ms(self) -> float:
        return self.host_copy_ms + self.cpu_step_ms

    def describe(self) -> str:
        modes = list(self.solution.choices)
        parts = [self.precision, sharding_words(self.sharding, self.offload)]
        parts += self.variant.words()
        counted = {m: modes.count(m) for m in CHECKPOINT_MODES if modes.count(m)}
        if counted.get("full") or counted.get("selective") or counted.get("offload"):
            parts.append(", ".join(f"{n} of {len(modes)} units {m}" for m, n in counted.items() if m != "keep"))
        else:
            parts.append("no checkpointing")
        return "; ".join(parts)


def sharding_words(sharding: str, offload: bool) -> str:
    words = "no sharding" if sharding == "none" else f"FSDP {sharding}"
    return words + " + CPU offload" if offload else words


def describe_config(precision: str, sharding: str, offload: bool) -> str:
    return f"{precision} with {sharding_words(sharding, offload)}"


def describe_choice(precision: str, sharding: str, choices, offload: bool = False,
                    variant: StepVariant = PLAIN) -> str:
    counted = {m: list(choices).count(m) for m in CHECKPOINT_MODES if m != "keep"}
    ck = ", ".join(f"{n}/{len(choices)} {m}" for m, n in counted.items() if n) or "no checkpointing"
    return ", ".join([precision, sharding_words(sharding, offload), *variant.words(), ck])
