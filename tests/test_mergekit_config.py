"""mergekit 0.1.5 configs, read as mergekit reads them: tiny models written by transformers (Llama, GPT-2), the same
YAML file run by mergekit (in process, computing in fp32) and by `pysoup merge --config`, every tensor compared; the
output loaded with transformers and run forward; malformed configs one-line errors.

Linear, passthrough and slice stacking are bit-identical to mergekit (the same fp32 sum, rounded once). TIES and
task arithmetic agree within fp32 rounding: mergekit multiplies w * tau then divides by the weights' sum, pysoup's
fused kernel rounds the mix once and adds it with one fma.
"""

import json
import os
import re
import warnings

import pytest
import torch
import yaml
from helpers.cli import run_cli
from safetensors.torch import load_file

from pysoup.errors import PlanError
from pysoup.mergekit import ConfigWarning, load_config
from pysoup.mergekit.run import merge_config

mergekit = pytest.importorskip("mergekit.merge")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.mergekit

LAYERS = 4


def _save(model, path):
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A base and three fine-tunes (base + small noise) of a 4-layer Llama, fp32, untied LM head."""
    root = tmp_path_factory.mktemp("llama")
    cfg = transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(cfg)
    paths = [_save(base, root / "base")]
    for i in range(3):
        torch.manual_seed(i + 1)
        with torch.no_grad():
            for p in base.parameters():
                p.add_(0.02 * torch.randn_like(p))
        paths.append(_save(base, root / f"ft{i}"))
    return paths


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt2")
    cfg = transformers.GPT2Config(vocab_size=80, n_positions=32, n_embd=32, n_layer=3, n_head=4)
    paths = []
    for i in range(2):
        torch.manual_seed(10 + i)
        paths.append(_save(transformers.GPT2LMHeadModel(cfg), root / f"g{i}"))
    return paths


def write(tmp_path, cfg, name="soup.yaml"):
    p = tmp_path / name
    p.write_text(cfg if isinstance(cfg, str) else yaml.safe_dump(cfg))
    return str(p)


def run_mergekit(path, out):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    with open(path) as f:
        cfg = MergeConfiguration.model_validate(yaml.safe_load(f))
    run_merge(cfg, str(out), MergeOptions(copy_tokenizer=False, quiet=True, write_model_card=False))
    return _tensors(out)


def _tensors(out):
    got = {}
    for f in sorted(os.listdir(out)):
        if f.endswith(".safetensors"):
            got.update(load_file(os.path.join(out, f)))
    return got


def run_both(tmp_path, cfg, cli=False):
    """(mergekit's tensors, pysoup's tensors, the config path) for one config; pysoup in process, or through the CLI
    (a process of its own: ~1 s more)."""
    path = write(tmp_path, cfg)
    mk = run_mergekit(path, tmp_path / "mk")
    if cli:
        run_cli("merge", "--config", path, "-o", tmp_path / "ps", check=True)
    else:
        merge_config(path, tmp_path / "ps")
    ours = _tensors(tmp_path / "ps")
    assert set(ours) == set(mk), set(ours) ^ set(mk)
    return mk, ours, path


def assert_bitwise(mk, ours):
    for k in mk:
        assert mk[k].dtype == ours[k].dtype and torch.equal(mk[k], ours[k]), k


def assert_fp32_close(mk, ours):
    for k in mk:
        torch.testing.assert_close(ours[k], mk[k], rtol=2e-6, atol=2e-6, msg=lambda m, k=k: f"{k}: {m}")


def forward(out):
    """Loads the output with transformers (its config.json's dtype) and runs a forward pass."""
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out))
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 7, 2]])).logits
    assert torch.isfinite(logits.float()).all()
    return model


# -- items 1-4: precedence, filters, numbers ------------------------------------------------------------------------


def test_top_level_parameters_are_every_models_default(tmp_path, llama):
    """A model without its own weight takes the top-level one (mergekit's precedence), bit for bit."""
    _, a, b, c = llama
    cfg = {
        "merge_method": "linear",
        "dtype": "float32",
        "parameters": {"weight": 0.5},
        "models": [{"model": a, "parameters": {"weight": 0.2}}, {"model": b}, {"model": c}],
    }
    mk, ours, path = run_both(tmp_path, cfg, cli=True)
    assert [m["weight"] for m in load_config(path).model_params] == [0.2, 0.5, 0.5]
    assert_bitwise(mk, ours)


