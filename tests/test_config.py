"""`TKIConfig`: every field TKI adds is documented, and stage-1 settings are refused at construction."""

import dataclasses

import pytest
from trl import SFTConfig

from tki_trainer import TKIConfig


def test_every_field_tki_adds_is_documented_in_the_parameters_docstring():
    added = {f.name for f in dataclasses.fields(TKIConfig)} - {f.name for f in dataclasses.fields(SFTConfig)}
    documented = {name for name in added if f"\n        {name} (`" in TKIConfig.__doc__}
    assert added and added - documented == set()
    assert "\n        hub_strategy (`" in TKIConfig.__doc__


@pytest.mark.parametrize(
    "setting,message",
    [({"prior_inputs_steps": 0}, "at least 1"), ({"prior_inputs_wasserstein": "cosine"}, "'emd'")],
)
def test_stage_1_settings_are_refused_at_construction(tmp_path, setting, message):
    with pytest.raises(ValueError, match=message):
        TKIConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", **setting)
