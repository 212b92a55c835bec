"""Speculative decoding with Qwen3.5's own multi-token-prediction head (`speculative="mtp"`).

- The head's forward equals an independent torch one built from transformers' own Qwen3.5 decoder layer and norms
  (transformers loads no `mtp.*` weights, so the MTP wiring is written here from the published definition: vLLM's
  qwen3_next_mtp), dense and MoE.
- Greedy output is identical with and without MTP drafts on tiny random Qwen3.5s (dense, MoE) whose random heads
  are almost always wrong, and on a "copying" model whose head predicts what the model will say most of the time,
  so that drafts are accepted and rejected; on the API, a Session and the server.
- After a round of drafts the head's cache is exact: every round's first draft logits equal a fresh pass of the head
  over the whole sequence; the model's own cache (DeltaNet states, KV) equals a fresh pass.
- Under sampling, sampled answers keep the model's exact joint distribution (`Sampler.verify` with a draft drawn
  from q is checked in test_speculative).
"""

from __future__ import annotations

import asyncio
import json

import mlx.core as mx
import numpy as np
import pytest
import torch
from fixtures_qwen3 import *  # noqa: F403  (pytest fixture: qwen3_tokenizer_dir)
from test_speculative import chi_square, engine_counts, run_in_slot, run_together
from tiny import HYBRID_TEXT, randomise_hybrid

import mlxq
from mlxq.api import Session
from mlxq.engine.batch import forward
from mlxq.engine.cache import KVCache
from mlxq.engine.prompt_cache import CacheSlot
from mlxq.errors import InvalidRequest
from mlxq.models.moe import SparseMoE
from mlxq.models.mtp import MTPDraft

MOE = dict(num_experts=8, num_experts_per_tok=3, moe_intermediate_size=32, shared_expert_intermediate_size=48)


class TorchMTP(torch.nn.Module):
    """The MTP head as published (vLLM's Qwen3NextMultiTokenPredictor): zero-centred RMSNorms of the embedding of
    token t + 1 and of the model's last hidden state at t (after its final norm), concatenated embedding first,
    `fc`, one full-attention decoder layer of the family (transformers' own), the final norm."""

    def __init__(self, config, layer_cls, norm_cls):
        super().__init__()
        h = config.hidden_size
        self.pre_fc_norm_embedding = norm_cls(h, eps=config.rms_norm_eps)
        self.pre_fc_norm_hidden = norm_cls(h, eps=config.rms_norm_eps)
        self.fc = torch.nn.Linear(2 * h, h, bias=False)
        full = config.layer_types.index("full_attention")
        self.layers = torch.nn.ModuleList([layer_cls(config, full)])
        self.norm = norm_cls(h, eps=config.rms_norm_eps)

    def forward(self, model, tokens: torch.Tensor) -> torch.Tensor:
        """Logits [n - 1, V] for tokens 2..n of `tokens` [1, n] (position t predicts token t + 2)."""
        hidden = model.model(tokens).last_hidden_state[:, :-1]  # the text model's output is after its final norm
        embedded = model.model.embed_tokens(tokens[:, 1:])
        x = self.fc(torch.cat([self.pre_fc_norm_embedding(embedded), self.pre_fc_norm_hidden(hidden)], dim=-1))
        n = x.shape[1]
        positions = torch.arange(n).view(1, 1, -1).expand(3, 1, -1)
        rope = model.model.rotary_emb(x, positions)
        for layer in self.layers:
            x = layer(x, position_embeddings=rope, attention_mask=None, position_ids=positions[0])
        return model.lm_head(self.norm(x))[0]


