"""Start the vlmkit Gradio demo: ``python apps/demo.py [--port N] [--host H] [--model PATH] [--sam-checkpoint PATH]``.

The app itself lives in :mod:`vlmkit.app` so that ``vlmkit demo`` works from an installed package too.
"""

import sys

from vlmkit.app import main

if __name__ == "__main__":
    sys.exit(main())
