"""``slidesam transfersam``: placeholder while the TransferSAM cascade (issue 7) is being built (owned by its helper)."""

from __future__ import annotations

import argparse

from slidesam.core import InputError


def register(sub) -> None:
    p = sub.add_parser("transfersam", help="(in progress) TransferSAM cascade (issue 7)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    raise InputError("slidesam transfersam is not built yet")
