"""The ``ratebp`` command line.

    ratebp train ...     train a spiking network with rate-based backprop and/or BPTT (``train.py``)
    ratebp bench ...     time and peak memory of a training step against BPTT, over T (``bench.py``)

Every mistake in the input — an unknown option, a bad value, a missing dataset, a checkpoint that does
not fit — ends the command with one line on stderr and exit status 2. An interrupt (Ctrl-C) ends it with
one line and exit status 130; a command that leaves files behind adds what is on disk as the message of
the KeyboardInterrupt it raises again (``train``: its last completed checkpoints).
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):          # one line, not argparse's usage block
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from . import bench, train

    parser = _Parser(prog="ratebp", description="Rate-based backpropagation for spiking networks: train and "
                                                "benchmark against BPTT.")
    commands = parser.add_subparsers(dest="command", metavar="{train,bench}", parser_class=_Parser)
    commands.required = True
    for name, module in (("train", train), ("bench", bench)):
        doc = module.__doc__.strip().replace("``", "")
        sub = commands.add_parser(name, help=doc.splitlines()[0], description=doc,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(sub)
        sub.set_defaults(run=module.run, parser=sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    from ..errors import RateBPError
    from .data import CLIError

    argv = list(sys.argv[1:] if argv is None else argv)
    args, unknown = build_parser().parse_known_args(argv)
    args.argv = argv[1:]                    # the subcommand's arguments (for a launcher that runs it again)
    if unknown:                             # reported by the subcommand, which the options belong to
        args.parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return args.run(args)
    except (CLIError, RateBPError) as e:
        print(f"ratebp {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        note = f"; {e}" if str(e) else ""
        print(f"ratebp {args.command}: interrupted{note}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