def test_filter_list_without_fallback_falls_through(tmp_path, llama):
    """density [{filter: mlp, value: 0.3}] on a model and density 0.7 at the top: non-mlp tensors get 0.7."""
    base, a, b, _ = llama
    cfg = {
        "merge_method": "ties",
        "base_model": base,
        "dtype": "float32",
        "parameters": {"density": 0.7, "weight": 0.5},
        "models": [{"model": a, "parameters": {"density": [{"filter": "mlp", "value": 0.3}]}}, {"model": b}],
    }
    mk, ours, path = run_both(tmp_path, cfg)
    spec = load_config(path)
    assert spec.model_params[0]["density"] == [{"filter": "mlp", "value": 0.3}, {"value": 0.7}]
    assert_fp32_close(mk, ours)


def test_scalar_filter_entry_and_numbers_written_as_strings(tmp_path, llama):
    """YAML 1.1 reads 2e-1 and 1e-0 as strings; a filter entry may stand alone. mergekit accepts both."""
    base, a, b, _ = llama
    text = f"""
merge_method: ties
base_model: {base}
dtype: float32
parameters:
  lambda: 8e-1
  density: {{filter: self_attn, value: 5e-1}}
models:
  - model: {a}
    parameters: {{weight: 2e-1}}
  - model: {b}
    parameters: {{weight: 1e-0, density: 0.9}}
"""
    mk, ours, path = run_both(tmp_path, text)
    spec = load_config(path)
    assert spec.params["lambda"] == 0.8 and [m["weight"] for m in spec.model_params] == [0.2, 1.0]
    assert spec.model_params[0]["density"] == [{"filter": "self_attn", "value": 0.5}, {"value": 1.0}]
    assert_fp32_close(mk, ours)


def test_slice_source_over_slice_over_top_level(tmp_path, llama):
    """slices: a source's weight beats the slice's, the slice's beats the top level's; t counts a slice's layers."""
    _, a, b, _ = llama
    cfg = {
        "merge_method": "linear",
        "dtype": "float32",
        "parameters": {"weight": 0.1, "normalize": False},
        "slices": [
            {
                "sources": [
                    {"model": a, "layer_range": [0, 2], "parameters": {"weight": [0.2, 0.9]}},
                    {"model": b, "layer_range": [0, 2]},
                ],
                "parameters": {"weight": 0.6},
            },
            {"sources": [{"model": a, "layer_range": [2, 4]}, {"model": b, "layer_range": [2, 4]}]},
        ],
    }
    mk, ours, _ = run_both(tmp_path, cfg)
    assert_bitwise(mk, ours)


def test_modules_one_module_with_its_own_parameters(tmp_path, llama):
    """`modules:` (Llama has one, "default"): the module's parameters sit between the slice's and the top level's."""
    _, a, b, _ = llama
    sources = [{"model": a, "layer_range": [0, 4]}, {"model": b, "layer_range": [0, 4], "parameters": {"weight": 0.2}}]
    cfg = {
        "merge_method": "linear",
        "dtype": "float32",
        "parameters": {"weight": 5.0, "normalize": True},
        "modules": {"default": {"slices": [{"sources": sources}], "parameters": {"weight": [0.4, 0.6]}}},
    }
    mk, ours, _ = run_both(tmp_path, cfg)
    assert_bitwise(mk, ours)


@pytest.fixture(scope="module")
def mistral3(tmp_path_factory):
    """Two tiny Mistral3 models (mergekit 0.1.5's architecture of three modules: text_decoder, vision_tower,
    multi_modal_projector), written by transformers: a 3-layer Mistral language model with its own LM head and a
    2-layer Pixtral vision tower."""
    root = tmp_path_factory.mktemp("mistral3")
    paths = []
    for i in range(2):
        torch.manual_seed(30 + i)
        text = transformers.MistralConfig(
            vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, tie_word_embeddings=False,
        )  # fmt: skip
        vision = transformers.PixtralVisionConfig(
            hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=16,
            patch_size=8, head_dim=8,
        )  # fmt: skip
        cfg = transformers.Mistral3Config(
            text_config=text, vision_config=vision, image_token_index=63, spatial_merge_size=1,
            tie_word_embeddings=False,
        )  # fmt: skip
        paths.append(_save(transformers.Mistral3ForConditionalGeneration(cfg), root / f"m{i}"))
    return paths


