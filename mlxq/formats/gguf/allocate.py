"""Types moved within a mix by the KL each move measurably adds, at the mix's own size
(`mlxq export --calibrate --method allocate`).

Why: on SmolLM2, quantizing one tensor class at a time with llama.cpp's own quantizer (the others Q8_0) and scoring
by llama-perplexity shows the KL sits in a few classes whose type is too coarse, and adds up per class (Q2_K's
classes sum to 0.287 against 0.29 for the whole file). ffn_down in Q3_K adds 0.157 nats (54 % of Q2_K's KL), in
Q4_K 0.003; attn_v in Q4_0 0.053, in Q5_0 0.014; ffn_up in Q4_0 0.036. Better codes within a type (GPTQ) cut the
layer error, yet the KL stays. So the bits are moved, and what a move costs is measured, not estimated: a
second-order (Fisher-weighted error) estimate, tried first, missed ffn_down's cliff (Q3_K -> Q4_K is 50x in KL; it
predicted about 4x) and scored no better than llama.cpp at Q2_K.

How: tensors are grouped by class (the GGUF name without its block number: every layer's ffn_down is one group).
Each group may move `OFFSETS` steps along its row width's ladder, every tensor from its own mix type (so the mix's
per-layer shape is kept). On calibration text the model runs with every tensor quantized (ggml's importance-weighted
fits, the codes the export writes) at the mix's types, and again with one group moved at a time, everything else at
the mix's types; the KL to the float model that each move adds is its cost. All these variants run together, layer
by layer (`measured_kl`): one decoder layer's weights are in memory at a time, as in calibration, so the pass
needs no more memory than the variants' hidden states (and the embedding at each candidate type), however big the
model. A budgeted choice (`allocate`, an exact multiple-choice knapsack) then picks, with the file's quantized bits at
most the mix's, once a step per group, and once a type per tensor, a group's measured KL shared among its tensors as
their importance-weighted errors change (whole groups are coarse: at Q4_K_M a class's step from Q5_0 to Q8_0 is 3
bits a weight). The greedy by KL saved per bit used before spent SmolLM2's Q4_K_M budget on token_embd's one big
step and missed the best pair of moves (attn_q to IQ4_NL paying for attn_v in Q8_0: -0.0123 against -0.0074). A
last pass measures both picks; the lowest KL of them and the mix is written.

Status (bench/gguf_export.py --part quality --methods allocate, scored by llama-perplexity on 8 x 512 held-back
tokens; the "float" model is the pinned Q4_1 GGUF dequantized): KL against llama.cpp+imatrix's at the same mix is
0.027651 / 0.034621 (0.799) at Q4_K_M (6.1309 / 6.1655 bpw), 0.041068 / 0.092745 (0.44) at Q3_K_M (5.3902 / 5.4551),
0.052019 / 0.291572 (0.18) at Q2_K (5.1123 / 5.1394). The whole-group pick won at every mix (on the calibration
text, Q4_K_M: 0.0276 against the per-tensor pick's 0.0371 and the mix's 0.0393: attn_q in IQ4_NL, attn_v in Q8_0).
Before the IQ4_NL rung and the exact choice: 0.91 / 0.43 / 0.20; the IQ4_NL rung with the greedy choice: 1.036 at
Q4_K_M (6.0915 bpw). About 190-260 s CPU on SmolLM2 (4 x 256 tokens, 29-31 variants).

Tried at Q4_K_M before the IQ4_NL rung and not kept (same bench, against 0.91 then): each class measured in three
bands of ten layers (46 moves instead of 16) reached 0.03131 on the calibration text but scored 0.032891 (0.95) at
6.1408 bpw, 406 s CPU; the classes measured on 2048 tokens instead of 1024 scored 0.032315 (0.93), 352 s CPU.
Neither finer groups nor more measured tokens carried over to the held-back text; the cheaper rung and the exact
choice did.

Ladders hold the K-quants, or for rows that are not whole 256-blocks IQ4_NL (4.5 bits, non-linear) and the
symmetric legacy types llama.cpp falls back to (Q5_0, Q8_0). Q4_0, llama.cpp's fallback at 4.5 bits, stands on
IQ4_NL's rung, so its step down is to IQ4_NL at the same size. Q4_1/Q5_1 are left out because they hold an
affine-quantized source exactly and would win on a re-quantized checkpoint (the bench's SmolLM2 is one) for the
wrong reason. Only tensors the model holds whole
move (the export's `allocated`); parts of a fused or stacked one (routed experts, split projections) keep the mix's.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from mlxq.formats.base import Checkpoint
from mlxq.formats.gguf.codecs import bits_per_weight

K_LADDER = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0")
LEGACY_LADDER = ("IQ4_NL", "Q5_0", "Q8_0")
# a mix's type off the ladder moves from where the ladder's type of its size stands (Q4_0 one step down reaches
# IQ4_NL, at the same 4.5 bits)
TWINS = {"Q4_0": "IQ4_NL", "Q4_1": "IQ4_NL", "Q5_1": "Q5_0"}
OFFSETS = (-1, 1, 2)  # steps a group may move from the mix's types
MEASURE_TOKENS = 1024  # of the calibration text, in sequences of MEASURE_SEQ
MEASURE_SEQ = 256
RESOLUTION = 1 << 14  # steps of the bit budget in the exact allocation


def ladder(kind: str, cols: int) -> tuple[str, ...] | None:
    """The types a tensor of `kind` with rows of `cols` may move along, or None when it stays (floats, ternary)."""
    rungs = K_LADDER if cols % 256 == 0 else LEGACY_LADDER if cols % 32 == 0 else ()
    return rungs if TWINS.get(kind, kind) in rungs else None


@dataclass(frozen=True)
class Tensor:
    """One quantized tensor of the mix: the model parameter it is, its group, the mix's type, its shape's say."""

    name: str
    group: str
    kind: str
    cols: int
    size: int  # weights

    def at(self, offset: int) -> str:
        """The type `offset` steps from the mix's along its ladder (clamped at the ends; a type off the ladder moves
        from where its twin stands)."""
        rungs = ladder(self.kind, self.cols)
        if rungs is None or offset == 0:
            return self.kind
        at = rungs.index(TWINS.get(self.kind, self.kind))
        return rungs[min(max(at + offset, 0), len(rungs) - 1)]


Variant = dict[str, str]  # parameter name -> the type it is quantized at; the others stay float
Measure = Callable[[list[Variant]], list[float]]


def choose(measure: Measure, tensors: list[Tensor], error: Callable[[str, str], float],
           say: Callable[[str], None] = lambda line: None) -> Variant:
    """A type per tensor, by measured KL. Each group's moves are measured one at a time against the mix
    (`measure` gives each variant's mean KL to the float model on the calibration text). Two picks by `allocate`,
    each at no more bits than the mix: one moving whole groups; one moving single tensors, a group's measured KL
    shared among its tensors as their importance-weighted errors (`error(name, type)`, computed while measuring)
    change. Both picks are measured once more, and the lowest KL of the mix and the picks wins."""
    mix = {t.name: t.kind for t in tensors}
    if all(t.at(o) == t.kind for t in tensors for o in OFFSETS):
        return mix  # nothing can move (no tensor on a ladder): no pass to run
    groups: dict[str, list[Tensor]] = {}
    for t in tensors:
        groups.setdefault(t.group, []).append(t)
    moves = []  # (group, offset), each a distinct set of types
    for g, ts in groups.items():
        seen = {tuple(t.kind for t in ts)}
        for o in OFFSETS:
            types = tuple(t.at(o) for t in ts)
            if types not in seen:
                seen.add(types)
                moves.append((g, o))
    variants = [mix] + [{**mix, **{t.name: t.at(o) for t in groups[g]}} for g, o in moves]
    base, *kls = measure(variants)
    whole = {g: {"+0": (_bits(ts, 0), 0.0)} for g, ts in groups.items()}
    single = {t.name: {t.kind: (_bits([t], 0), 0.0)} for t in tensors}
    for (g, o), kl in zip(moves, kls, strict=True):
        whole[g][f"{o:+d}"] = (_bits(groups[g], o), kl - base)
        say(f"{g} {o:+d} steps ({', '.join(sorted({t.at(o) for t in groups[g]}))}): KL {kl - base:+.5f}")
        for t, share in shares(groups[g], o, error).items():
            cost = (kl - base) * share
            if share > 0 and cost < single[t.name].get(t.at(o), (0.0, np.inf))[1]:
                single[t.name][t.at(o)] = (_bits([t], o), cost)
    by_group = allocate([Choice(g, opts, "+0") for g, opts in whole.items()])
    picks = [{t.name: t.at(int(by_group[t.group])) for t in tensors},
             allocate([Choice(t.name, single[t.name], t.kind) for t in tensors])]
    picks = [p for i, p in enumerate(picks) if p != mix and p not in picks[:i]]
    if not picks:
        say(f"kept the mix (KL {base:.5f} on the calibration text)")
        return mix
    kls = measure(picks)
    say(f"KL on the calibration text: mix {base:.5f}, moved {', '.join(f'{kl:.5f}' for kl in kls)}")
    best = int(np.argmin(kls))
    return picks[best] if kls[best] < base else mix


def shares(group: list[Tensor], offset: int, error: Callable[[str, str], float]) -> dict[Tensor, float]:
    """Each tensor's part of its group's move: its change of error over the group's (only changes the same way as
    the group's count)."""
    change = {t: error(t.name, t.at(offset)) - error(t.name, t.kind) for t in group}
    sign = np.sign(sum(change.values())) or 1.0
    part = {t: max(sign * c, 0.0) for t, c in change.items()}
    total = sum(part.values())
    return {t: p / total if total > 0 else 1 / len(group) for t, p in part.items()}


def _bits(tensors: list[Tensor], offset: int) -> float:
    return sum(t.size * bits_per_weight(t.at(offset)) for t in tensors)


def parameter_names(model) -> set[str]:
    return {name for name, _ in tree_flatten(model.parameters())}


def measured_kl(ckpt: Checkpoint, batches: list[list[int]], variants: list[Variant],
                weights: Callable[[list[tuple[str, str]]], list[mx.array]],
                progress: Callable[[], None] = lambda: None) -> list[float]:
    """Mean KL(float || variant) per token on `batches` (sequences of one length) for each variant, parameter n
    quantized at type k taken from `weights([(n, k), ...])` (dequantized, in the model's layout). Runs layer by
    layer: every variant's hidden states go through decoder layer i before layer i+1 is read from the checkpoint,
    and a layer's quantized weights are asked for together (so they can be encoded side by side), once for all
    variants, and dropped with the layer."""
    from mlxq.models import build_model, text_config
    from mlxq.quant.calibrate import _layer_of, _LayerSource

    model = build_model(text_config(ckpt.config))
    model.eval()
    unknown = {n for v in variants for n in v} - parameter_names(model)
    if unknown:
        raise ValueError(f"not parameters of the model: {sorted(unknown)[:3]}")
    source = _LayerSource(ckpt, model)
    everyone = [{}, *variants]  # the float model first
    made: dict[tuple[str, str], mx.array] = {}

    def make(own: dict[str, mx.array]) -> None:
        """Every variant's quantized weights among `own` (a layer's, or those outside the layers)."""
        wanted = sorted({(n, v[n]) for v in variants for n in own.keys() & v.keys()} - made.keys())
        made.update(zip(wanted, weights(wanted), strict=True))

    def load(own: dict[str, mx.array], variant: Variant) -> None:
        """The float weights `own`, the variant's replaced."""
        model.load_weights([(n, made[n, variant[n]] if n in variant else w) for n, w in own.items()], strict=False)

    source.bind(None)
    outside = {n: w for n, w in tree_flatten(model.parameters()) if _layer_of(n) is None}
    make(outside)
    tokens = mx.array(batches)
    caches = [model.make_cache() for _ in everyone]  # made while every layer is still there to say its kind
    hidden = []
    for v in everyone:
        load(outside, v)
        hidden.append(model.embed(tokens))
        mx.eval(hidden[-1])
    layers = model.layers
    for i in range(len(layers)):
        source.bind(i)
        prefix = f"model.layers.{i}"
        own = {f"{prefix}.{n}": w for n, w in tree_flatten(layers[i].parameters())}
        make(own)
        for j, v in enumerate(everyone):
            load(own, v)
            hidden[j] = layers[i](hidden[j], caches[j][i])
            caches[j][i] = None
            mx.eval(hidden[j])
        layers[i] = None
        made = {k: w for k, w in made.items() if not k[0].startswith(prefix + ".")}
        mx.clear_cache()
        progress()
    totals = [0.0] * len(variants)
    for b in range(len(batches)):  # one sequence's logits at a time: [seq, vocab] each
        load(outside, {})
        ref = _logprobs(model.head(model.norm(hidden[0][b])))
        p = mx.exp(ref)
        for j, v in enumerate(variants):
            load(outside, v)
            kl = (p * (ref - _logprobs(model.head(model.norm(hidden[j + 1][b]))))).sum()
            totals[j] += kl.item()
    return [t / tokens.size for t in totals]


def _logprobs(logits: mx.array) -> mx.array:
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


@dataclass
class Choice:
    """One tensor's candidates: type -> (bits, estimated cost)."""

    name: str
    options: dict[str, tuple[float, float]]
    start: str  # the mix's own type


def allocate(choices: list[Choice], resolution: int = RESOLUTION) -> dict[str, str]:
    """A type per tensor minimising the summed cost with total bits at most the mix's: a multiple-choice knapsack,
    solved exactly by dynamic programming over the bits each tensor takes above its smallest option, counted in
    `resolution` steps of the room the budget leaves there (rounded up, so never over budget). The mix's own types
    win ties and whatever the rounding misses."""
    start = {c.name: c.start for c in choices}
    budget = _bits_of(choices, start)
    low = [min(b for b, _ in c.options.values()) for c in choices]
    room = budget - sum(low)
    if room <= 0:
        return start
    step = room / resolution
    least = np.full(resolution + 1, np.inf)  # least cost with exactly r steps used
    least[0] = 0.0
    steps, taken = [], np.zeros((len(choices), resolution + 1), np.int16)
    for i, c in enumerate(choices):
        own = [math.ceil((bits - low[i]) / step) for bits, _ in c.options.values()]
        steps.append(own)
        now = np.full_like(least, np.inf)
        for k, ((_, cost), w) in enumerate(zip(c.options.values(), own, strict=True)):
            if w > resolution:
                continue
            with_k = np.full_like(least, np.inf)
            with_k[w:] = least[: resolution + 1 - w] + cost
            better = with_k < now
            now[better], taken[i, better] = with_k[better], k
        least = now
    r, pick = int(np.argmin(least)), {}
    for i in reversed(range(len(choices))):
        k = int(taken[i, r])
        pick[choices[i].name] = list(choices[i].options)[k]
        r -= steps[i][k]
    fits = _bits_of(choices, pick) <= budget
    return pick if fits and _total(choices, pick) < _total(choices, start) else start


def _total(choices: list[Choice], pick: dict[str, str]) -> float:
    return sum(c.options[pick[c.name]][1] for c in choices)


def _bits_of(choices: list[Choice], pick: dict[str, str]) -> float:
    return sum(c.options[pick[c.name]][0] for c in choices)
