"""The interface every pretraining target implements lives with the method, in `pretrain/dbot.py`
(`Target`, the per-token `normalize`, the `token_loss` behind `dbot.distill_loss`); re-exported here for
the targets of this package."""

from pretrain.dbot import Target, normalize, token_loss

__all__ = ["Target", "normalize", "token_loss"]