def test_modules_several_modules(tmp_path, mistral3):
    """`modules:` with two modules configured differently on a Mistral3 model: the language model a weighted
    `models:` merge with module parameters, the vision tower stacked from slices of both models (2 + 1 layers,
    renumbered from 0 within the module). Every tensor bit-identical to mergekit 0.1.5's, the same names (the
    projector, not listed, left out as mergekit leaves it out: a warning says so), and config.json's per-module
    layer counts as mergekit writes them."""
    a, b = mistral3
    cfg = {
        "merge_method": "linear",
        "dtype": "float32",
        "parameters": {"weight": 1.0},
        "modules": {
            "text_decoder": {
                "models": [{"model": a, "parameters": {"weight": 0.3}}, {"model": b}],
                "parameters": {"weight": 0.6},
            },
            "vision_tower": {
                "slices": [
                    {"sources": [{"model": a, "layer_range": [0, 2], "parameters": {"weight": 0.9}},
                                 {"model": b, "layer_range": [0, 2], "parameters": {"weight": 0.1}}]},
                    {"sources": [{"model": b, "layer_range": [1, 2]}, {"model": a, "layer_range": [1, 2]}],
                     "parameters": {"weight": [0.2, 0.8]}},
                ]
            },
        },
    }  # fmt: skip
    path = write(tmp_path, cfg)
    mk = run_mergekit(path, tmp_path / "mk")
    with pytest.warns(ConfigWarning, match="modules multi_modal_projector of Mistral3ForConditionalGeneration"):
        merge_config(path, tmp_path / "ps")
    ours = _tensors(tmp_path / "ps")
    assert set(ours) == set(mk), set(ours) ^ set(mk)
    assert_bitwise(mk, ours)
    names = set(ours)
    assert "language_model.lm_head.weight" in names and "vision_tower.transformer.layers.2.ffn_norm.weight" in names
    assert not any(n.startswith("multi_modal_projector.") for n in names)
    # The vision tower's third layer is layer 1 of both models; the slice's gradient [0.2, 0.8] at its one layer
    # (t = 1, as mergekit) weighs both 0.8: their mean. Its first two come from the first slice, 0.9 a + 0.1 b.
    sa, sb = (load_file(os.path.join(m, "model.safetensors")) for m in (a, b))
    name = "vision_tower.transformer.layers.1.attention.q_proj.weight"
    want = (0.8 * sb[name] + 0.8 * sa[name]) / 1.6
    torch.testing.assert_close(ours[name], 0.9 * sa[name] + 0.1 * sb[name])
    torch.testing.assert_close(ours["vision_tower.transformer.layers.2.attention.q_proj.weight"], want)
    with open(tmp_path / "mk" / "config.json") as f:
        mk_cfg = json.load(f)
    with open(tmp_path / "ps" / "config.json") as f:
        ps_cfg = json.load(f)
    for sub, layers in (("text_config", 3), ("vision_config", 3)):
        assert ps_cfg[sub]["num_hidden_layers"] == mk_cfg[sub]["num_hidden_layers"] == layers
    assert "num_hidden_layers" not in ps_cfg


@pytest.mark.parametrize(
    "family,module,message",
    [
        ("mistral3", "vision_encoder", r"modules\.vision_encoder: Mistral3ForConditionalGeneration .* has no module "
         r"'vision_encoder' \(its modules: multi_modal_projector, text_decoder, vision_tower\)"),
        ("llama", "text_decoder", r"has no module 'text_decoder' \(its modules: default\)"),
    ],
    ids=["mistral3", "llama"],
)  # fmt: skip
def test_modules_unknown_module_is_one_line_error(tmp_path, request, family, module, message):
    """A module name the architecture does not have: a one-line error listing the ones it has (mergekit 0.1.5: a
    KeyError from deep in its planner); nothing written."""
    models = request.getfixturevalue(family)
    cfg = {
        "merge_method": "linear",
        "modules": {module: {"models": [{"model": m, "parameters": {"weight": 1.0}} for m in models[:2]]}},
    }
    with pytest.raises(PlanError, match=message) as err:
        merge_config(write(tmp_path, cfg), tmp_path / "out")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()
    proc = run_cli("merge", "--config", write(tmp_path, cfg), "-o", tmp_path / "out")
    assert proc.returncode == 1 and proc.stderr.startswith("pysoup: error: ") and "has no module" in proc.stderr
    assert not (tmp_path / "out").exists()


# -- item 6: inputs mergekit ignores --------------------------------------------------------------------------------


def test_base_model_on_linear_is_one_more_input(tmp_path, llama):
    """mergekit 0.1.5 adds linear's base_model to the inputs, weighted by the top-level weight: a warning says so."""
    base, a, b, _ = llama
    cfg = {
        "merge_method": "linear",
        "base_model": base,
        "dtype": "float32",
        "parameters": {"weight": 0.5},
        "models": [{"model": a, "parameters": {"weight": 0.3}}, {"model": b}],
    }
    path = write(tmp_path, cfg)
    with pytest.warns(ConfigWarning, match="merges base_model .* as one more ordinary input"):
        spec = load_config(path)
    assert spec.inputs == [a, b, base] and spec.base is None
    mk = run_mergekit(path, tmp_path / "mk")
    with pytest.warns(ConfigWarning):
        merge_config(path, tmp_path / "ps")
    assert_bitwise(mk, _tensors(tmp_path / "ps"))


