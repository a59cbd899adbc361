"""linear_cross_entropy (the head + loss in chunks) equals the plain head + F.cross_entropy."""

import pytest
import torch
import torch.nn.functional as F

from ring_lightning.models.loss import default_chunk_tokens, linear_cross_entropy

TOL = 1e-6


def _plain(hidden, weight, labels, loss_weight=None):
    logits = F.linear(hidden, weight).float()
    ce = F.cross_entropy(logits.flatten(0, -2), labels.flatten(), ignore_index=-100, reduction="none")
    w = (labels.flatten() != -100).float()
    if loss_weight is not None:
        w = w * loss_weight.flatten().float()
    return (ce * w).sum(), w.sum()


def _case(seed, B=2, T=37, C=16, V=50, ignored=0.3):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, C, generator=g, requires_grad=True)
    weight = (torch.randn(V, C, generator=g) * 0.3).requires_grad_(True)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[torch.rand(B, T, generator=g) < ignored] = -100
    return hidden, weight, labels


@pytest.mark.parametrize("chunk", [1, 5, 16, 1000])
@pytest.mark.parametrize("weighted", [False, True])
def test_equals_plain_head_and_cross_entropy(chunk, weighted):
    hidden, weight, labels = _case(chunk)
    loss_weight = torch.rand(labels.shape, generator=torch.Generator().manual_seed(3)) if weighted else None
    ref_sum, ref_n = _plain(hidden, weight, labels, loss_weight)
    ref_grads = torch.autograd.grad(ref_sum * 0.7, (hidden, weight))
    got_sum, got_n = linear_cross_entropy(hidden, weight, labels, loss_weight=loss_weight, chunk_tokens=chunk)
    got_grads = torch.autograd.grad(got_sum * 0.7, (hidden, weight))  # a scaled loss, as the strategy's
    torch.testing.assert_close(got_sum, ref_sum, rtol=TOL, atol=TOL)
    assert float(got_n) == pytest.approx(float(ref_n))
    for got, ref in zip(got_grads, ref_grads):
        torch.testing.assert_close(got, ref, rtol=TOL, atol=TOL)


def test_every_label_ignored_gives_zero_loss_and_gradient():
    hidden, weight, labels = _case(7)
    labels.fill_(-100)
    loss_sum, n = linear_cross_entropy(hidden, weight, labels, chunk_tokens=8)
    loss_sum.backward()
    assert float(loss_sum.detach()) == 0.0 and float(n) == 0.0
    assert torch.count_nonzero(hidden.grad) == 0 and torch.count_nonzero(weight.grad) == 0


def test_no_gradient_wanted_computes_only_the_loss(monkeypatch):
    hidden, weight, labels = _case(8)
    matmuls = []
    real = torch.Tensor.__matmul__
    monkeypatch.setattr(torch.Tensor, "__matmul__", lambda a, b: matmuls.append(1) or real(a, b))
    with torch.no_grad():
        loss_sum, _ = linear_cross_entropy(hidden, weight, labels, chunk_tokens=8)
    assert len(matmuls) == -(-labels.numel() // 8)  # one logits matmul per chunk, no gradient matmuls
    torch.testing.assert_close(loss_sum, _plain(hidden, weight, labels)[0].detach(), rtol=TOL, atol=TOL)


def test_bf16_autocast_is_as_accurate_as_the_plain_head_under_autocast():
    hidden, weight, labels = _case(9, T=64, C=32, V=300)
    exact_sum, _ = _plain(hidden.double(), weight.double(), labels)
    exact = torch.autograd.grad(exact_sum, (hidden, weight))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_sum, _ = _plain(hidden, weight, labels)
        got_sum, _ = linear_cross_entropy(hidden, weight, labels, chunk_tokens=16)
    ref = torch.autograd.grad(ref_sum, (hidden, weight))
    got = torch.autograd.grad(got_sum, (hidden, weight))
    torch.testing.assert_close(got_sum, ref_sum, rtol=1e-5, atol=1e-5)  # both float32 softmax of bf16 logits
    for g, r, e in zip(got, ref, exact):
        assert g.dtype == r.dtype
        # bf16 matmuls both ways; ours sums the chunks in float32, so no worse than the plain head
        err_got = (g.double() - e).norm() / e.norm()
        err_ref = (r.double() - e).norm() / e.norm()
        assert err_got <= 1.5 * err_ref + 1e-6, (float(err_got), float(err_ref))


def test_bad_shapes_are_named():
    hidden, weight, labels = _case(10)
    with pytest.raises(ValueError, match="hidden .* and labels"):
        linear_cross_entropy(hidden, weight, labels[:, :-1])
    with pytest.raises(ValueError, match="weight must be"):
        linear_cross_entropy(hidden, weight.t(), labels)


def test_default_chunk_bounds_the_logits():
    assert default_chunk_tokens(128256) * 128256 <= 2**30
    assert default_chunk_tokens(259) > 100_000


@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_a_norm_run_per_chunk_equals_the_norm_run_once(chunk):
    """pre_head (the final norm, per token) inside the chunks: the same loss and the same gradients
    of the hidden states, the head and the norm's weight as norm -> head -> cross-entropy."""
    from ring_lightning.models.model import RMSNorm

    hidden, weight, labels = _case(11 + chunk)
    norm = RMSNorm(hidden.shape[-1], 1e-5)
    with torch.no_grad():
        norm.weight.mul_(torch.rand(hidden.shape[-1], generator=torch.Generator().manual_seed(5)) + 0.5)
    ref_sum, ref_n = _plain(norm(hidden), weight, labels)
    ref_grads = torch.autograd.grad(ref_sum * 0.7, (hidden, weight, norm.weight))
    got_sum, got_n = linear_cross_entropy(hidden, weight, labels, chunk_tokens=chunk, pre_head=norm)
    got_grads = torch.autograd.grad(got_sum * 0.7, (hidden, weight, norm.weight))
    torch.testing.assert_close(got_sum, ref_sum, rtol=TOL, atol=TOL)
    assert float(got_n) == float(ref_n)
    for got, ref in zip(got_grads, ref_grads):
        torch.testing.assert_close(got, ref, rtol=TOL, atol=TOL)


def test_a_norm_per_chunk_makes_no_gradient_without_grad_mode():
    from ring_lightning.models.model import RMSNorm

    hidden, weight, labels = _case(2)
    norm = RMSNorm(hidden.shape[-1], 1e-5)
    with torch.no_grad():
        loss_sum, _ = linear_cross_entropy(hidden, weight, labels, chunk_tokens=8, pre_head=norm)
    assert not loss_sum.requires_grad
    assert norm.weight.grad is None
