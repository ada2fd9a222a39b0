"""How the command line shows an error, the same for every command: a user's error (a LesaError) is one line
and exit code 2 unless ``--debug`` or ``LESA_DEBUG=1`` asks for its traceback, and a bug (any other exception)
always keeps its traceback. Each kind of bad input and fault is tested with its feature (docs/reliability.md
names every case with its test)."""
import pytest

from lesa.cli import main
from lesa.errors import ConfigError


def test_debug_shows_tracebacks_and_bugs_keep_theirs(tmp_path, capsys, monkeypatch):
    assert main(["train", "--lr", "0", "--output", str(tmp_path / "r")]) == 2  # without --debug: one line
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    with pytest.raises(ConfigError):
        main(["--debug", "train", "--lr", "0", "--output", str(tmp_path / "r")])
    monkeypatch.setenv("LESA_DEBUG", "1")
    with pytest.raises(ConfigError):
        main(["train", "--lr", "0", "--output", str(tmp_path / "r")])
    monkeypatch.delenv("LESA_DEBUG")
    # a programming error (not a LesaError) is not swallowed into one line
    import lesa.cli

    def broken(args):
        raise TypeError("a bug")

    monkeypatch.setitem(lesa.cli.COMMANDS, "models", (*lesa.cli.COMMANDS["models"][:3], broken))
    with pytest.raises(TypeError, match="a bug"):
        main(["models"])
