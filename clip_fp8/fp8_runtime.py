"""torch-fp8: CLIP encoders with real FP8 weights and FP8 GEMMs in plain PyTorch, no TensorRT.

What the ``torch_fp8`` stage writes and a serving process loads with one call::

    from clip_fp8.fp8_runtime import load
    clip = load("runs/latest/artifacts/torch_fp8", device="cuda", batch_sizes=(1, 8, 32, 128))
    image_embeds = clip.encode_image(pixel_values)   # [n, 3, 224, 224] -> [n, 768], any n
    text_embeds = clip.encode_text(input_ids)         # [n, 77] int64  -> [n, 768]

Every Linear that the calibrated ModelOpt checkpoint quantizes to FP8 E4M3 (static per-tensor scales for
weight and input) becomes an ``FP8Linear``: its weight stored in FP8 (half the bytes of FP16), its input
quantized with the calibrated scale and multiplied by ``torch._scaled_mm``. Everything else (patch
embedding, LayerNorms, attention's matmuls and softmax) runs in FP16: attention's FP8 quantizers are the
ModelOpt checkpoint's, and are dropped here (SDPA has no FP8 form in PyTorch).

Speed needs fusion: eagerly, the activation quantization (scale, clamp, cast) runs as separate
memory-bound kernels around each GEMM and the FP8 model is about twice as slow as FP16. So on a GPU each
encoder is compiled whole (``torch.compile``, ``mode="reduce-overhead"``: Inductor fuses the quantization
into the LayerNorm/GELU/residual kernels before it, and each batch size is replayed from a CUDA graph).
Batches are padded up to the nearest of ``batch_sizes`` (and split by the largest), so only those shapes
are ever compiled. FP8 GEMMs need compute capability 8.9 or higher; on a CPU the same products are
summed by an FP32 matmul (the FP8 operands upcast exactly), for checking accuracy only.

Q, K and V run as one FP8 GEMM (``fuse_qkv``, exact: the scales are folded, no weight re-rounded). Where FP8
does not beat FP16 at a batch size on a GPU type (the benchmark stage's ``serving.json``, measured in interleaved
rounds), that size is served by an FP16 copy of the tower (its weights dequantized from FP8: it costs the
tower's Linear weights in FP16 beside the FP8 ones, ``FP8CLIP.fp16_fallback_bytes``), so the model as served is
never slower than FP16. ``small_batch`` overrides the table: ``fp8`` everywhere, or ``fp16`` below the largest size.

Needs torch, transformers and safetensors only: no ModelOpt on a serving host.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn

from clip_fp8.model_locks import clip_model_construction
from clip_fp8.devices import fp8_support
from clip_fp8.encoders import ImageEncoder, TextEncoder

FORMAT = "clip-fp8/torch-fp8/1"
WEIGHTS = "model.safetensors"
LAYOUT = "torch_fp8.json"
FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
GEMM_ALIGNMENT = 16  # _scaled_mm on CUDA: both dims of the FP8 weight are multiples of 16
DEFAULT_BATCH_SIZES = (1, 8, 32, 128)
SERVING = "serving.json"  # the dispatch table: GPU type -> tower -> batch size -> "fp8" | "fp16"
TOWERS = {"image": ("vision_model", "visual_projection"), "text": ("text_model", "text_projection")}
# How every served form is compiled, FP8 and its FP16 twin alike, and how the benchmark stage compiles the FP16 model
# it judges FP8 against: one place, so the speed gate compares like with like. ``reduce-overhead`` (CUDA graphs).
COMPILE_OPTIONS = {"triton.cudagraphs": True}


def compiled(module: nn.Module) -> nn.Module:
    """``module`` compiled as the runtime serves it (``COMPILE_OPTIONS``), one static shape per batch size."""
    return torch.compile(module, dynamic=False, options=dict(COMPILE_OPTIONS))


class FP8Linear(nn.Module):
    """``y = q(x) @ W8ᵀ · s_x · s_w + b``: W8 in FP8 E4M3, ``q(x) = fp8(clamp(x / s_x))`` with a static scale."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8, device=device), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None
        self.register_buffer("weight_scale", torch.ones((), dtype=torch.float32, device=device))
        self.register_buffer("input_scale", torch.ones((), dtype=torch.float32, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        # A multiply by 1 / s_x, not a divide per element (docs/benchmarks.md, issue 24: the fused GELU kernel).
        x = x.reshape(-1, self.in_features) * self.input_scale.reciprocal()
        if not (x.is_cuda and torch.compiler.is_compiling()):
            # Compiled for a GPU, the cast is PTX's cvt...satfinite (mandatory for FP8): it saturates to +-448 by
            # itself, and the clamp cost a fifth of the GELU kernel's time. Eager casts gave NaN in older torch.
            x = x.clamp(-FP8_MAX, FP8_MAX)
        x8 = x.to(FP8)
        if x.is_cuda:
            # The bias goes into cuBLASLt's epilogue. Fast accumulation (no periodic promotion of Hopper's FP8
            # tensor-core partial sums) is what Transformer Engine uses for forward GEMMs: inference only.
            y = torch._scaled_mm(x8, self.weight.t(), scale_a=self.input_scale, scale_b=self.weight_scale,
                                 bias=self.bias, out_dtype=x.dtype, use_fast_accum=True)
        else:
            # CPU: the same products (FP8 values are exact in FP32), summed by an FP32 matmul; torch's CPU
            # _scaled_mm computes this too, orders of magnitude slower.
            y = (x8.to(x.dtype) * self.input_scale.to(x.dtype)) @ (self.weight.to(x.dtype) * self.weight_scale.to(x.dtype)).t()
            y = y if self.bias is None else y + self.bias
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, fp8=e4m3"


def gemm_fits(in_features: int, out_features: int) -> bool:
    return in_features % GEMM_ALIGNMENT == 0 and out_features % GEMM_ALIGNMENT == 0


def swap_in_fp8_linears(model: nn.Module, names: list[str], dtype: torch.dtype, device=None) -> None:
    """Replace the named ``nn.Linear`` modules with empty ``FP8Linear`` ones of the same shape."""
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, child)
        setattr(parent, child, FP8Linear(old.in_features, old.out_features, old.bias is not None, dtype, device))


class FusedQKVAttention(nn.Module):
    """CLIP's attention with Q, K and V from one FP8 GEMM: one launch and one read of the input instead of three.

    The three projections read the same input, so they share its calibrated scale; their weights keep their own
    FP8 bytes and scales. The GEMM multiplies by the largest of the three weight scales, ``s``, so each
    projection comes out divided by its ratio ``r = s_w / s`` (<= 1), and the ratios are folded where they are
    exact: ``r_q r_k`` into the softmax scale, ``r_v`` into the out projection's input scale (attention is
    linear in V), each bias divided by its own ratio. No weight is re-rounded."""

    def __init__(self, attention: nn.Module, qkv: FP8Linear, qk_ratio: float):
        super().__init__()
        self.config, self.is_causal = attention.config, attention.is_causal
        self.embed_dim, self.num_heads, self.head_dim = attention.embed_dim, attention.num_heads, attention.head_dim
        self.dropout = attention.dropout
        self.scale = attention.scale * qk_ratio
        self.qkv, self.out_proj = qkv, attention.out_proj
        self._attention = _attention_function(self.config._attn_implementation)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        queries, keys, values = (t.view(hidden_shape).transpose(1, 2)
                                 for t in self.qkv(hidden_states).split(self.embed_dim, dim=-1))
        output, weights = self._attention(self, queries, keys, values, attention_mask, scaling=self.scale,
                                          dropout=0.0 if not self.training else self.dropout, **kwargs)
        return self.out_proj(output.reshape(*input_shape, -1).contiguous()), weights


def _attention_function(implementation: str | None):
    """The attention function CLIPAttention calls for ``implementation`` (sdpa, eager, ...), in transformers 4.x and 5.x."""
    from transformers.models.clip.modeling_clip import ALL_ATTENTION_FUNCTIONS, eager_attention_forward

    if hasattr(ALL_ATTENTION_FUNCTIONS, "get_interface"):
        return ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
    return eager_attention_forward if implementation in (None, "eager") else ALL_ATTENTION_FUNCTIONS[implementation]


def fuse_qkv(model: nn.Module) -> int:
    """Give every CLIP attention whose Q, K and V are ``FP8Linear``s one fused GEMM (``FusedQKVAttention``);
    returns how many. Exact up to FP16 rounding: see ``FusedQKVAttention``."""
    fused = 0
    for name, attention in list(model.named_modules()):
        projections = [getattr(attention, p, None) for p in ("q_proj", "k_proj", "v_proj")]
        if not all(isinstance(p, FP8Linear) for p in projections) or not isinstance(attention.out_proj, FP8Linear):
            continue
        q, k, v = projections
        if len({float(p.input_scale) for p in projections}) != 1:
            continue  # one input, one calibrated scale: anything else is not a checkpoint this runtime wrote
        scale = max(p.weight_scale for p in projections)
        ratio = {id(p): float(p.weight_scale / scale) for p in projections}
        dtype = q.bias.dtype if q.bias is not None else attention.out_proj.bias.dtype
        qkv = FP8Linear(q.in_features, 3 * q.out_features, q.bias is not None, dtype, device=q.weight.device)
        qkv.weight.data = torch.cat([p.weight.data for p in projections])
        if q.bias is not None:
            qkv.bias.data = torch.cat([(p.bias.float() / ratio[id(p)]).to(p.bias.dtype) for p in projections])
        qkv.weight_scale.copy_(scale)
        qkv.input_scale.copy_(q.input_scale)
        # The out projection sees O / r_v: the same FP8 input with its quantization scale / r_v, and r_v back in
        # the dequantization (its weight scale), as both scales multiply the GEMM.
        attention.out_proj.input_scale.div_(ratio[id(v)])
        attention.out_proj.weight_scale.mul_(ratio[id(v)])
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child,
                FusedQKVAttention(attention, qkv, ratio[id(q)] * ratio[id(k)]))
        fused += 1
    return fused


