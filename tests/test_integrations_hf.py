"""Hugging Face transformers integration: tiny randomly initialised BERT (padded encoder) and Llama
(causal decoder with grouped-query heads), built from configs; nothing is downloaded.

"Covering" settings (bucket_size or window at least the sequence length) make the sparse support
hold every pair, so Scatterbrain attention equals exact softmax attention; those runs are compared
with the dense ("sdpa") model at atol 1e-5 in float32.
"""

import inspect

import pytest
import torch

from scatterattn import ScatterbrainConfig
from scatterattn.integrations import AttachedScatterbrain, ExactAttention, ensure_torchvision_importable

ensure_torchvision_importable()  # no-op unless a torchvision with broken compiled ops is installed
transformers = pytest.importorskip("transformers", reason="transformers is in the test extra: pip install -e '.[test]'")

import scatterattn.integrations.hf as sb_hf  # noqa: E402  (registers "scatterbrain")
from scatterattn.integrations import restore_attention, swap_attention  # noqa: E402
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.cache_utils import DynamicCache  # noqa: E402

ATOL = 1e-5
COVER = ScatterbrainConfig(num_features=16, bucket_size=64)  # bucket >= every sequence here: exact
APPROX = ScatterbrainConfig(num_features=8, bucket_size=4)  # a real approximation at these lengths


def tiny_bert(**overrides) -> BertModel:
    torch.manual_seed(0)
    cfg = dict(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    cfg.update(overrides)
    return BertModel(BertConfig(**cfg), add_pooling_layer=False).eval()


def tiny_llama(**overrides) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = dict(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128,
    )
    cfg.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


def bert_batch():
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 100, (3, 12), generator=gen)
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, 8:] = 0  # right padding, as BERT tokenizers do
    mask[2, 5:] = 0
    return ids, mask


def llama_batch():
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 100, (2, 12), generator=gen)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :3] = 0  # left padding, as for batched generation
    return ids, mask


def test_scatterbrain_is_registered_with_both_interfaces():
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    assert ALL_ATTENTION_FUNCTIONS["scatterbrain"] is sb_hf.scatterbrain_attention_forward
    # transformers only builds masks for names in the mask interface's global mapping: without this
    # entry, padding would silently never reach the attention function.
    assert ALL_MASK_ATTENTION_FUNCTIONS._global_mapping["scatterbrain"] is sb_hf.scatterbrain_mask
    assert "scatterbrain" in sb_hf.REGISTERED


@torch.no_grad()
def test_bert_padded_batch_equals_dense_with_lazy_defaults():
    model = tiny_bert()
    ids, mask = bert_batch()
    dense = model(input_ids=ids, attention_mask=mask).last_hidden_state
    unmasked = model(input_ids=ids).last_hidden_state
    assert (dense[1, :8] - unmasked[1, :8]).abs().max() > 1e-3  # the padding mask matters here
    model.set_attn_implementation("scatterbrain")
    out = model(input_ids=ids, attention_mask=mask).last_hidden_state
    # All positions are compared: BERT masks keys only, so a padded query row attends the same real
    # keys under both implementations.
    torch.testing.assert_close(out, dense, atol=ATOL, rtol=0)
    cores = {n: m for n, m in model.named_modules() if n.endswith(".scatterbrain")}
    assert sorted(cores) == [f"encoder.layer.{i}.attention.self.scatterbrain" for i in range(2)]
    assert all(isinstance(m, AttachedScatterbrain) and m.config == ScatterbrainConfig() for m in cores.values())
    # Deterministic per layer: another model gets the same draws, and the layers differ.
    other = tiny_bert()
    other.set_attn_implementation("scatterbrain")
    other(input_ids=ids, attention_mask=mask)
    seeds = [int(m.seed) for m in cores.values()]
    assert len(set(seeds)) == 2
    assert seeds == [int(m.seed) for m in other.modules() if isinstance(m, AttachedScatterbrain)]


@pytest.mark.parametrize("family", ["bert", "llama"])
@torch.no_grad()
def test_from_pretrained_with_scatterbrain(tmp_path, family):
    model, (ids, mask) = (tiny_bert(), bert_batch()) if family == "bert" else (tiny_llama(), llama_batch())
    dense = model(input_ids=ids, attention_mask=mask)[0]
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path, attn_implementation="scatterbrain").eval()
    assert loaded.config._attn_implementation == "scatterbrain"
    out = loaded(input_ids=ids, attention_mask=mask)[0]
    real = mask.bool()  # (see test_llama_gqa_causal_padded_equals_dense for why only real positions)
    torch.testing.assert_close(out[real], dense[real], atol=ATOL, rtol=0)


