"""torch-fp8 on a GPU of compute capability >= 8.9: loads, runs compiled, matches the fake-quant model, holds FP8.

Run through the device tool: ``python -m pytest -m gpu tests/test_gpu_fp8.py`` (with ModelOpt installed there).
The stage functions run as the flow runs them (calibration_data -> quantize -> torch_fp8), without Prefect.
"""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                                 reason="needs a CUDA GPU of compute capability >= 8.9 (run it through the device tool)")]

CHECK_SAMPLES = 16


@pytest.fixture(scope="module", autouse=True)
def modelopt_eager_fp8():
    """ModelOpt's FP8 fake quantization through its eager fallback: the same E4M3 rounding, without building its
    CUDA extension first (about a minute of a fresh GPU host's time)."""
    from modelopt.torch.quantization import extensions

    saved = getattr(extensions.get_cuda_ext_fp8, "extension", "unset")
    extensions.get_cuda_ext_fp8.extension = None
    yield
    if saved == "unset":
        del extensions.get_cuda_ext_fp8.extension
    else:
        extensions.get_cuda_ext_fp8.extension = saved


def vit_l_14(path):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from clip_fp8.model_locks import CLIP_VOCAB_SIZE
    from clip_fp8.tasks.checkpoints import EMBEDDED_MODELS, load_processor

    tokenizer = load_processor(EMBEDDED_MODELS["tiny-clip-shapes"]).tokenizer
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    text = dict(vocab_size=CLIP_VOCAB_SIZE, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                num_attention_heads=12, max_position_embeddings=77, eos_token_id=eos, pad_token_id=eos,
                bos_token_id=tokenizer.convert_tokens_to_ids("<|startoftext|>"))
    vision = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=224,
                  patch_size=14)
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=768)).save_pretrained(path)
    image = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    CLIPProcessor(image_processor=image, tokenizer=tokenizer).save_pretrained(path)
    return str(path)


def torch_fp8_artifact(source: str, tmp_path):
    """calibration_data -> quantize -> torch_fp8 as the flow runs them (no Prefect); every ref on the way."""
    from clip_fp8.artifacts import ArtifactStore
    from clip_fp8.config import PipelineConfig
    from clip_fp8.stage import execute
    from clip_fp8.tasks.calibration_data import calibration_data
    from clip_fp8.tasks.calibration_sources import resolve_data_source
    from clip_fp8.tasks.checkpoints import resolve_model_source
    from clip_fp8.tasks.quantize import quantize
    from clip_fp8.tasks.torch_fp8 import torch_fp8

    config = PipelineConfig().with_overrides([f"model.source={source}", "calibration.num_samples=256",
                                              "calibration.batch_size=128"])
    store = ArtifactStore(str(tmp_path / "store"))
    model_source, data_source = resolve_model_source(config.model), resolve_data_source(config.calibration)
    calib = execute(calibration_data, store, "c", {"data_source": data_source, "cfg": config.calibration})
    quantized = execute(quantize, store, "q", {"model_source": model_source, "calibration": calib,
                                               "data_source": data_source, "model_cfg": config.model,
                                               "calib_cfg": config.calibration, "cfg": config.quantization})
    return model_source, data_source, calib, quantized, execute(torch_fp8, store, "t", {"quantized": quantized,
                                                                                          "model_cfg": config.model})


@pytest.mark.parametrize("model", ["embedded", "vit-l-14"])
def test_torch_fp8_loads_runs_compiled_matches_fakequant_and_holds_fp8_weights(model, tmp_path):
    from clip_fp8.config import ModelConfig
    from clip_fp8.fp8_runtime import FP8, FP8Linear, load
    from clip_fp8.tasks.checkpoints import load_quantized
    from clip_fp8.tasks.surgery import check_inputs, torch_embeddings

    source = "embedded:tiny-clip-shapes" if model == "embedded" else vit_l_14(tmp_path / "vit-l-14")
    model_source, data_source, calib, quantized, artifact = torch_fp8_artifact(source, tmp_path)

    clip = load(artifact.local_dir(), device="cuda", batch_sizes=(CHECK_SAMPLES,))  # compiled, CUDA graphs
    layout = json.loads(artifact.file("layout").read_text())
    # Every FP8 Linear the layout names is in memory as one (Q, K and V as their attention's fused ``qkv``), and
    # no other: FP8 weights on the GPU, not upcast.
    fp8_layers = [m for m in clip.model.modules() if isinstance(m, FP8Linear)]
    assert {id(m) for m in fp8_layers} == {id(clip.linear(name)) for name in layout["fp8_linears"]} and fp8_layers
    assert all(m.weight.dtype == FP8 and m.weight.is_cuda for m in fp8_layers)
    fp16_bytes = artifact.meta["fp16_weights_bytes"]
    assert clip.weights_bytes < 0.75 * fp16_bytes

    inputs = check_inputs(model_source.path, json.loads(calib.file("manifest").read_text()), data_source.path,
                          CHECK_SAMPLES)
    fake = load_quantized(quantized.file("checkpoint"), ModelConfig(device="cuda", dtype="float16"))
    for encoder, encode in (("image", clip.encode_image), ("text", clip.encode_text)):
        reference = torch.from_numpy(torch_embeddings(fake, encoder, inputs[encoder]))
        got = encode(torch.from_numpy(inputs[encoder])).float().cpu()
        cos = torch.nn.functional.cosine_similarity(got, reference)
        assert cos.min() >= 0.99, f"{model} {encoder}: torch-fp8 vs fake-quant min cosine {cos.min():.4f}"
        assert got.shape == reference.shape and torch.isfinite(got).all()
        again = encode(torch.from_numpy(inputs[encoder][:3]))  # a smaller batch: padded to the compiled size
        assert torch.allclose(again.float().cpu(), got[:3], atol=1e-2, rtol=1e-2)


