"""``memprof demo``: measure, explain, decide, apply and verify on a built-in GPT, end to end."""

from __future__ import annotations

from pathlib import Path

import click

from .common import fmt_bytes

__all__ = ["COMMANDS", "demo"]


def _steps(model, opt, batch, n: int, track: bool):
    import memprof
    from memprof.training import default_step

    tracker = memprof.track(model, opt) if track else None
    if tracker:
        tracker.start()
    try:
        for _ in range(n):
            default_step(model, batch, opt)
    finally:
        if tracker:
            tracker.stop()
    return tracker.profile if tracker else None


_FILES = (("before.json", "profile"), ("after.json", "profile"), ("plan.toml", "plan"), ("timeline.png", "png"),
          ("modules.png", "png"), ("report.html", "html"), ("frontier.png", "png"), ("timeline-after.png", "png"))


@click.command("demo")
@click.option("--out", "out_dir", default="memprof-demo", show_default=True,
              type=click.Path(file_okay=False, path_type=Path), help="Folder for profiles, plan, plots.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--budget-fraction", type=click.FloatRange(0.3, 0.99), default=0.8, show_default=True,
              help="Plan for this fraction of the measured peak.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--force", is_flag=True, help="Overwrite files of these names in --out even if memprof did not write them.")
def demo(out_dir, device, budget_fraction, batch_size, force):
    """After one warm-up step, profile three training steps of a small GPT, explain the peak, plan for a smaller budget, apply the plan
    and measure again. Writes profiles, the plan, plots and an HTML report to --out.

    \b
    Examples:
      memprof demo
      memprof demo --out /tmp/demo --budget-fraction 0.7
    """
    import torch

    import memprof
    from memprof import plots
    from memprof.report import render
    from memprof.tracking.devices import cuda_available
    from memprof.zoo import DEMO_GPT, GPT, gpt_batch

    if device == "auto":
        device = "cuda" if cuda_available() else "cpu"
    if device == "cuda" and not cuda_available():
        raise memprof.MemprofError("--device cuda: CUDA is not available here")
    from memprof.files import check_output

    if out_dir.exists() and not out_dir.is_dir():
        raise click.BadParameter(f"{out_dir} is a file, not a folder", param_hint="--out")
    for name, kind in _FILES:
        check_output(out_dir / name, kind, force=force)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    with torch.device(device):
        model = GPT(DEMO_GPT)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    batch = gpt_batch(DEMO_GPT, batch_size, device=device)
    n_params = sum(p.numel() for p in model.parameters())
    click.echo(f"memprof demo: GPT ({DEMO_GPT.n_layer} layers, d={DEMO_GPT.n_embd}, {n_params / 1e6:.1f}M "
               f"parameters), batch {batch_size} x {DEMO_GPT.block_size} tokens, AdamW, on {device}\n")

    results: dict = {}

    def measure_before():
        _steps(model, opt, batch, 1, track=False)  # warm-up: first steps of a fresh model are slow (page faults)
        results["before"] = _steps(model, opt, batch, 3, track=True)
        results["before"].save(out_dir / "before.json")

    def plot_before():
        plots.timeline(results["before"], out_dir / "timeline.png")
        plots.modules(results["before"], out_dir / "modules.png")
        plots.html_report(results["before"], out_dir / "report.html")

    def make_plan():
        budget = int(results["before"].peak_bytes * budget_fraction)
        results["plan"] = memprof.plan(results["before"], budget)
        results["plan"].save(out_dir / "plan.toml")
        plots.frontier(results["plan"], out_dir / "frontier.png")

    def measure_after():
        with memprof.apply(model, results["plan"]):
            results["after"] = _steps(model, opt, batch, 3, track=True)
        results["after"].save(out_dir / "after.json")
        plots.timeline(results["after"], out_dir / "timeline-after.png")

    def time_plan():  # the verification's step time: untracked steps, with and without the plan, interleaved
        from memprof.policy.timing import time_overhead
        from memprof.training import default_step

        results["timing"] = time_overhead(model, lambda: default_step(model, batch, opt), results["plan"],
                                          reps=_TIMING_PAIRS)

    stages = [("warm up, measure 3 steps", measure_before), ("plots and report", plot_before), ("plan", make_plan),
              ("apply the plan, measure 3 steps again", measure_after),
              (f"time {_TIMING_PAIRS} untracked steps with and without it", time_plan)]
    with click.progressbar(stages, label="memprof demo", item_show_func=lambda s: s[0] if s else "",
                           file=click.get_text_stream("stderr")) as bar:
        for _, run_stage in bar:
            run_stage()

    before, after, the_plan = results["before"], results["after"], results["plan"]
    click.echo("\n" + render(before, sections=["summary"]).rstrip())
    click.echo("\n" + render(before, sections=["modules"], depth=1).rstrip())
    click.echo("\nWhy the plan:")
    for line in the_plan.explanation:
        click.echo(f"  {line}")
    click.echo(_side_by_side(before, after, the_plan, results["timing"]))
    click.echo(f"\nFiles in {out_dir}/: before.json, after.json, plan.toml, timeline.png, timeline-after.png, "
               "modules.png, frontier.png, report.html")
    click.echo(f"Next: memprof report {out_dir}/before.json | memprof plot {out_dir}/after.json --html")


_TIMING_PAIRS = 5  # untracked (plain, planned) step pairs, in alternating order


def _side_by_side(before, after, the_plan, timing) -> str:
    """Peak: tracked (before, after) against the plan; step time: untracked steps timed in pairs (plain and
    planned, alternating) — the plan's predicted overhead applied to the plain step's median."""
    from tabulate import tabulate

    modes = [c.mode for c in the_plan.checkpoint]
    base = timing.base_ms
    rows = [
        ("peak", fmt_bytes(before.peak_bytes), fmt_bytes(the_plan.predicted_peak_bytes), fmt_bytes(after.peak_bytes)),
        ("within budget", "no" if before.peak_bytes > the_plan.budget_bytes else "yes", "yes",
         "yes" if after.peak_bytes <= the_plan.budget_bytes else "NO"),
        (f"step time (untracked, median of {timing.pairs} pairs)", f"{base:.0f} ms",
         f"{base * (1 + the_plan.predicted_overhead):.0f} ms ({the_plan.predicted_overhead:+.1%})",
         f"{base * (1 + timing.overhead):.0f} ms ({timing.overhead:+.1%} ± {timing.stderr:.1%})"),
        ("checkpointed blocks", "0", f"{modes.count('full')} full, {modes.count('selective')} selective",
         f"{modes.count('full')} full, {modes.count('selective')} selective"),
    ]
    table = tabulate(rows, ["", "before", "plan predicts", "after (measured)"])
    err = 100 * (after.peak_bytes / the_plan.predicted_peak_bytes - 1)
    return (f"\nBudget {fmt_bytes(the_plan.budget_bytes)} ({the_plan.budget_bytes / before.peak_bytes:.0%} of the "
            f"measured peak):\n{table}\nmeasured peak vs prediction: {err:+.2f}%")


COMMANDS = [demo]
