import pytest

from nanochat.config import (
    MIDTRAIN_PRESETS,
    PRESETS,
    SFT_PRESETS,
    TOKENIZER_PRESETS,
    ConfigError,
    ModelConfig,
    OptimConfig,
    TrainConfig,
    parse_config,
)


def parse(*argv):
    return parse_config(TrainConfig, list(argv), presets=PRESETS, prog="nanochat test")


def test_defaults_without_preset():
    assert parse() == TrainConfig()


def test_preset_then_overrides_top_level_and_nested():
    cfg = parse("--preset", "tiny", "--depth", "6", "--optim.matrix-lr", "0.05", "--micro-batch", "4")
    assert cfg.model.depth == 6
    assert cfg.model.sequence_len == PRESETS["tiny"].model.sequence_len  # rest of the preset kept
    assert cfg.optim.matrix_lr == 0.05
    assert cfg.micro_batch == 4
    assert cfg.tokenizer == "tiny"


def test_presets_are_not_mutated_by_parsing():
    before = PRESETS["tiny"].model.depth
    parse("--preset", "tiny", "--depth", str(before + 3))
    assert PRESETS["tiny"].model.depth == before


def test_underscore_spelling_and_literal_choices():
    cfg = parse("--micro_batch", "3", "--mlp", "relu2", "--optim.optimizer", "adamw")
    assert (cfg.micro_batch, cfg.model.mlp, cfg.optim.optimizer) == (3, "relu2", "adamw")


def test_depth_drives_width_and_heads():
    m = ModelConfig(depth=20)
    assert (m.n_embd, m.n_head) == (1280, 10)
    m = ModelConfig(depth=4, aspect_ratio=32, head_dim=32)
    assert (m.n_embd, m.n_head) == (128, 4)


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--bogus-key", "1"], "--bogus-key"),
        (["--depth", "twelve"], "--depth"),
        (["--micro-batch", "-8"], "--micro-batch"),
        (["--optim.warmdown-frac", "1.5"], "--warmdown-frac"),
        (["--mlp", "gelu"], "--mlp"),
        (["--preset", "huge"], "--preset"),
        (["--n-kv-head", "3"], "--n-kv-head"),
    ],
)
def test_bad_values_are_refused_naming_the_field(argv, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        parse(*argv)
    assert exc.value.code == 2
    assert needle in capsys.readouterr().err


def test_validation_applies_to_python_construction_too():
    with pytest.raises(ConfigError, match="--total-batch-tokens"):
        TrainConfig(total_batch_tokens=0)
    with pytest.raises(ConfigError, match="--matrix-lr"):
        OptimConfig(matrix_lr=-1.0)


def test_every_training_preset_has_tokenizer_and_chat_presets():
    assert set(TOKENIZER_PRESETS) == set(PRESETS) == set(MIDTRAIN_PRESETS) == set(SFT_PRESETS)
    for name, preset in PRESETS.items():
        assert TOKENIZER_PRESETS[name].name == preset.tokenizer


def test_a_saved_shape_that_predates_a_field_gets_the_value_it_had_then():
    import dataclasses

    from nanochat.config import MODEL_FIELDS_ADDED

    saved = {k: v for k, v in dataclasses.asdict(ModelConfig()).items() if k not in MODEL_FIELDS_ADDED}
    old = ModelConfig.from_saved(saved)
    assert all(getattr(old, k) == v for k, v in MODEL_FIELDS_ADDED.items())
    assert ModelConfig.from_saved({**saved, "value_embeddings": True}).value_embeddings is True
