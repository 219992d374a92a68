"""``actserve_client.torch.RemoteActivation`` in real models gives the local modules' output."""

from __future__ import annotations

import copy

import pytest
import torch
from actserve_client import Client
from actserve_client.torch import RemoteActivation
from torch import nn


@pytest.fixture(scope="module")
def client(server):
    with Client(server.url) as c:
        yield c


def _twins(local_act: nn.Module, remote_act: nn.Module, dtype=torch.float32):
    torch.manual_seed(0)
    local = nn.Sequential(nn.Linear(8, 16), local_act, nn.Linear(16, 4)).to(dtype)
    remote = copy.deepcopy(local)
    remote[1] = remote_act
    return local, remote


@pytest.mark.parametrize(("local_act", "name", "params"), [
    (nn.GELU(), "gelu", {}),
    (nn.GELU(approximate="tanh"), "gelu", {"approximate": "tanh"}),
    (nn.LeakyReLU(0.2), "leaky_relu", {"negative_slope": 0.2}),
    (nn.SiLU(), "silu", {}),
    (nn.Hardtanh(-0.5, 0.5), "hardtanh", {"min_val": -0.5, "max_val": 0.5}),
])
def test_remote_activation_in_a_sequential_matches_the_local_module(client, local_act, name,
                                                                   params):
    local, remote = _twins(local_act, RemoteActivation(name, client=client, **params))
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        want, got = local(x), remote(x)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_remote_activation_keeps_16_and_64_bit_models_exact(client, dtype):
    local, remote = _twins(nn.Sigmoid(), RemoteActivation("sigmoid", client=client), dtype)
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(2)).to(dtype)
    with torch.no_grad():
        want, got = local(x), remote(x)
    assert got.dtype == dtype
    assert torch.equal(got, want)


def test_swap_every_relu_of_an_existing_model(client):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3), nn.ReLU(),
                          nn.Flatten())
    swapped = copy.deepcopy(model)
    for i, layer in enumerate(swapped):
        if isinstance(layer, nn.ReLU):
            swapped[i] = RemoteActivation("relu", client=client)
    x = torch.randn(2, 3, 9, 9)
    with torch.inference_mode():
        assert torch.equal(swapped(x), model(x))


def test_settings_travel_with_the_module(client):
    act = RemoteActivation("tanh", client=client, compute_dtype="float64")
    x = torch.linspace(-2, 2, 11)
    with torch.no_grad():
        y = act(x)
    assert y.dtype == torch.float64
    assert torch.equal(y, torch.tanh(x.double()))
    assert "'tanh'" in repr(act) and "compute_dtype='float64'" in repr(act)


def test_owned_client_from_a_url(server):
    act = RemoteActivation("relu", client=server.url)
    try:
        with torch.no_grad():
            assert act(torch.tensor([-1.0, 2.0])).tolist() == [0.0, 2.0]
    finally:
        act.close()
    assert act.client.is_closed


def test_bad_modules_and_inputs_are_refused(client):
    act = RemoteActivation("relu", client=client)
    with pytest.raises(TypeError):
        RemoteActivation("relu", client=42)
    with pytest.raises(TypeError):
        act([1.0, 2.0])


@pytest.mark.parametrize(("local_act", "name", "params"), [
    (nn.Tanh(), "tanh", {}),
    (nn.ELU(0.5), "elu", {"alpha": 0.5}),
    (nn.GELU(), "gelu", {}),
    (nn.LeakyReLU(0.2), "leaky_relu", {"negative_slope": 0.2}),
    (nn.SiLU(), "silu", {}),
])
def test_training_through_the_server_gives_the_local_gradients(client, local_act, name, params):
    """A small MLP trained for a few SGD steps with the activation on the server gets the
    same loss, parameter gradients and weights as the local model, bit for bit."""
    local, remote = _twins(local_act, RemoteActivation(name, client=client, **params))
    opt_l = torch.optim.SGD(local.parameters(), lr=0.05)
    opt_r = torch.optim.SGD(remote.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        x = torch.randn(16, 8, generator=gen)
        target = torch.randn(16, 4, generator=gen)
        losses = []
        for model, opt in ((local, opt_l), (remote, opt_r)):
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), target)
            loss.backward()
            losses.append(loss.detach())
        assert torch.equal(losses[0], losses[1])
        for (n, pl), pr in zip(local.named_parameters(), remote.parameters(), strict=True):
            assert pr.grad is not None and torch.equal(pl.grad, pr.grad), n
        opt_l.step()
        opt_r.step()
    for pl, pr in zip(local.parameters(), remote.parameters(), strict=True):
        assert torch.equal(pl, pr)


def test_input_gradient_through_the_server(client):
    act = RemoteActivation("sigmoid", client=client)
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    (act(x) * torch.arange(15.0, dtype=torch.float64).reshape(5, 3)).sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    (torch.sigmoid(x2) * torch.arange(15.0, dtype=torch.float64).reshape(5, 3)).sum().backward()
    assert torch.equal(x.grad, x2.grad)