def build(path, vocab: int, moe: bool, *, eos: int | None = None, seed: int = 0, copying: bool = False):
    """A tiny random Qwen3.5 (text) checkpoint with an MTP head, written to `path`; returns the torch model and its
    torch MTP head. `copying`: the network's mixers and MLPs are scaled down (the next token depends mostly on the
    current one) and the head reads only the embedding of token t + 1, through a layer scaled down alike, so it
    predicts what the model will say after that token most of the time (drafts accepted, and sometimes rejected),
    while its attention (its cache) still shows in its logits."""
    import transformers
    from safetensors.torch import load_file, save_file

    name = "qwen3_5_moe" if moe else "qwen3_5"
    mod = __import__(f"transformers.models.{name}.modeling_{name}", fromlist=["x"])
    prefix = "Qwen3_5Moe" if moe else "Qwen3_5"
    torch.manual_seed(seed)
    config_cls = getattr(transformers, f"{prefix}TextConfig")
    config = config_cls(**{**HYBRID_TEXT, **(MOE if moe else {}), "vocab_size": vocab},
                        tie_word_embeddings=not copying, eos_token_id=eos)
    model = getattr(transformers, f"{prefix}ForCausalLM")(config).eval()
    head = TorchMTP(config, getattr(mod, f"{prefix}DecoderLayer"), getattr(mod, f"{prefix}RMSNorm")).eval()
    with torch.no_grad():
        # Every matrix drawn here as transformers' init draws it (initializer_range): after some other tests in the
        # same process, a MoE model's experts came out of its constructor all zeros
        for p in [*model.parameters(), *head.parameters()]:
            if p.ndim >= 2:
                p.normal_(0.0, config.initializer_range)
        if copying:
            for n, p in model.named_parameters():
                if n.endswith(("o_proj.weight", "out_proj.weight", "down_proj.weight", "down_proj")):
                    p.mul_(0.15)
            for n, p in head.named_parameters():
                if n.endswith(("o_proj.weight", "down_proj.weight", "down_proj")):
                    p.mul_(0.15)
            h = config.hidden_size
            head.fc.weight.copy_(torch.cat([torch.eye(h), torch.zeros(h, h)], dim=1))
        else:
            randomise_hybrid(model)
            randomise_hybrid(head)  # its norms too: a missing 1 + w shows
    model.save_pretrained(path)
    weights = load_file(path / "model.safetensors")
    weights.update({f"mtp.{k}": v.contiguous() for k, v in head.state_dict().items()})
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "mtp_num_hidden_layers": 1}))
    return model, head


@pytest.fixture(scope="module", params=["dense", "moe"])
def reference(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"mtp-{request.param}")
    model, head = build(path, 160, request.param == "moe")
    return request.param, path, model, head


def test_mtp_forward_matches_a_torch_reference(reference):
    from mlxq.formats import open_checkpoint
    from mlxq.loading import load_model

    kind, path, model, head = reference
    net = load_model(open_checkpoint(str(path)))
    assert isinstance(net.mtp.layers[0].mlp, SparseMoE) == (kind == "moe")  # experts as the network's layers
    tokens = [(11 * i + 5) % 160 for i in range(40)]
    with torch.no_grad():
        want = head(model, torch.tensor([tokens])).numpy()
    # mlxq: the hidden states the engine keeps (the model's last layer output, its final norm applied), then the
    # head as the engine runs it (`batch.forward` of the MTP draft), over every position at once
    _, x = forward(net, mx.array([tokens]), net.make_cache(), [[]])
    draft = MTPDraft(net)
    logits, _ = forward(draft, mx.array([tokens[1:]]), draft.make_cache(), [list(range(len(tokens) - 1))],
                        net.norm(x[:, :-1]))
    got = np.array(logits)
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-4


