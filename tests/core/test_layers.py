"""Layering promises: the light layers import without torch."""

from __future__ import annotations

import subprocess
import sys


def test_core_data_and_package_root_do_not_import_torch():
    code = (
        "import sys, slidesam, slidesam.core, slidesam.core.config, slidesam.data.io, "
        "slidesam.data.prepare, slidesam.data.prompts, slidesam.cli.main\n"
        "slidesam.cli.main.build_parser()\n"
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_public_api_is_exported_lazily():
    import slidesam

    assert callable(slidesam.build_slidesam)
    assert slidesam.SlideSAMPredictor.__name__ == "SlideSAMPredictor"
