"""Command line: ``python llm_merging/main.py -m METHOD [options]`` (also ``python -m llm_merging.main`` and
the ``llm-merging`` console script); ``llm-merging COMMAND ...`` runs one of the other commands
(`llm_merging.cli.COMMANDS`: ``analyze``, ...). The starter kit's entry point; the commands live in
`llm_merging.cli`."""
from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # run as a script from a source tree: import the package, not its folder
    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
        sys.path[0] = _root
    else:
        sys.path.insert(0, _root)

from llm_merging import cli as commands  # noqa: E402
from llm_merging.cli.flags import build_parser  # noqa: E402  (public: the run parser, torch-free)


def main(argv: list[str] | None = None) -> int:
    """``llm-merging [COMMAND] ...``: the exit status. The flags are parsed before the library is loaded."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in commands.COMMANDS:  # e.g. `llm-merging analyze --base-model REF --models REF ...`
        return getattr(commands, commands.COMMANDS[argv[0]]).main(argv[1:])
    args = build_parser().parse_args(argv)
    return commands.run.main(argv, args)


def cli() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
