"""Experts Weights Averaging (pysoup.training.experts): ALGORITHMS.md's worked examples, the share step against a
plain-torch fp32 reference bit for bit, the router's partition, collapse, and every bad argument refused before
the model changes."""

import math

import pytest
import torch
from helpers.parametrize import FLOAT_DTYPES, id_formatter
from helpers.tensors import assert_bit_equal, bits, random_tensor

from pysoup import ops
from pysoup.dtypes import to_f32
from pysoup.errors import PlanError
from pysoup.ops.reference import fma_f32, round_to
from pysoup.training.experts import (
    ExpertsBlock,
    ExpertsWeightsAveraging,
    collapse_experts,
    convert_to_experts,
    experts_blocks,
)

EPS32 = 2.0**-24  # fp32's unit roundoff


@pytest.fixture(autouse=True)
def one_torch_thread():
    """The models here are tiny: torch's intra-op threads only wait on each other (on a loaded 2-core machine the
    training test took 7.9 s with 2 threads, 0.5 s with 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Layer(torch.nn.Module):
    def __init__(self, width=8):
        super().__init__()
        self.norm = torch.nn.LayerNorm(width)
        hidden = 2 * width
        self.mlp = torch.nn.Sequential(torch.nn.Linear(width, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, width))

    def forward(self, x):
        return x + self.mlp(self.norm(x))


class Net(torch.nn.Module):
    """A token model: [batch, tokens, 6] -> [batch, 3], two layers with a feed-forward block each."""

    def __init__(self, dtype=torch.float32, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = torch.nn.Linear(6, 8)
        self.layers = torch.nn.ModuleList([Layer(), Layer()])
        self.head = torch.nn.Linear(8, 3)
        self.to(dtype)

    def forward(self, x):
        x = self.embed(x)
        for layer in self.layers:
            x = layer(x)
        return self.head(x.mean(1))


MLPS = ["layers.0.mlp", "layers.1.mlp"]


def snapshot(model):
    """What must not change when a call is refused: the modules (by identity) and every tensor's bits."""
    return [(n, id(m)) for n, m in model.named_modules()], {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, snap):
    modules, state = snap
    assert [(n, id(m)) for n, m in model.named_modules()] == modules
    now = model.state_dict()
    assert list(now) == list(state)
    for k, v in state.items():
        assert_bit_equal(now[k], v) if v.is_floating_point() else torch.equal(now[k], v)


def spread_experts(model, seed=0, wide=False):
    """Gives every expert different weights, as training would (`wide`: exponents over 2^-30..2^30, except in
    float16, where they would overflow)."""
    with torch.no_grad():
        for block in experts_blocks(model).values():
            for expert in block.experts:
                for p in expert.parameters():
                    seed += 1
                    p.copy_(random_tensor(p.shape, p.dtype, seed=seed, wide=wide and p.dtype != torch.float16))


def expert_groups(model):
    """[[expert 0's tensor, ..., expert N-1's]] per parameter of every block."""
    return [list(ws) for b in experts_blocks(model).values() for ws in zip(*(e.parameters() for e in b.experts))]


def fp32_mean(ws):
    """The plain-torch definition: fp32 sum in expert order, divided by N (a tensor divisor: an exact division)."""
    s = ws[0].float()
    for w in ws[1:]:
        s = s + w.float()
    return s / torch.full_like(s, float(len(ws)))


def shared_reference(ws, beta):
    """The share step as documented, in plain torch: M = fp32_mean; t = beta N / (N - 1);
    W_i <- round(fma(t, M, round_fp32((1 - t) W_i)))."""
    n = len(ws)
    t = beta * n / (n - 1)
    m = fp32_mean(ws)
    out = []
    for w in ws:
        acc = w.float() * torch.full_like(m, to_f32(1.0 - t))
        out.append(round_to(fma_f32(t, m, acc), w.dtype))
    return out


