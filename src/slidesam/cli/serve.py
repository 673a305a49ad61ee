"""``slidesam serve``: placeholder while the web annotation UI (issue 9) is being built (owned by its helper)."""

from __future__ import annotations

import argparse

from slidesam.core import InputError


def register(sub) -> None:
    p = sub.add_parser("serve", help="(in progress) web annotation UI (issue 9)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    raise InputError("slidesam serve is not built yet")
