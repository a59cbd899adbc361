"""The memory options give the plain model's numbers: offloaded checkpoints, grouped
recomputation, MLP tiles and the chunked loss (float32, 1e-6)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ring_lightning.models.activations import HostOffload, recompute_offloaded, tiled
from ring_lightning.models.model import LongDocTransformer, ModelConfig
from ring_lightning.training.module import LongDocumentLM

TOL = 1e-6


class SDPACore(nn.Module):
    """Single-device causal SDPA with GQA by repetition (the model alone, no ring)."""

    def forward(self, q, k, v, is_causal=True, already_split=True, document_ids=None):
        groups = q.shape[2] // k.shape[2]
        k, v = (x.repeat_interleave(groups, dim=2) for x in (k, v))  # (B,T,K,D) -> (B,T,H,D)
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # (B,T,H,D) -> (B,H,T,D)
        return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal).transpose(1, 2)


def _grads(config: ModelConfig, ids, labels):
    torch.manual_seed(0)
    model = LongDocTransformer(config, lambda i: SDPACore())
    logits = model(ids)
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


BASE = dict(vocab_size=61, dim=32, n_layers=4, n_heads=4, n_kv_heads=2)


@pytest.mark.parametrize("options", [
    dict(checkpointing="full"),
    dict(checkpointing="full", offload_activations=True),
    dict(checkpointing="full", offload_activations=True, blocks_per_checkpoint=3),
    dict(checkpointing="full", blocks_per_checkpoint=2),
    dict(mlp_tile_tokens=7),
    dict(checkpointing="selective", mlp_tile_tokens=16),
    dict(checkpointing="full", offload_activations=True, mlp_tile_tokens=5),
    dict(checkpointing="full", offload_activations=True, mlp_tile_tokens=5, blocks_per_checkpoint=3),
    dict(checkpointing="full", offload_activations=True, mlp_tile_tokens=5, blocks_per_checkpoint=4),
])
def test_same_loss_and_gradients_as_the_plain_model(options):
    g = torch.Generator().manual_seed(1)
    ids, labels = torch.randint(0, 61, (2, 40), generator=g), torch.randint(0, 61, (2, 40), generator=g)
    ref_loss, ref = _grads(ModelConfig(**BASE), ids, labels)
    loss, got = _grads(ModelConfig(**BASE, **options), ids, labels)
    torch.testing.assert_close(loss, ref_loss, rtol=TOL, atol=TOL)
    assert got.keys() == ref.keys()
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=TOL, atol=TOL, msg=name)


def test_offload_keeps_one_input_per_group_and_nothing_else():
    """Only the group inputs are saved: the recomputed function's intermediates are not."""
    offload = HostOffload().new_pass()
    x = torch.randn(2, 9, 4, requires_grad=True)
    w = torch.randn(4, 4, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        y = recompute_offloaded(lambda h: torch.tanh(h @ w) @ w, x, [w], offload)
    assert saved == []  # nothing through autograd's saved tensors: the input is in the offload slot
    y.sum().backward()
    expected_x, expected_w = torch.autograd.grad((torch.tanh(x @ w) @ w).sum(), (x, w))
    torch.testing.assert_close(x.grad, expected_x, rtol=TOL, atol=TOL)
    torch.testing.assert_close(w.grad, expected_w, rtol=TOL, atol=TOL)


class GatheredLinear(nn.Module):
    """A linear layer whose forward reads a fresh leaf copy of its weight, as FSDP2 gathers a
    block's shards into new tensors around its forward; the copy's gradient, once accumulated,
    is handed to the weight (FSDP2's reduce-scatter) by a hook on the copy."""

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(w)

    def forward(self, h):
        gathered = self.w.detach().clone().requires_grad_()
        gathered.register_post_accumulate_grad_hook(lambda t: setattr(self.w, "grad", t.grad.clone()))
        return torch.tanh(h @ gathered) @ gathered


def test_offload_back_propagates_into_the_tensors_its_recomputation_reads():
    """Parameters given as the shards and read as other tensors: the recomputation's own backward
    accumulates into what it read (hooks fire), and the input gets its gradient."""
    g = torch.Generator().manual_seed(5)
    x, w = torch.randn(2, 9, 4, generator=g, requires_grad=True), torch.randn(4, 4, generator=g)
    layer = GatheredLinear(w)
    y = recompute_offloaded(layer, x, [layer.w], HostOffload().new_pass())
    (y * y.detach()).sum().backward()
    ref = w.clone().requires_grad_()
    expected_x, expected_w = torch.autograd.grad(((torch.tanh(x @ ref) @ ref) * y.detach()).sum(), (x, ref))
    torch.testing.assert_close(x.grad, expected_x, rtol=TOL, atol=TOL)
    torch.testing.assert_close(layer.w.grad, expected_w, rtol=TOL, atol=TOL)


def test_offload_refuses_a_recomputation_reading_given_and_other_tensors():
    x, w, v = (torch.randn(3, 3, requires_grad=True) for _ in range(3))
    y = recompute_offloaded(lambda h: h @ w @ v, x, [w], HostOffload().new_pass())
    with pytest.raises(RuntimeError, match="read some of the parameters given to it and other tensors"):
        y.sum().backward()


def test_tiles_cover_every_token_once():
    x = torch.randn(2, 23, 3, requires_grad=True)
    calls = []

    def fn(t):
        calls.append(t.shape[1])
        return t * 2

    y = tiled(fn, x, [], tile=5)
    assert calls == [5, 5, 5, 5, 3]
    torch.testing.assert_close(y, x * 2)
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, 2.0))