# ------------------------------------------------------------------------------------------- the engine
@pytest.fixture(scope="module")
def mtp_models(qwen3_tokenizer_dir, tmp_path_factory):
    """`mlxq.Model`s with the real Qwen3 tokenizer: random dense and MoE heads, and a copying dense one."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(str(qwen3_tokenizer_dir))
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    out = {}
    for name, moe, copying in (("dense", False, False), ("moe", True, False), ("copying", False, True)):
        path = tmp_path_factory.mktemp(f"mtp-engine-{name}")
        build(path, len(tok), moe, eos=eos, copying=copying, seed=1)
        tok.save_pretrained(path)
        out[name] = mlxq.load(str(path))
    return out


PROMPTS = ["Once upon a time a dragon", "The soup was cold and the waiter", "A man walks into a bar and"]


@pytest.mark.parametrize("name", ["dense", "moe", "copying"])
def test_greedy_output_is_identical_with_and_without_mtp(mtp_models, name):
    model = mtp_models[name]
    prompts = [model.tokenizer.encode(f"{name}: {p}") for p in PROMPTS]
    plain = [model.generate(p, max_tokens=32).tokens for p in prompts]
    drafted0, accepted0 = engine_counts(model)
    fast = [model.generate(p, max_tokens=32, speculative="mtp").tokens for p in prompts]
    drafted, accepted = (a - b for a, b in zip(engine_counts(model), (drafted0, accepted0), strict=True))
    assert fast == plain
    assert drafted > 0
    if name == "copying":  # drafts taken, and some rejected (rolled back)
        assert drafted // 3 < accepted < drafted, (accepted, drafted)


def test_rows_with_mtp_lookup_and_no_drafts_batch_together(mtp_models):
    model = mtp_models["copying"]
    prompts = [model.tokenizer.encode(f"batch {i}: {p}") for i, p in enumerate(PROMPTS * 2)]
    plain = [model.generate(p, max_tokens=40).tokens for p in prompts]
    assert run_together(model, prompts, ["mtp", 0, 4, "mtp", "mtp", 0]) == plain


def test_every_draft_round_reads_an_exact_head_cache(mtp_models, monkeypatch):
    """The logits of each round's first draft step equal the head run fresh over the whole sequence so far: what
    the rejected drafts put in the head's cache is gone, and every position was read from the model's own hidden
    states. The model's cache after the answer equals a fresh pass too (DeltaNet states restored)."""
    model = mtp_models["copying"]
    runner = model.engine.runner
    rounds: list = []
    real = runner.mtp_draft

    def recording(tokens, first):
        logits = real(tokens, first)
        if first:
            mx.eval(logits)
            rounds.append(np.array(logits[0]))
        return logits

    monkeypatch.setattr(runner, "mtp_draft", recording)
    prompt = model.tokenizer.encode("exact: the rain in Spain falls mainly on the")
    slot = CacheSlot()
    drafted0, accepted0 = engine_counts(model)
    out = run_in_slot(model, slot, prompt, max_tokens=30, speculative="mtp")
    drafted, accepted = engine_counts(model)
    assert 0 < accepted - accepted0 < drafted - drafted0
    assert out.usage.cached_tokens == 0
    assert len(rounds) > 3
    # fresh: the model over every token, then the head over every position
    net, tokens = model.net, prompt + out.tokens
    _, x = forward(net, mx.array([tokens]), net.make_cache(), [[]])
    draft = MTPDraft(net)
    fresh, _ = forward(draft, mx.array([tokens[1:]]), draft.make_cache(), [list(range(len(tokens) - 1))],
                       net.norm(x[:, :-1]))
    fresh = np.array(fresh)
    # The rounds ran at positions where the answer's next token was known: after the prompt and each decode step.
    # Each round's logits must be one of the fresh rows at or after the prompt's last position, in order.
    at = len(prompt) - 1
    for got in rounds:
        while at < len(fresh) and not np.allclose(got, fresh[at], atol=1e-4, rtol=1e-3):
            at += 1
        assert at < len(fresh), "a draft round read a head cache no fresh pass gives"
    # the model's own cache: equal to a fresh pass over the same tokens
    fresh_cache = net.make_cache()
    mx.eval(net(mx.array([slot.tokens]), fresh_cache))
    for held, want in zip(slot.caches, fresh_cache, strict=True):
        assert held.offset == want.offset == len(slot.tokens)
        if isinstance(want, KVCache):
            pairs = [(held.keys[..., : want.offset, :], want.keys[..., : want.offset, :])]
        else:
            pairs = [(held.conv, want.conv), (held.recurrent, want.recurrent)]
        for a, b in pairs:
            assert np.allclose(np.array(a), np.array(b), atol=1e-4, rtol=1e-3)


