"""Every option is declared once: each command's flags, their help, defaults and choices are generated from its
options schema (:func:`lesa.options.add_flags`), so that the command line and the schema cannot drift apart."""
import argparse
from typing import Literal, Optional

import pytest
from pydantic import Field

import lesa.cli as cli
from lesa.classification.config import LayerOptions, TrainConfig
from lesa.detection.config import DetConfig
from lesa.options import (
    HIDDEN,
    NEGATABLE,
    NO_FLAG,
    POSITIONAL,
    PositiveInt,
    add_flags,
    default_note,
    flag,
    metavar,
    schema,
)

# the schemas each command (and sub-command) takes its flags from
SCHEMAS = {
    "train": (TrainConfig, LayerOptions),
    "eval": (cli.EvalOptions,),
    "analyze": (cli.AnalyzeOptions,),
    "compare": (cli.CompareOptions,),
    "det train": (DetConfig,),
    "det eval": (cli.DetEvalOptions,),
    "det predict": (cli.DetPredictOptions,),
    "convert": (cli.ConvertOptions,),
    "models": (cli.ModelsOptions,),
    "export": (cli.ExportOptions,),
}
EXTRAS = {"train": {"config"}, "det train": {"config"}}  # flags of the command line itself: --config FILE


def command_parsers() -> dict[str, argparse.ArgumentParser]:
    found = {}
    for name, parser in cli._subparsers(cli.build_parser()).items():
        nested = cli._subparsers(parser)
        found.update({f"{name} {sub}": p for sub, p in nested.items()} if nested else {name: parser})
    return found


PARSERS = command_parsers()


def flagged(command: str) -> dict:
    """The options of ``command``'s schemas that the command line gives (those not declared NO_FLAG)."""
    return {name: info for cls in SCHEMAS[command] for name, info in cls.__pydantic_fields__.items()
            if (info.json_schema_extra or {}).get("flag") != NO_FLAG["flag"]}


def actions(command: str) -> list[argparse.Action]:
    return [a for a in PARSERS[command]._actions if not isinstance(a, argparse._HelpAction)]


def test_every_command_is_checked():
    assert set(PARSERS) == set(SCHEMAS)


@pytest.mark.parametrize("command", sorted(SCHEMAS))
def test_each_option_has_one_flag_and_each_flag_an_option(command):
    dests = [a.dest for a in actions(command)]
    assert len(dests) == len(set(dests)), dests
    assert set(dests) == set(flagged(command)) | EXTRAS.get(command, set())
    for action in actions(command):
        if action.dest in flagged(command):
            assert action.default is None, action.dest  # not given: the schema's default applies, below a file's
            assert not action.option_strings or action.option_strings[0] == flag(action.dest)


@pytest.mark.parametrize("command", sorted(SCHEMAS))
def test_every_command_and_option_says_what_it_is(command):
    assert PARSERS[command].description, command
    for action in actions(command):
        if action.help == argparse.SUPPRESS:
            continue
        info = flagged(command).get(action.dest)
        words = (action.help or "").removesuffix(default_note(info) or "" if info else "").strip()
        assert words, (command, action.dest, action.help)  # more than its default


def test_a_repeated_list_flag_adds_its_values_and_a_fixed_one_is_refused(capsys):
    parser = cli.build_parser()
    args = parser.parse_args(["det", "train", "--dcn-stages", "2", "--dcn-stages", "3"])
    assert args.dcn_stages == [2, 3]
    args = parser.parse_args(["compare", "--ops", "conv", "sa", "--ops", "lesa"])
    assert args.ops == ["conv", "sa", "lesa"]
    with pytest.raises(SystemExit) as raised:
        parser.parse_args(["analyze", "RUN", "--query", "1", "2", "--query", "3", "4"])
    assert raised.value.code == 2 and "--query given twice" in capsys.readouterr().err


@pytest.mark.parametrize("command", sorted(SCHEMAS))
def test_the_help_shows_each_schema_default(command):
    shown = "".join(PARSERS[command].format_help().split())  # argparse wraps lines at spaces and hyphens
    for action in actions(command):
        info = flagged(command).get(action.dest)
        if info is None or action.help == argparse.SUPPRESS:
            continue
        note = default_note(info)
        if note:
            assert action.help.endswith(note), (action.dest, action.help)
        if action.help:
            assert "".join(action.help.split()) in shown, action.dest


def test_unset_flags_take_the_defaults_of_the_schema_and_of_a_config_file(tmp_path):
    parse = cli.build_parser().parse_args
    assert cli.options_from(cli.EvalOptions, parse(["eval", "--checkpoint", "x"])).batch_size == 128
    assert cli.options_from(cli.ModelsOptions, parse(["models"])).pattern == "*"
    assert cli.options_from(cli.CompareOptions, parse(["compare"])).output == "runs/compare"
    config = tmp_path / "run.yaml"
    config.write_text("batch_size: 16\nlr: 0.1\n")
    cfg = cli.train_options(parse(["train", "--config", str(config), "--lr", "0.2"]))
    assert (cfg.batch_size, cfg.lr, cfg.epochs) == (16, 0.2, 15)  # file < command line; the schema below both
    assert cli.det_options(parse(["det", "train", "--config", str(config)])).batch_size == 16


def test_a_field_says_how_it_is_given():
    @schema
    class Toy:
        source: str = Field(description="read this", json_schema_extra=POSITIONAL)
        count: Optional[PositiveInt] = Field(None, description="how many", json_schema_extra=metavar("N"))
        point: Optional[list[int]] = Field(None, min_length=2, max_length=2, json_schema_extra=metavar("Y", "X"))
        kind: Literal["a", "b"] = "a"
        fast: Optional[bool] = Field(None, json_schema_extra=NEGATABLE)
        smoke: bool = Field(False, json_schema_extra=HIDDEN)
        table: dict = Field(default_factory=dict, json_schema_extra=NO_FLAG)

    parser = argparse.ArgumentParser(prog="toy")
    add_flags(parser, Toy)
    assert "usage: toy [-h] [--count N] [--point Y X] [--kind {a,b}] [--fast | --no-fast] source" in \
        " ".join(parser.format_usage().split())
    assert "--kind {a,b} (default: a)" in " ".join(parser.format_help().split())
    assert "smoke" not in parser.format_help()
    args = parser.parse_args(["f", "--point", "1", "2", "--no-fast", "--smoke"])
    assert vars(args) == dict(source="f", count=None, point=[1, 2], kind=None, fast=False, smoke=True)

    @schema
    class Untold:
        table: dict = Field(default_factory=dict)

    with pytest.raises(TypeError, match="declare it json_schema_extra=NO_FLAG"):
        add_flags(argparse.ArgumentParser(), Untold)
