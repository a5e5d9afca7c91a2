"""`python -m segmentation -c RECIPE [key=value ...]`: ADE20K UperNet segmentation (see segmentation/configs/)."""

from pathlib import Path

from core.config import cli
from segmentation.train import run

if __name__ == "__main__":
    run(cli("segmentation", Path(__file__).parent / "configs"))
