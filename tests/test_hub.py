"""The model card: rendered with a run's values, every field filled, metadata readable by huggingface_hub."""

import re

from huggingface_hub import ModelCard

from conftest import tki_config
from tki_trainer.hub import render_model_card


def test_model_card_renders_real_values_and_parses():
    config = tki_config(base_model_name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct", encoder_name="sentence-transformers/all-MiniLM-L6-v2")
    text = render_model_card(config, repo_id="user/tki-smol", training_data="192 P3 rows.", evaluation="| all | 30.1 |")
    assert not re.search(r"\{[a-z_]+\}", text)
    card = ModelCard(text)
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert {"peft", "trl", "tki"} <= set(card.data.tags) and card.data.library_name == "peft"
    assert "3 x 4 = 12" in text and "user/tki-smol" in text and "| all | 30.1 |" in text
