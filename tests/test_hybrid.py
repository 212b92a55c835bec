"""Qwen3.5 (dense, MoE), Qwen3-Next: logits equal transformers' on tiny random checkpoints; caches rewind."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
import torch
from fixtures_qwen3 import *  # noqa: F403  (pytest fixtures: qwen3_tokenizer_dir)
from tiny import HYBRID_TEXT, randomise_hybrid

from mlxq.engine.cache import KVCache, RecurrentCache, checkpoint, restore
from mlxq.errors import ConfigError
from mlxq.formats import open_checkpoint
from mlxq.loading import load_model

TEXT = HYBRID_TEXT
MOE = dict(num_experts=8, num_experts_per_tok=3, moe_intermediate_size=32, shared_expert_intermediate_size=48)
VISION = dict(depth=1, hidden_size=32, intermediate_size=32, num_heads=2, out_hidden_size=64)

# name: (config class, model class, config kwargs, wrapped in a vision-language config)
ARCHS = {
    "qwen3_5_text": ("Qwen3_5TextConfig", "Qwen3_5ForCausalLM", dict(TEXT, tie_word_embeddings=True), False),
    "qwen3_5_vl": ("Qwen3_5Config", "Qwen3_5ForConditionalGeneration", TEXT, True),
    "qwen3_5_moe_text": ("Qwen3_5MoeTextConfig", "Qwen3_5MoeForCausalLM", {**TEXT, **MOE}, False),
    "qwen3_5_moe_vl": ("Qwen3_5MoeConfig", "Qwen3_5MoeForConditionalGeneration", {**TEXT, **MOE}, True),
    # not periodic, and a dense MLP among the MoE layers
    "qwen3_next": (
        "Qwen3NextConfig",
        "Qwen3NextForCausalLM",
        {
            **TEXT,
            **MOE,
            "num_hidden_layers": 5,
            "mlp_only_layers": [1],
            "norm_topk_prob": False,
            "layer_types": [
                "linear_attention",
                "full_attention",
                "full_attention",
                "linear_attention",
                "linear_attention",
            ],
        },
        False,
    ),
}

PROMPT = [(7 * i + 3) % 160 for i in range(70)]  # two DeltaNet chunks, the second one partial
DECODE = [8, 19, 140, 2, 77, 45, 90, 13, 101, 66, 25, 38, 149, 4, 58, 71]  # 16 cached steps


def rel(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


def make_tiny(arch: str, path, seed: int = 0, **overrides):
    """Builds, saves and returns the transformers model (fp32, eval mode), with every norm, gate bias and
    decay parameter randomised so that a mishandled one shows in the logits; `overrides` change the config."""
    import transformers

    cfg_cls, model_cls, kwargs, wrapped = ARCHS[arch]
    kwargs = {**kwargs, **overrides}
    torch.manual_seed(seed)
    config_cls = getattr(transformers, cfg_cls)
    config = config_cls(text_config=kwargs, vision_config=VISION) if wrapped else config_cls(**kwargs)
    model = getattr(transformers, model_cls)(config).eval()
    randomise_hybrid(model)
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module", params=sorted(ARCHS))
def arch(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    ref = make_tiny(request.param, path)
    with torch.no_grad():
        ref_logits = ref(torch.tensor([PROMPT + DECODE])).logits[0].numpy()
    return request.param, path, ref_logits


def test_prompt_logits_match_transformers(arch):
    _, path, ref = arch
    net = load_model(open_checkpoint(str(path)))
    out = net(mx.array([PROMPT]), net.make_cache())[0]
    assert rel(out, ref[: len(PROMPT)]) < 1e-4


def test_cached_decode_matches_transformers(arch):
    _, path, ref = arch
    net = load_model(open_checkpoint(str(path)))
    cache = net.make_cache()
    steps = [net(mx.array([PROMPT]), cache)[0, -1]]
    for tok in DECODE[:-1]:
        steps.append(net(mx.array([[tok]]), cache)[0, -1])
    assert rel(mx.stack(steps), ref[len(PROMPT) - 1 : -1]) < 1e-4


def test_prefill_in_pieces_equals_one_call(arch):
    _, path, _ = arch
    net = load_model(open_checkpoint(str(path)))
    whole = net(mx.array([PROMPT]), net.make_cache())[0, -1]
    cache = net.make_cache()
    for a, b in [(0, 3), (3, 40), (40, 41), (41, 70)]:  # step path, chunked path, one token, chunked again
        last = net(mx.array([PROMPT[a:b]]), cache)[0, -1]
    assert rel(last, whole) < 1e-5


def test_checkpoint_restore_gives_identical_logits(arch):
    _, path, _ = arch
    net = load_model(open_checkpoint(str(path)))
    cache = net.make_cache()
    net(mx.array([PROMPT[:30]]), cache)
    saved = checkpoint(cache)
    first = [net(mx.array([PROMPT[30:50]]), cache)[0]] + [net(mx.array([[t]]), cache)[0] for t in DECODE[:4]]
    restore(cache, saved)
    assert all(c.offset == 30 for c in cache)
    again = [net(mx.array([PROMPT[30:50]]), cache)[0]] + [net(mx.array([[t]]), cache)[0] for t in DECODE[:4]]
    for a, b in zip(first, again, strict=True):
        assert mx.array_equal(a, b)
    # and a different continuation from the same point does not see the first one
    restore(cache, saved)
    other = net(mx.array([DECODE[:5]]), cache)[0, -1]
    fresh = net.make_cache()
    net(mx.array([PROMPT[:30]]), fresh)
    assert rel(other, net(mx.array([DECODE[:5]]), fresh)[0, -1]) < 1e-6


def test_non_periodic_layer_types_build_the_right_layers(tmp_path):
    make_tiny("qwen3_next", tmp_path)
    net = load_model(open_checkpoint(str(tmp_path)))
    kinds = [("linear" if layer.is_linear else "full") for layer in net.model.layers]
    assert kinds == ["linear", "full", "full", "linear", "linear"]
    assert [type(c) for c in net.make_cache()] == [RecurrentCache, KVCache, KVCache, RecurrentCache, RecurrentCache]
    assert [type(layer.mlp).__name__ for layer in net.model.layers] == [
        "SparseMoE",
        "GatedMLP",
        "SparseMoE",
        "SparseMoE",
        "SparseMoE",
    ]


def test_full_attention_interval_when_no_layer_types(tmp_path):
    make_tiny("qwen3_5_text", tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    del cfg["layer_types"]
    cfg.update(num_hidden_layers=4, full_attention_interval=2)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    from mlxq.models import build_model

    net = build_model(cfg)
    assert [layer.is_linear for layer in net.model.layers] == [True, False, True, False]


def test_fused_expert_tensors_load_like_per_expert_ones(tmp_path):
    """HF's fused 3-D `experts.gate_up_proj` / `experts.down_proj` (Qwen3.5-MoE hub checkpoints) give the
    same model as the per-expert tensors transformers writes."""
    from safetensors.numpy import load_file, save_file

    ref = make_tiny("qwen3_5_moe_text", tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    fused = {k: v for k, v in tensors.items() if ".experts." not in k}
    for layer in range(TEXT["num_hidden_layers"]):
        p = f"model.layers.{layer}.mlp.experts"
        n = MOE["num_experts"]
        fused[f"{p}.gate_up_proj"] = np.stack(
            [
                np.concatenate([tensors[f"{p}.{e}.gate_proj.weight"], tensors[f"{p}.{e}.up_proj.weight"]])
                for e in range(n)
            ]
        )
        fused[f"{p}.down_proj"] = np.stack([tensors[f"{p}.{e}.down_proj.weight"] for e in range(n)])
    (tmp_path / "model.safetensors").unlink()
    save_file(fused, tmp_path / "model.safetensors", metadata={"format": "pt"})
    net = load_model(open_checkpoint(str(tmp_path)))
    with torch.no_grad():
        want = ref(torch.tensor([PROMPT[:12]])).logits[0].numpy()
    assert rel(net(mx.array([PROMPT[:12]]), net.make_cache())[0], want) < 1e-4


def test_mtp_weights_load_only_into_a_head_the_config_names(tmp_path):
    """`mtp.*` weights are ignored unless the config names MTP layers; then they must all be there (the head itself
    is checked in test_mtp)."""
    from safetensors.numpy import load_file, save_file

    from mlxq.errors import FormatError

    make_tiny("qwen3_5_text", tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["mtp.fc.weight"] = np.ones((64, 128), np.float32)
    tensors["mtp.layers.0.input_layernorm.weight"] = np.zeros((64,), np.float32)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    net = load_model(open_checkpoint(str(tmp_path)))
    assert "mtp" not in net
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "mtp_num_hidden_layers": 1}))
    with pytest.raises(FormatError, match="missing tensor 'mtp"):
        load_model(open_checkpoint(str(tmp_path)))


def test_experts_per_token_override_changes_routing(tmp_path):
    ref = make_tiny("qwen3_5_moe_text", tmp_path)
    net = load_model(open_checkpoint(str(tmp_path)))
    tokens = mx.array([PROMPT[:12]])
    base = net(tokens, net.make_cache())
    net.set_experts_per_tok(MOE["num_experts"])  # all experts: a different, still finite, output
    wide = net(tokens, net.make_cache())
    assert not mx.allclose(base, wide) and bool(mx.isfinite(wide).all())
    net.set_experts_per_tok(MOE["num_experts_per_tok"])
    assert mx.array_equal(net(tokens, net.make_cache()), base)
    # the load-time option is the same routing as transformers' model configured with that k
    narrow = load_model(open_checkpoint(str(tmp_path)), experts_per_tok=1)
    for layer in ref.model.layers:
        layer.mlp.gate.top_k = 1
    with torch.no_grad():
        want = ref(torch.tensor([PROMPT[:40]])).logits[0].numpy()  # 40 tokens: the grouped-expert path
    assert rel(narrow(mx.array([PROMPT[:40]]), narrow.make_cache())[0], want) < 1e-4
    with pytest.raises(ConfigError, match="not in 1..8"):
        load_model(open_checkpoint(str(tmp_path)), experts_per_tok=9)
    make_tiny("qwen3_5_text", tmp_path / "dense")
    with pytest.raises(ConfigError, match="experts per token"):
        load_model(open_checkpoint(str(tmp_path / "dense")), experts_per_tok=2)


def test_partial_rotary_defaults_to_a_quarter():
    """transformers fills in partial_rotary_factor = 0.25 for all three when a config states none."""
    from mlxq.models import build_model

    cfg = {**TEXT, "model_type": "qwen3_next", **MOE, "rope_theta": 1e6}
    assert build_model(cfg).model.layers[3].self_attn.rope.dims == TEXT["head_dim"] // 4
    cfg["partial_rotary_factor"] = 0.5  # Qwen3-Next hub configs state it at the top level
    assert build_model(cfg).model.layers[3].self_attn.rope.dims == TEXT["head_dim"] // 2


def test_mlx_lm_quantized_checkpoint_loads(tmp_path):
    """A Qwen3.5-MoE dir as mlx-lm writes it (mlx-community layout): `language_model.model.*` names,
    `switch_mlp` experts, conv [C, K, 1], norms already shifted, 4-bit weights with 8-bit routers keyed by
    mlx-lm's module paths. Same logits as mlx-lm's own model on the same weights, prompt and decode."""
    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_lm.models import qwen3_5_moe
    from mlx_lm.utils import quantize_model, save_config, save_model

    rope = {"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.25}
    config = {
        "model_type": "qwen3_5_moe",
        "text_config": {**TEXT, **MOE, "model_type": "qwen3_5_moe_text", "rope_parameters": rope},
    }
    theirs = qwen3_5_moe.Model(qwen3_5_moe.ModelArgs.from_dict(json.loads(json.dumps(config))))
    mx.random.seed(0)
    theirs.update(
        tree_unflatten(
            [(k, mx.random.normal(v.shape) * 0.3 + ("norm" in k)) for k, v in tree_flatten(theirs.parameters())]
        )
    )
    theirs, config = quantize_model(theirs, config, group_size=32, bits=4)
    save_model(tmp_path, theirs)
    save_config(config, tmp_path / "config.json")
    ours = load_model(open_checkpoint(str(tmp_path)))
    assert type(ours.model.layers[0].mlp.gate).__name__ == "QuantizedLinear" and ours.model.layers[0].mlp.gate.bits == 8
    ours_cache, their_cache = ours.make_cache(), theirs.make_cache()
    got = [ours(mx.array([PROMPT[:40]]), ours_cache)[0]]
    want = [theirs(mx.array([PROMPT[:40]]), cache=their_cache)[0]]
    for tok in DECODE[:4]:
        got.append(ours(mx.array([[tok]]), ours_cache)[0])
        want.append(theirs(mx.array([[tok]]), cache=their_cache)[0])
    assert rel(mx.concatenate(got), mx.concatenate(want)) < 1e-4


def test_blocked_prefill_attention_matches_transformers(arch, monkeypatch):
    """Long prefill chunks take the query-blocked causal attention path (off Metal); with small blocks it
    runs here on a short prompt, after a cached prefix, and must give the same logits."""
    from mlxq.models import qwen3_5

    monkeypatch.setattr(qwen3_5, "PREFILL_BLOCK", 16)
    _, path, ref = arch
    net = load_model(open_checkpoint(str(path)))
    cache = net.make_cache()
    first = net(mx.array([PROMPT[:20]]), cache)[0]
    rest = net(mx.array([PROMPT[20:]]), cache)[0]
    assert rel(mx.concatenate([first, rest]), ref[: len(PROMPT)]) < 1e-4


# ------------------------------------------------------------------------------ the Python API on a hybrid
@pytest.fixture(scope="module")
def hybrid_api_model(qwen3_tokenizer_dir, tmp_path_factory):
    """`mlxq.Model`: a tiny random Qwen3.5 with the real Qwen3 tokenizer and chat template, and its torch twin."""
    import transformers

    import mlxq

    path = tmp_path_factory.mktemp("hybrid-api")
    tok = transformers.AutoTokenizer.from_pretrained(str(qwen3_tokenizer_dir))
    torch.manual_seed(1)
    config = transformers.Qwen3_5TextConfig(
        **{**TEXT, "vocab_size": len(tok), "tie_word_embeddings": True},
        eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
    )
    ref = transformers.Qwen3_5ForCausalLM(config).eval()
    ref.save_pretrained(path)
    tok.save_pretrained(path)
    return mlxq.load(str(path)), ref


def test_api_generate_on_a_hybrid_follows_transformers(hybrid_api_model):
    """Model.generate (chunked prefill, pipelined decode over DeltaNet + KV caches) picks transformers'
    greedy token at every step (up to ties), and Model.logits agrees with it."""
    model, ref = hybrid_api_model
    prompt = "A man walks into a bar and asks for a glass of water. " * 12  # several 64-token DeltaNet chunks
    ids = model.encode_prompt(prompt, raw=True)  # the forward pass alone: no chat turn, no thinking control
    out = model.generate(prompt, max_tokens=12, temperature=0.0, raw=True)
    assert out.finish_reason in ("length", "stop") and out.tokens
    with torch.no_grad():
        want = ref(torch.tensor([ids + out.tokens])).logits[0].numpy()
    steps = want[len(ids) - 1 : len(ids) - 1 + len(out.tokens)]
    chosen = steps[np.arange(len(out.tokens)), out.tokens]
    assert np.all(chosen >= steps.max(axis=-1) - 1e-4 * np.abs(steps).max())
    assert rel(model.logits(ids + out.tokens), want) < 1e-4


def test_session_on_a_hybrid_resumes_from_checkpoints(hybrid_api_model):
    """Recurrent layers cannot rewind by position: a Session keeps whole-cache checkpoints at the end of
    each turn's history and resumes from them, giving what a fresh cache gives."""
    from mlxq.api import Session

    model, _ = hybrid_api_model
    s = Session(model, system="You are a game master.", max_tokens=6, temperature=0.0)
    answers = [s.ask(q) for q in ("Is it about soup?", "Did he die?")]
    assert all(answers)
    assert not model.engine.rewindable and isinstance(s.slot.caches[0], RecurrentCache) and s.slot.marks
    second = s.stats[1]
    assert 0 < second.cached_tokens and second.cached_tokens + second.processed_tokens == second.prompt_tokens
    fresh = Session(model, max_tokens=6, temperature=0.0)
    fresh.messages = s.messages[:-2]
    assert fresh.ask("Did he die?") == answers[1] and fresh.stats[0].cached_tokens == 0
