"""``memprof estimate``: will it fit? A fake-tensor estimate of a training step, for any size and world size."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import MemprofError
from ..importer import import_attr, import_module
from ..vocab import DPO_REFERENCES, FINETUNE_METHODS, OPTIMIZERS, PRECISIONS, SHARDING_STRATEGIES
from .common import FORMAT, UNITS, echo_json, fmt_bytes

__all__ = ["COMMANDS", "estimate_cmd"]


def model_source(model_spec, hf, batch_spec, seq_len):
    """(build_model, make_batch(batch_size), description, source(batch_size) for the profile)."""
    from ..estimation.sources import describe_factory, describe_hf

    if bool(model_spec) == bool(hf):
        raise click.UsageError("give exactly one of --model PKG.MODULE:FACTORY or --hf NAME|CONFIG.json")
    if hf:
        from ..estimation import architecture_from_config_file, get_architecture

        arch = architecture_from_config_file(hf) if hf.endswith(".json") or Path(hf).is_file() else get_architecture(hf)
        max_len = arch.config.get("max_position_embeddings") or arch.config.get("n_positions")
        if seq_len is not None and arch.task != "image-classification" and max_len and seq_len > max_len:
            raise MemprofError(f"--seq-len {seq_len} exceeds {arch.name}'s maximum of {max_len} positions")
        return (arch.build_model, (lambda b: arch.make_batch(b, seq_len)), f"{arch.name} ({arch.source})",
                (lambda b: describe_hf(hf, b, seq_len)) if not hf.endswith(".json") else (lambda b: ""))
    factory = import_attr(model_spec, "--model")
    module_name = model_spec.partition(":")[0]
    if batch_spec:
        batch_fn = import_attr(batch_spec, "--batch")
    else:
        module = import_module(module_name, "--model")
        batch_fn = getattr(module, "make_batch", None)
        if batch_fn is None:
            raise MemprofError(f"{module_name!r} has no make_batch(batch_size, seq_len); pass --batch PKG.MODULE:FUNC")
        batch_spec = f"{module_name}:make_batch"
    return (factory, (lambda b: batch_fn(b, seq_len)), model_spec,
            lambda b: describe_factory(model_spec, batch_spec, b, seq_len))


def _parse_sweep(sweep: str | None):
    if not sweep:
        return None
    key, _, values = sweep.partition("=")
    if key.strip() != "batch-size" or not values:
        raise click.BadParameter("write --sweep batch-size=1,2,4,8", param_hint="--sweep")
    try:
        sizes = sorted({int(v) for v in values.split(",") if v.strip()})
    except ValueError:
        raise click.BadParameter(f"not a list of integers: {values!r}", param_hint="--sweep") from None
    if not sizes or sizes[0] < 1:
        raise click.BadParameter("batch sizes must be positive integers", param_hint="--sweep")
    return sizes


@click.command("estimate")
@click.option("--model", "model_spec", metavar="PKG.MODULE:FACTORY", help="A function returning your model.")
@click.option("--batch", "batch_spec", metavar="PKG.MODULE:FUNC",
              help="FUNC(batch_size, seq_len) returns a batch (default: make_batch beside --model's factory).")
@click.option("--hf", metavar="NAME|CONFIG.json", help="A catalog model (see --list-models) or a HF config.json.")
@click.option("--batch-size", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--seq-len", type=click.IntRange(min=1), help="Tokens per sequence (default: the model's usual length).")
@click.option("--precision", type=click.Choice(PRECISIONS), default="fp32", show_default=True)
@click.option("--optimizer", type=click.Choice(OPTIMIZERS), default="adamw", show_default=True)
@click.option("--world-size", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--sharding", type=click.Choice(SHARDING_STRATEGIES), default="none", show_default=True)
@click.option("--shard-group-size", type=click.IntRange(min=1), help="Ranks per shard group (hybrid).")
@click.option("--offload", is_flag=True,
              help="FSDP2 CPU offload of parameter shards, gradients and optimizer state (with --sharding; at "
                   "--world-size 1 use --sharding full).")
@click.option("--device", "device_name", metavar="NAME",
              help="A GPU (H100-80GB, A100-40GB, L4-24GB, ...) or cpu. Default: a CUDA GPU, times modelled for "
                   "an H100-80GB, no capacity checked; without CUDA here, CUDA is emulated on this machine's CPU "
                   "kernels (the output's first line says which device was assumed).")
@click.option("--device-memory", metavar="SIZE", help="Capacity to check against, e.g. 24GiB.")
@click.option("--sweep", metavar="batch-size=1,2,4,8", help="Estimate each batch size; report the largest that fits.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Write the estimated profile here.")
@click.option("--format", "fmt", type=FORMAT, default="table", show_default=True)
@click.option("--units", type=UNITS, default="auto", show_default=True)
@click.option("--depth", type=click.IntRange(min=0), default=2, show_default=True, help="Module table depth.")
@click.option("--lora", type=click.IntRange(min=1), metavar="R",
              help="Fine-tune with PEFT LoRA of rank R (on the attention projections: PEFT's defaults per family).")
@click.option("--lora-targets", metavar="NAME,NAME", help="Modules LoRA adapts (with --lora), e.g. q_proj,v_proj.")
@click.option("--method", type=click.Choice(FINETUNE_METHODS), default="sft", show_default=True,
              help="sft: the model's own loss (else output.sum()); dpo: DPO on chosen/rejected pairs "
                   "(--batch-size pairs), a frozen reference model's forward beside the policy's.")
@click.option("--dpo-reference", type=click.Choice(DPO_REFERENCES), default="model", show_default=True,
              help="DPO's reference: a model forward (with --lora: the base model, adapters disabled) or "
                   "log-probs precomputed into the batch.")
@click.option("--list-models", is_flag=True, help="List the catalog of architectures and exit.")
@click.option("--force", is_flag=True, help="Overwrite --out even if it is not a profile memprof wrote.")
def estimate_cmd(model_spec, batch_spec, hf, batch_size, seq_len, precision, optimizer, world_size, sharding,
                 shard_group_size, offload, device_name, device_memory, sweep, out, fmt, units, depth, lora,
                 lora_targets, method, dpo_reference, list_models, force):
    """Estimate a training step's memory on fake tensors: does it fit, with what headroom, and why.

    \b
    Examples:
      memprof estimate --list-models
      memprof estimate --hf llama-2-7b --seq-len 4096 --precision bf16-autocast --device H100-80GB
      memprof estimate --hf llama-3-70b --world-size 8 --sharding full --device H100-80GB
      memprof estimate --hf llama-2-7b --sharding full --offload --device H100-80GB
      memprof estimate --hf gpt2 --device L4-24GB --sweep batch-size=1,2,4,8,16
      memprof estimate --hf llama-3-8b --lora 16 --precision bf16-autocast --device A100-80GB
      memprof estimate --hf llama-3-8b --method dpo --seq-len 2048 --device H100-80GB
      memprof estimate --model mypkg.models:build --batch mypkg.data:make_batch --device-memory 24GiB
    """
    from ..estimation import CATALOG, estimate
    from ..hardware import DEVICES

    if list_models:
        rows = [(a.name, a.model_class, a.task, a.seq_len, a.source) for a in CATALOG.values()]
        if fmt == "json":
            echo_json([dict(zip(("name", "class", "task", "seq_len", "source"), r)) for r in rows])
        else:
            from tabulate import tabulate

            click.echo(tabulate(rows, ["name", "class", "task", "usual seq len", "config from"]))
            click.echo("\ndevices: " + ", ".join(DEVICES))
        return
    if device_name and device_memory:
        raise click.UsageError("give --device or --device-memory, not both")
    if device_memory is not None:
        from ..units import parse_size

        if parse_size(device_memory) <= 0:
            raise click.BadParameter(f"must be more than 0 bytes, got {device_memory!r}", param_hint="--device-memory")
    if out is not None:
        from ..files import check_output

        shown, out = out, check_output(out, "profile", inputs=[hf if hf and Path(hf).is_file() else None], force=force)
    device = "cpu" if (device_name or "").lower() == "cpu" else "cuda"
    capacity = device_memory or (device_name if device == "cuda" else None)
    build, batch_for, description, source_for = model_source(model_spec, hf, batch_spec, seq_len)
    if dpo_reference != "model" and method != "dpo":
        raise click.UsageError("--dpo-reference goes with --method dpo")
    from ..estimation.finetune import finetune_source, finetune_spec, parse_targets

    targets = parse_targets(lora_targets)
    build, batch_for, step, tuning = finetune_source(build, batch_for, lora=lora, lora_targets=targets,
                                                     method=method, dpo_reference=dpo_reference)
    tuned = finetune_spec(lora, targets, method, dpo_reference)
    if tuning:
        description = f"{description}, {tuning}"
    sizes = _parse_sweep(sweep) or [batch_size]
    results = []
    with click.progressbar(sizes, label="estimating", file=click.get_text_stream("stderr"),
                           item_show_func=lambda b: f"batch size {b}" if b else "") as bar:
        for b in bar:
            src = source_for(b)
            prof = estimate(build, lambda b=b: batch_for(b), step=step, optimizer=optimizer, precision=precision,
                            device=device, world_size=world_size, sharding=sharding,
                            shard_group_size=shard_group_size, device_memory=capacity, offload=offload,
                            description=f"{description}, batch {b}", source=src + tuned if src else "")
            results.append((b, prof))
    said = device_said(results[0][1], device_name, device_memory)
    if sweep:
        _echo_sweep(results, fmt, units, said)
        prof = results[-1][1]
    else:
        prof = results[0][1]
        _echo_estimate(prof, fmt, units, depth, said)
    if out is not None:
        prof.save(out)
        click.echo(f"wrote {shown}", err=True)


def _fits(prof) -> str:
    cap = prof.capacity_bytes
    if cap is None:
        return "no capacity given (--device or --device-memory)"
    head = cap - prof.peak_bytes
    verdict = "fits" if head >= 0 else "does NOT fit"
    return f"{verdict}: peak {fmt_bytes(prof.peak_bytes)} of {fmt_bytes(cap)} ({'headroom' if head >= 0 else 'short by'} {fmt_bytes(abs(head))})"


def device_said(prof, device_name, device_memory) -> str:
    """The first line of an estimate's output: the device it assumed, and whether CUDA was emulated."""
    if prof.environment.device == "cpu":
        return "Device: cpu (this machine's CPU and its kernels; times modelled from its measured speed)"
    emulated = prof.assumptions.get("device", "").startswith("cuda, emulated")
    how = "CUDA emulated on this machine's CPU kernels" if emulated else "CUDA on this machine's PyTorch build"
    if device_name:
        return f"Device: {prof.environment.device_name} ({how})"
    if device_memory:
        return (f"Device: a CUDA GPU of {fmt_bytes(prof.capacity_bytes)} (--device-memory; times modelled for an "
                f"H100-80GB; {how}; pass --device NAME)")
    return (f"Device: a CUDA GPU, times modelled for an H100-80GB (the default: no capacity checked; {how} — "
            "pass --device cpu or --device NAME)")