@torch.no_grad()
def test_llama_gqa_causal_padded_equals_dense():
    model = tiny_llama()
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    ids, mask = llama_batch()
    dense = model(input_ids=ids, attention_mask=mask).logits
    report = sb_hf.configure(model, COVER)
    assert [name for name, _ in report] == [f"model.layers.{i}.self_attn" for i in range(2)]
    assert model.config._attn_implementation == "scatterbrain"
    out = model(input_ids=ids, attention_mask=mask).logits
    # Only real (non-padded) query positions are compared: a left-padded query row has no visible
    # key at all; the package returns zeros there, transformers' sdpa mask gives such rows another
    # convention. Those rows feed nothing that is compared (their keys are masked for every row).
    real = mask.bool()
    torch.testing.assert_close(out[real], dense[real], atol=ATOL, rtol=0)


@torch.no_grad()
def test_causality_holds_in_approximate_mode():
    # Local window + low-rank (no data-dependent bucketing): changing the last token must leave the
    # logits of every earlier position unchanged.
    model = tiny_llama()
    sb_hf.configure(model, num_features=16, sparse="local", window=4)
    ids, _ = llama_batch()
    changed = ids.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 100
    a, b = model(input_ids=ids).logits, model(input_ids=changed).logits
    torch.testing.assert_close(a[:, :-1], b[:, :-1], atol=1e-5, rtol=0)
    assert (a[:, -1] - b[:, -1]).abs().max() > 1e-3


@torch.no_grad()
def test_generation_with_kv_cache_matches_dense():
    model = tiny_llama()
    ids, mask = llama_batch()
    kw = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True)
    dense_dyn = model.generate(ids, **kw)
    dense_static = model.generate(ids, cache_implementation="static", **kw)
    model.set_attn_implementation("scatterbrain")  # lazy defaults: bucket 128 covers every pair here
    for ref, extra in ((dense_dyn, {}), (dense_static, {"cache_implementation": "static"})):
        got = model.generate(ids, **extra, **kw)
        assert torch.equal(got.sequences, ref.sequences)
        for a, b in zip(got.logits, ref.logits):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


@torch.no_grad()
def test_chunked_prefill_with_cache_is_bottom_right_causal():
    # 5 new queries against 12 keys (7 cached): transformers' causal alignment is bottom-right.
    model = tiny_llama()
    ids, mask = llama_batch()

    # the cache argument is `cache` from transformers 5.24 on, `past_key_values` before
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def two_chunks():
        first = model(input_ids=ids[:, :7], attention_mask=mask[:, :7], use_cache=True,
                      **{cache_arg: DynamicCache(config=model.config)})
        second = model(input_ids=ids[:, 7:], attention_mask=mask, use_cache=True, **{cache_arg: first.past_key_values})
        return second.logits

    dense = two_chunks()
    sb_hf.configure(model, COVER)
    torch.testing.assert_close(two_chunks(), dense, atol=ATOL, rtol=0)


def test_default_configuration_trains_with_finite_loss():
    for model, batch in ((tiny_llama(), llama_batch()), (tiny_bert(), bert_batch())):
        sb_hf.configure(model, APPROX)  # approximate at these lengths (bucket 4, 8 features)
        model.train()
        ids, mask = batch
        out = model(input_ids=ids, attention_mask=mask)
        hidden = out.logits if hasattr(out, "logits") else out.last_hidden_state
        loss = hidden.float().pow(2).mean()
        loss.backward()
        assert torch.isfinite(loss)
        grads = [p.grad for n, p in model.named_parameters() if "q_proj" in n or "attention.self.query" in n]
        assert grads and all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    # The library defaults too (lazily created cores), on a sequence longer than a bucket:
    model = tiny_llama(max_position_embeddings=320)
    model.set_attn_implementation("scatterbrain")
    model.train()
    ids = torch.randint(0, 100, (1, 300), generator=torch.Generator().manual_seed(3))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(model.model.layers[0].self_attn.q_proj.weight.grad).all()


def test_first_call_under_inference_mode_then_training():
    """Cores created lazily by a first forward under torch.inference_mode() (an evaluation before
    fine-tuning) hold ordinary buffers: training afterwards works."""
    model = tiny_llama()
    model.set_attn_implementation("scatterbrain")
    ids, mask = llama_batch()
    with torch.inference_mode():
        model(input_ids=ids, attention_mask=mask)
    model.train()
    loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(model.model.layers[0].self_attn.q_proj.weight.grad).all()


