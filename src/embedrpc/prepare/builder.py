"""Build a serving graph for a Qwen3 embedding model from its checkpoint tensors.

The graph, per layer (H hidden, N query heads, K key/value heads, D head size):

    residual ─ SkipSimplifiedLayerNormalization ─ MatMul [H, (N+2K)·D] ─ Split → q, k, v
    q, k ─ per-head SimplifiedLayerNormalization (q_norm, k_norm) ─┐
    GroupQueryAttention(q, k, v, empty cache, seqlens_k, total_length, cos, sin; rotary
    inside) ─ MatMul (o)
    ─ SkipSimplifiedLayerNormalization ─ MatMul [H, 2I] ─ Split → gate, up
    ─ QuickGelu(gate, alpha=1) = SiLU · up ─ MatMul (down) ─ next layer's norm

then the final norm, pooling (last real token, or mean / first token as the
sentence-transformers config says) and L2 normalisation, all inside the graph:
inputs `input_ids`, `attention_mask` [B, S] int64 (right-padded), output
`sentence_embedding` [B, H] float32.

A reranker (Qwen3-Reranker: a Qwen3ForCausalLM whose model card scores a pair with
softmax over the last position's logits of "no" and "yes") ends differently: after
the final norm of the last real token, one float32 projection with weight
w_yes − w_no (those two rows of the LM head: lm_head.weight, or the token embeddings
when tied and no lm_head is stored) and a sigmoid, since softmax over two logits taking "yes" is
sigmoid(logit_yes − logit_no). Output `score` [B] float32; the 151,669-wide logits are
never computed. Metadata embedrpc.task = rerank.

Precision. In fp16/bf16 graphs the matrix products, attention and the per-head
norms run in the low precision, while the residual stream, every norm over the
hidden size (their sums of squares), pooling and normalisation stay float32:
that is where Qwen3 overflows fp16. Values that enter fp16 from a projection can
still exceed its range (±65504); for that each layer can carry two power-of-two
divisors, one folded into the value projection (attention is linear in V) and
one into the up projection (the MLP output is linear in `up`), undone in
float32 after the o and down projections. The divisors are chosen by measuring
the float32 graph (`probes=True` adds per-layer maxima as outputs), so they are
exact scalings of the same arithmetic.

int8 (for CPUs) keeps everything float32 except the four matrix products per
layer: int8 weights with one scale per output channel, activations quantised
per token (row) at run time, integer GEMM (uint8 × int8, VNNI where the CPU has
it). Per-token scales keep every vector independent of its batch-mates, which
per-tensor dynamic quantisation would not.

`emulate=True` builds a float32 graph that rounds to the low precision at every
point where the real graph would hold low-precision values (weights included,
overflow to inf included): the CPU check of fp16 and bf16 graphs, since ONNX
Runtime's CPU provider has no bf16 kernels and computes fp16 ones in float32.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .checkpoint import Qwen3Config, Weights, float32_to_bf16
from .errors import PrepareError

OPSET = 18
IR_VERSION = 8
BUILDER_VERSION = 2  # 2: mean pooling masks with Where
FP16_MAX = 65504.0
POOLINGS = ("lasttoken", "mean", "cls")
TASKS = ("embed", "rerank")
# Values entering fp16 are kept this far below its largest finite value.
FP16_HEADROOM = 16.0


@dataclass(frozen=True, kw_only=True)
class GraphOptions:
    # fp32, fp16 or bf16: the type of weights, products and attention; int8: float32 with
    # int8 matrix products (weights per output channel, activations per token)
    precision: str = "fp32"
    emulate: bool = False
    pooling: str = "lasttoken"
    normalize: bool = True
    probes: bool = False
    # Per layer: (divisor folded into v_proj, divisor folded into up_proj); powers of two.
    scales: dict[int, tuple[float, float]] = field(default_factory=dict)
    # embed: pooled, normalised vectors; rerank: a relevance score per row (Qwen3-Reranker)
    task: str = "embed"
    # rerank: the token ids of "yes" and "no", whose LM-head rows make the score
    rerank_tokens: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.precision not in ("fp32", "fp16", "bf16", "int8"):
            raise ValueError(f"precision {self.precision!r}: use fp32, fp16, bf16 or int8")
        if self.emulate and self.precision not in ("fp16", "bf16"):
            raise ValueError("emulate is for fp16 and bf16")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling {self.pooling!r}: use one of {', '.join(POOLINGS)}")
        if self.task not in TASKS:
            raise ValueError(f"task {self.task!r}: use one of {', '.join(TASKS)}")
        if self.task == "rerank" and (self.rerank_tokens is None or self.pooling != "lasttoken"):
            raise ValueError("a reranker needs rerank_tokens (yes, no) and reads the last "
                             "token (pooling lasttoken)")


def _onnx() -> Any:
    try:
        import onnx
    except ImportError:
        raise PrepareError("embedrpc prepare needs the onnx package: "
                           "pip install onnx (an embedrpc dependency)") from None
    return onnx


class _Graph:
    """Nodes and initializers with unique names, and the precision helpers."""

    def __init__(self, options: GraphOptions) -> None:
        self.onnx = _onnx()
        tp = self.onnx.TensorProto
        self.options = options
        self.nodes: list[Any] = []
        # The model is built in place: weights go straight into its initializers, since
        # copying gigabytes of tensors into a graph and the graph into a model (as
        # onnx.helper's make_graph and make_model do) took half the build time.
        self.model = self.onnx.ModelProto()
        self.initializers = self.model.graph.initializer
        self.outputs: list[Any] = []
        self._count = 0
        self.low = {"fp32": tp.FLOAT, "int8": tp.FLOAT, "fp16": tp.FLOAT16,
                    "bf16": tp.BFLOAT16}[options.precision]
        self.real_low = self.low != tp.FLOAT and not options.emulate
        self.emulating = self.low != tp.FLOAT and options.emulate
        # The type the low-precision region computes in (float32 when emulating).
        self.compute = self.low if self.real_low else tp.FLOAT

    def fresh(self, base: str) -> str:
        self._count += 1
        return f"{base}_{self._count}"

    def node(self, op: str, inputs: list[str], n_out: int = 1, *, domain: str = "",
             name: str = "", outputs: list[str] | None = None, **attrs: Any) -> Any:
        base = name or op
        outs = outputs or [self.fresh(f"{base}/out{i}") for i in range(n_out)]
        self.nodes.append(self.onnx.helper.make_node(
            op, inputs, outs, name=self.fresh(base), domain=domain, **attrs))
        return outs[0] if len(outs) == 1 else outs

    # ------------------------------------------------------------------ constants

    def const(self, name: str, array: np.ndarray) -> str:
        tensor = self.initializers.add()  # as numpy_helper.from_array fills it
        tensor.name = name
        tensor.data_type = self.onnx.helper.np_dtype_to_tensor_dtype(array.dtype)
        tensor.dims.extend(array.shape)
        tensor.raw_data = np.ascontiguousarray(array).astype(
            array.dtype.newbyteorder("<"), copy=False).tobytes()
        return name

    def ints(self, values: list[int], name: str = "") -> str:
        return self.const(name or self.fresh("const_i64"), np.array(values, dtype=np.int64))

    def f32(self, value: float) -> str:
        return self.const(self.fresh("const_f32"), np.array(value, dtype=np.float32))

    def weight(self, name: str, array: np.ndarray) -> str:
        """A tensor of the low-precision region (stored low, or rounded when emulating)."""
        array = np.ascontiguousarray(array, dtype=np.float32)
        if self.low == self.onnx.TensorProto.FLOAT:
            return self.const(name, array)
        if self.options.precision == "fp16":
            with np.errstate(over="ignore"):
                low = array.astype(np.float16)
            if self.emulating:
                return self.const(name, low.astype(np.float32))
            return self.const(name, low)
        bits = float32_to_bf16(array)
        if self.emulating:
            return self.const(name, (bits.astype(np.uint32) << 16).view(np.float32))
        tensor = self.initializers.add()
        tensor.name = name
        tensor.data_type = self.onnx.TensorProto.BFLOAT16
        tensor.dims.extend(array.shape)
        tensor.raw_data = bits.tobytes()
        return name

    def weight_f32(self, name: str, array: np.ndarray) -> str:
        return self.const(name, np.ascontiguousarray(array, dtype=np.float32))

    def linear(self, x: str, name: str, weight: np.ndarray) -> str:
        """x @ weight ([in, out]); named `name` (initializer) and `name/` (nodes)."""
        node = name.replace(".", "/", 1) if name.startswith("layers.") else name
        if self.options.precision != "int8":
            return self.rounded(self.node("MatMul", [x, self.weight(name, weight)], name=node))
        return self._linear_int8(x, name, node, np.ascontiguousarray(weight, dtype=np.float32))

    def _linear_int8(self, x: str, name: str, node: str, weight: np.ndarray) -> str:
        """Symmetric int8: weights per output channel, activations per token (row), so a
        token's result depends on nothing else in the batch. Integer GEMM (uint8 with zero
        point 128 × int8), then both scales in float32."""
        tp = self.onnx.TensorProto
        w_scale = np.abs(weight).max(axis=0) / 127.0
        w_scale[w_scale == 0] = 1.0
        w_int8 = np.clip(np.rint(weight / w_scale), -127, 127).astype(np.int8)
        wq = self.const(name, w_int8)
        ws = self.const(f"{name}.scale", w_scale.astype(np.float32))
        amax = self.node("ReduceMax", [self.node("Abs", [x]), self.ints([-1])], keepdims=1)
        scale = self.node("Max", [self.node("Mul", [amax, self.f32(1.0 / 127.0)]),
                                  self.f32(1e-30)], name=f"{node}/token_scale")
        shifted = self.node("Add", [self.node("Round", [self.node("Div", [x, scale])]),
                                    self.f32(128.0)])
        xq = self.node("Cast", [shifted], to=tp.UINT8)
        zero = self.const(self.fresh("zero_point_u8"), np.array(128, dtype=np.uint8))
        acc = self.node("MatMulInteger", [xq, wq, zero], name=node)
        out = self.node("Mul", [self.node("Cast", [acc], to=tp.FLOAT), scale])
        return self.node("Mul", [out, ws])

    # ------------------------------------------------------------------ precision

    def to_low(self, x: str) -> str:
        """float32 → the low-precision region."""
        if self.real_low:
            return self.node("Cast", [x], to=self.low)
        return self.rounded(x)

    def to_f32(self, x: str) -> str:
        """The low-precision region → float32."""
        if self.real_low:
            return self.node("Cast", [x], to=self.onnx.TensorProto.FLOAT)
        return x

    def to_f32_unscaled(self, x: str, div: float) -> str:
        """The low-precision region → float32, undoing a range scaling by 1/`div`."""
        out = self.to_f32(x)
        return out if div == 1.0 else self.node("Mul", [out, self.f32(div)])

    def rounded(self, x: str) -> str:
        """When emulating: what the real graph would store (round to low precision)."""
        if not self.emulating:
            return x
        low = self.node("Cast", [x], to=self.low)
        return self.node("Cast", [low], to=self.onnx.TensorProto.FLOAT)


def rope_caches(config: Qwen3Config) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin [max_positions, head_dim / 2], computed in float32 as transformers does."""
    dim = config.head_dim
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv_freq = (np.float32(1.0) / np.power(np.float32(config.rope_theta), exponents)).astype(
        np.float32)
    positions = np.arange(config.max_position_embeddings, dtype=np.float32)
    angles = np.outer(positions, inv_freq).astype(np.float32)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


