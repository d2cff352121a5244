"""``memprof run``: profile an unmodified training script (or module) as ``python`` would run it.

Thin on purpose: :func:`memprof.runner.run` runs and tracks the script; this layer parses options, prints
what Python would have printed on the way out (the traceback, a ``sys.exit`` message), the summary of the
profile (or, after an out-of-memory error, :func:`memprof.forensics.render_oom`), and passes the script's
exit code on. Everything memprof prints goes to stderr: the script owns stdout.

Options for memprof come before the script; everything after it belongs to the script (``-m``, ``--lr``,
even ``--steps``). An unknown option before the script is a usage error (exit 2).
"""

from __future__ import annotations

import difflib
import sys

import click

from ..errors import MemprofError
from ..units import parse_size
from .common import fmt_bytes

__all__ = ["COMMANDS", "run"]


def _reject_unknown_option(ctx: click.Context, token: str) -> None:
    """An option before the script that memprof does not know: usage error, with close matches."""
    names = [o for p in ctx.command.params for o in getattr(p, "opts", ()) if o.startswith("-")]
    close = difflib.get_close_matches(token.split("=", 1)[0], names, n=3)
    raise click.NoSuchOption(token.split("=", 1)[0], possibilities=close, ctx=ctx)


def _device_memory(size: str | None) -> int | None:
    if size is None:
        return None
    n = parse_size(size)
    if n <= 0:
        raise MemprofError(f"--device-memory must be more than 0 bytes, got {size!r}")
    return n


def _echo(text: str = "") -> None:
    click.echo(text, err=True)


def _rank_table(result) -> str:
    from tabulate import tabulate

    from ..runner import rank_rows

    rows = []
    for r in rank_rows(result.rank_profiles):
        if r.peak_bytes is None:
            rows.append((r.rank, "(no profile)", "", "", "", ""))
            continue
        share = f"{r.category} {100.0 * r.category_bytes / r.peak_bytes:.1f}%" if r.peak_bytes else r.category
        module = r.module or ("(optimizer.step)" if r.phase == "optimizer" else "(root)")
        rows.append((r.rank, fmt_bytes(r.peak_bytes), r.step, r.phase, module, share))
    title = f"Peak per rank ({result.world_size} ranks)"
    return f"{title}\n{'=' * len(title)}\n" + tabulate(
        rows, ["rank", "peak", "step", "phase", "module", "largest category"],
        colalign=("right", "right", "right", "left", "left", "left"), disable_numparse=True)


def _report_ranks(result, out: str) -> None:
    from ..runner import rank_profile_path

    _echo(_rank_table(result))
    missing = [r for r, p in result.rank_profiles.items() if p is None]
    written = [str(rank_profile_path(out, r)) for r, p in result.rank_profiles.items() if p is not None]
    _echo(f"memprof: profiles written to {', '.join(written)}")
    if missing:
        _echo(f"memprof: no profile from rank(s) {', '.join(map(str, missing))} in time")


def _report_profile(result, out: str) -> None:
    """After the script ended without an error: the summary table and where the profile is."""
    from ..report import render

    if result.rank is not None:
        if result.rank == 0 and result.rank_profiles:
            _report_ranks(result, out)
        return
    _echo(render(result.profile, sections=["summary"]).rstrip("\n"))
    _echo(f"memprof: profile written to {result.profile_path} (details: memprof report {result.profile_path})")


def _report_failure(result, device_memory: int | None, debug: bool) -> None:
    """After the script raised: the OOM report, or the traceback Python would print."""
    from ..forensics import render_oom

    if result.out_of_memory and result.profile is not None:
        _echo(render_oom(result.profile, capacity_bytes=device_memory if result.rehearsed_oom else None,
                         error=result.error).rstrip("\n"))
        if result.raised_at:
            _echo(f"memprof: {type(result.error).__name__} raised at {result.raised_at}")
        if debug:
            _echo(result.stderr_text.rstrip("\n"))
    elif result.stderr_text:
        click.echo(result.stderr_text, err=True, nl=False)
    if result.profile_path is not None:
        _echo(f"memprof: partial profile written to {result.profile_path}")