def test_attention_dropout_is_an_error_unless_ignored_or_exact():
    ids, mask = bert_batch()
    model = tiny_bert(attention_probs_dropout_prob=0.1).train()
    sb_hf.configure(model, APPROX)
    with pytest.raises(ValueError, match="attention dropout"):
        model(input_ids=ids, attention_mask=mask)
    sb_hf.configure(model, APPROX, attention_dropout="ignore")
    assert torch.isfinite(model(input_ids=ids, attention_mask=mask).last_hidden_state).all()
    sb_hf.configure(model, "exact")  # exact layers apply the dropout
    torch.manual_seed(5)
    a = model(input_ids=ids, attention_mask=mask).last_hidden_state
    b = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert (a - b).abs().max() > 0


@torch.no_grad()
def test_state_dict_round_trip_restores_outputs():
    ids, mask = llama_batch()
    a, b = tiny_llama(), tiny_llama()
    sb_hf.configure(a, APPROX, seed=1)
    sb_hf.configure(b, APPROX, seed=2)
    out_a, out_b = a(input_ids=ids).logits, b(input_ids=ids).logits
    assert (out_a - out_b).abs().max() > 1e-4  # different random features
    state = a.state_dict()
    assert "model.layers.0.self_attn.scatterbrain.feature_matrix" in state
    b.load_state_dict(state)
    torch.testing.assert_close(b(input_ids=ids).logits, out_a, atol=0, rtol=0)


@torch.no_grad()
def test_dense_checkpoint_loads_strictly_and_keeps_draws():
    dense = tiny_llama()
    model = tiny_llama()
    sb_hf.configure(model, APPROX, seed=3)
    before = model.model.layers[1].self_attn.scatterbrain.feature_matrix.clone()
    with torch.no_grad():
        for p in dense.parameters():
            p.add_(0.01)
    model.load_state_dict(dense.state_dict(), strict=True)  # no scatterbrain entries in it
    assert torch.equal(model.model.layers[1].self_attn.scatterbrain.feature_matrix, before)
    assert torch.equal(model.lm_head.weight, dense.lm_head.weight)


@torch.no_grad()
def test_per_layer_exact_and_approximate():
    ids, mask = llama_batch()
    model = tiny_llama()
    dense = model(input_ids=ids, output_hidden_states=True).hidden_states
    report = dict(sb_hf.configure(model, APPROX, per_layer={0: "exact"}))
    assert report == {"model.layers.0.self_attn": "exact", "model.layers.1.self_attn": "scatterbrain(features=8, lsh(bucket=4, hashes=1))"}
    assert isinstance(model.model.layers[0].self_attn.scatterbrain, ExactAttention)
    hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
    torch.testing.assert_close(hidden[1], dense[1], atol=ATOL, rtol=0)  # after the exact layer
    assert (hidden[2] - dense[2]).abs().max() > 1e-4  # the approximate layer changes things
    sb_hf.configure(model, APPROX, per_layer={"model.layers.0.self_attn": "exact", 1: "exact"})
    out = model(input_ids=ids, output_hidden_states=True).hidden_states
    torch.testing.assert_close(out[-1], dense[-1], atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match=r"per_layer keys \[7\] match no attention module"):
        sb_hf.configure(model, APPROX, per_layer={7: "exact"})
    assert isinstance(model.model.layers[0].self_attn.scatterbrain, ExactAttention)  # unchanged by the failed call
    with pytest.raises(TypeError, match="unknown Scatterbrain setting"):
        sb_hf.configure(model, {"bucket": 4})


def test_unsupported_masks_and_options_raise():
    ids, mask = llama_batch()
    model = tiny_llama()
    model.set_attn_implementation("scatterbrain")
    with pytest.raises(NotImplementedError, match="2-D padding mask"):
        model(input_ids=ids, attention_mask=torch.ones(2, 1, 12, 12, dtype=torch.bool).tril())
    with pytest.raises(ValueError, match="output_attentions"):
        model(input_ids=ids, output_attentions=True)
    mistral = transformers.MistralForCausalLM(
        transformers.MistralConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, sliding_window=4)
    ).eval()
    mistral.set_attn_implementation("scatterbrain")
    with pytest.raises(NotImplementedError, match="sliding window"):
        mistral(input_ids=ids)
    with pytest.raises(ValueError, match="no attention module"):
        sb_hf.configure(torch.nn.Linear(3, 3))


