"""TrainConfig value checks: every field's type from its annotation, ranges, loss and augmentation
options; through --set (apply_sets), JSON config files and the constructor, each a one-line InputError
naming the key."""

import json
import re

import pytest

from cerebrum_jax.errors import InputError
from cerebrum_jax.experiment.config import LoopConfig, TrainConfig, apply_sets, load_config

BAD = [
    # (key, value as parsed JSON, message)
    ("patience", "abc", "patience: must be an integer, got 'abc'"),
    ("patience", 2.5, "patience: must be an integer"),
    ("patience", -1, "patience: must be >= 0"),
    ("epochs_warmup", True, "epochs_warmup: must be an integer, got True"),
    ("batch_size", 0, "batch_size: must be >= 1"),
    ("seed", 1.5, "seed: must be an integer, got 1.5"),
    ("seed", -1, "seed: must be in 0..4294967295, got -1"),
    ("seed", False, "seed: must be an integer"),
    ("seed", 2**32, "seed: must be in 0..4294967295"),
    ("fold", 0, "fold: must be >= 1"),
    ("margin", "4", "margin: must be an integer"),
    ("last_layer", "abc", "last_layer: must be an integer"),
    ("last_layer", 15, "last_layer: must be in 1..14"),
    ("grid", 5, "grid: must be a list of 3 integers or null"),
    ("grid", [8, 8], "grid: must be a list of 3 integers"),
    ("grid", [8, 8, 8.5], "grid: must be a list of 3 integers"),
    ("grid", [8, 8, 12], "grid: must be 3 positive multiples of 8"),
    ("lr_warmup", "x", "lr_warmup: must be a finite number, got 'x'"),
    ("lr_finetune", True, "lr_finetune: must be a finite number"),
    ("lr_finetune", float("nan"), "lr_finetune: must be a finite number"),
    ("min_lr", -1e-7, "min_lr: must be >= 0"),
    ("plateau_factor", 0, "plateau_factor: must be in (0, 1]"),
    ("lr_schedule", "linear", "lr_schedule: must be one of ['plateau', 'cosine'], not 'linear'"),
    ("lr_hold", 1, "lr_hold: must be in [0, 1), got 1"),
    ("lr_hold", -0.1, "lr_hold: must be in [0, 1), got -0.1"),
    ("voxel_mm", "0.7", "voxel_mm: must be a finite number or null"),
    ("voxel_mm", 0, "voxel_mm: must be > 0"),
    ("dropout", 1, "dropout: must be a boolean"),
    ("remat", "yes", "remat: must be a boolean"),
    ("data", ["a"], "data: must be a string or null"),
    ("layout", None, "layout: must be a string"),
    ("seg_name", "", "seg_name: must not be empty"),
    ("mask_name", 3, "mask_name: must be a string or null"),
    ("drop_labels", [True], "drop_labels: must be a list of strings"),
    ("merge_labels", {"a": 1}, "merge_labels: must be a list of strings"),
    ("loss", "focal", "unknown loss 'focal'"),
    ("class_weights", "inverse", "unknown class_weights 'inverse'"),
    ("precision", "fp8", "precision: must be one of"),
    ("normalization", "global", "normalization: must be one of ['auto', 'zscore', 'voxelwise']"),
    ("augment", 3, "augment: must be a mapping"),
    ("augment", {"p_bias": "x"}, "augment.p_bias: must be a finite number"),
    ("augment", {"p_bias": 2}, "p_bias must be in [0, 1]"),
    ("augment", {"max_shift_vox": [1, 2]}, "augment.max_shift_vox: must be a list of 3"),
    ("augment", {"no_such": 1}, "unknown augmentation option(s) ['no_such']"),
    ("augment", {"flip_axes": [0, 3]}, "flip_axes must be distinct axes 0, 1, 2"),
    ("augment_mirror", "left", "augment_mirror: must be one of ['none', 'lr', 'all'], not 'left'"),
    ("tta", "0,1", "tta: must be one of ['none', 'lr', 'all'], not '0,1'"),
]


