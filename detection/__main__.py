"""`python -m detection -c RECIPE [key=value ...]`: COCO Mask R-CNN with a ViTDet backbone (see detection/configs/)."""

from pathlib import Path

from core.config import cli
from detection.train import run

if __name__ == "__main__":
    run(cli("detection", Path(__file__).parent / "configs"))