@pytest.mark.parametrize("method", ["slerp", "model_stock"])
def test_weights_mergekit_ignores_are_warnings(tmp_path, llama, method):
    base, a, b, _ = llama
    models = [a] if method == "slerp" else [a, b]
    cfg = {
        "merge_method": method,
        "base_model": base,
        "dtype": "float32",
        "models": [{"model": base}] + [{"model": m, "parameters": {"weight": 0.5}} for m in models],
    }
    if method == "slerp":
        cfg["parameters"] = {"t": [0.0, 0.5, 1.0]}
    path = write(tmp_path, cfg)
    with pytest.warns(ConfigWarning, match=f"'{method}' takes no parameter 'weight'; ignored"):
        load_config(path)
    mk = run_mergekit(path, tmp_path / "mk")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigWarning)
        ours = merge_config(path, None)
    for k in mk:
        torch.testing.assert_close(ours[k], mk[k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")


# -- item 7: config.json -----------------------------------------------------------------------------------------------


def test_config_json_states_the_output_dtype(tmp_path, llama):
    base, a, b, _ = llama
    cfg = {
        "merge_method": "task_arithmetic",
        "base_model": base,
        "dtype": "float32",
        "out_dtype": "bfloat16",
        "parameters": {"lambda": 0.9},
        "models": [{"model": a, "parameters": {"weight": 0.4}}, {"model": b, "parameters": {"weight": 0.6}}],
    }
    mk, ours, _ = run_both(tmp_path, cfg)
    for k in mk:  # bf16 outputs: one bf16 ulp where the fp32 results straddle a rounding boundary
        torch.testing.assert_close(ours[k].float(), mk[k].float(), rtol=8e-3, atol=1e-6)
    ps_cfg = json.loads((tmp_path / "ps" / "config.json").read_text())
    mk_cfg = json.loads((tmp_path / "mk" / "config.json").read_text())
    assert ps_cfg["dtype"] == mk_cfg["dtype"] == "bfloat16"
    assert {k: v for k, v in ps_cfg.items() if k != "transformers_version"} == {
        k: v for k, v in mk_cfg.items() if k != "transformers_version"
    }
    assert forward(tmp_path / "ps").dtype == torch.bfloat16


# -- item 9: slices ------------------------------------------------------------------------------------------------


def test_passthrough_stacks_layers_bit_for_bit(tmp_path, llama):
    """A frankenmerge: layers 0-2 of one model, then 1-3 of another (6 layers), renumbered; num_hidden_layers 6."""
    _, a, b, _ = llama
    cfg = {
        "merge_method": "passthrough",
        "dtype": "float32",
        "slices": [
            {"sources": [{"model": a, "layer_range": [0, 3]}]},
            {"sources": [{"model": b, "layer_range": [1, 4]}]},
        ],
    }
    mk, ours, _ = run_both(tmp_path, cfg, cli=True)
    assert_bitwise(mk, ours)
    src = load_file(os.path.join(b, "model.safetensors"))
    assert torch.equal(ours["model.layers.3.mlp.up_proj.weight"], src["model.layers.1.mlp.up_proj.weight"])
    assert torch.equal(ours["lm_head.weight"], src["lm_head.weight"])
    assert json.loads((tmp_path / "ps" / "config.json").read_text())["num_hidden_layers"] == 6
    assert forward(tmp_path / "ps").config.num_hidden_layers == 6


def test_gpt2_slices_merged_by_slerp(tmp_path, gpt2):
    """GPT-2 (transformer.h.N.): a slice of two sources merged by slerp with a gradient over the slice's layers."""
    g0, g1 = gpt2
    cfg = {
        "merge_method": "slerp",
        "base_model": g0,
        "dtype": "float32",
        "parameters": {"t": [0.0, 1.0]},
        "slices": [{"sources": [{"model": g0, "layer_range": [0, 3]}, {"model": g1, "layer_range": [0, 3]}]}],
    }
    mk, ours, _ = run_both(tmp_path, cfg)
    for k in mk:
        torch.testing.assert_close(ours[k], mk[k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    forward(tmp_path / "ps")


def test_llava_style_model(tmp_path_factory, tmp_path):
    """A LLaVA-style model (CLIP vision tower, projector, Llama language model) written by transformers 5, merged by
    `models:`. mergekit 0.1.5 infers this architecture with transformers 5's module names (model.vision_tower...,
    model.language_model...) that the files do not use (language_model.model...): it writes the vision tower and the
    projector, renamed, and silently drops the language model. pysoup merges every tensor under the files' names:
    the tensors both write are bit-identical, and transformers loads pysoup's output and runs image + text."""
    root = tmp_path_factory.mktemp("llava")
    paths = []
    for i in range(2):
        torch.manual_seed(20 + i)
        text = transformers.LlamaConfig(
            vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2,
        )  # fmt: skip
        vision = transformers.CLIPVisionConfig(
            hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=16,
            patch_size=8,
        )  # fmt: skip
        cfg = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=63)
        paths.append(_save(transformers.LlavaForConditionalGeneration(cfg), root / f"m{i}"))
    cfg = {
        "merge_method": "linear",
        "dtype": "float32",
        "models": [
            {"model": paths[0], "parameters": {"weight": 0.3}},
            {"model": paths[1], "parameters": {"weight": 0.7}},
        ],
    }
    path = write(tmp_path, cfg)
    mk = run_mergekit(path, tmp_path / "mk")
    merge_config(path, tmp_path / "ps")
    ours = _tensors(tmp_path / "ps")
    assert set(ours) == set(load_file(os.path.join(paths[0], "model.safetensors")))
    assert mk and all(k.startswith("model.") and k[len("model.") :] in ours for k in mk)
    for k in mk:
        assert torch.equal(mk[k], ours[k[len("model.") :]]), k
    model = transformers.LlavaForConditionalGeneration.from_pretrained(str(tmp_path / "ps"))
    ids = torch.tensor([[1] + [63] * 4 + [5, 7]])  # one image token per patch: (16 / 8)^2, the CLS dropped
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=torch.randn(1, 3, 16, 16)).logits
    assert torch.isfinite(out).all()


# -- item 10: tokenizers and chat templates --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def with_tokenizers(tmp_path_factory):
    """A base with a 70-token BPE tokenizer, a fine-tune that adds two special tokens and a word (73 rows), and one
    with the base's tokenizer: 2-layer Llamas."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    root = tmp_path_factory.mktemp("tok")
    text = ["the quick brown fox jumps over the lazy dog", "merging models is soup making", "a b c d e f g h i j"] * 5
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    bpe.train_from_iterator(text, trainers.BpeTrainer(vocab_size=70, special_tokens=["<unk>", "<s>", "</s>"]))
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )

    def model(seed, path, tokenizer):
        torch.manual_seed(seed)
        cfg = transformers.LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=False,
        )
        tokenizer.save_pretrained(path)
        return _save(transformers.LlamaForCausalLM(cfg), path)

    base = model(0, root / "base", tok)
    extended = transformers.AutoTokenizer.from_pretrained(base)
    extended.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    extended.add_tokens(["soupword"])
    extended.chat_template = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
    return (
        base,
        model(1, root / "ft1", extended),
        model(2, root / "ft2", transformers.AutoTokenizer.from_pretrained(base)),
    )


@pytest.mark.parametrize(
    "extra",
    [
        {"tokenizer_source": "union"},
        {"tokenizer_source": "base"},
        {"tokenizer_source": "FT1"},
        {"tokenizer": {"source": "union", "tokens": {"<|im_start|>": {"source": "FT1", "force": True},
                                                     "soupword": {"source": {"kind": "zero"}}}}},
        {"tokenizer": {"source": "union", "pad_to_multiple_of": 8}},
        {"tokenizer_source": "union", "chat_template": "chatml"},
        {"tokenizer_source": "union", "chat_template": "auto"},
        {"chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}"},
    ],
    ids=["union", "base", "model", "tokens", "pad-to-8", "union+chatml", "union+auto", "literal-template"],
)  # fmt: skip
def test_tokenizer_merges_as_mergekit(tmp_path, with_tokenizers, extra):
    """Embedding and LM-head rows moved to the output vocabulary and filled as mergekit fills them; the tokenizer's
    vocabulary, special tokens and chat template equal mergekit's; AutoTokenizer and the model load it."""
    base, ft1, ft2 = with_tokenizers
    extra = json.loads(json.dumps(extra).replace("FT1", ft1))
    cfg = {
        "merge_method": "ties",
        "base_model": base,
        "dtype": "float32",
        "models": [
            {"model": ft1, "parameters": {"weight": 0.5, "density": 0.5}},
            {"model": ft2, "parameters": {"weight": 0.5, "density": 0.7}},
        ],
        **extra,
    }
    if "tokenizer_source" not in extra and "tokenizer" not in extra:  # no vocabulary merge: the same vocabularies
        cfg["models"] = cfg["models"][1:]
    path = write(tmp_path, cfg)
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    run_merge(
        MergeConfiguration.model_validate(cfg), str(tmp_path / "mk"), MergeOptions(quiet=True, write_model_card=False)
    )
    merge_config(path, tmp_path / "ps")
    mk, ours = _tensors(tmp_path / "mk"), _tensors(tmp_path / "ps")
    assert set(mk) == set(ours)
    assert_fp32_close(mk, ours)
    tok_mk = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "mk"))
    tok_ps = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "ps"))
    assert tok_ps.get_vocab() == tok_mk.get_vocab() and tok_ps.all_special_tokens == tok_mk.all_special_tokens
    assert tok_ps.chat_template == tok_mk.chat_template
    if extra.get("chat_template") == "auto":  # the one template among the inputs (ft1's)
        assert "<|im_start|>" in tok_ps.chat_template
    assert not [f for f in os.listdir(os.path.dirname(base)) if f.startswith(".pysoup-vocab-")]  # scratch removed
    vocab = json.loads((tmp_path / "ps" / "config.json").read_text())["vocab_size"]
    assert vocab == json.loads((tmp_path / "mk" / "config.json").read_text())["vocab_size"]
    assert vocab == (80 if "pad_to_multiple_of" in extra.get("tokenizer", {}) else len(tok_ps))
    forward(tmp_path / "ps")