@click.command("run", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option("--steps", type=click.IntRange(min=1), default=2, show_default=True,
              help="Optimizer steps to track; the script then runs on untracked.")
@click.option("--out", default="memprof.json", show_default=True, type=click.Path(dir_okay=False),
              help="Profile file (under torchrun one per rank: NAME.rankN.json).")
@click.option("--device-memory", metavar="SIZE",
              help="Rehearse a device of SIZE (e.g. 24GiB): stop where tracked memory would exceed it and "
                   "report what was live.")
@click.option("--policy", "policy_path", metavar="PLAN.toml",
              help="Apply this plan to the script's model at its first forward (then measure it).")
@click.option("--budget", metavar="SIZE|DEVICE",
              help="Fit the script into SIZE: estimate, plan and apply on the fly (as @memprof.auto).")
@click.option("--levers", default="checkpoint,precision,loss-head", show_default=True, metavar="LIST",
              help="With --budget: checkpoint, precision (autocast), loss-head (the output projection and "
                   "cross-entropy a chunk of tokens at a time); each plan is measured in the running script and "
                   "dropped if it does not hold.")
@click.option("--plan-out", default="memprof-plan.toml", show_default=True, type=click.Path(dir_okay=False),
              help="With --budget: where to write the plan.")
@click.option("--force", is_flag=True,
              help="Overwrite --out/--plan-out even if they are not files memprof wrote (never the script or the "
                   "plan it applies).")
@click.option("-m", "as_module", is_flag=True,
              help="Run a module like python -m: the first argument is the module's name.")
@click.argument("target", nargs=-1, type=click.UNPROCESSED, metavar="SCRIPT|-m MODULE [ARGS]...")
@click.pass_context
def run(ctx, steps, out, device_memory, policy_path, budget, levers, plan_out, force, as_module, target):
    """Run a training script unmodified, as python would, and profile its first optimizer steps.

    The script's output and exit code pass through; memprof prints the profile's summary (to stderr) and
    writes the profile. If the script raises, its traceback is printed and the exit code is 1; on an
    out-of-memory error (real, or rehearsed with --device-memory) memprof prints what was live at that
    moment instead. Either way the partial profile is written. Under torchrun every rank writes its own
    profile and rank 0 prints the peak of each rank.

    \b
    Examples:
      memprof run train.py --lr 3e-4                  # memprof options go before the script
      memprof run --steps 5 --out prof.json train.py
      memprof run -m mypkg.train --config small.yaml
      memprof run --device-memory 24GiB train.py      # would it fit a 24 GiB GPU? where would it fail?
      memprof run --policy policies/gpt-24g.toml train.py   # apply a plan, measure, compare
      memprof run --budget 24GiB train.py             # plan and apply on the fly
      torchrun --nproc-per-node 2 -m memprof run --out prof.json train_ddp.py
    """
    from .. import runner

    if not target:
        raise click.UsageError("missing the script to run (or -m MODULE)", ctx=ctx)
    if target[0].startswith("-") and target[0] != "-":
        _reject_unknown_option(ctx, target[0])
    limit = _device_memory(device_memory)
    if policy_path and budget:
        raise click.UsageError("give --policy or --budget, not both", ctx=ctx)
    out, plan_out, inputs = _outputs(target[0], as_module, out, plan_out if budget else None, policy_path, force)
    extra, applied = _plan_options(policy_path, budget, levers, out, plan_out)
    try:
        result = runner.run(target[0], list(target[1:]), module=as_module, steps=steps, out=out,
                            device_memory=limit, force=force, inputs=inputs, **extra)
    finally:
        if applied.get("auto") is not None:
            applied["auto"].close()
    sys.stdout.flush()  # the script's output first
    code = result.exit_code
    if result.error is not None:
        _report_failure(result, limit, bool(ctx.obj and ctx.obj.get("debug")))
    else:
        if result.stderr_text:  # sys.exit("message")
            click.echo(result.stderr_text, err=True, nl=False)
        if result.profile is not None and result.profile_path is not None:
            _report_profile(result, out)
            if applied.get("plan") is not None and result.rank in (None, 0):
                _echo(_verification(applied["plan"], result.profile, result.world_size or 1))
            if applied.get("auto") is not None:
                session = applied["auto"]
                written = f"; plan written to {plan_out}" if session.plan is not None and session.plan_saved else ""
                _echo(f"memprof: {session.action}{written}")
                if applied["auto"].verification is not None:
                    _echo(_live_verification(applied["auto"].verification))
    if result.save_error is not None:
        e = result.save_error
        if isinstance(e, MemprofError):
            _echo(f"memprof: error: the profile was not written: {e}")
        else:
            _echo(f"memprof: error: could not write the profile: {e.strerror or e}: {e.filename or out}")
        code = code or 2
    elif result.profile is None:
        _echo("memprof: error: tracking failed; no profile was written (rerun with --debug and report it)")
        code = code or 2
    ctx.exit(code)


def _outputs(script, as_module, out, plan_out, policy_path, force):
    """``out`` and ``plan_out`` made absolute and checked before the script runs (see memprof.files), and the
    files that are inputs: the script (the runner adds it), the plan applied."""
    from ..files import check_output
    from ..runner import resolve_target, target_files

    inputs = [p for p in (policy_path,) if p]
    script_files = target_files(resolve_target(script, module=as_module))
    out = check_output(out, "profile", inputs=[*script_files, *inputs], force=force)
    if plan_out is not None:
        plan_out = check_output(plan_out, "plan", inputs=[*script_files, *inputs, out], force=force,
                                option="--plan-out")
        if plan_out == out:
            raise MemprofError(f"--plan-out {plan_out}: is also --out; give them different paths")
    return out, plan_out, inputs


def _plan_options(policy_path, budget, levers, out, plan_out):
    """runner.run() arguments that apply a plan file (--policy) or plan on the fly (--budget)."""
    applied: dict = {}
    if policy_path:
        from .. import load
        from ..plans import Plan
        from ..policy.apply import apply
        from ..policy.auto import first_call_context
        from ..policy.live_levers import check_script_plan

        the_plan = load(policy_path)
        if not isinstance(the_plan, Plan):
            raise MemprofError(f"{policy_path}: is a {type(the_plan).__name__}, not a plan")
        if the_plan.sharding.strategy != "none":
            raise MemprofError(f"{policy_path}: shards with FSDP, which replaces the parameters the script's "
                               "optimizer already holds by its first forward; apply it in code, before building "
                               "the optimizer: memprof.apply(model, memprof.load(PLAN))")
        check_script_plan(the_plan, policy_path)  # the loop's and the optimizer's levers: refused before it runs
        applied["plan"] = the_plan

        def on_root_forward(model, args, kwargs):
            applied["handle"] = apply(model, the_plan)
            return first_call_context(the_plan, model)

        return {"on_root_forward": on_root_forward}, applied
    if budget:
        from ..hardware import resolve_capacity
        from ..policy.auto import AutoSession
        from ..policy.live_levers import check_live_levers
        from .plan_cmds import parse_levers

        lever_list = check_live_levers(parse_levers(levers), "--budget")
        _, budget_bytes = resolve_capacity(budget)
        if not budget_bytes:
            raise MemprofError(f"--budget must be a positive size or a device name, got {budget!r}")
        session = AutoSession(budget_bytes, lever_list, "adamw", out, plan_out,
                              notify=lambda message: _echo(f"memprof: {message}"))
        applied["auto"] = session

        def attach(tracking):
            session.tracker = tracking.tracker
            session.watch_steps()

        return {"on_root_forward": session.first_forward, "on_stop": session.first_steps_done,
                "session_hook": attach, "grad_forward_only": True}, applied
    return {}, applied


def _verification(the_plan, prof, world_size: int = 1) -> str:
    """Prediction and measurement side by side (peak; step time against the plan's baseline); a plan made for
    another world size is not verified by this run, and the text says so."""
    from tabulate import tabulate

    if the_plan.world_size != world_size:
        return (f"memprof: the plan was not verified: it is for world size {the_plan.world_size} and the script ran "
                f"as {world_size} process(es); its per-device peak holds only with that many ranks (launch with "
                f"torchrun --nproc-per-node {the_plan.world_size} -m memprof run ...)")

    def cells(predicted, measured, text, digits):  # a side not measured (a profile without step times): n/a
        if not predicted or not measured:
            return (text(predicted) if predicted else "n/a", text(measured) if measured else "n/a", "")
        return text(predicted), text(measured), f"{100 * (measured / predicted - 1):+.{digits}f}%"

    rows = [
        ("peak", *cells(the_plan.predicted_peak_bytes, prof.peak_bytes, fmt_bytes, 2)),
        ("step time (fastest after the first)",
         *cells(the_plan.predicted_step_ms, prof.steady_step_ms, lambda ms: f"{ms:.1f} ms", 1)),
    ]
    verdict = "within" if prof.peak_bytes <= the_plan.budget_bytes else "OVER"
    return (f"Plan verified ({verdict} the budget of {fmt_bytes(the_plan.budget_bytes)}):\n"
            + tabulate(rows, ["", "predicted", "measured", "difference"]))


def _live_verification(r) -> str:
    """The applied plan's predicted and measured peak and step time, as the live check measured them."""
    from tabulate import tabulate

    if r.measured_peak_bytes is None:
        return "memprof: the plan was not verified: the script ended before its applied steps were measured"
    rows = [("peak (tracked)", fmt_bytes(r.predicted_peak_bytes), fmt_bytes(r.measured_peak_bytes),
             f"{100 * (r.measured_peak_bytes / r.predicted_peak_bytes - 1):+.2f}%" if r.predicted_peak_bytes else "")]
    if r.measured_overhead is not None:
        how = (f"untracked, {r.timed_pairs} pairs with plain steps" if r.interleaved
               else f"untracked, {r.timed_pairs} steps vs the plan's baseline")
        err = f" ± {r.overhead_stderr:.1%}" if r.overhead_stderr is not None else ""
        rows.append((f"step-time overhead ({how})", f"{r.predicted_overhead:+.1%}",
                     f"{r.measured_overhead:+.1%}{err}", f"{100 * (r.measured_overhead - r.predicted_overhead):+.1f} pts"))
    if r.planned_step_ms is not None:
        plain = f"{r.plain_step_ms:.1f} ms plain, " if r.plain_step_ms is not None else ""
        predicted = f"{r.predicted_step_ms:.1f} ms" if r.predicted_step_ms else ""
        diff = f"{100 * (r.planned_step_ms / r.predicted_step_ms - 1):+.1f}%" if r.predicted_step_ms else ""
        rows.append(("step time (untracked, median)", predicted, f"{plain}{r.planned_step_ms:.1f} ms planned", diff))
    if r.reverted:
        verdict = "no plan held; the plain step was restored"
    elif not r.finished:
        verdict = "unfinished: the script ended during the check"
    else:
        verdict = "within" if r.within_budget() else "OVER"
        verdict = f"{verdict} the budget of {fmt_bytes(r.budget_bytes)}"
    moves = "".join(f"\n  {m}" for m in r.moves)
    return (f"Applied plan checked in the running script ({verdict}):\n"
            + tabulate(rows, ["", "predicted", "measured", "difference"]) + (f"\nMoves:{moves}" if moves else ""))


COMMANDS = [run]
