"""``slidesam`` command line: one subcommand per module in this package, each a thin call into
the Python API. Errors the user can fix print one line (``slidesam: error: ...``), exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import sys

from slidesam import __version__
from slidesam.core import InputError
from slidesam.core.runtime import reuse_freed_memory

# subcommand modules, each with ``register(subparsers)`` that sets ``func=run(args) -> int``
_COMMANDS = (
    "demo",
    "ssa",
    "phantom",
    "prepare",
    "segment",
    "evaluate",
    "train",
    "pseudo_label",
    "unet_train",
    "nnunet_export",
    "transfersam",
    "msam",
    "serve",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="slidesam",
        description=(
            "Promptable 3D medical image segmentation: Slide-SAM and the SSA multi-phase renal "
            "tumor pipeline. Run 'slidesam COMMAND --help' for each command."
        ),
    )
    parser.add_argument("--version", action="version", version=f"slidesam {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    import importlib

    for name in _COMMANDS:
        importlib.import_module(f"slidesam.cli.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s"
        if args.verbose
        else "%(levelname)s: %(message)s",
    )
    reuse_freed_memory()  # the command owns the process: large tensors reuse freed memory
    try:
        return int(args.func(args) or 0)
    except (InputError, FileNotFoundError, NotADirectoryError, PermissionError) as exc:
        print(f"slidesam: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("slidesam: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