# --set gives a string field the text typed when it is no string in JSON (--set val_subject=123 is
# "123"): these rows are errors only in JSON files and Python configs
TEXT_ON_SET = {"data", "layout", "mask_name"}


@pytest.mark.parametrize("key,value,message", BAD)
def test_bad_values_name_the_key(tmp_path, key, value, message):
    if key not in TEXT_ON_SET:
        with pytest.raises(InputError) as e:
            apply_sets(TrainConfig(), [f"{key}={json.dumps(value)}"])
        assert str(e.value).startswith("--set: ") and message in str(e.value)
        assert "\n" not in str(e.value)
    path = tmp_path / "c.json"
    path.write_text(json.dumps({key: value}, allow_nan=True))
    with pytest.raises(InputError, match=re.escape(message)) as e:
        load_config(path)
    assert str(e.value).startswith(str(path))
    with pytest.raises(InputError, match=re.escape(message)):
        TrainConfig(**{key: value})


GOOD = [
    # (key, --set text, stored value)
    ("lr_warmup", "1", 1.0),
    ("lr_finetune", "1e30", 1e30),
    ("voxel_mm", "1", 1.0),
    ("voxel_mm", "null", None),
    ("grid", "[8, 16, 24]", (8, 16, 24)),
    ("grid", "null", None),
    ("drop_labels", "7", ("7",)),
    ("drop_labels", "6,7", ("6,7",)),
    ("drop_labels", '[6, "7"]', ("6", "7")),
    ("merge_labels", "3,4=fluid", ("3,4=fluid",)),
    ("dropout", "false", False),
    ("prob_class", "1", "1"),  # a string field keeps the text of a number
    ("val_subject", "123", "123"),
    ("seg_name", "aseg", "aseg"),
    ("mask_name", "brainmask", "brainmask"),
    ("mask_name", "3", "3"),
    ("normalization", "voxelwise", "voxelwise"),
    ("data", '["a"]', '["a"]'),
    (
        "augment",
        '{"max_shift_vox": [1, 2, 3], "p_bias": 0}',
        {"max_shift_vox": (1.0, 2.0, 3.0), "p_bias": 0.0},
    ),
]


@pytest.mark.parametrize("key,text,stored", GOOD)
def test_good_values_are_converted(key, text, stored):
    cfg = apply_sets(TrainConfig(), [f"{key}={text}"])
    value = getattr(cfg, key)
    assert value == stored and type(value) is type(stored)
    if isinstance(stored, dict):
        assert all(type(value[k]) is type(v) for k, v in stored.items())


def test_defaults_and_shipped_experiments_pass_their_own_checks():
    cfg = TrainConfig()
    assert cfg.seg_name == "dseg" and cfg.mask_name is None
    assert cfg.normalization == "auto"
    for name in ("demo", "schneider19"):
        loaded = load_config(name)
        assert TrainConfig(**loaded.to_dict()) == loaded  # the resolved dict (config.json) loads back


def test_typed_sections_each_part_gets_one():
    from cerebrum_jax.model.network import ModelConfig
    from cerebrum_jax.train.augment import AugmentConfig
    from cerebrum_jax.train.losses import LossConfig

    cfg = load_config("demo").override(augment={"p_bias": 0.0}, slab_rows=None)
    assert cfg.loss_config == LossConfig("ce+dice", "none")
    assert cfg.augment_config == AugmentConfig(p_bias=0.0)  # override replaces the whole mapping
    assert cfg.loss_config is cfg.loss_config  # built once, with the config
    assert cfg.loop == LoopConfig(
        batch_size=1, augment_views=4, patience=10, min_lr=1e-7, lr_schedule="cosine", lr_hold=0.75
    )
    assert cfg.phase("warmup") == (1e-3, 3) and cfg.phase("finetune").epochs == 60
    init = cfg.init_config
    assert (
        init.dropout_rate == ModelConfig.dropout_rate
        and cfg.override(dropout=False).init_config.dropout_rate == 0
    )
    assert (init.weights, init.n_filters, init.last_layer) == (cfg.weights, cfg.n_filters, cfg.last_layer)
    assert cfg.override(fold=3, grid=(16, 24, 16)).data_config.fold == 3
    assert cfg.override(mesh="1x4").runtime_config.mesh == "1x4" and cfg.runtime_config.slab_rows is None
    assert cfg.override(prob_class="wm").output_config.prob_class == "wm"
    assert TrainConfig().loop == LoopConfig()  # one set of defaults: the loop's are the config's
    assert "_loss" not in cfg.to_dict() and "loss_config" not in cfg.to_dict()  # config.json: the flat keys