# -- malformed configs: one line, exit 1 ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cfg,match",
    [
        ({"merge_method": "linear"}, "exactly one of 'models', 'slices' or 'modules'"),
        ({"merge_method": "linear", "models": "x"}, "'models' must be a list"),
        ({"merge_method": "linear", "models": [{"model": "A", "parameters": {"weight": 1}}], "tokenizer_src": 1},
         "unknown key 'tokenizer_src'"),
        ({"merge_method": "frankensoup", "models": [{"model": "A"}]}, "'frankensoup' is not a mergekit 0.1.5 method"),
        ({"merge_method": "ties", "base_model": "B", "models": [{"model": "A", "parameters": {"lambda": "x"}}]},
         "parameter 'lambda' must be a number, got 'x'"),
        ({"merge_method": "ties", "base_model": "B", "models": [{"model": "A"}]},
         "model 'A': parameter 'weight' is not set"),
        ({"merge_method": "ties", "base_model": "B", "parameters": {"normalize": "maybe"},
          "models": [{"model": "A", "parameters": {"weight": 1}}]}, "'normalize' must be true or false, got 'maybe'"),
        ({"merge_method": "ties", "base_model": "B", "parameters": {"rescale": True},
          "models": [{"model": "A", "parameters": {"weight": 1}}]}, "'rescale' of merge_method 'ties' is not"),
        ({"merge_method": "linear", "slices": [{"sources": [{"model": "A", "layer_range": [3, 1]}]}]},
         "layer_range must be [start, stop)"),
        ({"merge_method": "linear", "slices": [{"sources": [{"model": "A", "layer_range": [0, 2]},
                                                             {"model": "B", "layer_range": [0, 3]}]}]},
         "same number of layers"),
        ({"merge_method": "slerp", "models": [{"model": "A"}, {"model": "B"}], "parameters": {"t": 0.5}},
         "needs a base_model"),
        ({"merge_method": "linear", "models": [{"parameters": {}}]}, "needs a 'model' path"),
        ("just a string", "a config is a mapping"),
    ],
)  # fmt: skip
def test_bad_configs_are_one_line_errors(tmp_path, cfg, match):
    path = write(tmp_path, cfg)
    with pytest.raises(PlanError, match=match.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        load_config(path)
    proc = run_cli("merge", "--config", path, "-o", tmp_path / "o")
    assert proc.returncode == 1 and match in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_layer_range_past_the_models_layers(tmp_path, llama):
    _, a, _, _ = llama
    cfg = {"merge_method": "passthrough", "slices": [{"sources": [{"model": a, "layer_range": [2, 6]}]}]}
    proc = run_cli("merge", "--config", write(tmp_path, cfg), "-o", tmp_path / "o")
    assert proc.returncode == 1 and "goes past its 4 layers" in proc.stderr


def test_weight_only_through_filters_must_cover_every_tensor(tmp_path, llama):
    """mergekit has no default weight: a model whose weight comes only from filter entries fails on a tensor none
    matches; so does pysoup, naming the tensor (before writing anything)."""
    _, a, b, _ = llama
    cfg = {
        "merge_method": "linear",
        "models": [{"model": a, "parameters": {"weight": [{"filter": "mlp", "value": 0.3}]}}, {"model": b}],
        "parameters": {"normalize": True},
    }
    cfg["models"][1]["parameters"] = {"weight": 1.0}
    proc = run_cli("merge", "--config", write(tmp_path, cfg), "-o", tmp_path / "o")
    assert proc.returncode == 1 and "parameter 'weight' has no value for tensor" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


def test_stacked_slices_with_a_tokenizer_union_and_scale(tmp_path, with_tokenizers):
    """passthrough stacking of two models with different vocabularies (tokenizer_source: union) and a per-source
    `scale`: bit-identical to mergekit, the union tokenizer loads."""
    _, ft1, ft2 = with_tokenizers
    cfg = {
        "merge_method": "passthrough",
        "dtype": "float32",
        "tokenizer_source": "union",
        "slices": [
            {"sources": [{"model": ft1, "layer_range": [0, 1]}]},
            {"sources": [{"model": ft2, "layer_range": [1, 2], "parameters": {"scale": 0.5}}]},
        ],
    }
    path = write(tmp_path, cfg)
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    run_merge(
        MergeConfiguration.model_validate(cfg), str(tmp_path / "mk"), MergeOptions(quiet=True, write_model_card=False)
    )
    merge_config(path, tmp_path / "ps")
    assert_bitwise(_tensors(tmp_path / "mk"), _tensors(tmp_path / "ps"))
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "ps"))
    assert tok.get_vocab() == transformers.AutoTokenizer.from_pretrained(str(tmp_path / "mk")).get_vocab()
    assert forward(tmp_path / "ps").config.vocab_size == len(tok) == 73


