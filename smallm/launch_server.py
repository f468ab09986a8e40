"""``python -m smallm.launch_server --model-path ...``: SGLang's spelling of ``smallm serve``."""

from __future__ import annotations

import sys

from smallm.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