class _Qwen3Graph:
    """The parts of a Qwen3 graph, built in order on one _Graph: sequence bookkeeping,
    the embedding, the decoder layers (attention, MLP), the final norm, then the head
    (pooling and normalisation for embeddings)."""

    def __init__(self, config: Qwen3Config, weights: Weights, options: GraphOptions) -> None:
        self.g = _Graph(options)
        self.config = config
        self.weights = weights
        self.options = options
        self.probes: list[tuple[str, str]] = []
        # Only the pooled rows matter after the last attention when pooling reads one row.
        self.pooled_early = options.pooling in ("lasttoken", "cls")

    def sequence(self) -> None:
        """Lengths and positions: right padding puts each row's tokens at 0..len-1; an
        empty key/value cache and the rotary tables for GroupQueryAttention."""
        g, tp, config = self.g, self.g.onnx.TensorProto, self.config
        shape = g.node("Shape", ["input_ids"], name="shape")
        seq = g.node("Gather", [shape, g.const("one_i64", np.array(1, dtype=np.int64))], axis=0)
        self.total_length = g.node("Cast", [seq], to=tp.INT32, name="total_sequence_length")
        self.lengths = g.node("ReduceSum", ["attention_mask", g.ints([1])], keepdims=0)
        self.last = g.node("Max", [g.node("Sub", [self.lengths, g.ints([1])]), g.ints([0])],
                           name="last_index")
        self.seqlens_k = g.node("Cast", [self.last], to=tp.INT32, name="seqlens_k")
        # An empty cache ([B, KV heads, 0, D]) for every layer: GroupQueryAttention's
        # prompt path, as generation graphs feed it on their first step (CPU and CUDA
        # kernels alike).
        batch = g.node("Slice", [shape, g.ints([0]), g.ints([1])])
        past_shape = g.node("Concat", [batch, g.ints([config.kv_heads, 0, config.head_dim])],
                            axis=0)
        self.empty_past = g.node("ConstantOfShape", [past_shape], name="empty_past",
                                 value=g.onnx.helper.make_tensor("value", g.compute, [1],
                                                                 [0.0]))
        cos, sin = rope_caches(config)
        self.cos_cache = g.weight("rope.cos", cos)
        self.sin_cache = g.weight("rope.sin", sin)

    def embed(self) -> str:
        """The residual stream at the input: token embeddings, float32."""
        g, config = self.g, self.config
        embed = g.weight("embed_tokens", self.weights.get(
            "embed_tokens.weight", (config.vocab_size, config.hidden_size)))
        return g.to_f32(g.rounded(g.node("Gather", [embed, "input_ids"], axis=0, name="embed")))

    def take_pooled_rows(self, x: str) -> str:
        """[B, S, H] → [B, 1, H]: the rows pooling reads (last real token or first)."""
        g = self.g
        if self.options.pooling == "cls":
            return g.node("Slice", [x, g.ints([0]), g.ints([1]), g.ints([1])])
        index = g.node("Reshape", [self.last, g.ints([-1, 1, 1])])
        index = g.node("Expand", [index, g.ints([1, 1, self.config.hidden_size])])
        return g.node("GatherElements", [x, index], axis=1, name="pool_last_token")

    def absmax(self, values: list[str]) -> str:
        """The largest |value| over tensors (an activation probe)."""
        g = self.g
        maxima = [g.node("ReduceMax", [g.node("Abs", [v])], keepdims=0) for v in values]
        stacked = g.node("Concat", [g.node("Reshape", [m, g.ints([1])]) for m in maxima],
                         axis=0)
        return g.node("ReduceMax", [stacked], keepdims=0)

    def head_norm(self, x: str, heads: int, which: str, layer: str) -> str:
        """Qwen3's per-head RMSNorm of q or k."""
        g, hd = self.g, self.config.head_dim
        gamma = g.weight(f"{layer}.{which}_norm", self.weights.get(
            f"{layer}.self_attn.{which}_norm.weight", (hd,)))
        per_head = g.node("Reshape", [x, g.ints([0, 0, heads, hd])])
        normed = g.node("SimplifiedLayerNormalization", [per_head, gamma], axis=-1,
                        epsilon=self.config.rms_norm_eps, stash_type=1,
                        name=f"{layer}/{which}_norm")
        return g.node("Reshape", [g.rounded(normed), g.ints([0, 0, heads * hd])])

    def attention(self, i: int, normed: str, attn_div: float) -> str:
        """Packed QKV projection, q/k norms, GroupQueryAttention (rotary inside), o; back
        to float32."""
        g, config, p = self.g, self.config, f"layers.{i}"
        hidden, q_size, kv_size = config.hidden_size, config.q_size, config.kv_size
        wq = self.weights.get(f"{p}.self_attn.q_proj.weight", (q_size, hidden))
        wk = self.weights.get(f"{p}.self_attn.k_proj.weight", (kv_size, hidden))
        wv = self.weights.get(f"{p}.self_attn.v_proj.weight", (kv_size, hidden)) / attn_div
        qkv = g.linear(g.to_low(normed), f"{p}.qkv_proj", np.concatenate([wq, wk, wv]).T)
        q, k, v = g.node("Split", [qkv, g.ints([q_size, kv_size, kv_size])], 3, axis=-1)
        q = self.head_norm(q, config.heads, "q", p)
        k = self.head_norm(k, config.kv_heads, "k", p)
        attn = g.node(
            "GroupQueryAttention", [q, k, v, self.empty_past, self.empty_past, self.seqlens_k,
                                    self.total_length, self.cos_cache, self.sin_cache], 3,
            domain="com.microsoft", num_heads=config.heads, kv_num_heads=config.kv_heads,
            do_rotary=1, rotary_interleaved=0, scale=1.0 / math.sqrt(config.head_dim),
            name=f"{p}/attention")[0]
        attn = g.rounded(attn)
        o = g.linear(attn, f"{p}.o_proj", self.weights.get(f"{p}.self_attn.o_proj.weight",
                                                           (hidden, q_size)).T)
        out = g.to_f32_unscaled(o, attn_div)
        if self.options.probes:
            self.probes.append((f"probe.{i}.attention", self.absmax([v, attn, o])))
        return out

    def mlp(self, i: int, normed: str, mlp_div: float) -> str:
        """Packed gate/up projection, SiLU(gate) · up, down; back to float32."""
        g, config, p = self.g, self.config, f"layers.{i}"
        hidden, inter = config.hidden_size, config.intermediate_size
        w_gate = self.weights.get(f"{p}.mlp.gate_proj.weight", (inter, hidden))
        w_up = self.weights.get(f"{p}.mlp.up_proj.weight", (inter, hidden)) / mlp_div
        gate_up = g.linear(g.to_low(normed), f"{p}.gate_up_proj",
                           np.concatenate([w_gate, w_up]).T)
        gate, up = g.node("Split", [gate_up, g.ints([inter, inter])], 2, axis=-1)
        silu = g.rounded(g.node("QuickGelu", [gate], domain="com.microsoft", alpha=1.0,
                                name=f"{p}/silu"))
        act = g.rounded(g.node("Mul", [silu, up]))
        down = g.linear(act, f"{p}.down_proj", self.weights.get(f"{p}.mlp.down_proj.weight",
                                                                (hidden, inter)).T)
        out = g.to_f32_unscaled(down, mlp_div)
        if self.options.probes:
            self.probes.append((f"probe.{i}.mlp", self.absmax([up, act, down])))
        return out

    def layer(self, i: int, residual: str, mlp_out: str | None) -> tuple[str, str]:
        """One decoder layer; returns (residual, this layer's MLP output), whose sum the
        next norm takes."""
        g, config, p = self.g, self.config, f"layers.{i}"
        hidden, eps = config.hidden_size, config.rms_norm_eps
        attn_div, mlp_div = self.options.scales.get(i, (1.0, 1.0))
        gamma_in = g.weight_f32(f"{p}.input_layernorm", self.weights.get(
            f"{p}.input_layernorm.weight", (hidden,)))
        if mlp_out is None:
            normed = g.node("SimplifiedLayerNormalization", [residual, gamma_in], axis=-1,
                            epsilon=eps, stash_type=1, name=f"{p}/input_norm")
        else:
            normed, _, _, residual = g.node(
                "SkipSimplifiedLayerNormalization", [mlp_out, residual, gamma_in], 4,
                domain="com.microsoft", epsilon=eps, name=f"{p}/input_norm")
        attn_out = self.attention(i, normed, attn_div)
        if i == config.layers - 1 and self.pooled_early:
            # Only the pooled rows matter after the last attention: skip the rest's MLP.
            attn_out, residual = self.take_pooled_rows(attn_out), self.take_pooled_rows(
                residual)
        gamma_post = g.weight_f32(f"{p}.post_attention_layernorm", self.weights.get(
            f"{p}.post_attention_layernorm.weight", (hidden,)))
        normed, _, _, residual = g.node(
            "SkipSimplifiedLayerNormalization", [attn_out, residual, gamma_post], 4,
            domain="com.microsoft", epsilon=eps, name=f"{p}/post_attention_norm")
        return residual, self.mlp(i, normed, mlp_div)

    def final_norm(self, mlp_out: str, residual: str) -> str:
        g = self.g
        gamma = g.weight_f32("norm", self.weights.get("norm.weight",
                                                      (self.config.hidden_size,)))
        return g.node("SkipSimplifiedLayerNormalization", [mlp_out, residual, gamma], 1,
                      domain="com.microsoft", epsilon=self.config.rms_norm_eps,
                      name="final_norm")

    def embedding_head(self, final: str) -> None:
        """Pooling and L2 normalisation → `sentence_embedding` [B, H] float32."""
        g, tp, hidden = self.g, self.g.onnx.TensorProto, self.config.hidden_size
        if self.pooled_early:
            pooled = g.node("Reshape", [final, g.ints([-1, hidden])], name="pooled")
        else:  # mean over real tokens
            # Where, not a product with the mask: padded positions may hold anything (cuDNN
            # attention leaves padded query rows unspecified), and inf or NaN times 0 is
            # NaN.
            real = g.node("Unsqueeze", [g.node("Cast", ["attention_mask"], to=tp.BOOL),
                                        g.ints([-1])])
            kept = g.node("Where", [real, final, g.f32(0.0)], name="pool_mask")
            summed = g.node("ReduceSum", [kept, g.ints([1])], keepdims=0)
            count = g.node("Max", [g.node("Cast", [g.node("Reshape", [
                self.lengths, g.ints([-1, 1])])], to=tp.FLOAT), g.f32(1.0)])
            pooled = g.node("Div", [summed, count], name="pooled")
        if self.options.normalize:
            norm = g.node("ReduceL2", [pooled, g.ints([-1])], keepdims=1)
            norm = g.node("Max", [norm, g.f32(1e-12)])  # as torch's F.normalize: 0 stays 0
            g.node("Div", [pooled, norm], outputs=["sentence_embedding"], name="l2_normalize")
        else:
            g.node("Identity", [pooled], outputs=["sentence_embedding"])

    def rerank_head(self, final: str) -> None:
        """The model card's score from the last real token's final hidden state h:
        softmax over (logit_no, logit_yes) taking yes = sigmoid(h · (w_yes − w_no)), in
        float32 in every precision → `score` [B]."""
        g, hidden = self.g, self.config.hidden_size
        assert self.options.rerank_tokens is not None
        yes, no = self.options.rerank_tokens
        rows = self.lm_head_rows([yes, no])
        direction = (rows[0] - rows[1]).astype(np.float32).reshape(hidden, 1)
        pooled = g.node("Reshape", [final, g.ints([-1, hidden])], name="pooled")
        logit = g.node("MatMul", [pooled, g.weight_f32("score_head", direction)],
                       name="score_head")
        logit = g.node("Reshape", [logit, g.ints([-1])], name="relevance_logit")
        g.node("Sigmoid", [logit], outputs=["score"], name="score")

    def lm_head_rows(self, rows: list[int]) -> np.ndarray:
        """Rows of the LM head [len(rows), H]: lm_head.weight when the checkpoint has one
        (as transformers 5 loads it, tied or not), else the token embeddings when
        config.json ties them (Qwen3-Reranker-0.6B and 4B store no lm_head)."""
        config = self.config
        name = "lm_head.weight"
        if name not in self.weights and config.tie_word_embeddings:
            name = "embed_tokens.weight"
        if name not in self.weights:
            raise PrepareError(
                "checkpoint has no lm_head.weight and config.json does not tie the LM head "
                "to the embeddings (tie_word_embeddings false): a reranker scores with the "
                "LM head's rows for 'yes' and 'no'")
        return self.weights.get_rows(name, rows, (config.vocab_size, config.hidden_size))

    def finish(self, output: str, width: int | None) -> Any:
        """The ModelProto: inputs, `output` float32 ([batch, width], or [batch] when width
        is None), probes, metadata."""
        g, tp = self.g, self.g.onnx.TensorProto
        helper, options = g.onnx.helper, self.options
        inputs = [helper.make_tensor_value_info(n, tp.INT64, ["batch", "sequence"])
                  for n in ("input_ids", "attention_mask")]
        dims: list[Any] = ["batch"] if width is None else ["batch", width]
        outputs = [helper.make_tensor_value_info(output, tp.FLOAT, dims)]
        for name, value in self.probes:
            g.node("Identity", [value], outputs=[name])
            outputs.append(helper.make_tensor_value_info(name, tp.FLOAT, []))
        model = g.model  # what make_graph and make_model would give, without copying weights
        model.graph.node.extend(g.nodes)
        model.graph.name = "embedrpc_qwen3"
        model.graph.input.extend(inputs)
        model.graph.output.extend(outputs)
        model.opset_import.extend([helper.make_opsetid("", OPSET),
                                   helper.make_opsetid("com.microsoft", 1)])
        model.producer_name = "embedrpc prepare"
        model.ir_version = IR_VERSION
        precision = options.precision + ("-emulated" if options.emulate else "")
        if options.task == "rerank":
            assert options.rerank_tokens is not None
            props = {"embedrpc.precision": precision, "embedrpc.task": "rerank",
                     "embedrpc.rerank_tokens": ",".join(map(str, options.rerank_tokens)),
                     "embedrpc.builder_version": str(BUILDER_VERSION)}
        else:  # as before tasks existed, so embedding graphs stay byte-identical
            props = {"embedrpc.precision": precision, "embedrpc.pooling": options.pooling,
                     "embedrpc.normalized": str(options.normalize).lower(),
                     "embedrpc.builder_version": str(BUILDER_VERSION)}
        helper.set_model_props(model, props)
        return model


