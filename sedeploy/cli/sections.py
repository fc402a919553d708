"""Options grouped into help sections, and old option spellings kept for one release.

click prints every option under one "Options:" heading; :class:`Command` prints them under the section each
:func:`option` names (in the order the sections first appear), so ``--help`` reads as "Calibration", "INT8 budget",
… A spelling that was renamed is a hidden :func:`deprecated` option: it still works, says on stderr what to use
instead, and hands its value to the new option.
"""
from __future__ import annotations

from typing import Callable

import click
from click.core import ParameterSource

#: the heading of options that name no section (click's own -h/--help)
OTHER = "Other options"


class Option(click.Option):
    """A click option that knows its help section and, when it is an old spelling, its replacement."""

    def __init__(self, *decls, section: str | None = None, use: str | None = None, rename_to: str | None = None,
                 **kwargs):
        super().__init__(*decls, **kwargs)
        self.section = section
        self.use = use  # the spelling to use instead (deprecated spellings only)
        self.rename_to = rename_to  # the parameter that receives this spelling's value


def option(*decls, section: str, **kwargs) -> Callable:
    """``click.option`` shown under the help heading ``section``."""
    return click.option(*decls, cls=Option, section=section, **kwargs)


def deprecated(old: str, use: str, *, rename_to: str | None = None, **kwargs) -> Callable:
    """A hidden old spelling ``old``: it still works for one release and says on stderr to use ``use``.

    With ``rename_to`` its value goes to that (new) parameter; without, the command receives it under its own
    name and combines it itself."""
    name = "deprecated_" + old.lstrip("-").replace("-", "_")
    return click.option(old, name, cls=Option, hidden=True, default=None, use=use, rename_to=rename_to, **kwargs)


def stack(*decorators: Callable) -> Callable:
    """Several option decorators as one, applied in the order written (so --help lists them in that order)."""
    def apply(fn):
        for deco in reversed(decorators):
            fn = deco(fn)
        return fn
    return apply


class Command(click.Command):
    """A command whose --help lists options by section and that maps deprecated spellings to the new ones."""

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        sections: dict[str, list[tuple[str, str]]] = {}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx) if isinstance(param, click.Option) else None
            if record is not None:
                sections.setdefault(getattr(param, "section", None) or OTHER, []).append(record)
        sections[OTHER] = sections.pop(OTHER, [])  # click's own options (-h/--help) last
        for title, rows in sections.items():
            if not rows:
                continue
            with formatter.section(title):
                formatter.write_dl(rows)

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        rest = super().parse_args(ctx, args)
        for param in self.params:
            if not (isinstance(param, Option) and param.use):
                continue
            value = ctx.params.pop(param.name) if param.rename_to else ctx.params.get(param.name)
            if value is None:
                continue
            old = param.opts[0]
            click.echo(f"warning: {old} is deprecated; use {param.use} (the old spelling goes in the next "
                       "release)", err=True)
            if param.rename_to:
                if ctx.get_parameter_source(param.rename_to) is ParameterSource.COMMANDLINE:
                    raise click.UsageError(f"{old} and {param.use} name the same option; give only {param.use}.",
                                           ctx=ctx)
                ctx.params[param.rename_to] = value
        return rest
