"""`python -m pretrain -c RECIPE [key=value ...]`: dBOT pretraining (see pretrain/configs/)."""

from pathlib import Path

from core.config import cli
from pretrain.train import run

if __name__ == "__main__":
    run(cli("pretrain", Path(__file__).parent / "configs"))
