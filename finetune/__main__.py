"""`python -m finetune -c RECIPE [key=value ...]`: fine-tuning, linear probe, transfer (see finetune/configs/)."""

from pathlib import Path

from core.config import cli
from finetune.train import run

if __name__ == "__main__":
    run(cli("finetune", Path(__file__).parent / "configs"))
