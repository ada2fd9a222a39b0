"""Fuzzing keeps the input contract true: whatever a user types into any command, and whatever
arguments a Python caller gives the public builders, the only outcomes are success or a
:class:`~lesa.errors.LesaError` shown in one line with exit code 2 - never another exception.

The command-line fuzz draws flags from each command's own parser (so a new option is fuzzed the day it
is added) and values from the kinds users get wrong: wrong types, NaN, infinities, negatives, zero, huge
numbers, empty strings, and paths that are files, folders, missing or absurdly long. The commands' work
is replaced by a recorder, so what is tested is that validation and the output guard catch everything
before work starts; the work itself on valid values is tested end to end elsewhere.
"""
import argparse
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lesa.cli as cli_module
from lesa import LESA2d, create_model
from lesa.errors import LesaError

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SCRATCH = Path(tempfile.mkdtemp(prefix="lesa-fuzz-"))
(SCRATCH / "afile.txt").write_text("not a checkpoint")
(SCRATCH / "adir").mkdir(exist_ok=True)
(SCRATCH / "empty.yaml").write_text("")
(SCRATCH / "list.yaml").write_text("- 1\n- 2\n")
(SCRATCH / "bad.yaml").write_text("epochs: [\n")

NUMBERS = ["0", "-1", "1", "3", "2.5", "nan", "inf", "-inf", "1e309", "99999999999999999999", "-0.0", "0.5"]
WORDS = ["", " ", "abc", "true", "None", "cuda", "cuda:7", "cpu", "auto", "lesa_resnet_tiny", "digits",
         "resnet_tiny", "flat", "rel2d", "é", "--", "-x"]
PATHS = [str(SCRATCH / "afile.txt"), str(SCRATCH / "adir"), str(SCRATCH / "missing" / "deeper"),
         str(SCRATCH / ("n" * 300)), str(SCRATCH / "afile.txt" / "under"), str(SCRATCH / "empty.yaml"),
         str(SCRATCH / "list.yaml"), str(SCRATCH / "bad.yaml"), "/dev/null", "/"]
VALUES = st.sampled_from(NUMBERS + WORDS + PATHS)


def subparsers() -> dict[str, argparse.ArgumentParser]:
    """Every command's parser (``det`` contributes ``det train`` / ``det eval`` / ``det predict``)."""
    found = {}
    for name, (_, add_args, _, _) in cli_module.COMMANDS.items():
        parser = argparse.ArgumentParser()
        add_args(parser)
        nested = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if nested:
            found.update({f"{name} {sub}": p for sub, p in nested[0].choices.items()})
        else:
            found[name] = parser
    return found


PARSERS = subparsers()


@st.composite
def command_lines(draw, command: str, pools: dict = None) -> list[str]:
    argv = command.split()
    for action in PARSERS[command]._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        required = action.required or not action.option_strings
        if not required and not draw(st.booleans()):
            continue
        if action.option_strings:
            argv.append(draw(st.sampled_from(action.option_strings)))
        if action.nargs == 0:
            continue
        pool = st.sampled_from(list(action.choices)) | VALUES if action.choices else VALUES
        pool = (pools or {}).get(action.dest, pool)
        count = action.nargs if isinstance(action.nargs, int) else draw(st.integers(1, 2))
        argv += [draw(pool) for _ in range(count)]
    return argv


def run_main(argv: list[str], capsys, stub: bool = True) -> None:
    """``lesa ARGV``, with the work stubbed unless ``stub=False``: exit 0, argparse's usage error, or one
    line with exit 2."""
    ran = []
    commands = {name: (*entry[:3], lambda options: ran.append(options) or 0)
                for name, entry in cli_module.COMMANDS.items()}
    with pytest.MonkeyPatch.context() as mp:
        if stub:
            mp.setattr(cli_module, "COMMANDS", commands)
        mp.chdir(SCRATCH)
        try:
            code = cli_module.main(argv)
        except SystemExit as stop:  # argparse: a value its type cannot parse, a missing flag
            assert stop.code == 2, argv
            capsys.readouterr()
            return
    err = capsys.readouterr().err.strip()
    assert code in (0, 2) or (argv[0] == "models" and code == 1), (argv, code)  # models: grep's "no match"
    if code:
        assert len(err.splitlines()) == 1 and "Traceback" not in err, (argv, err)
        assert not ran, argv
    elif stub:
        assert len(ran) == 1, argv


