"""`python -m detection -c RECIPE [key=value ...] [--print-config] [--debug]`:
COCO Mask R-CNN with a ViTDet backbone (see detection/configs/).

A configuration, data or checkpoint error prints one line `error: <message>` and exits with status 2
(`--debug` or DBOT_DEBUG=1: with its traceback); any other exception is a bug and shows its traceback.
"""

import sys
from pathlib import Path

from core.config import cli
from core.errors import main
from detection.schema import DetectionConfig
from detection.train import run

if __name__ == "__main__":
    sys.exit(main(lambda: run(cli("detection", Path(__file__).parent / "configs", schema=DetectionConfig))))