def test_per_model_filters_match_the_sources_own_names(tmp_path, llama):
    """mergekit matches a model's filters against that model's tensor names: `layers.0.` on a source whose layer 0
    becomes output layer 2 scales output layer 2, not output layer 0."""
    _, a, b, _ = llama
    scale = [{"filter": "layers.0.", "value": 2.0}, {"value": 1.0}]
    cfg = {
        "merge_method": "passthrough",
        "dtype": "float32",
        "slices": [
            {"sources": [{"model": a, "layer_range": [0, 2]}]},
            {"sources": [{"model": b, "layer_range": [0, 2], "parameters": {"scale": scale}}]},
        ],
    }
    mk, ours, _ = run_both(tmp_path, cfg)
    assert_bitwise(mk, ours)
    src = load_file(os.path.join(b, "model.safetensors"))
    assert torch.equal(ours["model.layers.2.mlp.up_proj.weight"], 2 * src["model.layers.0.mlp.up_proj.weight"])


def test_slices_with_their_own_base_and_parameters(tmp_path, llama):
    """ties per slice: the second slice has its own base_model and lambda, and a source's density gradient runs over
    that slice's layers."""
    base, a, b, _ = llama
    cfg = {
        "merge_method": "ties",
        "dtype": "float32",
        "base_model": base,
        "parameters": {"weight": 0.5, "density": 0.6},
        "slices": [
            {"sources": [{"model": a, "layer_range": [0, 2]}, {"model": base, "layer_range": [0, 2]}]},
            {
                "base_model": b,
                "parameters": {"lambda": 0.7},
                "sources": [
                    {"model": a, "layer_range": [2, 4], "parameters": {"density": [0.2, 0.9]}},
                    {"model": b, "layer_range": [2, 4]},
                ],
            },
        ],
    }
    mk, ours, _ = run_both(tmp_path, cfg)
    assert_fp32_close(mk, ours)