@torch.no_grad()
def test_swap_and_restore_hf_model_inside_a_wrapper():
    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lm = tiny_llama()

        def forward(self, ids):
            return self.lm(input_ids=ids).logits

    ids, _ = llama_batch()
    wrapper = Wrapper()
    dense = wrapper(ids)
    report = swap_attention(wrapper, APPROX)
    assert report.names == ["lm.model.layers.0.self_attn", "lm.model.layers.1.self_attn"]
    assert {e.kind for e in report} == {"hf"} and "sdpa" in report.replaced[0].before
    assert wrapper.lm.config._attn_implementation == "scatterbrain"
    assert (wrapper(ids) - dense).abs().max() > 1e-4
    restored = restore_attention(wrapper)
    assert restored.names == report.names
    assert wrapper.lm.config._attn_implementation == "sdpa"
    assert not any(n.endswith("scatterbrain") for n, _ in wrapper.named_modules())
    torch.testing.assert_close(wrapper(ids), dense, atol=0, rtol=0)
    with pytest.raises(ValueError, match="nothing to restore"):
        restore_attention(wrapper)


# ----------------------------------------------------------------------------- chained-gradient attention


def test_lowrank_grad_attention_is_registered_with_both_interfaces():
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    assert ALL_ATTENTION_FUNCTIONS[sb_hf.LOWRANK_NAME] is sb_hf.lowrank_grad_attention_forward
    assert ALL_MASK_ATTENTION_FUNCTIONS._global_mapping[sb_hf.LOWRANK_NAME] is sb_hf.scatterbrain_mask
    assert sb_hf.REGISTERED == ["scatterbrain", "scatterbrain_lowrank_grad"]


def llama_loss_and_grads(model, ids, mask):
    model.zero_grad()
    logits = model(input_ids=ids, attention_mask=mask).logits
    loss = logits[mask.bool()].float().pow(2).mean()  # real positions only (see the GQA test above)
    loss.backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_lowrank_grad_llama_exact_forward_and_chained_backward():
    """Exact model, approximate gradient, inside a padded GQA Llama: the forward equals sdpa's; with
    exact factors the chain gives sdpa's gradients; with the defaults the gradients are finite and
    every (batch, kv-head) group of every layer is counted."""
    from scatterattn import lora

    ids, mask = llama_batch()
    model = tiny_llama()
    dense_logits, dense_grads = llama_loss_and_grads(model, ids, mask)
    model.set_attn_implementation(sb_hf.LOWRANK_NAME)
    for layer in model.model.layers:
        layer.self_attn.scatterbrain_lowrank_kwargs = {"factors": "exact", "threshold": None, "stats": None}
    logits, grads = llama_loss_and_grads(model, ids, mask)
    real = mask.bool()
    torch.testing.assert_close(logits[real], dense_logits[real], atol=ATOL, rtol=0)
    assert grads.keys() == dense_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, dense_grads[name], atol=ATOL, rtol=1e-4, msg=name)

    stats = lora.ChainedGradientStats()
    for layer in model.model.layers:
        layer.self_attn.scatterbrain_lowrank_kwargs = {"num_features": 32, "stats": stats, "seed": 0,
                                                       "sparse": "local", "window": 4}
    logits, grads = llama_loss_and_grads(model, ids, mask)
    torch.testing.assert_close(logits[real], dense_logits[real], atol=ATOL, rtol=0)
    assert all(torch.isfinite(g).all() for g in grads.values())
    name = "model.layers.0.self_attn.q_proj.weight"
    assert (grads[name] - dense_grads[name]).norm() > 1e-3 * dense_grads[name].norm()  # approximate
    assert stats.approximate + stats.fallback == 2 * 2 * 2  # layers x batch x kv heads


@pytest.mark.parametrize("implementation", ["scatterbrain", "scatterbrain_lowrank_grad"])
def test_llama_trains_under_autocast(implementation):
    """Mixed-precision training (torch.autocast, as the transformers Trainer's bf16=True) hands the
    attention fp32 q and k (after the rotary embedding) and a bf16 v: attended in bf16, as SDPA does,
    and equal to dense under the covering setting. Before: a dtype error on every forward."""
    ids, mask = llama_batch()
    losses, grads = {}, {}
    for name in ("sdpa", implementation):
        model = tiny_llama().train()
        if name == "scatterbrain":
            sb_hf.configure(model, COVER)
        elif name != "sdpa":
            model.set_attn_implementation(name)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        losses[name] = loss.item()
        grads[name] = model.model.layers[0].self_attn.q_proj.weight.grad
    assert abs(losses[implementation] - losses["sdpa"]) < 1e-3, losses  # bf16 attention both ways
    assert torch.isfinite(grads[implementation]).all()
    cosine = torch.nn.functional.cosine_similarity(grads[implementation].flatten(), grads["sdpa"].flatten(), dim=0)
    assert cosine > 0.99, cosine
