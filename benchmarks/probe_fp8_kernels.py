"""What the FP8 encoders' non-GEMM kernels cost at ViT-L/14 batch-128 shapes, and what each form of them would cost.

The profile of FP8 as served (docs/benchmarks.md, issue 24) shows two places where FP8 loses time that FP16 does not
lose, or that neither needs to lose:

- **activation + quantize**: the GELU kernel that also quantizes fc2's input (``gelu(x) / s``, clamped, cast to
  E4M3) takes longer than FP16's plain GELU although it writes half the bytes. Forms timed: as compiled now
  (divide), multiplying by a precomputed reciprocal, without the clamp (E4M3's saturating conversion), the tanh
  GELU; each as bytes moved over time, against a plain copy (the bandwidth ceiling);
- **attention**: SDPA's backends (cuDNN, FlashAttention-2, memory-efficient) on the towers' shapes, the text tower
  with a causal flag and with the 4-D mask a causal mask can arrive as;
- **GEMM epilogue** (``--sections epilogue``): fc1, its bias, GELU and fc2's input quantization, FP8 and FP16, each
  compiled as served (cuBLASLt, then one Triton kernel for GELU + quantize) and with Inductor's ``max-autotune``,
  whose Triton GEMM templates can carry GELU and the quantization in their epilogue (no GELU pass over memory);
  what it costs in compile time is recorded, and which kernels it chose.

Each case's forms are timed in interleaved rounds (``clip_fp8.timing.interleaved``); the Triton source Inductor
wrote for each activation form is saved beside the JSON.

    python benchmarks/probe_fp8_kernels.py --out $OUT/kernels.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from clip_fp8.fp8_runtime import FP8, FP8_MAX
from clip_fp8.timing import interleaved

# (rows, width) of fc1's output at batch 128: image 128 x 257 tokens x 4096, text 128 x 77 x 3072.
ACTIVATIONS = {"image": (128 * 257, 4096), "text": (128 * 77, 3072)}
# (batch, heads, tokens, head dim) of attention at batch 128.
ATTENTION = {"image": (128, 16, 257, 64), "text": (128, 12, 77, 64)}


def activation_forms(scale: torch.Tensor, reciprocal: torch.Tensor) -> dict:
    return {
        "copy fp16": (lambda x: x.clone(), 2),
        "gelu fp16": (lambda x: F.gelu(x), 2),
        "gelu/s clamp fp8 (now)": (lambda x: (F.gelu(x) / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), 1),
        "gelu*r clamp fp8": (lambda x: (F.gelu(x) * reciprocal).clamp(-FP8_MAX, FP8_MAX).to(FP8), 1),
        "gelu*(1/s) clamp fp8 (inline)": (lambda x: (F.gelu(x) * scale.reciprocal()).clamp(-FP8_MAX, FP8_MAX).to(FP8), 1),
        "gelu*r fp8 (no clamp)": (lambda x: (F.gelu(x) * reciprocal).to(FP8), 1),
        "tanh-gelu*r clamp fp8": (lambda x: (F.gelu(x, approximate="tanh") * reciprocal).clamp(-FP8_MAX, FP8_MAX).to(FP8), 1),
        "quantize only *r": (lambda x: (x * reciprocal).clamp(-FP8_MAX, FP8_MAX).to(FP8), 1),
    }


def probe_activations(out_dir: Path, rounds: int, cdt: bool) -> dict:
    from torch._inductor.utils import run_and_get_code

    results = {}
    for tower, (rows, width) in ACTIVATIONS.items():
        x = torch.randn(rows, width, device="cuda", dtype=torch.float16) * 3
        scale = (F.gelu(x).float().abs().amax() / FP8_MAX).reshape(())
        reciprocal = 1.0 / scale
        forms = activation_forms(scale, reciprocal)
        launches, out_bytes = {}, {}
        for name, (fn, out_elem) in forms.items():
            compiled = torch.compile(fn, dynamic=False, options={"coordinate_descent_tuning": cdt})
            _, code = run_and_get_code(compiled, x)
            (out_dir / f"{tower}-{name.split(' (')[0].replace('/', '_div_').replace('*', '_mul_').replace(' ', '_').replace('(', '').replace(')', '')}"
                       f"{'-cdt' if cdt else ''}.py").write_text("\n\n".join(code))
            out_bytes[name] = x.numel() * (2 + out_elem)
            launches[name] = lambda compiled=compiled: compiled(x)
        exact = forms["gelu*r clamp fp8"][0](x).view(torch.uint8)
        timed = interleaved(launches, rounds=rounds, block_target_ms=60)
        results[tower] = {name: {"median_us": round(s["median_ms"] * 1000, 1), "spread": round(s["spread"], 4),
                                 "GB_s": round(out_bytes[name] / (s["median_ms"] * 1e-3) / 1e9, 1)}
                          for name, s in timed["forms"].items()}
        # The clamp is only redundant if the conversion saturates: compare the bytes with and without it.
        unclamped = torch.compile(forms["gelu*r fp8 (no clamp)"][0], dynamic=False)(x * 4).view(torch.uint8)
        clamped = torch.compile(forms["gelu*r clamp fp8"][0], dynamic=False)(x * 4).view(torch.uint8)
        results[tower]["no-clamp bytes equal on overflowing input"] = bool(torch.equal(unclamped, clamped))
        results[tower]["div vs mul bytes differing"] = int(
            (forms["gelu/s clamp fp8 (now)"][0](x).view(torch.uint8) != exact).sum())
        del x
    return results


def probe_attention(rounds: int) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION}
    results = {}
    for tower, (b, h, s, d) in ATTENTION.items():
        # As the model hands them over: [b, s, h*d] viewed as heads and transposed (not contiguous).
        q, k, v = (torch.randn(b, s, h * d, device="cuda", dtype=torch.float16).view(b, s, h, d).transpose(1, 2)
                   for _ in range(3))
        cases = {"no mask": dict(attn_mask=None, is_causal=False)}
        if tower == "text":
            mask = torch.full((s, s), float("-inf"), device="cuda", dtype=torch.float16).triu(1).expand(b, 1, s, s)
            cases = {"is_causal": dict(attn_mask=None, is_causal=True), "4-D causal mask": dict(attn_mask=mask, is_causal=False)}
        for case, kwargs in cases.items():
            launches, reference = {}, F.scaled_dot_product_attention(q.float(), k.float(), v.float(),
                                                                     attn_mask=None if kwargs["attn_mask"] is None
                                                                     else kwargs["attn_mask"].float(),
                                                                     is_causal=kwargs["is_causal"])
            errors = {}
            for name, backend in backends.items():
                try:
                    with sdpa_kernel([backend]):
                        got = F.scaled_dot_product_attention(q, k, v, **kwargs)
                except RuntimeError as exc:
                    errors[name] = str(exc).splitlines()[0][:160]
                    continue
                errors[name] = f"rel err {float((got.float() - reference).norm() / reference.norm()):.2e}"

                def run(backend=backend, kwargs=kwargs):
                    with sdpa_kernel([backend]):
                        F.scaled_dot_product_attention(q, k, v, **kwargs)
                launches[name] = run
            timed = interleaved(launches, rounds=rounds, block_target_ms=60) if launches else {"forms": {}}
            flops = 4 * b * h * s * s * d / (2 if kwargs["is_causal"] else 1)
            results[f"{tower} {case}"] = {
                name: {"median_us": round(st["median_ms"] * 1000, 1), "spread": round(st["spread"], 4),
                       "TFLOPS": round(flops / (st["median_ms"] * 1e-3) / 1e12, 1), "check": errors[name]}
                for name, st in timed["forms"].items()} | {n: {"error": e} for n, e in errors.items() if n not in launches}
    return results


# fc1 at batch 128: (rows, in features, out features).
GEMMS = {"image": (128 * 257, 1024, 4096), "text": (128 * 77, 768, 3072)}


def probe_gemm_epilogue(out_dir: Path, rounds: int) -> dict:
    """fc1 + bias + GELU (+ fc2's input quantization), as served and with max-autotune, FP16 and FP8."""
    from torch._inductor.utils import run_and_get_code

    results = {}
    for tower, (rows, k, n) in GEMMS.items():
        x16 = torch.randn(rows, k, device="cuda", dtype=torch.float16)
        w16 = torch.randn(n, k, device="cuda", dtype=torch.float16) * k ** -0.5
        bias = torch.randn(n, device="cuda", dtype=torch.float16) * 0.02
        s_x = (x16.float().abs().amax() / FP8_MAX).reshape(())
        s_w = (w16.float().abs().amax() / FP8_MAX).reshape(())
        x8, w8 = (x16.float() / s_x).to(FP8), (w16.float() / s_w).to(FP8)
        s_y = (F.gelu(F.linear(x16, w16, bias)).float().abs().amax() / FP8_MAX).reshape(())
        r_y = 1.0 / s_y

        def fp16(x16=x16, w16=w16, bias=bias):
            return F.gelu(F.linear(x16, w16, bias))

        def fp8(x8=x8, w8=w8, s_x=s_x, s_w=s_w, bias=bias, r_y=r_y):
            y = torch._scaled_mm(x8, w8.t(), scale_a=s_x, scale_b=s_w, bias=bias, out_dtype=torch.float16,
                                 use_fast_accum=True)
            return (F.gelu(y) * r_y).to(FP8)

        launches, compile_s, kernels, outputs = {}, {}, {}, {}
        for name, fn in (("fp16", fp16), ("fp8", fp8)):
            for tune in (False, True):
                form = f"{name} {'max-autotune' if tune else 'as served'}"
                torch._dynamo.reset()
                compiled = torch.compile(fn, dynamic=False, options={"max_autotune": tune})
                started = time.perf_counter()
                out, code = run_and_get_code(compiled)
                compile_s[form] = round(time.perf_counter() - started, 1)
                source = "\n\n".join(code)
                (out_dir / f"epilogue-{tower}-{form.replace(' ', '-')}.py").write_text(source)
                # What ran: extern GEMM calls (cuBLAS) and the Triton kernels Inductor defined (tem: a GEMM template).
                kernels[form] = sorted({line.split("(")[0].strip() for line in source.splitlines()
                                        if "extern_kernels." in line and "(" in line} |
                                       {line.split("=")[0].strip() for line in source.splitlines()
                                        if line.startswith("triton_") and "async_compile" in line})
                outputs[form] = out.float() * (s_y if name == "fp8" else 1)
                launches[form] = compiled
        timed = interleaved(launches, rounds=rounds, block_target_ms=60)
        flops = 2 * rows * k * n
        results[tower] = {form: {"median_us": round(st["median_ms"] * 1000, 1), "spread": round(st["spread"], 4),
                                 "TFLOPS": round(flops / (st["median_ms"] * 1e-3) / 1e12, 1),
                                 "compile_s": compile_s[form], "kernels": kernels[form]}
                          for form, st in timed["forms"].items()}
        for name in ("fp16", "fp8"):  # max-autotune changes no arithmetic that matters: its output against as served
            a, b = outputs[f"{name} as served"], outputs[f"{name} max-autotune"]
            results[tower][f"{name} max-autotune vs as served"] = {
                "min_row_cosine": round(F.cosine_similarity(a, b).min().item(), 6)}
        del x16, w16, x8, w8, launches, outputs
        torch._dynamo.reset()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sections", default="attention,activation,activation-cdt",
                        help="comma-separated: attention, activation, activation-cdt, epilogue")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    code_dir = args.out.parent / "inductor-kernels"
    code_dir.mkdir(parents=True, exist_ok=True)
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    sections = {"attention": lambda: probe_attention(args.rounds),
                "activation": lambda: probe_activations(code_dir, args.rounds, cdt=False),
                "activation-cdt": lambda: probe_activations(code_dir, args.rounds, cdt=True),
                "epilogue": lambda: probe_gemm_epilogue(code_dir, args.rounds)}
    chosen = args.sections.split(",")
    if unknown := [c for c in chosen if c not in sections]:
        raise SystemExit(f"--sections: {', '.join(unknown)} not one of {', '.join(sections)}")
    for section in chosen:  # written after each: a cut-off run keeps what it measured
        result[section] = sections[section]()
        args.out.write_text(json.dumps(result, indent=1))
        for case, forms in result[section].items():
            for name, s in forms.items():
                print(f"{section:14s} {case:22s} {name:32s} {s}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