def test_model_plus_lora_reference(tmp_path, llama):
    """`MODEL+LORA`: the adapter folded into its model first (mergekit: PEFT's merge_and_unload), then merged; the
    fold rounds W + s·BA once in fp32 where PEFT adds in another order: within fp32 rounding."""
    peft = pytest.importorskip("peft")
    base, a, b, _ = llama
    torch.manual_seed(5)
    model = transformers.LlamaForCausalLM.from_pretrained(a)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft.get_peft_model(model, lora).save_pretrained(str(tmp_path / "adapter"))
    cfg = {
        "merge_method": "task_arithmetic",
        "base_model": base,
        "dtype": "float32",
        "models": [
            {"model": f"{a}+{tmp_path / 'adapter'}", "parameters": {"weight": 0.6}},
            {"model": b, "parameters": {"weight": 0.4}},
        ],
    }
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    options = MergeOptions(
        copy_tokenizer=False, quiet=True, write_model_card=False, lora_merge_cache=str(tmp_path / "c")
    )
    run_merge(MergeConfiguration.model_validate(cfg), str(tmp_path / "mk"), options)
    merge_config(write(tmp_path, cfg), tmp_path / "ps")
    mk, ours = _tensors(tmp_path / "mk"), _tensors(tmp_path / "ps")
    assert set(mk) == set(ours)
    assert_fp32_close(mk, ours)
    plain = {**cfg, "models": [{"model": a, "parameters": {"weight": 0.6}}, cfg["models"][1]]}
    without = merge_config(write(tmp_path, plain, "plain.yaml"))  # the adapter changes q_proj
    assert not torch.equal(
        ours["model.layers.0.self_attn.q_proj.weight"], without["model.layers.0.self_attn.q_proj.weight"]
    )
    assert not [f for f in os.listdir(os.path.dirname(a)) if f.startswith(".pysoup-folded-")]  # removed


