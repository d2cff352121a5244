"""The decision engine: which levers make a training step fit a memory budget at the least step time, and
applying the decision (a :class:`~memprof.plans.Plan`) to a model.

Submodules: :mod:`.chain_problem` and :mod:`.solver` (the exact chain solvers: DP, MILP cross-check, brute
force, Pareto frontier), :mod:`.chain` (a profile as a chain problem), :mod:`.engine` (``plan()``: checkpoint
modes per unit x precision x sharding/offload x step variant), :mod:`.variants` (the step levers as one
value: loss head, micro-batches, optimizer step in backward, bf16 moments; each lever in its own module:
:mod:`.loss_head`, :mod:`.microbatch`, :mod:`.step_in_backward`, :mod:`.state_precision`), :mod:`.apply`
(``apply``/``remove``), :mod:`.auto` and :mod:`.live_check` (``@memprof.auto``, ``run --budget``: plan,
apply, verify in the loop), :mod:`.timing`, :mod:`.variant_timing` and :mod:`.costs` (time costs). The plan
file is :mod:`memprof.plans` (schema ``memprof.plan/1``). This package's ``__init__`` and the solvers do not
import torch.
"""

from ..plans import (
    CheckpointChoice,
    FrontierPoint,
    Plan,
    PlanFormatError,
    PlanValueError,
    Sharding,
    Source,
    load_plan,
)
from ..vocab import CHECKPOINT_MODES, LEVERS, PRECISIONS, SHARDING_STRATEGIES
from .solver import (
    ChainProblem,
    InfeasibleBudget,
    Option,
    PeakTerm,
    ProblemError,
    Solution,
    SolverError,
    Unit,
    dominant_term,
    frontier,
    min_peak,
    peak_of,
    solve,
    solve_brute_force,
    solve_dp,
    solve_ilp,
)

__all__ = [
    # solver
    "ChainProblem",
    "InfeasibleBudget",
    "Option",
    "PeakTerm",
    "ProblemError",
    "Solution",
    "SolverError",
    "Unit",
    "dominant_term",
    "frontier",
    "min_peak",
    "peak_of",
    "solve",
    "solve_brute_force",
    "solve_dp",
    "solve_ilp",
    # plan
    "CHECKPOINT_MODES",
    "LEVERS",
    "PRECISIONS",
    "SHARDING_STRATEGIES",
    "CheckpointChoice",
    "FrontierPoint",
    "Plan",
    "PlanFormatError",
    "PlanValueError",
    "Sharding",
    "Source",
    "load_plan",
]