def test_the_loaded_runtime_serves_each_size_by_the_form_its_table_names_and_the_forms_agree(tmp_path):
    """A serving table for this GPU (image batch 1 and text batch 8 in FP16, the rest FP8): each compiled size runs
    the form the table names, and the FP16 twin agrees with the FP8 form (same FP8-rounded weights)."""
    from clip_fp8.fp8_runtime import SERVING, load

    *_, artifact = torch_fp8_artifact("embedded:tiny-clip-shapes", tmp_path)
    gpu = torch.cuda.get_device_name()
    table = {"gpus": {gpu: {"image": {"1": {"served_by": "fp16"}, "8": {"served_by": "fp8"}},
                            "text": {"1": {"served_by": "fp8"}, "8": {"served_by": "fp16"}}}}}
    (tmp_path / SERVING).write_text(json.dumps(table))
    clip = load(artifact.local_dir(), device="cuda", batch_sizes=(1, 8), dispatch=tmp_path / SERVING)
    assert {(t, b): clip.served_by(t, b) for t in ("image", "text") for b in (1, 8)} == {
        ("image", 1): "fp16", ("image", 8): "fp8", ("text", 1): "fp8", ("text", 8): "fp16"}
    size = clip.model.config.vision_config.image_size
    pixels = torch.randn(8, 3, size, size, device="cuda", dtype=torch.float16)
    ids = torch.randint(0, clip.model.config.text_config.vocab_size - 1, (8, 77), device="cuda")
    ids[:, -1] = clip.model.config.text_config.eos_token_id
    cos = torch.nn.functional.cosine_similarity
    for encode, x in ((clip.encode_image, pixels), (clip.encode_text, ids)):
        batch = encode(x).float()  # batch 8
        singles = torch.cat([encode(x[i:i + 1]).float() for i in range(8)])  # batch 1: the other form
        assert cos(batch, singles).min() >= 0.99


def test_the_benchmark_stages_serving_table_serves_each_size_by_its_verdict_and_the_runtime_follows_it(tmp_path):
    """``serving_table`` on a real artifact: every tower and size timed, FP8 serving exactly where it won every
    round, and ``load`` with the written ``serving.json`` dispatching as the table says."""
    from clip_fp8.config import ModelConfig
    from clip_fp8.fp8_runtime import SERVING, load
    from clip_fp8.tasks.benchmark import serving_table

    model_source, *_, artifact = torch_fp8_artifact("embedded:tiny-clip-shapes", tmp_path)
    table = serving_table(model_source.path, ModelConfig(), artifact, [1, 8], rounds=3)
    assert table["gpu"] == torch.cuda.get_device_name() and set(table["towers"]) == {"image", "text"}
    for tower, sizes in table["towers"].items():
        assert set(sizes) == {"1", "8"}
        for entry in sizes.values():
            assert entry["served_by"] == ("fp8" if entry["verdict"] == "win" else "fp16")
            assert entry["served_ms"] == entry[f"{entry['served_by']}_ms"] > 0
            assert entry["speedup_min"] <= entry["speedup"] <= entry["speedup_max"]
    (tmp_path / SERVING).write_text(json.dumps({"gpus": {table["gpu"]: table["towers"]}}))
    clip = load(artifact.local_dir(), device="cuda", batch_sizes=(1, 8), dispatch=tmp_path / SERVING, compile=False)
    assert {(t, b): clip.served_by(t, b) for t in ("image", "text") for b in (1, 8)} == {
        (t, b): table["towers"][t][str(b)]["served_by"] for t in ("image", "text") for b in (1, 8)}


def test_compiled_fp8_linear_saturates_an_overflowing_input_as_the_eager_clamp_does():
    """Compiled for the GPU, FP8Linear leaves out the clamp (E4M3's PTX conversion saturates): inputs far past the
    calibrated range give the eager, clamped result, and nothing non-finite. Not bit for bit: eagerly ``x / s_x`` is
    rounded to FP16 before the cast, compiled it stays FP32 (an FP8 step apart on a few elements)."""
    from clip_fp8.fp8_runtime import FP8, FP8_MAX, FP8Linear

    layer = FP8Linear(256, 128, True, torch.float16, device="cuda")
    with torch.no_grad():
        layer.weight.copy_((torch.randn(128, 256, device="cuda") * 100).clamp(-FP8_MAX, FP8_MAX).to(FP8))
        layer.bias.normal_()
        layer.weight_scale.fill_(0.01)
        layer.input_scale.fill_(0.02)  # calibrated |x| <= ~9: the inputs below reach 100 times that
    x = torch.randn(64, 256, device="cuda", dtype=torch.float16) * 300
    with torch.inference_mode():
        eager = layer(x)
        compiled = torch.compile(layer, dynamic=False)(x)
    assert torch.isfinite(eager).all() and torch.isfinite(compiled).all()
    assert torch.nn.functional.cosine_similarity(compiled.float(), eager.float()).min() > 0.999
    # Saturated, not wrapped or zeroed: the same as feeding the compiled layer inputs clamped to the range.
    inside = x.clamp(-FP8_MAX * 0.02, FP8_MAX * 0.02)
    with torch.inference_mode():
        assert torch.equal(compiled, torch.compile(layer, dynamic=False)(inside))