# -- convert and collapse ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "dtype,n", [(torch.float32, 2), (torch.float32, 4), (torch.float16, 3), (torch.bfloat16, 3), (torch.bfloat16, 7)],
    ids=lambda v: str(v).replace("torch.", ""),
)  # fmt: skip
def test_convert_then_collapse_gives_back_the_original_bit_for_bit(dtype, n):
    model = Net(dtype)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    classes = {name: type(m) for name, m in model.named_modules()}
    params = sum(p.numel() for p in model.parameters())
    convert_to_experts(model, MLPS, num_experts=n, seed=3)
    assert sum(p.numel() for p in model.parameters()) == params + (n - 1) * sum(
        p.numel() for name in MLPS for p in model.get_submodule(name).experts[0].parameters()
    )
    assert "layers.0.mlp.experts.1.2.bias" in model.state_dict()
    collapse_experts(model)
    assert {name: type(m) for name, m in model.named_modules()} == classes
    assert sum(p.numel() for p in model.parameters()) == params
    after = model.state_dict()
    assert list(after) == list(before)
    for k, v in before.items():
        assert_bit_equal(after[k], v)


def test_convert_then_collapse_float32_three_experts_within_one_ulp():
    """fp32 with N = 3: 2x is exact, round(3x) has relative error <= 2^-24, so round(round(3x) / 3) is x or a
    neighbour."""
    model = Net()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(random_tensor(p.shape, p.dtype, seed=p.numel(), wide=True))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    collapse_experts(convert_to_experts(model, MLPS, num_experts=3))
    for k, v in before.items():
        assert int((bits(model.state_dict()[k]).long() - bits(v).long()).abs().max()) <= 1, k


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=id_formatter("dtype"))
def test_collapse_is_the_experts_mean(dtype):
    model = convert_to_experts(Net(dtype), MLPS, num_experts=3)
    spread_experts(model, wide=True)
    blocks = experts_blocks(model)
    want = {
        f"{name}.{k}": round_to(fp32_mean([e.state_dict()[k] for e in block.experts]), dtype)
        for name, block in blocks.items()
        for k in block.experts[0].state_dict()
    }
    collapse_experts(model)
    assert not experts_blocks(model)
    state = model.state_dict()
    for k, w in want.items():
        assert_bit_equal(state[k], w)


def test_collapsed_model_computes_like_the_original_class():
    model = convert_to_experts(Net(), MLPS, num_experts=2)
    spread_experts(model)
    collapse_experts(model)
    plain = Net()
    plain.load_state_dict(model.state_dict())
    x = torch.randn(2, 5, 6)
    assert torch.equal(model(x), plain(x))


def test_predicate_converts_the_outermost_matches_and_numbers_blocks():
    model = Net()
    convert_to_experts(model, lambda name, m: isinstance(m, torch.nn.Sequential), num_experts=2, seed=1)
    assert list(experts_blocks(model)) == MLPS
    # a later conversion numbers its blocks after the first ones, so no two blocks route alike
    model2 = Net()
    convert_to_experts(model2, "layers.0.mlp", num_experts=2)
    convert_to_experts(model2, "layers.1.mlp", num_experts=2)
    assert [b.index for b in experts_blocks(model2).values()] == [0, 1]


# -- the router ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tokens", [1, 2, 14, 33], ids=id_formatter("tokens"))
def test_router_sends_every_token_to_exactly_one_expert(tokens):
    block = ExpertsBlock(Layer().mlp, num_experts=3, seed=5)
    spread_experts(torch.nn.ModuleList([block]))
    x = torch.randn(tokens, 8)
    for call, mode in enumerate(("train", "eval", "train")):  # eval routes the same random way
        block.train(mode == "train")
        out = block(x.view(1, tokens, 8)).view(tokens, 8)
        parts = block.partition(tokens, call)
        assert torch.equal(torch.cat(parts).sort().values, torch.arange(tokens))
        assert sorted(len(p) for p in parts) == sorted(len(p) for p in torch.arange(tokens).tensor_split(3))
        for k, idx in enumerate(parts):
            if idx.numel():
                assert torch.equal(out[idx], block.experts[k](x[idx]))
    assert block.calls == 3


