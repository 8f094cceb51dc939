"""CLI flags declared next to config dataclass fields.

    @dataclass
    class FooConfig:
        port: int = flag(50051, "port to listen on")

    FooConfig.add_cli_args(parser) / FooConfig.from_cli_args(args) come from `CliConfig`.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any


def flag(default: Any, help: str, *, choices: typing.Sequence[Any] | None = None) -> Any:
    """A dataclass field with a default and its --flag's help text."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


def _base_type(annotation: Any) -> type:
    """`int | None` -> int; `str` -> str."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0]
    return annotation


class CliConfig:
    """Mixin for config dataclasses whose fields were declared with `flag(...)`."""

    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser, prefix: str = "") -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if "help" not in f.metadata:
                continue
            name = "--" + prefix + f.name.replace("_", "-")
            typ = _base_type(hints[f.name])
            dest = prefix.replace("-", "_") + f.name
            if typ is bool:
                parser.add_argument(name, dest=dest, action=argparse.BooleanOptionalAction, default=f.default,
                                    help=f.metadata["help"])
            else:
                help_text = f.metadata["help"]
                # NOTE: a help text that explains its default itself ("default: the model's") or a default of None
                # (nothing set) would read twice or as Python's "None" with "(default: X)" appended.
                if f.default is not None and "default" not in help_text:
                    help_text += f" (default: {f.default})"
                parser.add_argument(name, dest=dest, type=typ, default=f.default, choices=f.metadata["choices"],
                                    help=help_text)

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace, prefix: str = ""):
        values = {}
        for f in dataclasses.fields(cls):
            dest = prefix.replace("-", "_") + f.name
            if "help" in f.metadata and hasattr(args, dest):
                values[f.name] = getattr(args, dest)
        return cls(**values)

    def to_cli_args(self, prefix: str = "") -> list[str]:
        """The flags that reproduce this config in a child process."""
        argv: list[str] = []
        for f in dataclasses.fields(self):
            if "help" not in f.metadata:
                continue
            value = getattr(self, f.name)
            name = "--" + prefix + f.name.replace("_", "-")
            if isinstance(value, bool):
                argv.append(name if value else "--" + prefix + "no-" + f.name.replace("_", "-"))
            elif value is not None:
                argv += [name, str(value)]
        return argv
