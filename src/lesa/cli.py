"""The ``lesa`` command line (also ``python -m lesa``)."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Callable, Optional


# -- lesa models ---------------------------------------------------------------------------------------
def _models_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("pattern", nargs="?", default="*", help="shell-style filter, e.g. 'lesa_*'")
    p.add_argument("--params", action="store_true", help="also build each model and count its parameters")


def run_models(args: argparse.Namespace) -> int:
    from .models import create_model, list_models
    from .utils import count_params

    for name in list_models(args.pattern):
        print(f"{name:32s} {count_params(create_model(name)) / 1e6:8.2f}M" if args.params else name)
    return 0


# -- lesa convert --------------------------------------------------------------------------------------
def _convert_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", help="official checkpoint (.pth), e.g. the authors' checkpoint.pth")
    p.add_argument("output", help="output file: .pth/.pt (torch) or .safetensors")
    p.add_argument("--model", help="verify that the result loads strictly into this model (e.g. lesa_resnet50)")
    p.add_argument("--pos-embed", choices=["flat", "rel2d"], help="with --model: the checkpoint's embedding")
    p.add_argument("--img-size", type=int, help="with --model: input size the checkpoint was trained at")


def run_convert(args: argparse.Namespace) -> int:
    from .convert import convert_official_state_dict, save_state_dict
    from .weights import check_state_dict, read_checkpoint

    sd = convert_official_state_dict(read_checkpoint(args.input))
    if args.model:
        from .models import create_model

        kwargs = {k: v for k, v in (("pos_embed", args.pos_embed), ("img_size", args.img_size)) if v}
        if "pos_embed" not in kwargs:
            kwargs["pos_embed"] = "rel2d" if any(k.endswith("rel_pos.height") for k in sd) else "flat"
        check_state_dict(create_model(args.model, **kwargs), sd)
    save_state_dict(sd, args.output)
    print(f"wrote {len(sd)} tensors to {args.output}")
    return 0


Command = tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]
COMMANDS: dict[str, Command] = {
    "models": ("list the available models", _models_args, run_models),
    "convert": ("convert an official LESA checkpoint to lesa's layout", _convert_args, run_convert),
}


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="lesa", description="Locally Enhanced Self-Attention")
    parser.add_argument("--version", action="version", version=f"lesa {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, add_args, _) in COMMANDS.items():
        add_args(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return COMMANDS[args.command][2](args) or 0
    except (ValueError, FileNotFoundError, TypeError) as err:
        print(f"lesa {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lesa {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
