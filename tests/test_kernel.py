"""The empirical NTK against an independent torch.func reference, and its contract."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from lightning_ttp.kernel import NTKMemoryError, empirical_ntk
from tests.ntk_reference import reference_jacobian, reference_ntk, relative_error

TOL = 1e-5


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(7, 16), nn.ReLU(inplace=True), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))


class _CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(4, 5, 3, stride=2, dilation=1),
            nn.GroupNorm(1, 5),
            nn.ReLU(),
        )
        self.conv1d = nn.Conv1d(5, 3, 2)
        self.head = nn.Linear(3 * 3, 4)

    def forward(self, x):
        h = self.features(x)  # (n, 5, 2, 2)
        h = self.conv1d(h.flatten(2))  # (n, 3, 3)
        return self.head(h.flatten(1))


class _Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 8, padding_idx=0)
        self.norm = nn.LayerNorm(8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.out = nn.Linear(8, 4)

    def forward(self, ids):
        h = self.norm(self.embed(ids))
        h, _ = self.attn(h, h, h)
        return self.out(h.mean(1))


class _Tied(nn.Module):
    """Embedding tied to the output layer, and a block called twice."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(6, 5)
        self.block = nn.Linear(5, 5)
        self.out = nn.Linear(5, 6, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, ids):
        h = self.embed(ids).mean(1)
        h = torch.tanh(self.block(torch.tanh(self.block(h))))
        return self.out(h)


class _DictModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 6)
        self.b = nn.Linear(2, 6)
        self.head = nn.Linear(6, 2)

    def forward(self, batch):
        return self.head(torch.relu(self.a(batch["x"]) + self.b(batch["z"])))


def _bn_with_stats(model: nn.Module) -> nn.Module:
    gen = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=gen, dtype=m.running_mean.dtype))
            m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=gen, dtype=m.running_var.dtype))
    return model