@pytest.mark.parametrize("command", sorted(PARSERS))
def test_any_command_line_is_validated_or_refused_in_one_line(command, capsys):
    @FUZZ
    @given(command_lines(command))
    def check(argv):
        run_main(argv, capsys)

    check()


@pytest.mark.parametrize("command", ["eval", "convert", "models"])
def test_cheap_commands_run_for_real_on_fuzzed_options(command, capsys, digits_run):
    """The work itself, not stubbed, on drawn options (commands that finish in about a second)."""
    runs = [str(digits_run), str(digits_run / "last.pt")]
    pools = {"checkpoint": st.sampled_from(runs) | VALUES, "input": st.sampled_from(runs[1:]) | VALUES,
             "data": st.sampled_from(["digits", *PATHS]), "workers": st.sampled_from(["0", "1", "-1", "x"]),
             "output": st.sampled_from([str(SCRATCH / "out.safetensors"), str(SCRATCH / "o.pt"), *PATHS])}

    @settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(command_lines(command, pools))
    def check(argv):
        run_main(argv, capsys, stub=False)

    check()


ODD = st.sampled_from([0, -3, 1, 2, 4, 7, 4.0, True, None, "4", [4], (8, 8), (0, 8), float("nan"), 2.5, 10**6])


CHANNELS = st.sampled_from([0, -3, 1, 2, 4, 7, 8, 4.0, True, None, "4", [4], float("nan")])  # no huge weights


@FUZZ
@given(heads=ODD, feature_size=ODD, stride=ODD, in_chans=CHANNELS, channels=CHANNELS,
       pos_embed=st.sampled_from(["flat", "rel2d", "both", "", None, 3]),
       impl=st.sampled_from(["auto", "fused", "reference", "cuda", None]))
def test_layer_arguments_build_or_raise_one_lesa_error(heads, feature_size, stride, in_chans, channels, pos_embed,
                                                       impl):
    try:
        layer = LESA2d(in_chans, channels, heads=heads, stride=stride, pos_embed=pos_embed,
                       feature_size=feature_size, impl=impl)
    except LesaError as err:
        assert "\n" not in str(err)
        return
    size = feature_size if isinstance(feature_size, int) else feature_size[0]
    assume_small = in_chans * channels * size * size <= 4096 * 64
    if assume_small:  # a built layer runs on an input of its own size
        out = layer(torch.randn(1, in_chans, size, size))
        assert out.shape[1] == channels


@FUZZ
@given(name=st.sampled_from(["lesa_resnet_tiny", "resnet_tiny", "sa_resnet_tiny", "aa_resnet_tiny",
                             "static_lesa_resnet_tiny", "lesa_resnet_tinyy", ""]),
       kwargs=st.dictionaries(st.sampled_from(["num_classes", "img_size", "in_chans", "heads", "drop_rate",
                                               "pos_embed", "impl", "stem", "global_pool", "bogus"]),
                              ODD | st.sampled_from(["flat", "rel2d", "avg", "small", "x"]), max_size=3))
def test_create_model_builds_or_raises_one_lesa_error(name, kwargs):
    try:
        create_model(name, **kwargs)
    except LesaError as err:
        assert "\n" not in str(err)


@FUZZ
@given(shape=st.lists(st.integers(0, 9), min_size=0, max_size=5),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.float16, torch.uint8, torch.int64, torch.bool]),
       train=st.booleans())
def test_layer_inputs_run_or_raise_one_lesa_error(shape, dtype, train):
    layer = LESA2d(8, 8, heads=2, pos_embed="rel2d", feature_size=6).train(train)
    try:
        out = layer(torch.zeros(shape, dtype=dtype))
    except LesaError as err:
        assert "\n" not in str(err)
        return
    assert out.shape[0] == shape[0] and out.shape[1] == 8 and torch.isfinite(out).all()