@pytest.mark.parametrize(
    "tokenizer,match",
    [
        ({"source": "union", "tokens": {"<s>": {"source": {"kind": "weird"}}}}, "token source kind 'weird'"),
        (
            {"source": "union", "tokens": {"<s>": {"source": {"kind": "model_token", "model": "X"}}}},
            "token_id or token",
        ),
        ({"source": "./no-such-model"}, "cannot load its tokenizer"),
    ],
)
def test_bad_tokenizer_sections_are_one_line_errors(tmp_path, with_tokenizers, tokenizer, match):
    base, ft1, _ = with_tokenizers
    cfg = {
        "merge_method": "task_arithmetic",
        "base_model": base,
        "parameters": {"weight": 1.0},
        "models": [{"model": ft1}],
        "tokenizer": tokenizer,
    }
    path = write(tmp_path, cfg)
    with pytest.raises(PlanError, match=re.escape(match)) as err:
        merge_config(path, tmp_path / "o")
    assert "\n" not in str(err.value) and not (tmp_path / "o").exists()
    assert not [f for f in os.listdir(os.path.dirname(base)) if f.startswith(".pysoup-vocab-")]


def test_stacked_qwen3_keeps_layer_types_per_layer(tmp_path_factory, tmp_path):
    """Qwen3 states one attention type per layer (layer_types); a stack of layers 0-2 of one model and 1-3 of another
    gets those layers' types. mergekit 0.1.5 keeps the donor's 4, and transformers refuses to save that config for 6
    layers: mergekit fails after writing the weights. pysoup's weights are those, bit for bit, and its output loads."""
    root = tmp_path_factory.mktemp("qwen3")
    paths = []
    for i, types in enumerate(
        [["full_attention", "sliding_attention"] * 2, ["sliding_attention"] * 2 + ["full_attention"] * 2]
    ):
        torch.manual_seed(30 + i)
        cfg = transformers.Qwen3Config(
            vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, use_sliding_window=True, sliding_window=4, layer_types=types,
        )  # fmt: skip
        paths.append(_save(transformers.Qwen3ForCausalLM(cfg), root / f"q{i}"))
    cfg = {
        "merge_method": "passthrough",
        "dtype": "float32",
        "slices": [
            {"sources": [{"model": paths[0], "layer_range": [0, 3]}]},
            {"sources": [{"model": paths[1], "layer_range": [1, 4]}]},
        ],
    }
    path = write(tmp_path, cfg)
    with pytest.raises(Exception, match="must be equal to the number of `layer_types`"):
        run_mergekit(path, tmp_path / "mk")
    merge_config(path, tmp_path / "ps")
    mk, ours = _tensors(tmp_path / "mk"), _tensors(tmp_path / "ps")
    assert mk and set(mk) == set(ours)
    assert_bitwise(mk, ours)
    model = forward(tmp_path / "ps")
    assert model.config.num_hidden_layers == 6
    assert model.config.layer_types == ["full_attention", "sliding_attention", "full_attention"] + [
        "sliding_attention", "full_attention", "full_attention"
    ]  # fmt: skip


@pytest.mark.parametrize(
    "name,where",
    [
        ("model.layers.7.mlp.up_proj.weight", ("layer", 7)),
        ("transformer.h.2.attn.c_attn.weight", ("layer", 2)),
        ("blocks.0.norm1.weight", ("layer", 0)),
        ("model.embed_tokens.weight", ("pre", None)),
        ("transformer.wpe.weight", ("pre", None)),
        ("gpt_neox.embed_in.weight", ("pre", None)),
        ("embed_out.weight", ("post", None)),
        ("model.norm.weight", ("post", None)),
        ("transformer.ln_f.bias", ("post", None)),
        ("lm_head.weight", ("post", None)),
        ("model.rotary_scale", None),
    ],
)
def test_where_a_tensor_goes_in_a_slice_merge(name, where):
    from pysoup.mergekit.slices import place

    assert place(name) == where


def test_a_tensor_pysoup_cannot_place_is_an_error_naming_it(tmp_path, llama):
    import shutil

    from safetensors.torch import save_file

    _, a, _, _ = llama
    odd = tmp_path / "odd"
    shutil.copytree(a, odd)
    sd = load_file(str(odd / "model.safetensors"))
    save_file({**sd, "model.rotary_scale": torch.ones(4)}, str(odd / "model.safetensors"), metadata={"format": "pt"})
    cfg = {"merge_method": "passthrough", "slices": [{"sources": [{"model": str(odd), "layer_range": [0, 2]}]}]}
    with pytest.raises(PlanError, match="tensor 'model.rotary_scale' is neither in a layer nor an embedding"):
        merge_config(write(tmp_path, cfg), tmp_path / "o")
    assert not (tmp_path / "o").exists()
