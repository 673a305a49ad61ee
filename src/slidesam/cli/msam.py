"""``slidesam msam``: placeholder while the M-SAM 3D refinement (issue 8) is being built (owned by its helper)."""

from __future__ import annotations

import argparse

from slidesam.core import InputError


def register(sub) -> None:
    p = sub.add_parser("msam", help="(in progress) M-SAM 3D refinement (issue 8)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    raise InputError("slidesam msam is not built yet")
