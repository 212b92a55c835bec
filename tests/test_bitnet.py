"""BitNet b1.58: mlxq's logits equal transformers' BitNetForCausalLM with packed ternary BitLinear layers (int8
activations, per-tensor weight_scale), prompt and 16 cached steps; and the float (unquantized) variant."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
import torch
from test_models import DECODE, PROMPT, rel

from mlxq.formats import open_checkpoint
from mlxq.kernels import ternary
from mlxq.loading import load_model
from mlxq.models.bitnet import unpack_hf

CONFIG = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5,
              bos_token_id=1, eos_token_id=2)  # BitNetConfig's defaults (128000/1) lie past this vocab
QUANT = {"quant_method": "bitnet", "linear_class": "bitlinear", "quantization_mode": "offline"}


def make_bitnet(path, packed: bool, seed: int = 0, **overrides):
    """A tiny random BitNetForCausalLM (packed: BitLinear layers with random ternary codes and weight_scale), saved
    the way the hub checkpoints are (uint8 packed weights, `quantization_config`); `overrides` change the config."""
    import torch._dynamo
    from safetensors.torch import save_file
    from transformers import BitNetConfig, BitNetForCausalLM
    from transformers.integrations.bitnet import BitLinear, pack_weights

    torch._dynamo.config.disable = True  # BitLinear's helpers are torch.compile'd: plain eager is enough here
    torch.manual_seed(seed)
    config = BitNetConfig(**{**CONFIG, **overrides})
    model = BitNetForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.2)
    if packed:  # transformers' replace_with_bitnet_linear builds on the meta device: do the same swap on the CPU
        gen = torch.Generator().manual_seed(seed + 1)
        for name, m in list(model.named_modules()):
            if isinstance(m, torch.nn.Linear) and name != "lm_head":
                layer = BitLinear(m.in_features, m.out_features, bias=False, dtype=torch.float32)
                codes = torch.randint(-1, 2, (m.out_features, m.in_features), generator=gen)
                layer.weight.copy_(pack_weights(codes.clone()))
                layer.weight_scale.fill_(float(torch.empty(1).uniform_(2.0, 8.0, generator=gen)))
                model.set_submodule(name, layer)
    state = {k: v.contiguous() for k, v in model.state_dict().items()
             if "rotary_emb" not in k and not (config.tie_word_embeddings and k == "lm_head.weight")}
    save_file(state, str(path / "model.safetensors"))
    cfg = config.to_dict()
    if packed:
        cfg["quantization_config"] = QUANT
    (path / "config.json").write_text(json.dumps(cfg))
    return model


@pytest.fixture(scope="module", params=["packed", "float"])
def bitnet(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"bitnet_{request.param}")
    ref = make_bitnet(path, request.param == "packed")
    with torch.no_grad():
        logits = ref(torch.tensor([PROMPT + DECODE])).logits[0].numpy()
    return path, logits


def test_prompt_and_cached_steps_match_transformers(bitnet):
    path, ref = bitnet
    net = load_model(open_checkpoint(str(path)))
    cache = net.make_cache()
    prompt = net(mx.array([PROMPT]), cache)[0]
    assert rel(prompt, ref[: len(PROMPT)]) < 1e-4
    steps = [prompt[-1]]
    for tok in DECODE[:-1]:
        steps.append(net(mx.array([[tok]]), cache)[0, -1])
    assert rel(mx.stack(steps), ref[len(PROMPT) - 1 : -1]) < 1e-4


def test_hf_packing_and_scale_convention():
    """transformers' pack_weights round-trips through unpack_hf, and a packed BitLinear's output is
    (int8 x . codes) / (weight_scale * input_scale) = ternary_matmul with scale 1 / weight_scale."""
    import torch._dynamo
    from transformers.integrations.bitnet import BitLinear, pack_weights

    torch._dynamo.config.disable = True
    codes = torch.randint(-1, 2, (12, 256), generator=torch.Generator().manual_seed(3))
    packed = pack_weights(codes.clone())
    assert (np.asarray(unpack_hf(mx.array(packed.numpy()))) == codes.numpy()).all()
    layer = BitLinear(256, 12, bias=False, dtype=torch.float32)
    layer.weight.copy_(packed)
    layer.weight_scale.fill_(4.0)
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = layer(x).numpy()
    w = ternary.TernaryWeight(ternary.pack(mx.array(codes.numpy()), "tq2"), mx.array([0.25]), 256, "tq2")
    xq, scale = ternary.quantize_activations(mx.array(x.numpy()))
    assert rel(ternary.ternary_matmul(xq, w, scale), want) < 1e-6


def test_quantize_ternary_writes_the_packing_losslessly(tmp_path):
    """`mlxq quantize --recipe ternary` on a packed BitNet checkpoint writes mlxq's ternary packing (uint8 codes,
    one scale a row, int8 activations recorded) and, with the embeddings and norms kept in float32, the result
    still matches transformers: the ternary weights lost nothing. No warning: the model was trained ternary."""
    from io import StringIO

    from rich.console import Console

    from mlxq.quant import pipeline
    from mlxq.quant.recipes import make_recipe

    path = tmp_path / "src"
    path.mkdir()
    with torch.no_grad():
        ref = make_bitnet(path, packed=True)(torch.tensor([PROMPT + DECODE])).logits[0].numpy()
    out = tmp_path / "ternary"
    pipeline._ternary_warned = False
    log = StringIO()
    recipe = make_recipe("ternary", overrides={"embeddings": "float"})
    pipeline.quantize(str(path), out, recipe, dtype=mx.float32, progress=False, console=Console(file=log))
    assert "TERNARY" not in log.getvalue()
    cfg = json.loads((out / "config.json").read_text())
    entry = cfg["quantization"]["model.layers.0.mlp.down_proj"]
    assert entry["mode"] == "ternary" and entry["packing"] == "tq2" and entry["act_bits"] == 8
    ckpt = open_checkpoint(str(out))
    assert ckpt.tensors.info("model.layers.0.mlp.down_proj.weight").dtype == "uint8"
    net = load_model(ckpt)
    assert rel(net(mx.array([PROMPT + DECODE]), net.make_cache())[0], ref) < 1e-4
