"""``slidesam serve``: the web annotation UI (``slidesam.web``) on a local port.

The web framework and torch are imported inside ``run`` only, so building the CLI parser stays
light (tests/core/test_layers.py). Install the extra first: ``pip install 'slidesam[web]'``.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
from pathlib import Path

from slidesam.core import InputError

log = logging.getLogger(__name__)

_LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def register(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="web annotation UI: box -> 3D mask, refine, brush, undo, export; SSA review",
        description=(
            "Start the local web annotation UI: open a volume (upload or --data-dir), draw a box, "
            "get the 3D mask by Slide-SAM propagation, refine with points or boxes, fix by hand, "
            "export the mask as NIfTI with the image's geometry. Binds to 127.0.0.1 by default."
        ),
    )
    p.add_argument(
        "--checkpoint",
        metavar="MODEL",
        help="Slide-SAM checkpoint (official SAM, released Slide-SAM or ours); default: the "
        "embedded tiny model (phantoms only)",
    )
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument(
        "--data-dir",
        type=Path,
        metavar="DIR",
        help="folder the UI may open images from and save masks into (next to the image)",
    )
    p.add_argument("--max-sessions", type=int, default=8, help="open sessions at most (8)")
    p.add_argument(
        "--max-memory-mb", type=float, default=4096, help="memory for all sessions (4096 MB)"
    )
    p.add_argument("--max-upload-mb", type=float, default=512, help="largest upload (512 MB)")
    p.set_defaults(func=run)


def _is_loopback(host: str) -> bool:
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from slidesam.web.app import create_app
        from slidesam.web.state import ServerConfig
    except ImportError as exc:
        raise InputError(
            f"the web UI needs its extra ({exc.name} is missing): pip install 'slidesam[web]'"
        ) from None
    if not 0 < args.port < 65536:
        raise InputError(f"--port must be 1..65535, got {args.port}")
    config = ServerConfig(
        data_dir=args.data_dir,
        max_sessions=args.max_sessions,
        max_memory_mb=args.max_memory_mb,
        max_upload_mb=args.max_upload_mb,
    )
    loopback = _is_loopback(args.host)
    if not loopback:
        log.warning(
            "serving on %s: anyone who can reach this address can open and annotate images "
            "(there is no login); keep it on a trusted network",
            args.host,
        )
    hosts = ["localhost", "127.0.0.1", "[::1]", "::1"] if loopback else None
    app = create_app(config, checkpoint=args.checkpoint, allowed_hosts=hosts)
    shown = "localhost" if loopback else args.host
    print(f"slidesam serve: open http://{shown}:{args.port}/ (Ctrl+C to stop)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
