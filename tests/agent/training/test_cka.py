"""Tests of chainfed.agent.training.cka against the HSIC definition of linear CKA."""

import pytest
import torch

from chainfed.agent.training.cka import linear_cka, masked_token_rows


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


def hsic_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """CKA from its definition: HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)), HSIC = tr(KHLH)."""
    x, y = x.double(), y.double()
    n = x.shape[0]
    h = torch.eye(n, dtype=torch.float64) - torch.full((n, n), 1.0 / n, dtype=torch.float64)
    k, l_ = x @ x.T, y @ y.T

    def hsic(a, b):
        return torch.trace(a @ h @ b @ h)

    return float(hsic(k, l_) / torch.sqrt(hsic(k, k) * hsic(l_, l_)))


def random_orthogonal(d: int, gen: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    return q


# (n, d1, d2): feature form (n ≫ d), Gram form (d > n) and in between
SHAPES = [(200, 8, 12), (10, 64, 100), (30, 30, 5)]


@pytest.mark.parametrize(("n", "d1", "d2"), SHAPES)
def test_matches_hsic_definition(gen, n, d1, d2):
    x = torch.randn(n, d1, generator=gen)
    y = x[:, :1] * torch.randn(1, d2, generator=gen) + torch.randn(n, d2, generator=gen)
    assert linear_cka(x, y) == pytest.approx(hsic_cka(x, y), rel=1e-9, abs=1e-12)
    assert linear_cka(y, x) == pytest.approx(linear_cka(x, y), rel=1e-12)


@pytest.mark.parametrize(("n", "d1", "d2"), SHAPES)
def test_self_similarity_is_one(gen, n, d1, d2):
    x = torch.randn(n, d1, generator=gen)
    assert linear_cka(x, x) == pytest.approx(1.0, rel=1e-12)


@pytest.mark.parametrize(("n", "d1", "d2"), SHAPES)
def test_invariances(gen, n, d1, d2):
    x = torch.randn(n, d1, generator=gen, dtype=torch.float64)
    y = torch.tanh(x @ torch.randn(d1, d2, generator=gen, dtype=torch.float64))
    base = linear_cka(x, y)
    assert 0.0 < base < 1.0
    scaled = linear_cka(3.7e5 * x, 1e-4 * y)
    rotated = linear_cka(x @ random_orthogonal(d1, gen), y @ random_orthogonal(d2, gen))
    shifted = linear_cka(x + 5.0, y - torch.arange(d2, dtype=torch.float64))
    assert scaled == pytest.approx(base, rel=1e-9)
    assert rotated == pytest.approx(base, rel=1e-9)
    assert shifted == pytest.approx(base, rel=1e-9)


def test_independent_matrices_score_low_when_n_exceeds_d(gen):
    x = torch.randn(4000, 16, generator=gen)
    y = torch.randn(4000, 24, generator=gen)
    assert linear_cka(x, y) < 0.02


def test_low_precision_input_is_computed_in_float64(gen):
    x = torch.randn(64, 32, generator=gen)
    y = x @ torch.randn(32, 16, generator=gen)
    assert linear_cka(x.half(), y.bfloat16()) == pytest.approx(
        hsic_cka(x.half().float(), y.bfloat16().float()), rel=1e-9
    )


@pytest.mark.parametrize(
    ("x", "y", "match"),
    [
        (torch.randn(5, 3), torch.randn(6, 3), "same rows"),
        (torch.randn(5), torch.randn(5, 3), "2-D"),
        (torch.randn(1, 3), torch.randn(1, 3), "at least 2"),
        (torch.ones(5, 3), torch.randn(5, 3), "constant"),
        (torch.zeros(5, 3), torch.randn(5, 3), "all zeros"),
        (torch.full((5, 3), float("nan")), torch.randn(5, 3), "non-finite"),
    ],
)
def test_input_validation(x, y, match):
    with pytest.raises(ValueError, match=match):
        linear_cka(x, y)


def test_masked_token_rows_keeps_real_tokens_in_order():
    hidden = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)  # (B, T, d)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    rows = masked_token_rows(hidden, mask)
    assert rows.shape == (5, 3) and rows.dtype == hidden.dtype
    expected = torch.cat([hidden[0, :3], hidden[1, :2]])
    assert torch.equal(rows, expected)
    assert torch.equal(masked_token_rows(hidden, mask.bool()), expected)


def test_masked_token_rows_validation():
    with pytest.raises(ValueError, match=r"\(B, T, d\)"):
        masked_token_rows(torch.zeros(4, 3), torch.ones(4, 3))
    with pytest.raises(ValueError, match="does not match"):
        masked_token_rows(torch.zeros(2, 4, 3), torch.ones(2, 5))


def test_foat_style_use(gen):
    """Per-layer CKA against the embedding falls as a chain of random maps drifts."""
    emb = torch.randn(4, 16, 8, generator=gen)  # (B, T, d)
    mask = torch.ones(4, 16, dtype=torch.long)
    mask[:, 12:] = 0
    base = masked_token_rows(emb, mask)
    h, scores = emb, []
    for _ in range(4):
        h = torch.tanh(h @ torch.randn(8, 8, generator=gen)) + 0.5 * h
        scores.append(linear_cka(masked_token_rows(h, mask), base))
    assert all(0.0 < s <= 1.0 for s in scores)
    assert scores[0] > scores[-1]