def test_router_is_reproducible_and_differs_between_calls_and_blocks():
    a = ExpertsBlock(Layer().mlp, num_experts=4, seed=0, index=0)
    b = ExpertsBlock(Layer().mlp, num_experts=4, seed=0, index=1)
    again = ExpertsBlock(Layer().mlp, num_experts=4, seed=0, index=0)
    first = torch.cat(a.partition(64, 0))
    assert torch.equal(first, torch.cat(again.partition(64, 0)))
    assert not torch.equal(first, torch.cat(a.partition(64, 1)))
    assert not torch.equal(first, torch.cat(b.partition(64, 0)))


def test_gradients_reach_only_the_experts_that_got_tokens():
    block = ExpertsBlock(Layer().mlp, num_experts=4)
    block(torch.randn(1, 2, 8)).sum().backward()  # 2 tokens, 4 experts: two get one token each, two get none
    got = [e[0].weight.grad is not None for e in block.experts]
    assert got == [True, True, False, False]


# -- the share step -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["auto", "reference"], ids=id_formatter("backend"))
@pytest.mark.parametrize("beta", [0.3, 1.0], ids=id_formatter("beta"))
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=id_formatter("dtype"))
def test_share_step_matches_the_plain_torch_reference_bit_for_bit(dtype, beta, backend):
    model = Net(dtype)
    convert_to_experts(model, MLPS[:1], num_experts=3)
    convert_to_experts(model, MLPS[1:], num_experts=2)  # two expert counts: two share weights
    spread_experts(model, wide=True)
    others = {k: v.clone() for k, v in model.state_dict().items() if ".experts." not in k}
    groups = expert_groups(model)
    want = [shared_reference(ws, beta) for ws in groups]
    ExpertsWeightsAveraging(model, share_rate=beta, backend=backend).step()
    for ws, refs in zip(groups, want):
        for w, ref in zip(ws, refs):
            assert_bit_equal(w.detach(), ref)
    state = model.state_dict()
    for k, v in others.items():
        assert_bit_equal(state[k], v)


@pytest.mark.parametrize("n", [2, 3, 5], ids=id_formatter("experts"))
def test_share_step_keeps_the_experts_mean(n):
    """ALGORITHMS.md: one share step leaves the mean unchanged. Exactly in real arithmetic; in fp32, per element
    |mean' - mean| <= 4 (N + 2) 2^-24 max_i |W_i| (M's sum rounding, the two roundings of each lerp, t <= 2),
    means taken in fp64."""
    model = convert_to_experts(Net(), MLPS, num_experts=n)
    spread_experts(model)
    groups = expert_groups(model)
    before = [torch.stack([w.detach().double() for w in ws]) for ws in groups]
    ExpertsWeightsAveraging(model, share_rate=0.7).step()
    for ws, old in zip(groups, before):
        new = torch.stack([w.detach().double() for w in ws])
        tol = 4 * (n + 2) * EPS32 * old.abs().amax(0)
        assert ((new.mean(0) - old.mean(0)).abs() <= tol).all()
        assert not torch.equal(new, old)


def test_share_step_exact_cases():
    """beta = 0 changes no bit; beta = (N - 1) / N (beta' = 1) makes every expert the fp32 mean exactly."""
    model = convert_to_experts(Net(), MLPS, num_experts=3)
    spread_experts(model, wide=True)
    snap = snapshot(model)
    ewa = ExpertsWeightsAveraging(model, share_rate=0.0)
    ewa.step()
    assert_unchanged(model, snap)
    groups = expert_groups(model)
    means = [fp32_mean(ws) for ws in groups]
    ewa.step(share_rate=2 / 3)
    for ws, m in zip(groups, means):
        for w in ws:
            assert_bit_equal(w.detach(), m)


def test_the_two_share_rate_spellings_agree():
    """Toward the others' mean at beta == toward the mean of all at beta' = beta N / (N - 1); the spread about
    the mean shrinks by 1 - beta'. fp64 references; the fp32 step within 8 ulps of the largest expert value."""
    n, beta_all = 4, 0.6
    beta = beta_all * (n - 1) / n
    model = convert_to_experts(Net(), MLPS, num_experts=n)
    spread_experts(model)
    groups = expert_groups(model)
    olds = [torch.stack([w.detach().double() for w in ws]) for ws in groups]
    ExpertsWeightsAveraging(model, share_rate=beta).step()
    for ws, old in zip(groups, olds):
        mean_all = old.mean(0)
        mean_others = (old.sum(0) - old) / (n - 1)
        spelled_beta = (1 - beta) * old + beta * mean_others
        spelled_all = (1 - beta_all) * old + beta_all * mean_all
        assert torch.allclose(spelled_beta, spelled_all, rtol=0, atol=1e-12)
        assert torch.allclose(spelled_all - mean_all, (1 - beta_all) * (old - mean_all), rtol=0, atol=1e-12)
        got = torch.stack([w.detach().double() for w in ws])
        assert ((got - spelled_beta).abs() <= 8 * EPS32 * old.abs().amax()).all()