def build_graph(config: Qwen3Config, weights: Weights, options: GraphOptions,
                progress: Callable[[str], None] | None = None) -> Any:
    """The model's ModelProto (initializers inline; save it with external data when
    large): the decoder, then pooling and normalisation (`sentence_embedding` [B, H]) or,
    for task rerank, the yes − no score (`score` [B])."""
    b = _Qwen3Graph(config, weights, options)
    b.sequence()
    residual, mlp_out = b.embed(), None
    for i in range(config.layers):
        if progress and (i % 4 == 0 or i == config.layers - 1):
            progress(f"layer {i + 1}/{config.layers}")
        residual, mlp_out = b.layer(i, residual, mlp_out)
    assert mlp_out is not None
    final = b.final_norm(mlp_out, residual)
    if options.task == "rerank":
        b.rerank_head(final)
        return b.finish("score", None)
    b.embedding_head(final)
    return b.finish("sentence_embedding", config.hidden_size)


def fp16_scales(maxima: dict[str, float], layers: int) -> dict[int, tuple[float, float]]:
    """Per-layer power-of-two divisors that keep measured maxima (times the headroom)
    inside fp16's range. `maxima` maps probe names to float32 maxima."""
    def divisor(value: float) -> float:
        need = value * FP16_HEADROOM / FP16_MAX
        return 1.0 if not need > 1.0 else float(2.0 ** math.ceil(math.log2(need)))

    scales = {}
    for i in range(layers):
        attn = divisor(maxima.get(f"probe.{i}.attention", 0.0))
        mlp = divisor(maxima.get(f"probe.{i}.mlp", 0.0))
        if (attn, mlp) != (1.0, 1.0):
            scales[i] = (attn, mlp)
    return scales


def graph_summary(model: Any) -> dict[str, Any]:
    """Op counts and what matters about the graph, for embedrpc_prepared.json and tests."""
    counts: dict[str, int] = {}
    for node in model.graph.node:
        key = f"{node.domain}.{node.op_type}" if node.domain else node.op_type
        counts[key] = counts.get(key, 0) + 1
    return {"ops": dict(sorted(counts.items())),
            "inputs": [i.name for i in model.graph.input],
            "outputs": [o.name for o in model.graph.output]}


def strip_probes(model: Any) -> Any:
    """The same graph without the probe outputs and the nodes only they used."""
    keep = [o for o in model.graph.output if not o.name.startswith("probe.")]
    del model.graph.output[:]
    model.graph.output.extend(keep)
    while True:
        used = {name for node in model.graph.node for name in node.input}
        used |= {o.name for o in model.graph.output}
        dead = [n for n in model.graph.node if not any(o in used for o in n.output if o)]
        if not dead:
            break
        for node in dead:
            model.graph.node.remove(node)
    used = {name for node in model.graph.node for name in node.input}
    unused = [t for t in model.graph.initializer if t.name not in used]
    for tensor in unused:
        model.graph.initializer.remove(tensor)
    return model
