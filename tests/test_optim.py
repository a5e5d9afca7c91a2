"""The named weight-decay rules of core.optim, each against its codebase's rule written out."""

import torch

from core.optim import detectron2_no_decay, mae_finetune_groups, mae_pretrain_groups, mmseg_groups
from pretrain.model import MaskedStudent


def no_decay(groups) -> set[str]:
    return {n for g in groups if g["weight_decay"] == 0 for n in g["names"]}


def test_mae_pretraining_exempts_1d_and_biases_only():
    student = MaskedStudent(target_dim=8, decoder_dim=16, decoder_depth=1, decoder_heads=2, img_size=32, patch_size=4,
                            embed_dim=32, depth=2, num_heads=2)  # fmt: skip
    groups = mae_pretrain_groups(student, 0.05)
    # timm's add_weight_decay as main_pretrain.py calls it (no skip list): len(shape) == 1 or name ends in .bias
    expect = {n for n, p in student.named_parameters() if p.requires_grad and (p.ndim == 1 or n.endswith(".bias"))}
    assert no_decay(groups) == expect
    assert "cls_token" not in expect and "mask_token" not in expect  # MAE decays its tokens while pretraining
    assert all(g["lr_scale"] == 1.0 for g in groups)
    assert "pos_embed" not in {n for g in groups for n in g["names"]}  # the fixed sin-cos table is not trained


def test_finetuning_rule_and_the_transfer_scripts_decay_everything():
    from core.vit import build_vit

    vit = build_vit("tiny", num_classes=3, global_pool="avg")
    expect = {n for n, p in vit.named_parameters() if p.ndim == 1} | {"cls_token", "pos_embed"}
    assert no_decay(mae_finetune_groups(vit, 0.05, 0.75)) == expect
    assert no_decay(mae_finetune_groups(vit, 0.05, exempt=False)) == set()


def test_mmseg_rule_is_the_authors_constructor_written_out(tiny_segmentor):
    model = tiny_segmentor
    # mmcv_custom/layer_decay_optimizer_constructor.py over model.named_parameters() (names with "backbone.")
    expect = {
        n
        for n, p in model.named_parameters()
        if len(p.shape) == 1 or n.endswith(".bias") or n in ("pos_embed", "cls_token")
    }
    assert no_decay(mmseg_groups(model, 0.05, 0.65)) == expect
    assert "backbone.pos_embed" not in expect and "backbone.cls_token" not in expect


def test_detectron2_exemption_is_by_torch_norm_class_and_own_name():
    from timm.layers import LayerNorm2d

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.ln = torch.nn.LayerNorm(4)  # a torch norm class: exempt
            self.gn = torch.nn.GroupNorm(2, 4)
            self.ln2d = LayerNorm2d(4)  # stands in for detectron2's own layers.LayerNorm: decayed
            self.fc = torch.nn.Linear(4, 4)
            self.pos_embed = torch.nn.Parameter(torch.zeros(1, 2, 4))
            self.sub = torch.nn.Module()
            self.sub.pos_embed = torch.nn.Parameter(torch.zeros(3))
            self.decoder_pos_embed = torch.nn.Parameter(torch.zeros(1, 2, 4))  # not named pos_embed: decayed

    names = detectron2_no_decay(Net())
    assert names == {"ln.weight", "ln.bias", "gn.weight", "gn.bias", "pos_embed", "sub.pos_embed"}
    assert detectron2_no_decay(Net(), norms=False, names=()) == set()
