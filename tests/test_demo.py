"""`gptfast demo --quick` runs end to end on the CPU: trains, samples, benchmarks."""
import json

from gptfast import cli


def test_demo_quick_finishes_on_cpu(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--quick", "--device", "cpu", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "[1/3] training" in printed and "trained " in printed and "training loss" in printed
    assert "--- sample ---" in printed and "sampler:" in printed
    assert "| op | shape | provider | median ms |" in printed
    assert "sampler_step" in printed and "model forward" in printed and "generate" in printed
    # The trained model was exported in Hugging Face format, ready for `gptfast generate --model`.
    config = json.loads((out / "config.json").read_text())
    assert config["n_layer"] >= 1


def test_demo_sample_is_capped_to_the_model_context():
    # The full CPU plan asks for more tokens than the tiny model's context holds.
    import dataclasses

    import torch

    from gptfast import GPT, GPTConfig
    from gptfast.demo import generate_sample, plan_for
    from gptfast.tokenizer import ByteTokenizer

    plan = dataclasses.replace(plan_for(torch.device("cpu"), quick=True), sample_tokens=500)
    model = GPT(GPTConfig.from_preset("tiny", block_size=16))
    text = generate_sample(model, ByteTokenizer(), plan, prompt="def ")
    assert "--- sample ---" in text