def test_one_home_for_the_vocabularies():
    from cerebrum_jax import choices
    from cerebrum_jax.data import inputs
    from cerebrum_jax.experiment import config, normalization
    from cerebrum_jax.model import checkpoint
    from cerebrum_jax.parallel import sharding

    assert config.PRECISIONS is sharding.PRECISIONS is choices.PRECISIONS
    assert inputs.NORMALIZATIONS is checkpoint.NORMALIZATIONS is choices.NORMALIZATIONS
    assert normalization.FOLD_NORMALIZATIONS is choices.FOLD_NORMALIZATIONS
    assert config.NORMALIZATIONS == ("auto", *choices.FOLD_NORMALIZATIONS)


def test_every_key_belongs_to_one_section():
    """The flat keys (the file format) and the typed sections stay one set: a new key must be given a
    section, or no part of a fold would be handed it."""
    import dataclasses

    from cerebrum_jax.experiment import runguard
    from cerebrum_jax.experiment.config import DataConfig, InitConfig, OutputConfig, RuntimeConfig

    names = lambda cls: {f.name for f in dataclasses.fields(cls)}  # noqa: E731
    sections = {
        "data": names(DataConfig),
        "init": names(InitConfig),
        "loss": {"loss", "class_weights", "skeleton_classes", "skeleton_weight"},
        "augment": {"augment", "augment_voxel_mm", "augment_mirror"},
        "phases": {f"{k}_{p}" for k in ("lr", "epochs") for p in ("warmup", "finetune")},
        "loop": names(LoopConfig) - {"slab_rows"},  # slab_rows: runtime's, resolved into the loop's
        "runtime": names(RuntimeConfig),
        "output": names(OutputConfig),
    }
    owners = {}
    for section, keys in sections.items():
        for key in keys:
            owners.setdefault(key, []).append(section)
    assert {k: v for k, v in owners.items() if len(v) > 1} == {}
    assert set(owners) == names(TrainConfig)
    assert runguard.PERFORMANCE_KEYS == tuple(f.name for f in dataclasses.fields(RuntimeConfig))


def test_recipes_keep_schneider19_the_papers_and_add_the_few_label_parts():
    paper, recipe, synth = (load_config(n) for n in ("schneider19", "fewlabel", "fewlabel_synth"))
    assert paper.skeleton_classes == () and paper.augment_voxel_mm is None and not paper.augment_config.synth
    assert (paper.class_weights, paper.loss) == ("balanced", "dice")
    assert (paper.augment_mirror, paper.tta) == ("none", "none")  # the original had no mirroring
    assert (recipe.class_weights, recipe.skeleton_classes, recipe.augment_voxel_mm) == ("thin", (), None)
    assert (recipe.augment_mirror, recipe.tta) == ("lr", "lr") == (synth.augment_mirror, synth.tta)
    assert (
        not recipe.augment_config.synth and synth.augment_config.synth and synth.augment_config.p_synth == 0.5
    )
    assert synth.augment_voxel_mm == 0.63 and synth.class_weights == recipe.class_weights
    same = ("grid", "augment_views", "epochs_finetune", "batch_size")  # the step budget: no more steps
    assert all(getattr(recipe, k) == getattr(paper, k) == getattr(synth, k) for k in same)
    assert recipe.epochs_warmup == synth.epochs_warmup <= paper.epochs_warmup