def test_tiles_with_several_inputs_and_outputs_give_every_gradient():
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(2, 17, 3, generator=g, requires_grad=True), torch.randn(2, 17, 3, generator=g)
    w = torch.randn(3, 3, generator=g, requires_grad=True)

    def fn(x, y):
        return torch.tanh(x @ w) * y, x * 3

    out1, out2 = tiled(fn, (a, b), [w], tile=4)
    ref1, ref2 = fn(a, b)
    torch.testing.assert_close(out1, ref1)
    torch.testing.assert_close(out2, ref2)
    grads = torch.autograd.grad((out1 * ref1.detach()).sum() + out2.sum(), (a, w))
    expected = torch.autograd.grad((ref1 * ref1.detach()).sum() + ref2.sum(), (a, w))
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=TOL, atol=TOL)


def test_offload_options_are_refused_without_full_checkpointing():
    with pytest.raises(ValueError, match="offload_activations=True needs checkpointing='full'"):
        ModelConfig(**BASE, offload_activations=True, checkpointing="selective")
    with pytest.raises(ValueError, match="blocks_per_checkpoint"):
        ModelConfig(**BASE, blocks_per_checkpoint=2)
    with pytest.raises(ValueError, match="mlp_tile_tokens"):
        ModelConfig(**BASE, mlp_tile_tokens=-1)


def _module_step(loss_chunk_tokens, batch):
    torch.manual_seed(0)
    module = LongDocumentLM(model=dict(BASE, checkpointing="full", offload_activations=True),
                            attention={"variant": "standard"}, loss_chunk_tokens=loss_chunk_tokens)
    loss_sum, num_tokens, logits = module.loss_sums(module.prepare_batch(batch))
    (loss_sum / num_tokens).backward()
    return loss_sum.detach(), logits, {n: p.grad.clone() for n, p in module.named_parameters()}


def test_the_module_trains_on_the_chunked_loss_exactly_as_on_the_logits():
    g = torch.Generator().manual_seed(2)
    labels = torch.randint(0, 61, (2, 32), generator=g)
    labels[:, :5] = -100
    batch = {"input_ids": torch.randint(0, 61, (2, 32), generator=g), "labels": labels,
             "document_ids": torch.cat([torch.zeros(2, 12), torch.ones(2, 20)], 1).long()}
    ref_sum, ref_logits, ref = _module_step(0, batch)
    got_sum, got_logits, got = _module_step(None, batch)
    assert ref_logits is not None and got_logits is None  # the default never forms the logits
    torch.testing.assert_close(got_sum, ref_sum, rtol=TOL, atol=TOL)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=TOL, atol=TOL, msg=name)


def test_two_forwards_before_their_backwards_keep_their_own_inputs():
    """A loss built from two forward passes (each offloading) back-propagates both correctly."""
    torch.manual_seed(0)
    model = LongDocTransformer(ModelConfig(**BASE, checkpointing="full", offload_activations=True),
                               lambda i: SDPACore())
    ref = LongDocTransformer(ModelConfig(**BASE), lambda i: SDPACore())
    ref.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(5)
    a, b = torch.randint(0, 61, (1, 24), generator=g), torch.randint(0, 61, (1, 24), generator=g)
    (model(a).square().mean() + model(b).mean()).backward()
    (ref(a).square().mean() + ref(b).mean()).backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=TOL, atol=TOL, msg=name)


def test_a_tiled_output_whose_values_are_not_needed_still_gives_every_gradient():
    """values_needed=False (a recomputation that only differentiates through its output): the
    output holds NaN, and the gradients are those of the computed output."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 23, 6, generator=g, requires_grad=True)
    w = torch.randn(6, 6, generator=g, requires_grad=True)
    grad_y = torch.randn(2, 23, 6, generator=g)

    def fn(h):
        return torch.tanh(h @ w) * h

    ref = torch.autograd.grad(fn(x), (x, w), grad_y)
    y = tiled(fn, x, [w], tile=5, values_needed=False)
    assert y.shape == x.shape and torch.isnan(y).all()
    got = torch.autograd.grad(y, (x, w), grad_y)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=TOL, atol=TOL)


def test_offload_refuses_two_forwards_before_one_backward_through_gathering_modules():
    """The in-place backward (modules gathering their parameters, as FSDP2's) after two forwards:
    FSDP2 would drop a block's second recomputation's gradients, so it raises naming the options;
    one forward per backward, twice, is accepted."""
    g = torch.Generator().manual_seed(5)
    layer = GatheredLinear(torch.randn(4, 4, generator=g))
    x = torch.randn(2, 9, 4, generator=g, requires_grad=True)
    offload = HostOffload()
    y1 = recompute_offloaded(layer, x, [layer.w], offload.new_pass())
    y2 = recompute_offloaded(layer, x, [layer.w], offload.new_pass())
    with pytest.raises(RuntimeError, match=r"ran the model twice .*checkpointing=full .*strategy=ring \(DDP\)"):
        (y1.sum() + 0.5 * y2.sum()).backward()
    for _ in range(2):
        recompute_offloaded(layer, x, [layer.w], offload.new_pass()).sum().backward()
