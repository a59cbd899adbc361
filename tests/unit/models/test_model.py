"""LongDocTransformer: shapes, rotary embeddings from given positions, GQA, checkpointing.

Most tests use a tiny local attention core (SDPA with GQA expansion) so they prove
properties of the model alone; the last ones run the real engine single-device.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ring_lightning.models.model import PRESETS, LongDocTransformer, ModelConfig

# float32 on CPU: the same math in a different order (split halves, checkpoint replay,
# GQA by repetition) agrees to a few ulps of activations of size ~1.
ATOL = 1e-5
# A uniform shift of every position changes the rotation angles in float64 and rounds
# them to float32 tables: agreement to ~1e-5 relative, not bit-exact.
SHIFT_ATOL = 1e-4


class SDPACore(nn.Module):
    """Stand-in attention core: single-device SDPA, kv heads repeated for GQA."""

    def forward(self, q, k, v, is_causal=True, already_split=True):
        groups = q.shape[2] // k.shape[2]
        k, v = (x.repeat_interleave(groups, dim=2) for x in (k, v))  # (B,T,K,D) -> (B,T,H,D)
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # (B,T,H,D) -> (B,H,T,D)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
        return out.transpose(1, 2)  # (B,H,T,D) -> (B,T,H,D)


class PrefixCacheCore(nn.Module):
    """Keeps the keys/values of the previous call: the second half attends to the first.

    Models what a ring does for the second of two ranks (contiguous layout) without a
    process group: it only works if RoPE rotated the cached keys with their own positions.
    """

    def __init__(self):
        super().__init__()
        self.k = self.v = None

    def forward(self, q, k, v, is_causal=True, already_split=True):
        if self.k is not None:
            k, v = torch.cat([self.k, k], 1), torch.cat([self.v, v], 1)  # (B, T0+T, K, D)
        self.k, self.v = k, v
        groups = q.shape[2] // k.shape[2]
        k, v = (x.repeat_interleave(groups, dim=2) for x in (k, v))
        T, S = q.shape[1], k.shape[1]
        mask = torch.ones(T, S, dtype=torch.bool).tril(diagonal=S - T)  # query i sees keys <= S-T+i
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
        return out.transpose(1, 2)


def tiny(**overrides):
    return ModelConfig.preset("tiny", **overrides)


def make(config=None, core=SDPACore, seed=0):
    torch.manual_seed(seed)
    return LongDocTransformer(config or tiny(), lambda i: core())


def ids(B=2, T=32, vocab=259, seed=1):
    return torch.randint(vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def test_forward_shapes_and_default_positions():
    model = make()
    x = ids()
    logits = model(x)
    assert logits.shape == (2, 32, 259)
    torch.testing.assert_close(logits, model(x, torch.arange(32)), atol=0, rtol=0)
    torch.testing.assert_close(logits, model(x, torch.arange(32).expand(2, 32)), atol=0, rtol=0)
    with pytest.raises(ValueError, match="position_ids"):
        model(x, torch.arange(31))


def test_rope_uses_given_positions_not_arange():
    model, x = make(), ids()
    base = model(x)
    gap = torch.cat([torch.arange(16), torch.arange(16) + 116])  # positions with a hole
    assert not torch.allclose(base, model(x, gap), atol=1e-3)
    # RoPE is relative: shifting every position by the same amount changes nothing.
    torch.testing.assert_close(base, model(x, torch.arange(32) + 100_000), atol=SHIFT_ATOL, rtol=0)


def test_split_halves_with_global_positions_match_full_sequence():
    model_full = make()
    model_split = make(core=PrefixCacheCore)
    model_split.load_state_dict(model_full.state_dict())
    x = ids(T=32)
    full = model_full(x)
    first = model_split(x[:, :16], torch.arange(16))
    second = model_split(x[:, 16:], torch.arange(16, 32))  # global positions of the second shard
    torch.testing.assert_close(torch.cat([first, second], 1), full, atol=ATOL, rtol=0)


def test_gqa_equals_mha_with_repeated_kv_weights():
    gqa = make(tiny(n_heads=4, n_kv_heads=2))
    mha = make(tiny(n_heads=4, n_kv_heads=4))
    state = gqa.state_dict()
    D = gqa.config.head_dim
    for key, value in state.items():
        if key.endswith(("wk.weight", "wv.weight")):
            # (K*D, C) -> (K, D, C) -> repeat each kv head for its 2 query heads -> (H*D, C)
            state[key] = value.view(2, D, -1).repeat_interleave(2, dim=0).reshape(4 * D, -1)
    mha.load_state_dict(state)
    assert gqa.layers[0].attention.wk.weight.shape == (2 * D, 64)
    x = ids()
    torch.testing.assert_close(gqa(x), mha(x), atol=ATOL, rtol=0)


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_checkpointing_gives_identical_outputs_and_grads(mode):
    config = tiny(n_layers=3, checkpointing="none")
    ref = make(config)
    ckpt = make(tiny(n_layers=3, checkpointing=mode, checkpoint_every_n_layers=2))
    ckpt.load_state_dict(ref.state_dict())
    runs = [0] * 3  # how often each layer's first norm ran: twice where backward recomputed it
    for i, layer in enumerate(ckpt.layers):
        layer.attention_norm.register_forward_pre_hook(lambda mod, args, i=i: runs.__setitem__(i, runs[i] + 1))
    x = ids()
    out_ref, out_ckpt = ref(x), ckpt(x)
    torch.testing.assert_close(out_ckpt, out_ref, atol=0, rtol=0)
    out_ref.square().mean().backward()
    out_ckpt.square().mean().backward()
    assert runs == ([2, 1, 2] if mode == "selective" else [2, 2, 2])
    for (name, p), q in zip(ref.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=ATOL, rtol=0, msg=name)


def test_presets_have_their_advertised_sizes():
    expected = {"tiny": 0.13e6, "small": 3.1e6, "350m": 340e6, "1b": 974e6, "3b": 2.82e9, "8b": 6.98e9}  # byte vocabulary
    for name in PRESETS:
        with torch.device("meta"):  # no memory, no init cost
            model = LongDocTransformer(ModelConfig.preset(name), lambda i: nn.Identity())
        assert math.isclose(model.num_params(), expected[name], rel_tol=0.02), name


def test_flops_per_token():
    model = make()
    n = model.num_params(exclude_embedding=True)
    c = model.config
    dense = 6 * n + 12 * c.n_layers * c.n_heads * c.head_dim * 1024
    assert model.flops_per_token(1024, causal=False) == dense
    assert model.flops_per_token(1024) == 6 * n + (dense - 6 * n) / 2
    assert model.flops_per_token(1024, causal=False, attention_fraction=0.25) == 6 * n + (dense - 6 * n) / 4


@pytest.mark.parametrize(
    "bad, field",
    [
        (dict(n_kv_heads=3), "n_kv_heads"),
        (dict(dim=60), "dim"),
        (dict(checkpointing="some"), "checkpointing"),
        (dict(n_layers=0), "n_layers"),
    ],
)
def test_bad_config_raises_value_error_naming_field(bad, field):
    with pytest.raises(ValueError, match=field):
        tiny(**bad)


def test_config_from_mapping_and_preset():
    assert ModelConfig.from_any({"preset": "tiny", "n_layers": 3}).n_layers == 3
    assert ModelConfig.from_any({"dim": 128, "n_heads": 4}).hidden_dim == 384
    with pytest.raises(ValueError, match="preset"):
        ModelConfig.preset("huge")
    with pytest.raises(ValueError, match="n_layer"):
        ModelConfig.from_any({"n_layer": 2})


# ------------------------------------------------------------------ with the real engine

attention = pytest.importorskip("ring_lightning.attention")


def test_matches_stand_in_with_standard_ring_attention_single_device():
    ref = make()
    ring = LongDocTransformer(tiny(), lambda i: attention.create_ring_attention("standard"))
    ring.load_state_dict(ref.state_dict())
    x = ids()
    torch.testing.assert_close(ring(x), ref(x), atol=ATOL, rtol=0)
    ring(x).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in ring.parameters())


def test_dilated_attention_runs_and_differs_from_dense():
    dense = LongDocTransformer(tiny(), lambda i: attention.create_ring_attention("standard"))
    dilated = LongDocTransformer(
        tiny(), lambda i: attention.create_ring_attention("standard", segment_lengths=[8, 16], dilation_rates=[1, 2])
    )
    dilated.load_state_dict(dense.state_dict())
    x = ids(T=32)
    out = dilated(x)
    assert out.shape == (2, 32, 259) and torch.isfinite(out).all()
    assert not torch.allclose(out, dense(x), atol=1e-4)
    # Position 0 attends to itself alone under causal dense and under every dilated head.
    torch.testing.assert_close(out[:, 0], dense(x)[:, 0], atol=ATOL, rtol=0)
