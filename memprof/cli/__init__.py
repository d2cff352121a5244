"""The ``memprof`` command line: a thin click layer over the library; it renders, the library computes.

Conventions (every command): ``--help`` with examples; exit code 0 on success, 1 when the user's script
failed, 2 on bad usage or input; errors are one line on stderr (``--debug`` shows the traceback);
``--format json`` output is machine-readable.
"""

from __future__ import annotations

import os
import sys

import click

from .._version import __version__
from ..errors import MemprofError

__all__ = ["main"]

os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # silence the profiler's per-session lines (scratch calibration)


class _UsageLine(click.ClickException):
    """A click usage error shown as one line on stderr (exit code 2), naming the command's --help."""

    exit_code = 2

    def __init__(self, error: click.UsageError) -> None:
        path = error.ctx.command_path if error.ctx is not None else "memprof"
        message = " ".join(error.format_message().split())
        super().__init__(f"{path}: {message} (see {path} --help)")

    def show(self, file=None) -> None:
        click.echo(f"memprof: error: {self.message}", err=True)


class _Group(click.Group):
    """Turns MemprofError (and other expected failures) and click's usage errors into one line and exit code 2."""

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.UsageError as e:
            raise _UsageLine(e) from None

    def invoke(self, ctx):
        try:
            return self._invoke(ctx)
        except click.UsageError as e:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            raise _UsageLine(e) from None

    def _invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except MemprofError as e:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"memprof: error: {e}", err=True)
            ctx.exit(2)
        except OSError as e:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"memprof: error: {e.strerror or e}: {e.filename or ''}".rstrip(": "), err=True)
            ctx.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
@click.version_option(__version__, prog_name="memprof")
@click.pass_context
def main(ctx, debug):
    """memprof: where a PyTorch training step's memory goes, what to do about it, and proof that it worked.

    \b
    Examples:
      memprof demo                         profile a small GPT, explain the peak, plan and verify
      memprof run train.py --lr 3e-4       profile an unmodified training script
      memprof report memprof.json          tables: summary, modules, largest tensors
      memprof plot memprof.json --html     timeline.png, modules.png and report.html
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


def _register() -> None:
    import importlib

    for name in ("demo_cmds", "run_cmds", "report_cmds", "estimate_cmds", "plan_cmds"):
        module = importlib.import_module(f".{name}", __name__)
        for command in getattr(module, "COMMANDS", ()):
            main.add_command(command)


_register()


if __name__ == "__main__":  # python -m memprof (memprof/__main__.py) is the module entry point
    sys.exit(main())