class _SequenceFirst(nn.Module):
    """Layers that see (L, N, d) tensors: the sample dimension is not the leading one."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(9, 6)
        self.proj = nn.Linear(6, 6)
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 3)

    def forward(self, ids):
        h = self.embed(ids).transpose(0, 1)  # (L, N, d)
        h = self.norm(torch.tanh(self.proj(h)))
        return self.head(h.mean(0))


class _Transformer(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(9, 8)
        self.encoder = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.1)  # sequence-first
        self.head = nn.Linear(8, 3)

    def forward(self, ids):
        return self.head(self.encoder(self.embed(ids).transpose(0, 1)).mean(0))


CASES = {
    "mlp": (_mlp, lambda: torch.randn(9, 7)),
    "cnn": (lambda: _bn_with_stats(_CNN()), lambda: torch.randn(6, 2, 10, 10)),
    "attention": (_Attention, lambda: torch.randint(0, 11, (5, 6))),
    "tied": (_Tied, lambda: torch.randint(0, 6, (5, 4))),
    "dict": (_DictModel, lambda: {"x": torch.randn(7, 3), "z": torch.randn(7, 2)}),
    "sequence-first, N = L": (_SequenceFirst, lambda: torch.randint(0, 9, (5, 5))),
    "sequence-first, N != L": (_SequenceFirst, lambda: torch.randint(0, 9, (4, 6))),
    "transformer": (_Transformer, lambda: torch.randint(0, 9, (4, 4))),
    "sparse embedding": (lambda: nn.Sequential(nn.Embedding(7, 4, sparse=True), nn.Flatten(), nn.Linear(12, 2)),
                         lambda: torch.randint(0, 7, (5, 3))),
}


def _case(name: str):
    torch.manual_seed(0)
    build, data = CASES[name]
    model = build().double()
    inputs = data()
    if isinstance(inputs, dict):
        inputs = {k: v.double() for k, v in inputs.items()}
    elif inputs.is_floating_point():
        inputs = inputs.double()
    return model, inputs


def _dense_embeddings(model: nn.Module) -> nn.Module:
    """The same function with sparse=False embeddings (torch.func cannot differentiate sparse ones)."""
    dense = copy.deepcopy(model)
    for module in dense.modules():
        if isinstance(module, nn.Embedding):
            module.sparse = False
    return dense


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("kernel", ["full", "trace"])
def test_exact_gram_matches_torch_func(name, kernel):
    model, inputs = _case(name)
    ntk = empirical_ntk(model, inputs, kernel=kernel)
    reference = reference_ntk(_dense_embeddings(model), inputs, kernel=kernel)
    assert ntk.gram.shape == reference.shape
    assert relative_error(ntk.gram, reference) <= TOL
    model.eval()
    assert torch.allclose(ntk.outputs, model(inputs))


def test_fast_paths_and_fallback_are_used_where_expected():
    model, inputs = _case("attention")
    methods = empirical_ntk(model, inputs).methods
    assert methods["attn.in_proj_weight"].startswith("fallback")
    assert methods["attn.out_proj.weight"].startswith("fallback")  # used outside its own forward
    assert not methods["embed.weight"].startswith("fallback")
    assert not methods["norm.weight"].startswith("fallback")
    model, inputs = _case("tied")
    methods = empirical_ntk(model, inputs).methods
    assert methods["embed.weight"].startswith("fallback") and methods["block.weight"].startswith("fallback")


def test_frozen_layers_are_excluded():
    model, inputs = _case("cnn")
    for p in model.features.parameters():
        p.requires_grad_(False)
    ntk = empirical_ntk(model, inputs)
    assert relative_error(ntk.gram, reference_ntk(model, inputs)) <= TOL
    assert ntk.num_parameters == [sum(p.numel() for p in model.parameters() if p.requires_grad)]


def test_output_fn_for_tuple_outputs():
    class TupleOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = _mlp()

        def forward(self, x):
            return {"logits": self.net(x), "aux": x.sum()}

    torch.manual_seed(0)
    model, x = TupleOut().double(), torch.randn(5, 7, dtype=torch.float64)

    def output_fn(m, inputs):
        return m(inputs)["logits"]

    ntk = empirical_ntk(model, x, output_fn=output_fn)
    assert relative_error(ntk.gram, reference_ntk(model, x, output_fn=output_fn)) <= TOL


def test_parameter_groups_sum_to_whole_and_match_per_group_reference():
    model, x = _case("mlp")
    optimizer = torch.optim.SGD(
        [{"params": model[0].parameters()}, {"params": list(model[2].parameters()) + list(model[4].parameters())}],
        lr=0.1,
    )
    ntk = empirical_ntk(model, x, parameter_groups=optimizer.param_groups)
    assert len(ntk.grams) == 2
    assert torch.allclose(ntk.grams[0] + ntk.grams[1], ntk.gram)
    assert relative_error(ntk.gram, reference_ntk(model, x)) <= TOL
    for p in model[2:].parameters():
        p.requires_grad_(False)
    assert relative_error(ntk.grams[0], reference_ntk(model, x)) <= TOL


def test_weight_and_bias_in_different_groups():
    model, x = _case("cnn")
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    ntk = empirical_ntk(model, x, parameter_groups=[weights, biases])
    assert relative_error(ntk.gram, reference_ntk(model, x)) <= TOL
    for p in weights:
        p.requires_grad_(False)
    assert relative_error(ntk.grams[1], reference_ntk(model, x)) <= TOL


def test_chunking_does_not_change_the_result():
    model, x = _case("cnn")
    whole = empirical_ntk(model, x)
    chunked = empirical_ntk(model, x, chunk_size=4)
    assert relative_error(chunked.gram, whole.gram) <= 1e-12


def test_global_rng_is_left_as_it_was_even_when_the_model_draws_random_numbers():
    class NoisyInEval(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = _mlp()

        def forward(self, x):
            return self.net(x) + 0.0 * torch.rand(x.shape[0], 1)

    model, x = NoisyInEval(), torch.randn(4, 7)
    rng = torch.get_rng_state()
    empirical_ntk(model, x)
    assert torch.equal(torch.get_rng_state(), rng)


def test_model_state_is_left_as_it_was():
    model, x = _case("cnn")
    model.train()
    model.features[1].eval()  # a mixed-mode model
    model.head.weight.requires_grad_(False)
    before = copy.deepcopy(model.state_dict())
    modes = [m.training for m in model.modules()]
    flags = [p.requires_grad for p in model.parameters()]
    rng = torch.get_rng_state()
    empirical_ntk(model, x)
    empirical_ntk(model, x, projection_dim=64, projection="sparse")
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)


@pytest.mark.parametrize("projection", ["gaussian", "sparse", "kronecker"])
def test_projection_is_unbiased_and_seeded(projection):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 24), nn.Tanh(), nn.Linear(24, 3)).double()
    x = torch.randn(6, 12, dtype=torch.float64)
    exact = empirical_ntk(model, x).gram
    dim = 64
    draws = [empirical_ntk(model, x, projection_dim=dim, projection=projection, seed=s).gram for s in range(200)]
    mean = sum(draws) / len(draws)
    single = empirical_ntk(model, x, projection_dim=dim, projection=projection, seed=0).gram
    # averaging 200 seeds shrinks the error like 1/sqrt(200): a biased estimator would not get there
    # unbiased: the mean of 200 draws has about 1/sqrt(200) = 0.07 of one draw's error
    assert relative_error(mean, exact) < 0.2 * relative_error(single, exact)
    again = empirical_ntk(model, x, projection_dim=dim, projection=projection, seed=0).gram
    assert torch.equal(single, again)
    other = empirical_ntk(model, x, projection_dim=dim, projection=projection, seed=1).gram
    assert not torch.equal(single, other)


def test_kronecker_projection_of_convolutions_is_unbiased():
    model, x = _case("cnn")
    exact = empirical_ntk(model, x).gram
    draws = [empirical_ntk(model, x, projection_dim=16, projection="kronecker", seed=s).gram for s in range(100)]
    single_error = sum(relative_error(d, exact) for d in draws[:10]) / 10
    assert relative_error(sum(draws) / len(draws), exact) < 0.25 * single_error


@pytest.mark.parametrize("projection", ["gaussian", "sparse"])
def test_projection_error_decreases_like_inverse_sqrt_dim(projection):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 4)).double()
    x = torch.randn(8, 20, dtype=torch.float64)
    exact = empirical_ntk(model, x).gram

    def mean_error(dim: int) -> float:
        errors = [
            relative_error(empirical_ntk(model, x, projection_dim=dim, projection=projection, seed=s).gram, exact)
            for s in range(12)
        ]
        return sum(errors) / len(errors)

    small, large = mean_error(64), mean_error(1024)
    ratio = small / large  # 1/sqrt(D') predicts sqrt(16) = 4
    assert 2.5 < ratio < 6.5, ratio


def test_projection_of_chunked_inputs_matches_unchunked():
    model, x = _case("attention")
    a = empirical_ntk(model, x, projection_dim=32, projection="sparse", chunk_size=2).gram
    b = empirical_ntk(model, x, projection_dim=32, projection="sparse").gram
    assert relative_error(a, b) <= 1e-12


def test_trace_is_the_sum_of_diagonal_blocks():
    model, x = _case("mlp")
    full = empirical_ntk(model, x).gram
    trace = empirical_ntk(model, x, kernel="trace").gram
    n, c = x.shape[0], 3
    blocks = full.reshape(n, c, n, c).diagonal(dim1=1, dim2=3).sum(-1)
    assert torch.allclose(trace, blocks)


def test_memory_budget_error_names_the_options():
    model, x = _case("mlp")
    with pytest.raises(NTKMemoryError, match=r"fewer samples.*trace.*projection"):
        empirical_ntk(model, x, memory_budget=1000)


def test_float32_exact_is_accurate():
    torch.manual_seed(0)
    model = _mlp()
    x = torch.randn(9, 7)
    ours = empirical_ntk(model, x).gram.double()
    assert relative_error(ours, reference_ntk(model.double(), x.double())) <= 1e-5


@pytest.mark.parametrize(
    "make, error",
    [
        (lambda m, x: (m.requires_grad_(False), x), "no trainable parameters"),
        (lambda m, x: (m, x[:0]), "N = 0"),
        (lambda m, x: (nn.Sequential(m, nn.Flatten(0)), x), r"\(N, C\)"),
        (lambda m, x: (m, x * float("nan")), "NaN or inf"),
    ],
)
def test_bad_input_gets_a_clear_error(make, error):
    model, x = make(_mlp(), torch.randn(4, 7))
    with pytest.raises(ValueError, match=error):
        empirical_ntk(model, x)


def test_bad_options_and_foreign_parameters():
    model, x = _mlp(), torch.randn(4, 7)
    with pytest.raises(ValueError, match="kernel"):
        empirical_ntk(model, x, kernel="diag")
    with pytest.raises(ValueError, match="projection_dim"):
        empirical_ntk(model, x, projection_dim=0)
    with pytest.raises(ValueError, match="not a parameter of `model`"):
        empirical_ntk(model, x, parameter_groups=[[nn.Parameter(torch.zeros(2))]])


def test_jacobian_reference_shape_is_what_the_tests_assume():
    model, x = _case("mlp")
    jac = reference_jacobian(model, x)
    assert jac.shape == (9, 3, sum(p.numel() for p in model.parameters()))
    assert math.isfinite(jac.sum().item())


@pytest.mark.parametrize("kernel", [(3, 3), (1, 2), (2, 3)])
@pytest.mark.parametrize("dilation", [(1, 1), (2, 1)])
@pytest.mark.parametrize("padding", [(0, 0), (1, 2)])
@pytest.mark.parametrize("stride", [(1, 1), (2, 3)])
def test_patches_match_torch_unfold(kernel, dilation, padding, stride):
    from lightning_ttp.kernel.terms import _patches

    x = torch.randn(2, 3, 9, 11)
    reference = torch.nn.functional.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)
    assert torch.equal(_patches(x, (kernel, dilation, padding, stride)), reference.transpose(1, 2))


class _Switch(nn.Module):
    """A layer called once or twice, by a flag that the cached probe verdict cannot see."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 3)
        self.twice = False

    def forward(self, x):
        h = self.a(x).tanh()
        if self.twice:
            h = self.a(h).tanh()
        return self.b(h)


