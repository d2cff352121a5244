"""``memprof plan``: choose checkpointing, precision and sharding under a budget; write a reviewable plan."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import MemprofError, ProfileFormatError
from ..vocab import CHECKPOINT_MODES
from .common import echo_json, fmt_bytes

__all__ = ["COMMANDS", "plan_cmd"]


def parse_levers(text: str) -> tuple[str, ...]:
    from ..vocab import LEVERS

    levers = tuple(x.strip() for x in text.split(",") if x.strip())
    bad = [x for x in levers if x not in LEVERS]
    if bad or not levers:
        raise click.BadParameter(f"choose from {', '.join(LEVERS)} (comma-separated)", param_hint="--levers")
    return levers


@click.command("plan")
@click.argument("profile", metavar="PROFILE")
@click.option("--budget", required=True, metavar="SIZE|DEVICE", help="Per-device budget: 24GiB, 80GB or H100-80GB.")
@click.option("--world-size", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--levers", default="checkpoint", show_default=True, metavar="LIST",
              help="Comma-separated: checkpoint, precision, sharding (FSDP strategies and CPU offload), loss-head "
                   "(the output projection and cross-entropy a chunk of tokens at a time), micro-batches (2 or 4, "
                   "gradients accumulated), optimizer-in-backward, bf16-moments (Adam moments in bf16), activation-offload (a unit's saved "
                   "tensors in host memory; CUDA profiles, with a model to estimate).")
@click.option("--units", "unit_patterns", multiple=True, metavar="PATTERN",
              help="Units to checkpoint: class name or FQN glob (default: the repeated blocks).")
@click.option("--precision", "current_precision", default=None, help="The precision the profile was taken in.")
@click.option("--hf", metavar="NAME|CONFIG.json", help="The model, to estimate other precisions/sharding.")
@click.option("--model", "model_spec", metavar="PKG.MODULE:FACTORY",
              help="Or your model's factory, to estimate other precisions/sharding.")
@click.option("--batch", "batch_spec", metavar="PKG.MODULE:FUNC",
              help="With --model: FUNC(batch_size, seq_len) returns a batch (default: make_batch beside it).")
@click.option("--batch-size", type=click.IntRange(min=1), default=1, show_default=True, help="With --hf/--model.")
@click.option("--seq-len", type=click.IntRange(min=1), help="With --hf/--model.")
@click.option("--shard-group-size", type=click.IntRange(min=1), help="Consider hybrid sharding with groups of N.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Write the plan (TOML), e.g. policies/x.toml.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path), help="Frontier figure (PNG).")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@click.option("--force", is_flag=True, help="Overwrite --out/--plot even if they are not files memprof wrote.")
def plan_cmd(profile, budget, world_size, levers, unit_patterns, current_precision, hf, model_spec, batch_spec,
             batch_size, seq_len, shard_group_size, out, plot_path, fmt, force):
    """Plan checkpointing (and precision, sharding) so that a step fits a memory budget, for the least time.

    Other precisions and sharding are weighed on estimates of the same model: name it with --hf or --model
    (a profile made by `memprof estimate --hf NAME` names its catalog model already). Code named inside a
    profile file is never imported; a lever that cannot be weighed is refused, with the reason.

    \b
    Examples:
      memprof plan memprof.json --budget 24GiB --out policies/gpt-24g.toml
      memprof plan est.json --budget H100-80GB --levers checkpoint,precision
      memprof plan est.json --budget H100-80GB --world-size 8 --levers checkpoint,precision,sharding
      memprof plan est.json --budget H100-80GB --levers precision,sharding   (1 GPU: sharding = CPU offload)
      memprof plan prof.json --budget 16GiB --levers checkpoint,precision --hf llama-3.2-1b --seq-len 2048
    """
    from .. import load
    from ..estimation.sources import EstimateSource, describe_hf, source_from_profile
    from ..files import check_output
    from ..policy.engine import UnweighableLeverError, plan
    from ..profiles import Profile

    inputs = [profile, hf if hf and Path(hf).is_file() else None]
    shown = {}
    if out is not None:
        out, shown[out] = check_output(out, "plan", inputs=inputs, force=force), out
    if plot_path is not None:
        given = plot_path
        plot_path = check_output(plot_path, "png", inputs=[*inputs, out], force=force, option="--plot")
        shown[plot_path] = given
    prof = load(profile)
    if not isinstance(prof, Profile):
        raise ProfileFormatError(profile, f"is a {type(prof).__name__}, not a profile")
    lever_list = parse_levers(levers)
    source = None
    if batch_spec and not model_spec:
        raise click.UsageError("--batch goes with --model")
    if hf or model_spec:
        from .estimate_cmds import model_source

        build, make, description, _ = model_source(model_spec, hf, batch_spec, seq_len)
        catalog = hf and not model_spec and not (hf.endswith(".json") or Path(hf).is_file())
        source = EstimateSource(build, lambda: make(batch_size), prof.assumptions.get("optimizer", "adamw"),
                                "cpu" if prof.environment.device == "cpu" else "cuda", budget,
                                description=description,
                                cache_key=describe_hf(hf, batch_size, seq_len) if catalog else None)
    elif any(lv != "checkpoint" for lv in lever_list):
        source = source_from_profile(prof, device_memory=budget)
    try:
        result = plan(prof, budget, world_size=world_size, levers=lever_list, units=list(unit_patterns) or None,
                      source=source, precision=current_precision, shard_group_size=shard_group_size)
    except UnweighableLeverError as e:
        raise MemprofError(
            f"--levers {','.join(e.levers)} cannot be weighed from {profile} alone ({e.configurations[0]} and "
            "others need an estimate of the model): name the model with --hf NAME|CONFIG.json or --model "
            "PKG.MODULE:FACTORY (with the profile's --batch-size and --seq-len), or plan with --levers checkpoint"
        ) from None
    if out is not None:
        result.save(out)
    if plot_path is not None:
        from ..plots import frontier as frontier_plot

        frontier_plot(result, plot_path)
    if fmt == "json":
        echo_json(result.to_dict())
    else:
        _echo_plan(result)
    for path in (out, plot_path):
        if path is not None:
            click.echo(f"wrote {shown[path]}", err=True)


def _echo_plan(p) -> None:
    from tabulate import tabulate

    click.echo(f"Plan for {fmt_bytes(p.budget_bytes)} per device, world size {p.world_size}: predicted peak "
               f"{fmt_bytes(p.predicted_peak_bytes)}, step {p.predicted_step_ms:.1f} ms "
               f"({p.predicted_overhead:+.1%} vs {p.baseline_step_ms:.1f} ms)")
    offload = " + CPU offload (parameter shards, gradients, optimizer state on the host)" \
        if p.sharding.offload_optimizer else ""
    click.echo(f"  precision {p.precision}; sharding {p.sharding.strategy}{offload}")
    if p.step_levers():
        click.echo("  step: " + ", ".join(p.step_levers()))
    modes = p.checkpoint_modes()
    counted = {m: sum(1 for v in modes.values() if v == m) for m in CHECKPOINT_MODES}
    click.echo("  checkpoint: " + ", ".join(f"{n} {m}" for m, n in counted.items() if n))
    rows = [(c.unit, c.mode) for c in p.checkpoint if c.mode != "keep"]
    if rows:
        click.echo(tabulate(rows, ["unit", "mode"]))
    click.echo("\nWhy:")
    for line in p.explanation:
        click.echo(f"  {line}")
    if p.frontier:
        click.echo("\nFrontier (peak vs step time; every point is the fastest plan at that peak):")
        frows = [(fmt_bytes(f.peak_bytes), f"{f.step_ms:.1f}",
                  "fits" if f.peak_bytes <= p.budget_bytes else "", f.description) for f in p.frontier]
        click.echo(tabulate(frows, ["peak", "step ms", "", "configuration"]))


plan_cmd.name = "plan"
COMMANDS = [plan_cmd]
