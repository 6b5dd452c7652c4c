"""Shared option groups (`options.grouped`): declared once, offered by name, received as one value."""

import typer
from typer.testing import CliRunner

from prune_cli.cli import app, ui
from prune_cli.cli import options as O

runner = CliRunner()


def _app(seen: list) -> typer.Typer:
    small = typer.Typer(add_completion=False)

    @small.command()
    @O.grouped(run="seed device quiet", select="mode max_ratio")
    def cmd(name: str = "x", select: O.SelectOptions = O.SelectOptions(), run: O.RunOptions = O.RunOptions()) -> None:
        seen.append((name, select, run, ui.quiet))

    return small


def test_a_command_gets_the_options_it_names_in_that_order_as_one_value(monkeypatch):
    monkeypatch.setattr(ui, "quiet", False)
    seen: list = []
    small = _app(seen)
    result = runner.invoke(small, ["--name", "y", "--seed", "3", "--max-ratio", "0.5", "--quiet"])
    assert result.exit_code == 0, result.output
    name, select, run, quiet = seen[0]
    assert name == "y" and quiet is True  # ui.quiet is set before the command runs
    assert run == O.RunOptions(seed=3, quiet=True) and select == O.SelectOptions(max_ratio=0.5)
    options = [p.opts[0] for p in typer.main.get_command(small).params]
    assert options == ["--name", "--mode", "--max-ratio", "--seed", "--device", "--quiet"]
    assert runner.invoke(small, ["--threads", "2"]).exit_code == 2  # not offered: no such option


# Options a command declares for itself on purpose: sinf eval's batches are "1 and a routed deployment's batch";
# compare's --runtime overrides the experiment's `runtime:` (no default of its own), as its other flags do.
OWN = {("eval", "--latency-batches"), ("report", "--quiet"), ("compare", "--runtime")}


def test_every_command_offers_a_shared_option_with_its_one_declaration():
    """The help and default of --device, --seed, --threads, --mode, ... are those of the groups in every command."""
    reference = typer.Typer(add_completion=False)

    @reference.command()
    @O.grouped(run=" ".join(O.RunOptions.__dataclass_fields__), select=" ".join(O.SelectOptions.__dataclass_fields__))
    def every(select: O.SelectOptions = O.SelectOptions(), run: O.RunOptions = O.RunOptions()) -> None:
        pass

    declared = {p.opts[0]: (p.help, p.default) for p in typer.main.get_command(reference).params}
    group = typer.main.get_group(app)
    commands = [*group.commands.values(), *group.commands["sinf"].commands.values()]
    checked = 0
    for command in commands:
        for p in getattr(command, "params", []):
            if p.opts[0] in declared and (command.name, p.opts[0]) not in OWN:
                assert (p.help, p.default) == declared[p.opts[0]], (command.name, p.opts[0])
                checked += 1
    assert checked > 40