def fp16_twin(model: nn.Module, tower: str) -> nn.Module:
    """A copy of ``model`` whose ``tower`` runs FP16 GEMMs on its FP8 weights dequantized (``W8 · s_w``): the same
    weights, none of the activation quantization. A fused Q/K/V keeps its folded scales (the arithmetic holds)."""
    twin = copy.copy(model)  # the other tower and the shared buffers stay the model's own
    twin._modules = dict(model._modules)
    for part in TOWERS[tower]:
        twin._modules[part] = copy.deepcopy(model._modules[part])
    for part in TOWERS[tower]:
        for name, module in list(twin.get_submodule(part).named_modules()):
            if isinstance(module, FP8Linear):
                linear = nn.Linear(module.in_features, module.out_features, module.bias is not None,
                                   device=module.weight.device, dtype=module.bias.dtype if module.bias is not None
                                   else torch.float16)
                with torch.no_grad():
                    linear.weight.copy_(module.weight.float() * module.weight_scale)
                    if module.bias is not None:
                        linear.bias.copy_(module.bias)
                parent, _, child = name.rpartition(".")
                setattr(twin.get_submodule(f"{part}.{parent}" if parent else part), child, linear.requires_grad_(False))
    return twin.eval()


def dispatch_table(layout_dir: Path, dispatch, gpu: str, batch_sizes, small_batch: str) -> dict[str, dict[int, str]]:
    """Tower -> batch size -> ``fp8`` or ``fp16``: ``dispatch`` (a table, or a ``serving.json`` path; default: the
    one beside the artifact) for this GPU type, overridden by ``small_batch``; FP8 where nothing was measured."""
    sizes = sorted(set(batch_sizes)) or [0]
    if small_batch not in ("auto", "fp8", "fp16"):
        raise ValueError(f"small_batch '{small_batch}' is not one of auto, fp8, fp16")
    if small_batch != "auto":
        return {t: {b: "fp16" if small_batch == "fp16" and b < sizes[-1] else "fp8" for b in sizes} for t in TOWERS}
    if dispatch is None and (layout_dir / SERVING).is_file():
        dispatch = layout_dir / SERVING
    if isinstance(dispatch, (str, Path)):
        dispatch = json.loads(Path(dispatch).read_text())
    measured = ((dispatch or {}).get("gpus") or {}).get(gpu, {})
    return {t: {b: measured.get(t, {}).get(str(b), {}).get("served_by", "fp8") for b in sizes} for t in TOWERS}


