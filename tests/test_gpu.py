"""On one CUDA GPU, in bf16: TKI training steps under every switch combination, KR stage 1, routed generation and
the export to plain LoRA. Skipped where no GPU is visible."""

import pytest
import torch
from peft import PeftModel

from conftest import KEY_DIM, tiny_llama, tiny_tokenizer, tki_config, trained_like
from test_trainer import common, rows
from tki_trainer import TKIConfig, TKITrainer, compute_prior_inputs, export_lora, route
from tki_trainer.reinstatement import PriorInputConfig


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def gpu_args(tmp_path, name, **overrides):
    values = {**common(tmp_path, name), "use_cpu": False, "bf16": True, **overrides}
    return TKIConfig(**values)


@pytest.mark.parametrize(
    "lta,kr,pcgrad", [(True, True, True), (True, False, False), (True, True, False), (False, True, True)]
)
def test_bf16_training_steps_on_one_gpu(tmp_path, lta, kr, pcgrad):
    from peft import LoraConfig

    peft_config = (
        tki_config() if lta else LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    )
    trainer = TKITrainer(tiny_llama(), args=gpu_args(tmp_path, "run", lta=lta, kr=kr, pcgrad=pcgrad,
                         prior_inputs_steps=2, prior_inputs_learning_rate=1e-2),
                         train_dataset=rows(), processing_class=tiny_tokenizer(), peft_config=peft_config)  # fmt: skip
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    assert next(trainer.model.parameters()).is_cuda
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    assert any(not torch.equal(before[n], p.detach()) for n, p in trainer.model.named_parameters() if n in before)


def test_stage1_on_one_gpu_matches_the_cpu(tmp_path):
    config = PriorInputConfig(steps=2, learning_rate=1e-2)
    cpu = compute_prior_inputs(tiny_llama(), tiny_tokenizer(), rows(), tmp_path / "cpu", config=config)
    gpu = compute_prior_inputs(tiny_llama().cuda(), tiny_tokenizer(), rows(), tmp_path / "gpu", config=config)
    for example in cpu.examples:
        torch.testing.assert_close(gpu.load_delta(example), cpu.load_delta(example), atol=2e-3, rtol=2e-2)


def test_routed_generation_and_export_on_one_gpu(tmp_path):
    from peft import get_peft_model

    model = trained_like(get_peft_model(tiny_llama(), tki_config())).cuda().to(torch.bfloat16).eval()
    queries = torch.randn(2, KEY_DIM, generator=torch.Generator().manual_seed(0)).cuda()
    ids = torch.tensor([[1, 5, 7, 9], [1, 8, 3, 4]]).cuda()
    with route(model, queries):
        routed = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, num_beams=2)
    assert routed.shape[0] == 2 and routed.is_cuda
    export_lora(model, queries[0], tmp_path / "plain")
    plain = PeftModel.from_pretrained(tiny_llama().cuda().to(torch.bfloat16), str(tmp_path / "plain")).eval()
    with torch.no_grad(), route(model, queries[:1]):
        expected = model(input_ids=ids[:1]).logits
    actual = plain(input_ids=ids[:1]).logits
    torch.testing.assert_close(actual.float(), expected.float(), atol=5e-2, rtol=5e-2)
