"""`python -m segmentation -c RECIPE [key=value ...] [--print-config] [--debug]`:
ADE20K UperNet segmentation (see segmentation/configs/).

A configuration, data or checkpoint error prints one line `error: <message>` and exits with status 2
(`--debug` or DBOT_DEBUG=1: with its traceback); any other exception is a bug and shows its traceback.
"""

import sys
from pathlib import Path

from core.config import cli
from core.errors import main
from segmentation.schema import SegmentationConfig
from segmentation.train import run

if __name__ == "__main__":
    sys.exit(main(lambda: run(cli("segmentation", Path(__file__).parent / "configs", schema=SegmentationConfig))))