def test_share_step_is_one_fused_lerp_per_expert_count(monkeypatch):
    calls = []
    real = ops.lerp_
    monkeypatch.setattr(ops, "lerp_", lambda avg, cur, t, *a: calls.append(len(avg)) or real(avg, cur, t, *a))
    model = convert_to_experts(Net(), MLPS, num_experts=3)
    ExpertsWeightsAveraging(model, share_rate=0.1).step()
    assert calls == [2 * 4 * 3]  # 2 blocks x 4 tensors x 3 experts, one call


def test_training_with_the_share_step_then_collapse():
    """A few optimizer steps with the share step after each: the experts get closer than without it, and the
    collapsed model is the plain architecture with their mean."""
    spreads = {}
    for beta in (0.0, 0.5):
        model = convert_to_experts(Net(seed=1), MLPS, num_experts=4, seed=2)
        ewa = ExpertsWeightsAveraging(model, share_rate=beta)
        g = torch.Generator().manual_seed(0)
        for _ in range(4):
            x, y = torch.randn(8, 5, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
            model.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            with torch.no_grad():  # plain SGD: making a torch.optim optimizer first imports for ~8 s
                for p in model.parameters():
                    if p.grad is not None:
                        p.sub_(0.5 * p.grad)
            ewa.step()
        spreads[beta] = sum(float(torch.stack([w.detach() for w in ws]).std(0).sum()) for ws in expert_groups(model))
        collapse_experts(model)
        assert isinstance(model.layers[0].mlp, torch.nn.Sequential)
    assert 0 < spreads[0.5] < spreads[0.0] / 4


# -- bad arguments: one line, nothing changed ---------------------------------------------------------------------
def tied_model():
    model = Net()
    model.head.weight = torch.nn.Parameter(torch.zeros(3, 8))
    model.layers[0].mlp[0].weight = model.layers[1].mlp[0].weight  # tied across blocks
    return model


def int_param_model():
    model = Net()
    model.layers[0].mlp.register_parameter("steps", torch.nn.Parameter(torch.ones(2, dtype=torch.int64), False))
    return model


CONVERT_CASES = [
    ("unknown name", Net, dict(modules=["layers.0.mpl"], num_experts=2), "no module named 'layers.0.mpl'"),
    ("close names", Net, dict(modules=["layers.0.mpl"], num_experts=2), "close: layers.0.mlp"),
    ("no parameters", Net, dict(modules=["layers.0.mlp.1"], num_experts=2), "has no parameters"),
    ("one expert", Net, dict(modules=MLPS, num_experts=1), "num_experts must be an integer >= 2"),
    ("fractional experts", Net, dict(modules=MLPS, num_experts=2.5), "num_experts must be an integer >= 2"),
    ("bool experts", Net, dict(modules=MLPS, num_experts=True), "num_experts must be an integer >= 2"),
    ("the model itself", Net, dict(modules=[""], num_experts=2), "the model itself"),
    ("nested names", Net, dict(modules=["layers.0", "layers.0.mlp"], num_experts=2), "is inside 'layers.0'"),
    ("named twice", Net, dict(modules=[MLPS[0], MLPS[0]], num_experts=2), "named twice"),
    ("empty list", Net, dict(modules=[], num_experts=2), "no modules given"),
    ("not names", Net, dict(modules=42, num_experts=2), "a list of module names or a predicate"),
    ("not a string", Net, dict(modules=[3], num_experts=2), "module names must be strings"),
    ("predicate matches nothing", Net, dict(modules=lambda n, m: False, num_experts=2), "matched no module"),
    ("tied weights", tied_model, dict(modules=["layers.0.mlp"], num_experts=2), "is tied to 'layers.1.mlp.0.weight'"),
    ("integer parameter", int_param_model, dict(modules=["layers.0.mlp"], num_experts=2), "is int64"),
    ("bad seed", Net, dict(modules=MLPS, num_experts=2, seed="1"), "seed must be an integer"),
]  # fmt: skip


@pytest.mark.parametrize("case", CONVERT_CASES, ids=lambda c: c[0])
def test_convert_refuses(case):
    _, make, kwargs, message = case
    model = make()
    snap = snapshot(model)
    with pytest.raises(PlanError, match=message.replace("(", r"\(").replace(".", r"\.")) as err:
        convert_to_experts(model, **kwargs)
    assert "\n" not in str(err.value)
    assert_unchanged(model, snap)


def test_convert_refuses_a_block_already_converted():
    model = convert_to_experts(Net(), MLPS, num_experts=2)
    snap = snapshot(model)
    with pytest.raises(PlanError, match="already part of ExpertsBlock 'layers.0.mlp'"):
        convert_to_experts(model, ["layers.1.norm", "layers.0.mlp.experts.0"], num_experts=2)
    assert_unchanged(model, snap)


def edit_shape(model):
    model.layers[1].mlp.experts[1][2].bias = torch.nn.Parameter(torch.zeros(9))


def edit_dtype(model):
    model.layers[1].mlp.experts[2].half()


EDITS = [("shape", edit_shape, r"expert 1's '2\.bias' is float32 \[9\] on cpu, expert 0's float32 \[8\]"),
         ("dtype", edit_dtype, r"expert 2's '0\.weight' is float16 \[16, 8\] on cpu, expert 0's float32")]  # fmt: skip


@pytest.mark.parametrize("edit", EDITS, ids=lambda e: e[0])
@pytest.mark.parametrize("call", ["share", "step", "collapse"], ids=id_formatter("call"))
def test_experts_edited_apart_are_refused(call, edit):
    model = convert_to_experts(Net(), MLPS, num_experts=3)
    ewa = ExpertsWeightsAveraging(model, share_rate=0.5)
    _, apply_edit, message = edit
    apply_edit(model)
    snap = snapshot(model)
    run = {
        "share": lambda: ExpertsWeightsAveraging(model, share_rate=0.5),
        "step": ewa.step,
        "collapse": lambda: collapse_experts(model),
    }[call]
    with pytest.raises(PlanError, match="ExpertsBlock 'layers.1.mlp': " + message):
        run()
    assert_unchanged(model, snap)


@pytest.mark.parametrize("beta", [-0.1, 1.5, math.nan, "0.3", True, None], ids=id_formatter("beta"))
def test_share_rate_outside_zero_one_is_refused(beta):
    model = convert_to_experts(Net(), MLPS, num_experts=2)
    ewa = ExpertsWeightsAveraging(model, share_rate=0.5)
    snap = snapshot(model)
    with pytest.raises(PlanError, match=r"share_rate must be a number in \[0, 1\]"):
        ExpertsWeightsAveraging(model, share_rate=beta)
    if beta is not None:  # None means "the rate given at construction" to step()
        with pytest.raises(PlanError, match=r"share_rate must be a number in \[0, 1\]"):
            ewa.step(share_rate=beta)
    assert_unchanged(model, snap)


def test_no_experts_block_is_refused():
    model = Net()
    snap = snapshot(model)
    with pytest.raises(PlanError, match="no ExpertsBlock: convert_to_experts first"):
        ExpertsWeightsAveraging(model, share_rate=0.5)
    with pytest.raises(PlanError, match="no ExpertsBlock to collapse"):
        collapse_experts(model)
    assert_unchanged(model, snap)


def test_share_step_after_collapse_is_refused():
    model = convert_to_experts(Net(), MLPS, num_experts=2)
    ewa = ExpertsWeightsAveraging(model, share_rate=0.5)
    collapse_experts(model)
    with pytest.raises(PlanError, match="ExpertsBlock 'layers.0.mlp' is no longer in the model"):
        ewa.step()
