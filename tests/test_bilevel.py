"""The bilevel meta step's hypergradient against numerical differentiation on a tiny model."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from collab_distill.meta import BilevelConfig, hypergradient


@pytest.fixture(autouse=True)
def float64():
    """Numerical differentiation needs double precision; restore the default afterwards."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def _problem(momentum: float = 0.0, weight_decay: float = 0.0):
    torch.manual_seed(0)
    students = {"a": nn.Linear(4, 3), "b": nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))}
    cnet = nn.Linear(4, 2)  # one weight per student per image
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    xv, yv = torch.randn(6, 4), torch.randint(0, 3, (6,))
    optimizers = {
        "a": torch.optim.SGD(students["a"].parameters(), lr=0.3, momentum=momentum, weight_decay=weight_decay),
        "b": torch.optim.SGD(students["b"].parameters(), lr=0.1, momentum=momentum, weight_decay=weight_decay),
    }
    if momentum:  # give the optimizers a momentum buffer, as after some real steps
        for name, m in students.items():
            F.cross_entropy(m(x), y).backward()
            optimizers[name].step()
            optimizers[name].zero_grad()

    def train_loss(params, phi=None):
        w = torch.sigmoid(functional_call(cnet, phi, (x,)) if phi is not None else cnet(x))
        total = 0
        for j, (name, m) in enumerate(students.items()):
            ce = F.cross_entropy(functional_call(m, params[name], (x,)), y, reduction="none")
            total = total + (w[:, j] * ce).mean()
        return total

    def meta_loss(params):
        return sum(F.cross_entropy(functional_call(m, params[n], (xv,)), yv) for n, m in students.items())

    return students, cnet, optimizers, train_loss, meta_loss


def _numerical(students, cnet, optimizers, train_loss, meta_loss, config):
    """d/dphi of L_meta(theta - lr * step(theta, phi)) by central differences."""
    from collab_distill.meta import lookahead

    params = {n: dict(m.named_parameters()) for n, m in students.items()}
    flat = [p for _, p in cnet.named_parameters()]
    names = [n for n, _ in cnet.named_parameters()]
    out = [torch.zeros_like(p) for p in flat]

    def f(phi):
        loss = train_loss(params, phi)
        theta = [p for ps in params.values() for p in ps.values()]
        g = torch.autograd.grad(loss, theta)
        it = iter(g)
        grads = {n: {k: next(it) for k in ps} for n, ps in params.items()}
        ahead = lookahead({n: {k: v.detach() for k, v in ps.items()} for n, ps in params.items()},
                          params, grads, optimizers, config)
        return float(meta_loss(ahead))

    h = 1e-6
    for i, p in enumerate(flat):
        for idx in range(p.numel()):
            phi_plus = {n: q.detach().clone() for n, q in zip(names, flat)}
            phi_minus = {n: q.detach().clone() for n, q in zip(names, flat)}
            phi_plus[names[i]].view(-1)[idx] += h
            phi_minus[names[i]].view(-1)[idx] -= h
            out[i].view(-1)[idx] = (f(phi_plus) - f(phi_minus)) / (2 * h)
    return out


@pytest.mark.parametrize("momentum,weight_decay", [(0.0, 0.0), (0.9, 1e-2)])
@pytest.mark.parametrize("mode,tol", [("second_order", 1e-6), ("finite_difference", 2e-3)])
def test_hypergradient_matches_numerical(mode, tol, momentum, weight_decay):
    students, cnet, optimizers, train_loss, meta_loss = _problem(momentum, weight_decay)
    config = BilevelConfig(hypergradient=mode, lookahead_momentum=bool(momentum),
                           lookahead_weight_decay=bool(weight_decay), fd_epsilon=1e-3)
    params = {n: dict(m.named_parameters()) for n, m in students.items()}
    before = {n: {k: v.detach().clone() for k, v in p.items()} for n, p in params.items()}
    grads, value = hypergradient(params=params, meta_params=list(cnet.parameters()), train_loss=train_loss,
                                 meta_loss=meta_loss, optimizers=optimizers, config=config)
    expected = _numerical(students, cnet, optimizers, train_loss, meta_loss, config)
    for got, want in zip(grads, expected):
        assert want.abs().max() > 1e-4  # the problem really has a meta-gradient
        torch.testing.assert_close(got, want, rtol=tol, atol=tol * want.abs().max().item())
    assert value > 0
    # the real parameters are untouched by the lookahead
    for n, p in params.items():
        for k, v in p.items():
            assert torch.equal(v, before[n][k])


def test_momentum_and_weight_decay_change_the_hypergradient():
    results = []
    for momentum in (False, True):
        students, cnet, optimizers, train_loss, meta_loss = _problem(0.9, 1e-2)
        config = BilevelConfig(lookahead_momentum=momentum, lookahead_weight_decay=momentum)
        params = {n: dict(m.named_parameters()) for n, m in students.items()}
        g, _ = hypergradient(params=params, meta_params=list(cnet.parameters()), train_loss=train_loss,
                             meta_loss=meta_loss, optimizers=optimizers, config=config)
        results.append(torch.cat([x.flatten() for x in g]))
    assert not torch.allclose(results[0], results[1])


def test_a_trainable_parameter_outside_the_optimizer_is_an_error_not_lr_one():
    from collab_distill import ConfigError
    from collab_distill.meta import lookahead

    students, _, optimizers, *_ = _problem()
    optimizers["b"] = torch.optim.SGD(students["b"][0].parameters(), lr=0.1)  # the last layer left out
    params = {n: dict(m.named_parameters()) for n, m in students.items()}
    grads = {n: {k: torch.ones_like(v) for k, v in ps.items()} for n, ps in params.items()}
    with pytest.raises(ConfigError, match=r"student 'b' parameter '2\.weight'.*none of its optimizer"):
        lookahead(params, params, grads, optimizers, BilevelConfig())
    ahead = lookahead({"a": params["a"]}, params, grads, optimizers, BilevelConfig())  # the complete one steps
    assert torch.allclose(ahead["a"]["weight"], params["a"]["weight"] - 0.3)
