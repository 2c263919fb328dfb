"""LoRA extraction from a GPT-2 (transformers' Conv1D layers, weights stored [in, out]; embeddings named wte/wpe)
against PEFT: the adapter is fan_in_fan_out, found from config.json, and at full rank PEFT's merge_and_unload of it
reproduces the fine-tuned model, a module whose bias changed included (saved whole)."""

import json

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")

from pysoup.lora import extract_lora, open_adapter  # noqa: E402


def _gpt2(path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=40, n_positions=16)).save_pretrained(path)
    return path


def test_gpt2_extracts_a_fan_in_fan_out_adapter_that_reproduces_the_finetuned_model(tmp_path):
    import shutil

    from peft import PeftModel
    from safetensors.torch import load_file, save_file
    from transformers import GPT2LMHeadModel

    base = _gpt2(tmp_path / "base")
    sd = load_file(str(base / "model.safetensors"))
    g = torch.Generator().manual_seed(3)
    # every weight moves; one Conv1D bias too (its module cannot be a LoRA module then)
    bias = "transformer.h.1.mlp.c_fc.bias"
    ft = {k: v + 0.05 * torch.randn(v.shape, generator=g) if k.endswith(".weight") or k == bias else v
          for k, v in sd.items()}  # fmt: skip
    (tmp_path / "ft").mkdir()
    save_file(ft, str(tmp_path / "ft" / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(base / "config.json", tmp_path / "ft")

    report = extract_lora(str(tmp_path / "ft"), str(base), tmp_path / "ad", rank=40)
    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True
    assert "transformer.h.1.mlp.c_fc" in report.modules_to_save
    assert "transformer.h.1.mlp.c_fc" not in report.ranks
    assert min(report.retained_energy.values()) > 1 - 1e-9
    with open_adapter(tmp_path / "ad") as ad:
        assert ad.modules["transformer.wte"].kind == "embedding"
        c_attn = ad.modules["transformer.h.0.attn.c_attn"]
        assert (c_attn.rank, c_attn.features, c_attn.transposed) == (32, (96, 32), True)

    model = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(base), str(tmp_path / "ad"))
    merged = model.merge_and_unload().state_dict()
    for k, v in ft.items():
        torch.testing.assert_close(merged[k], v, atol=2e-5, rtol=1e-5, msg=k)