class FP8CLIP:
    """The two encoders of a torch-fp8 artifact, ready to serve: ``encode_image``, ``encode_text``.

    ``table`` (tower -> batch size -> fp8 | fp16) names the form that serves each compiled size; a tower with
    any FP16 size also holds its FP16 twin (``fp16_fallback_bytes``)."""

    def __init__(self, model: nn.Module, device: str, dtype: torch.dtype, batch_sizes, compile: bool, layout: dict,
                 table: dict[str, dict[int, str]] | None = None):
        self.model, self.device, self.dtype, self.layout = model, device, dtype, layout
        self.batch_sizes = tuple(sorted(set(batch_sizes)))
        self.table = table or {t: {} for t in TOWERS}
        self.twins = {t: fp16_twin(model, t) for t in TOWERS if "fp16" in self.table.get(t, {}).values()}
        wrap = compiled if compile else (lambda m: m)
        if compile:  # one compiled frame per form and size: past dynamo's limit (8) it would silently run eagerly
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 4 * len(self.batch_sizes) + 8)
        self._forms = {("image", "fp8"): wrap(ImageEncoder(model).eval()), ("text", "fp8"): wrap(TextEncoder(model).eval())}
        for tower, twin in self.twins.items():
            self._forms[(tower, "fp16")] = wrap((ImageEncoder if tower == "image" else TextEncoder)(twin).eval())

    @property
    def weights_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in [*self.model.parameters(), *self.model.buffers()])

    @property
    def fp16_fallback_bytes(self) -> int:
        """What the FP16 twins add: their towers (Linear weights in FP16, and the copies of everything else)."""
        return sum(t.numel() * t.element_size() for tower, twin in self.twins.items() for part in TOWERS[tower]
                   for t in [*twin.get_submodule(part).parameters(), *twin.get_submodule(part).buffers()])

    def linear(self, name: str) -> nn.Module:
        """The module that runs the checkpoint's Linear ``name`` (the layout's names): itself, or for Q, K and V
        of a fused attention, its one ``qkv`` GEMM."""
        parent, _, child = name.rpartition(".")
        attention = self.model.get_submodule(parent)
        if child in ("q_proj", "k_proj", "v_proj") and isinstance(attention, FusedQKVAttention):
            return attention.qkv
        return self.model.get_submodule(name)

    def fp8_weights(self) -> int:
        """How many weight tensors are held in FP8 (what the GPU tests check is really in memory)."""
        return sum(1 for m in self.model.modules() if isinstance(m, FP8Linear) and m.weight.dtype == FP8)

    def served_by(self, tower: str, batch: int) -> str:
        """The form that serves ``batch`` rows of ``tower``: that of the compiled size the batch is padded to."""
        size = next((b for b in self.batch_sizes if b >= batch), self.batch_sizes[-1] if self.batch_sizes else batch)
        return self.table.get(tower, {}).get(size, "fp8")

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self._run("image", pixel_values.to(self.device, self.dtype))

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self._run("text", input_ids.to(self.device))

    def warm_up(self) -> None:
        """Compile and record every batch size now (a few calls each), not on a user's first request."""
        config = self.model.config
        size = config.vision_config.image_size
        for batch in self.batch_sizes or (1,):
            pixels = torch.zeros(batch, 3, size, size, device=self.device, dtype=self.dtype)
            ids = torch.full((batch, config.text_config.max_position_embeddings), config.text_config.eos_token_id,
                             device=self.device, dtype=torch.long)
            for _ in range(3):
                self.encode_image(pixels)
                self.encode_text(ids)

    def _run(self, tower: str, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            if not self.batch_sizes:
                return self._forms[(tower, self.served_by(tower, x.shape[0]))](x)
            outputs = []
            for chunk in x.split(self.batch_sizes[-1]):
                n = chunk.shape[0]
                size = next(b for b in self.batch_sizes if b >= n)
                if size > n:  # pad with copies of the last row: a valid input, dropped again below
                    chunk = torch.cat([chunk, chunk[-1:].expand(size - n, *chunk.shape[1:])])
                # A CUDA-graph replay reuses its output buffer: copy out before the next call.
                outputs.append(self._forms[(tower, self.served_by(tower, size))](chunk)[:n].clone())
            return torch.cat(outputs)


def load(path: str | Path, device: str = "cuda", dtype: torch.dtype = torch.float16,
         batch_sizes=DEFAULT_BATCH_SIZES, compile: bool | None = None, fuse: bool = True,
         dispatch: dict | str | Path | None = None, small_batch: str = "auto", gpu: str | None = None) -> FP8CLIP:
    """Load a torch-fp8 artifact for serving. ``compile`` defaults to True on a GPU (the speed is there).
    ``device="cpu"`` (with ``dtype=torch.float32``) runs the same arithmetic slowly: for accuracy checks.
    ``fuse``: Q, K and V in one GEMM. ``dispatch``: the benchmark's ``serving.json`` (default: one beside the
    artifact), read for ``gpu`` (default: this device's name); ``small_batch`` overrides it (module docstring)."""
    from safetensors.torch import load_file
    from transformers import CLIPConfig, CLIPModel

    path = Path(path)
    layout = json.loads((path / LAYOUT).read_text())
    if layout.get("format") != FORMAT:
        raise ValueError(f"{path / LAYOUT}: format {layout.get('format')!r}, expected {FORMAT!r}")
    if device.startswith("cuda") and (why_not := fp8_support(device)):
        raise RuntimeError(f"torch-fp8 cannot run on {device}: {why_not}")
    config = CLIPConfig.from_pretrained(str(path))
    config._attn_implementation = "sdpa"
    # Built on the meta device: no random initialisation to overwrite, and no use of the CUDA generator, which a
    # failed CUDA-graph capture earlier in the process leaves unusable ("Offset increment outside graph capture").
    with clip_model_construction(), torch.device("meta"):
        model = CLIPModel(config).to(dtype)
    model = model.to_empty(device=device)
    swap_in_fp8_linears(model, layout["fp8_linears"], dtype, device)
    state = load_file(str(path / WEIGHTS), device=device)
    state = {k: (v.to(dtype) if v.is_floating_point() and v.dtype not in (FP8, torch.float32) else v)
             for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    persistent = {k for k, _ in model.state_dict().items()}
    if unexpected or [k for k in missing if k in persistent and not k.endswith("position_ids")]:
        raise ValueError(f"{path / WEIGHTS} does not match its config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for name, buffer in model.named_buffers():  # what no file holds: CLIP's position ids, 0 .. n-1
        if name not in persistent or name in missing:
            if not name.endswith("position_ids"):
                raise ValueError(f"{name}: a buffer torch-fp8 does not know how to rebuild (transformers changed?)")
            buffer.copy_(torch.arange(buffer.shape[-1], device=buffer.device).expand_as(buffer))
    if fuse:
        fuse_qkv(model)
    compile = device.startswith("cuda") if compile is None else compile
    if gpu is None:
        gpu = torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu"
    table = dispatch_table(path, dispatch, gpu, batch_sizes, small_batch)
    return FP8CLIP(model.eval(), device, dtype, batch_sizes if compile else (), compile, layout, table)
