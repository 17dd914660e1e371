"""``python -m bench.quality``: thread settings first, then the pipeline."""

from __future__ import annotations

import sys

from bench.common import model

if __name__ == "__main__":
    model.cpu_threads(2)
    from bench.quality.run import main

    sys.exit(main())
