"""Highway layers: gate behaviour at its extremes, identity without layers, shapes."""

import pytest
import torch

from chatforge.modules.highway import Highway


def test_shape_preserved_and_gate_bias_initialised():
    hw = Highway(8, num_layers=2, gate_bias=-2.0)
    x = torch.randn(3, 5, 8)
    assert hw(x).shape == x.shape
    assert all(torch.all(g.bias == -2.0) for g in hw.gates)


def test_closed_gate_carries_input_open_gate_transforms():
    torch.manual_seed(0)
    x = torch.randn(4, 6)
    carry = Highway(6, 1, gate_bias=-50.0)
    torch.testing.assert_close(carry(x), x)  # t ~ 0: y = x
    transform = Highway(6, 1, gate_bias=50.0)
    lin = transform.transforms[0]
    torch.testing.assert_close(transform(x), torch.relu(lin(x)))  # t ~ 1: y = relu(W x + b)


def test_mixture_matches_formula():
    torch.manual_seed(1)
    hw = Highway(5, 1, gate_bias=0.3)
    x = torch.randn(2, 5)
    t = torch.sigmoid(hw.gates[0](x))
    expected = t * torch.relu(hw.transforms[0](x)) + (1 - t) * x
    torch.testing.assert_close(hw(x), expected)
    assert not torch.allclose(hw(x), x)


def test_zero_layers_is_identity_and_bad_args_fail():
    x = torch.randn(2, 3)
    assert torch.equal(Highway(3, 0)(x), x)
    with pytest.raises(ValueError, match="dim=0"):
        Highway(0, 1)
