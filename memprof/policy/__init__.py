"""The decision engine: what to checkpoint (later also which precision and how to shard) so training fits a budget.

So far: the chain solvers (:mod:`memprof.policy.solver`: exact DP, MILP cross-check, brute force, Pareto frontier)
and the plan file (:mod:`memprof.policy.plan`, schema ``memprof.plan/1``). Nothing in this package imports torch.
"""

from .plan import (
    CHECKPOINT_MODES,
    LEVERS,
    PRECISIONS,
    SHARDING_STRATEGIES,
    CheckpointChoice,
    FrontierPoint,
    Plan,
    PlanFormatError,
    PlanValueError,
    Sharding,
    Source,
    load_plan,
)
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
