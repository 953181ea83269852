"""`cloudfs --help` and `cloudfs COMMAND --help` for every command, nested ones included: each
answers with exit status 0 and names every option and argument the command takes."""

from __future__ import annotations

from collections.abc import Iterator

import click
import pytest
from click.testing import CliRunner

from cloudfs import cli


def commands(group: click.Group, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """The argument paths of every command under ``group``, groups included."""
    for name, command in group.commands.items():
        yield (*path, name)
        if isinstance(command, click.Group):
            yield from commands(command, (*path, name))


def command_at(path: tuple[str, ...]) -> click.Command:
    command: click.Command = cli.main
    for name in path:
        assert isinstance(command, click.Group)
        command = command.commands[name]
    return command


ALL = sorted(commands(cli.main))


def test_every_command_is_listed() -> None:
    """The walk finds the commands the README documents, the nested ones included."""
    assert {("mount",), ("unmount",), ("status",), ("refresh",), ("audit", "verify")} <= set(ALL)


def test_top_level_help_lists_every_command() -> None:
    """`cloudfs --help` names each command."""
    result = CliRunner().invoke(cli.main, ["--help"], prog_name="cloudfs")
    assert result.exit_code == 0, result.output
    for name in cli.main.commands:
        assert f"  {name}" in result.output, name


@pytest.mark.parametrize("path", ALL, ids=" ".join)
def test_command_help_names_every_option(path: tuple[str, ...]) -> None:
    """The help of ``cloudfs PATH`` shows its usage, its description and every option's flags
    (hidden ones aside) and argument."""
    command = command_at(path)
    result = CliRunner().invoke(cli.main, [*path, "--help"], prog_name="cloudfs")
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"Usage: cloudfs {' '.join(path)} "), result.output
    assert command.help, f"{' '.join(path)} has no description"
    assert command.help.split("\n")[0].strip()[:40] in result.output
    for parameter in command.params:
        if isinstance(parameter, click.Option):
            if parameter.hidden:
                continue
            for flag in (*parameter.opts, *parameter.secondary_opts):
                assert flag in result.output, f"{' '.join(path)}: {flag} not in its help"
        elif isinstance(parameter, click.Argument):
            assert parameter.human_readable_name in result.output, parameter.name