def test_session_and_server_take_mtp(mtp_models):
    from test_server import MODEL, serving

    model = mtp_models["copying"]
    question = "Tell me about the rain in Spain."
    plain = Session(model, max_tokens=24)
    fast = Session(model, max_tokens=24, speculative="mtp")
    drafted = engine_counts(model)[0]
    for q in (question, "And then?"):  # the second turn resumes from the conversation's cache
        assert fast.ask(q) == plain.ask(q)
    assert engine_counts(model)[0] > drafted
    messages = [{"role": "user", "content": question}]
    with serving(model) as live:
        def ask(extra: dict):
            r = live.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0,
                                                    extra_body=extra)
            return r.choices[0].message.content

        drafted = live.engine.stats()["drafted"]
        assert ask({"mlxq": {"speculative": "mtp"}}) == ask({})
        assert live.engine.stats()["drafted"] > drafted
        bad = live.raw("/v1/chat/completions", json.dumps({"model": MODEL, "messages": messages,
                                                           "mlxq": {"speculative": "eagle"}}).encode())
        assert bad[0] == 400


def test_a_model_without_mtp_weights_says_so(hybrid_model_without_mtp):
    with pytest.raises(InvalidRequest, match=r"^speculative: .*no multi-token-prediction head \(mtp\.\* weights\)"):
        hybrid_model_without_mtp.generate("hello", max_tokens=4, speculative="mtp")
    with pytest.raises(InvalidRequest, match="speculative: must be"):
        hybrid_model_without_mtp.generate("hello", max_tokens=4, speculative="medusa")


@pytest.fixture(scope="module")
def hybrid_model_without_mtp(qwen3_tokenizer_dir, tmp_path_factory):
    """A checkpoint whose config names an MTP layer whose weights a conversion dropped: it loads, without a head."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(str(qwen3_tokenizer_dir))
    path = tmp_path_factory.mktemp("no-mtp")
    config = transformers.Qwen3_5TextConfig(**{**HYBRID_TEXT, "vocab_size": len(tok)}, tie_word_embeddings=True)
    transformers.Qwen3_5ForCausalLM(config).save_pretrained(path)
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "mtp_num_hidden_layers": 1}))
    tok.save_pretrained(path)
    model = mlxq.load(str(path))
    assert "mtp" not in model.net
    return model


# ------------------------------------------------------------------------------------------------ sampling
def test_sampled_answers_with_mtp_keep_their_distribution(mtp_models):
    """End to end: three tokens sampled among the two likeliest (top_k=2), drafted by the copying head, follow the
    model's exact joint distribution (computed from its logits), with drafts accepted and rejected on the way."""
    model = mtp_models["copying"]
    prompt = model.tokenizer.encode("Colours: red blue red blue")

    def dist(prefix: tuple[int, ...]) -> dict[int, float]:
        logits = np.array(model.logits(prompt + list(prefix))[-1], dtype=np.float64)
        top = np.argsort(-logits)[:2]
        q = np.exp(logits[top] - logits[top].max())
        return dict(zip(top.tolist(), (q / q.sum()).tolist(), strict=True))

    exact = {(): 1.0}
    for _ in range(3):
        exact = {k + (t,): p * pt for k, p in exact.items() for t, pt in dist(k).items()}
    n = 240

    async def sample_all():
        return await asyncio.gather(*(model.agenerate(prompt, max_tokens=3, ignore_eos=True, speculative="mtp",
                                                      temperature=1.0, top_k=2, seed=i) for i in range(n)))

    drafted0, accepted0 = engine_counts(model)
    results = asyncio.run(sample_all())
    drafted, accepted = engine_counts(model)
    assert 0 < accepted - accepted0 < drafted - drafted0  # drafts taken and drafts rejected
    counts: dict = {}
    for r in results:
        counts[tuple(r.tokens)] = counts.get(tuple(r.tokens), 0) + 1
    assert set(counts) <= set(exact)
    assert chi_square(counts, exact, n) < 24.32, (counts, exact)  # 7 degrees of freedom, p = 0.001