def test_probe_verdict_is_cached_per_model_and_rechecked_when_the_forward_changes():
    torch.manual_seed(0)
    model = _Switch().double()
    x = torch.randn(6, 4, dtype=torch.float64)
    forwards = []
    model.register_forward_hook(lambda *args: forwards.append(1))
    empirical_ntk(model, x)
    assert len(forwards) == 2  # the probe and one chunk
    forwards.clear()
    again = empirical_ntk(model, x[:5], output_fn=None)  # another N: same verdict, no probe
    assert len(forwards) == 1
    assert relative_error(again.gram, reference_ntk(model, x[:5])) < TOL
    assert set(again.methods.values()) == {"ghost"}
    model.twice = True  # `a` now runs twice per forward: its cached fast path is stale
    changed = empirical_ntk(model, x)
    assert relative_error(changed.gram, reference_ntk(model, x)) < TOL
    assert changed.methods["a.weight"].startswith("fallback")


def test_cost_estimate_counts_the_contraction_the_engine_chooses():
    from lightning_ttp.kernel import estimate_ntk_cost

    model, x = _case("cnn")
    ntk = empirical_ntk(model, x)
    cost = estimate_ntk_cost(model, x, num_samples=40, probe_samples=3)
    assert cost.num_samples == 40 and cost.num_outputs == 4 and cost.fallback_parameters == 0
    for names, (method, flops) in cost.layers.items():
        assert flops > 0
        assert {ntk.methods[name] for name in names.split("+")} == {method}, names
    # the head (Linear 9 -> 4 with bias, one position): ghost, N²·(d_in + C²·d_out) multiply-adds by hand
    assert cost.layers["head.weight+head.bias"] == ("ghost", 40 * 40 * (10 + 16 * 4))
    assert cost.seconds >= cost.passes_seconds > 0 and cost.bytes > 0
    projected = estimate_ntk_cost(model, x, projection_dim=8, projection="kronecker")
    assert projected.contraction_flops < estimate_ntk_cost(model, x).contraction_flops


@pytest.mark.parametrize("rows", [1023, 1100, 4099])
def test_gram_products_from_the_blocks_above_the_diagonal(rows):
    from lightning_ttp.kernel.terms import _gram_of_features, _self_product

    flat = torch.randn(rows, 37, dtype=torch.float64)
    assert torch.allclose(_self_product(flat), flat @ flat.T, rtol=0, atol=1e-12)
    # features stored output-major, as the engine forms them output by output: (C, N, k) viewed as (N, C, k)
    output_major = torch.randn(3, rows // 3, 5, dtype=torch.float64)
    features = output_major.transpose(0, 1)
    dense = features.contiguous().reshape(-1, 5)
    assert torch.allclose(_gram_of_features(features, "full"), dense @ dense.T, rtol=0, atol=1e-12)
