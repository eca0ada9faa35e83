"""Configs validate themselves; presets and overrides fail early with a suggestion."""

import pytest

from cvtcl.config import TrainConfig, apply_overrides, describe
from cvtcl.presets import PRESETS, get_preset


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_build_and_round_trip(name):
    config = get_preset(name)
    assert TrainConfig.from_dict(config.to_dict()) == config


def test_stage1_presets_carry_paper_hyperparameters():
    config = get_preset("ucf101-stage1-flow")
    assert (config.optim.lr, config.optim.weight_decay, config.optim.epochs) == (1e-3, 1e-4, 300)
    assert config.optim.lr_milestones == (250, 280) and config.optim.lr_gamma == 0.1
    assert (config.data.frames_per_clip, config.data.crop_size) == (32, 128)
    assert (config.loss.queue_size, config.loss.tau, config.loss.momentum) == (2048, 0.07, 0.999)
    assert config.stage.modality == "flow" and config.model.backbone == "s3d"
    paper = get_preset("paper-8x-titanxp")
    assert paper.run.expect_world_size == 8 and paper.optim.amp == "fp32"
    assert paper.loss.queue_size % (paper.data.batch_size * 8) == 0


def test_k400_presets_take_coclr_k400_settings_and_paper_elsewhere():
    rgb, flow, whole = (get_preset(n) for n in ("k400-stage1-rgb", "k400-stage1-flow", "k400-cvtcl"))
    ucf = get_preset("ucf101-stage1-rgb")
    assert rgb.data.root == whole.data.root == "data/kinetics400" and rgb.data.split == "1"
    assert rgb.loss.queue_size == flow.loss.queue_size == whole.loss.queue_size == 16384
    assert (rgb.stage.modality, flow.stage.modality) == ("rgb", "flow")
    assert (rgb.optim, rgb.loss.tau, rgb.data.batch_size) == (ucf.optim, ucf.loss.tau, ucf.data.batch_size)
    assert (whole.schedule.cycles, whole.schedule.cotrain_epochs, whole.schedule.cotrain_lr_milestones) == (2, 50, (40,))
    assert len({rgb.run.out_dir, flow.run.out_dir, whole.run.out_dir}) == 3


def test_overrides_are_typed():
    config = apply_overrides(get_preset("smoke"), [
        "optim.lr=5e-4", "data.batch_size=8", "model.channels_last_3d=true", "optim.lr_milestones=3,5",
        "stage.modality=flow",
    ])
    assert config.optim.lr == 5e-4 and config.data.batch_size == 8 and config.model.channels_last_3d is True
    assert config.optim.lr_milestones == (3, 5) and config.stage.modality == "flow"


def test_unknown_key_suggests_the_closest():
    with pytest.raises(KeyError, match="did you mean 'loss.tau'"):
        apply_overrides(get_preset("smoke"), ["loss.tua=0.1"])
    with pytest.raises(KeyError, match="did you mean 'optim.lr'"):
        apply_overrides(get_preset("smoke"), ["optim.lrr=0.1"])


def test_bad_preset_suggests_the_closest():
    with pytest.raises(KeyError, match="did you mean 'ucf101-stage1-rgb'"):
        get_preset("ucf101-stage1-rbg")


@pytest.mark.parametrize("override,message", [
    ("data.frames_per_clip=30", "divisible by data.num_segments"),
    ("data.pair_mode=independent", "set data.pair_mode=same"),
    ("optim.amp=fp8", "choose one of auto, bf16, fp16, fp32"),
    ("data.backend=pytorch", "choose one of dali, baseline"),
    ("data.augment=strong", "choose one of standard, weak, coclr"),
    ("model.backbone=s3d", "needs >= 5 frames and >= 32 pixels per input; got 2-frame segments"),
    ("loss.bn_groups=1", "at least 2"),
    ("loss.momentum=1.0", r"loss.momentum=1.0 must be in \[0, 1\)"),  # a key encoder that never follows
    ("optim.lr_milestones=280,250", r"optim.lr_milestones=\[280, 250\] must be strictly increasing epochs >= 1"),
    # a repeated milestone applied gamma twice; 0 or less lowered the lr from the first epoch
    ("optim.lr_milestones=3,3", r"optim.lr_milestones=\[3, 3\] must be strictly increasing"),
    ("schedule.cotrain_lr_milestones=-1",
     r"schedule.cotrain_lr_milestones=\[-1\] must be strictly increasing epochs >= 1"),
    ("stage.kind=cotrain", "set stage.sampler_checkpoint"),
    ("data.batch_size=two", "cannot read 'two' as int"),
    ("model.channels_last_3d=maybe", "expected true or false"),
    ("optim.lr", "not key=value"),
    ("optim.lr=nan", "optim.lr=nan must be a finite number > 0"),
    ("loss.tau=inf", "loss.tau=inf must be a finite number > 0"),
    ("loss.tau=1e-20", "loss.tau=1e-20 is below 0.001"),
    ("optim.weight_decay=inf", "optim.weight_decay=inf must be a finite number >= 0"),
    ("optim.grad_clip=nan", "optim.grad_clip=nan must be a finite number >= 0"),
    ("optim.lr_gamma=-1", "optim.lr_gamma=-1.0 must be a finite number > 0"),
    ("data.crop_scale_min=0", r"data.crop_scale_min=0.0 must be in \(0, 1\]"),
    ("run.seed=-1", r"run.seed=-1 must be in 0 .. 2\*\*63 - 1"),
    ("run.device=cpu:abc", "run.device='cpu:abc': choose auto, cpu, cuda or cuda:N"),
])
def test_invalid_values_are_refused(override, message):
    with pytest.raises((ValueError, KeyError), match=message):
        apply_overrides(get_preset("smoke"), [override])


def test_a_config_without_any_loss_is_refused():
    assert apply_overrides(get_preset("smoke"), ["loss.instance_weight=0"]).loss.ltcl_weight > 0  # an ablation
    with pytest.raises(ValueError, match="leave no loss to train on"):
        apply_overrides(get_preset("smoke"), ["loss.instance_weight=0", "loss.ltcl_weight=0"])


def test_describe_lists_every_key_with_a_reason():
    text = describe()
    assert "loss.queue_size = 2048  # K negatives" in text
    assert all("#  " not in line and line.split("# ")[1] for line in text.splitlines())
