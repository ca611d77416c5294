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

Speed needs fusion: eagerly, the activation quantization (divide, clamp, cast) runs as separate
memory-bound kernels around each GEMM and the FP8 model is about twice as slow as FP16. So on a GPU each
encoder is compiled whole (``torch.compile``, ``mode="reduce-overhead"``: Inductor fuses the quantization
into the LayerNorm/GELU/residual kernels before it, and each batch size is replayed from a CUDA graph).
Batches are padded up to the nearest of ``batch_sizes`` (and split by the largest), so only those shapes
are ever compiled. FP8 GEMMs need compute capability 8.9 or higher; on a CPU the same products are
summed by an FP32 matmul (the FP8 operands upcast exactly), for checking accuracy only.

Needs torch, transformers and safetensors only: no ModelOpt on a serving host.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from clip_fp8.clip import clip_model_construction
from clip_fp8.devices import fp8_support
from clip_fp8.encoders import ImageEncoder, TextEncoder

FORMAT = "clip-fp8/torch-fp8/1"
WEIGHTS = "model.safetensors"
LAYOUT = "torch_fp8.json"
FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
GEMM_ALIGNMENT = 16  # _scaled_mm on CUDA: both dims of the FP8 weight are multiples of 16
DEFAULT_BATCH_SIZES = (1, 8, 32, 128)


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
        x8 = (x.reshape(-1, self.in_features) / self.input_scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
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


class FP8CLIP:
    """The two encoders of a torch-fp8 artifact, ready to serve: ``encode_image``, ``encode_text``."""

    def __init__(self, model: nn.Module, device: str, dtype: torch.dtype, batch_sizes, compile: bool, layout: dict):
        self.model, self.device, self.dtype, self.layout = model, device, dtype, layout
        self.batch_sizes = tuple(sorted(set(batch_sizes)))
        image, text = ImageEncoder(model).eval(), TextEncoder(model).eval()
        if compile:
            image = torch.compile(image, mode="reduce-overhead", dynamic=False)
            text = torch.compile(text, mode="reduce-overhead", dynamic=False)
        self._image, self._text = image, text

    @property
    def weights_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in [*self.model.parameters(), *self.model.buffers()])

    def fp8_weights(self) -> int:
        """How many weight tensors are held in FP8 (what the GPU tests check is really in memory)."""
        return sum(1 for m in self.model.modules() if isinstance(m, FP8Linear) and m.weight.dtype == FP8)

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self._run(self._image, pixel_values.to(self.device, self.dtype))

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self._run(self._text, input_ids.to(self.device))

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

    def _run(self, encoder, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            if not self.batch_sizes:
                return encoder(x)
            outputs = []
            for chunk in x.split(self.batch_sizes[-1]):
                n = chunk.shape[0]
                size = next(b for b in self.batch_sizes if b >= n)
                if size > n:  # pad with copies of the last row: a valid input, dropped again below
                    chunk = torch.cat([chunk, chunk[-1:].expand(size - n, *chunk.shape[1:])])
                # A CUDA-graph replay reuses its output buffer: copy out before the next call.
                outputs.append(encoder(chunk)[:n].clone())
            return torch.cat(outputs)


def load(path: str | Path, device: str = "cuda", dtype: torch.dtype = torch.float16,
         batch_sizes=DEFAULT_BATCH_SIZES, compile: bool | None = None) -> FP8CLIP:
    """Load a torch-fp8 artifact for serving. ``compile`` defaults to True on a GPU (the speed is there).
    ``device="cpu"`` (with ``dtype=torch.float32``) runs the same arithmetic slowly: for accuracy checks."""
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
    with clip_model_construction(), torch.device(device):
        model = CLIPModel(config).to(dtype)
    swap_in_fp8_linears(model, layout["fp8_linears"], dtype, device)
    state = load_file(str(path / WEIGHTS), device=device)
    state = {k: (v.to(dtype) if v.is_floating_point() and v.dtype not in (FP8, torch.float32) else v)
             for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    persistent = {k for k, _ in model.state_dict().items()}
    if unexpected or [k for k in missing if k in persistent and not k.endswith("position_ids")]:
        raise ValueError(f"{path / WEIGHTS} does not match its config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    compile = device.startswith("cuda") if compile is None else compile
    return FP8CLIP(model.eval(), device, dtype, batch_sizes if compile else (), compile, layout)
