"""The sweep command: ``python -m fxpp.sweep [--vlm] [--only a,b] [--write-docs]``.

Without ``--vlm``, the causal-LM sweep (:mod:`fxpp.testing.sweep_causal`); with it, the
image-text-to-text sweep (:mod:`fxpp.testing.sweep_vlm`). Both write their section of
docs/supported_models.md (:data:`fxpp.testing.report.SECTION_MARK` between them).
"""

from __future__ import annotations

import sys

from .sweep_causal import main as causal_main
from .sweep_vlm import main as vlm_main


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--vlm" in argv:
        return vlm_main(argv, prog="python -m fxpp.sweep --vlm")
    return causal_main(argv)


if __name__ == "__main__":
    sys.exit(main())