def _echo_estimate(prof, fmt, units, depth, said="") -> None:
    from ..report import render

    if fmt == "json":
        import json

        data = json.loads(render(prof, format="json", units=units, depth=depth))
        data["fits"] = None if prof.capacity_bytes is None else prof.peak_bytes <= prof.capacity_bytes
        data["device_assumed"] = said
        echo_json(data)
        return
    if said:
        click.echo(said)
    click.echo(f"Estimated (fake tensors) per rank: {_fits(prof)}")
    if prof.offload_host_bytes is not None:
        resident, host_peak = prof.offload_host_bytes
        click.echo(f"CPU offload: {fmt_bytes(host_peak)} of host memory per rank "
                   f"({fmt_bytes(resident)} of parameter shards, gradients and "
                   "optimizer state, and the optimizer step's temporaries)")
    click.echo("")
    click.echo(render(prof, format=fmt, units=units, depth=depth, sections=None if fmt != "csv" else ["modules"]),
               nl=False)


def _echo_sweep(results, fmt, units, said="") -> None:
    cap = results[0][1].capacity_bytes
    rows = [(b, p.peak_bytes, None if cap is None else p.peak_bytes <= cap) for b, p in results]
    fitting = [b for b, _, ok in rows if ok]
    if fmt == "json":
        echo_json({"device_assumed": said, "capacity_bytes": cap,
                   "largest_fitting_batch_size": max(fitting) if fitting else None,
                   "batch_sizes": [{"batch_size": b, "peak_bytes": pk, "fits": ok} for b, pk, ok in rows]})
        return
    from tabulate import tabulate

    table = [(b, fmt_bytes(pk, units), "-" if ok is None else ("yes" if ok else "no")) for b, pk, ok in rows]
    if said:
        click.echo(said)
    click.echo(tabulate(table, ["batch size", "peak per rank", "fits"], tablefmt="github" if fmt == "markdown" else "simple"))
    if cap is None:
        click.echo("\nno capacity given: pass --device or --device-memory to know what fits")
    elif fitting:
        click.echo(f"\nlargest batch size that fits in {fmt_bytes(cap)}: {max(fitting)}")
    else:
        click.echo(f"\nnone of these batch sizes fits in {fmt_bytes(cap)}")


estimate_cmd.name = "estimate"
COMMANDS = [estimate_cmd]
