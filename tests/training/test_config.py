import pytest

from anystory.training import ConfigError, load_config
from conftest import CONFIGS


@pytest.mark.parametrize("name", ["tiny_stage1", "tiny_stage2", "sdxl_stage1", "sdxl_stage2"])
def test_shipped_configs_load(name):
    config = load_config(CONFIGS / f"{name}.yaml")
    assert config.train.learning_rate == 1e-4


def test_sdxl_configs_use_the_papers_batch():
    for stage in (1, 2):
        assert load_config(CONFIGS / f"sdxl_stage{stage}.yaml").train.total_batch_size == 64


def test_overrides_parse_values_as_yaml():
    config = load_config(CONFIGS / "tiny_stage1.yaml", ["train.max_steps=7", "data.scale_range=[0.5, 2]", "model.adapter=null"])
    assert config.train.max_steps == 7
    assert config.data.scale_range == (0.5, 2.0)
    assert config.model.adapter is None


def test_a_mapping_override_merges_into_the_mapping_it_names():
    config = load_config(CONFIGS / "tiny_stage1.yaml",
                         ["model.adapter_kwargs={max_subjects: 4, qformer_depth: 2}", "model.adapter_kwargs={reference_query: true}"])
    assert config.model.adapter_kwargs == {"max_subjects": 4, "qformer_depth": 2, "reference_query": True}


@pytest.mark.parametrize(
    "override, message",
    [("train.max_step=3", "unknown key"), ("nosection.x=1", "unknown config section"), ("train.max_steps", "section.key=value"),
     ("train.learning_rate=fast", "must be a number"), ("train.mixed_precision=fp8", "must be one of")],
)
def test_bad_overrides_are_named(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(CONFIGS / "tiny_stage1.yaml", [override])


def test_mixed_precision_no_survives_yaml_reading_it_as_false():
    # YAML 1.1 reads a bare `no` as False; accelerate then fails with "Unknown mode: False".
    assert load_config(CONFIGS / "tiny_stage1.yaml", ["train.mixed_precision=no"]).train.mixed_precision == "no"
