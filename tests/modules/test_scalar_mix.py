"""ELMo's scalar mix against a numpy oracle (Peters et al. 2018, equation 1)."""

import numpy as np
import pytest
import torch

from chatforge.modules.scalar_mix import ScalarMix


def oracle(layers: np.ndarray, s: np.ndarray, gamma: float, mask: np.ndarray | None) -> np.ndarray:
    w = np.exp(s - s.max())
    w = w / w.sum()
    out = np.zeros_like(layers[0])
    for j, h in enumerate(layers):
        if mask is not None:
            m = np.broadcast_to(mask[..., None], h.shape)
            mean = h[m].mean()
            var = ((h[m] - mean) ** 2).mean()
            h = (h - mean) / np.sqrt(var + 1e-12)
        out += w[j] * h
    return gamma * out


@pytest.mark.parametrize("layer_norm", [False, True])
def test_matches_numpy_oracle(layer_norm):
    rng = np.random.default_rng(0)
    layers = rng.normal(size=(3, 2, 5, 4)).astype(np.float64)
    s = np.array([0.5, -1.0, 2.0])
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=bool)
    mix = ScalarMix(3, layer_norm=layer_norm, initial_scalars=s.tolist()).double()
    with torch.no_grad():
        mix.gamma.fill_(1.7)
    got = mix([torch.from_numpy(h) for h in layers], torch.from_numpy(mask)).detach().numpy()
    want = oracle(layers, s, 1.7, mask if layer_norm else None)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)


def test_uniform_start_and_learnable():
    mix = ScalarMix(2)
    a, b = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    torch.testing.assert_close(mix([a, b]), 0.5 * (a + b))
    mix([a, b]).sum().backward()
    assert mix.scalars.grad is not None and mix.gamma.grad is not None
    assert ScalarMix(2, trainable=False).scalars.requires_grad is False


def test_padding_does_not_change_normalised_real_positions():
    torch.manual_seed(0)
    mix = ScalarMix(2, layer_norm=True)
    h = [torch.randn(1, 3, 4) for _ in range(2)]
    padded = [torch.cat([x, 100 * torch.randn(1, 2, 4)], 1) for x in h]
    mask = torch.tensor([[True, True, True, False, False]])
    torch.testing.assert_close(mix(padded, mask)[:, :3], mix(h, torch.ones(1, 3, dtype=torch.bool)))


def test_bad_input_fails_clearly():
    with pytest.raises(ValueError, match="num_layers"):
        ScalarMix(0)
    with pytest.raises(ValueError, match="initial_scalars has 2"):
        ScalarMix(3, initial_scalars=[0.0, 0.0])
    with pytest.raises(ValueError, match="got 2 layers"):
        ScalarMix(3)([torch.zeros(1, 2, 3)] * 2)
    with pytest.raises(ValueError, match="needs the"):
        ScalarMix(2, layer_norm=True)([torch.zeros(1, 2, 3)] * 2)
