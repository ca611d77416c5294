"""ModelOpt for real on the embedded CLIP: our config's coverage, and the audit catching what escapes."""

from __future__ import annotations

import copy

import pytest
import torch

from clip_fp8.config import PipelineConfig, QuantizationConfig
from clip_fp8.errors import PipelineInputError
from clip_fp8.tasks.audit import coverage
from clip_fp8.tasks.checkpoints import EMBEDDED_MODELS, load_clip
from clip_fp8.tasks.checkpoints import register_quantized_attention
from clip_fp8.tasks.quantize import check_exclusions_match, fp8_quant_config, quantizer_table

MODEL = EMBEDDED_MODELS["tiny-clip-shapes"]


def _calibrate(model) -> None:
    torch.manual_seed(0)
    ids = torch.randint(0, model.config.text_config.vocab_size - 2, (8, 77))
    ids[:, 10] = model.config.text_config.eos_token_id
    pixels = torch.randn(8, 3, 64, 64)
    with torch.no_grad():
        model(input_ids=ids, pixel_values=pixels)


def _quantize(quant_cfg: dict, attn_implementation: str = "sdpa"):
    import modelopt.torch.quantization as mtq

    model = load_clip(MODEL, PipelineConfig().model, attn_implementation=attn_implementation)
    register_quantized_attention(model)
    mtq.quantize(model, quant_cfg, _calibrate)
    return model


def test_project_config_quantizes_both_towers_and_attention():
    cfg = QuantizationConfig()
    model = _quantize(fp8_quant_config(cfg))
    summary = coverage(quantizer_table(model), cfg)
    assert summary["passed"], summary["problems"]
    patch = [m for m in summary["modules"] if m["module"].endswith("patch_embedding")]
    assert patch and not patch[0]["enabled"] and "quantization.exclude '*patch_embedding*'" in patch[0]["excluded"]


def test_audit_fails_when_attention_is_requested_but_not_quantized():
    # A model quantized without attention quantizers, audited against a config that asks for them.
    model = _quantize(fp8_quant_config(QuantizationConfig(quantize_attention=False)))
    summary = coverage(quantizer_table(model), QuantizationConfig(quantize_attention=True))
    assert not summary["passed"]
    assert any("attention" in p and "Q/K/V" in p for p in summary["problems"]), summary["problems"]
    assert summary["towers"]["image"]["attention_quantized"] == 0


def test_an_attention_unit_recovery_leaves_in_fp16_passes_the_audit_attributed_to_recovery():
    """Recovery's exclusion of one attention unit (sensitivity's pattern for it) is a decision, not a gap: the next
    attempt's audit passes, says recovery left it in FP16 and why, and still counts the other attentions."""
    from clip_fp8.tasks.recovery import exclusion_reasons
    from clip_fp8.tasks.sensitivity import exclusion_pattern

    unit = {"unit": "vision_model.encoder.layers.1.self_attn", "kind": "attention", "score": 0.5}
    unit["exclude"] = exclusion_pattern(unit)
    recovered = exclusion_reasons([unit])
    cfg = QuantizationConfig()
    model = _quantize(fp8_quant_config(cfg, list(recovered)))
    summary = coverage(quantizer_table(model), cfg, recovered)
    assert summary["passed"], summary["problems"]
    (entry,) = [m for m in summary["modules"] if m["module"] == unit["unit"]]
    assert entry["excluded"] == [f"quantization.recovery '{unit['exclude']}' (sensitivity rank 1, KL 0.5)"]
    image = summary["towers"]["image"]
    assert image["attention_total"] == 2 and image["attention_in_scope"] == image["attention_quantized"] == 1
    # The same table audited without recovery's word for it is a gap again.
    assert not coverage(quantizer_table(model), cfg)["passed"]


def test_audit_fails_when_calibration_never_reaches_a_tower():
    import modelopt.torch.quantization as mtq

    def text_only(model):
        ids = torch.randint(0, 500, (4, 77))
        with torch.no_grad():
            model.get_text_features(input_ids=ids)

    model = load_clip(MODEL, PipelineConfig().model)
    register_quantized_attention(model)
    mtq.quantize(model, fp8_quant_config(QuantizationConfig()), text_only)
    summary = coverage(quantizer_table(model), QuantizationConfig())
    assert not summary["passed"]
    assert any(p.startswith("vision_model") and "never calibrated" in p for p in summary["problems"])
    assert not any(p.startswith("text_model") for p in summary["problems"])


def test_audit_exposes_modelopt_default_config_skipping_the_image_tower():
    import modelopt.torch.quantization as mtq

    cfg = QuantizationConfig()
    model = _quantize(copy.deepcopy(mtq.FP8_DEFAULT_CFG))
    summary = coverage(quantizer_table(model), cfg)
    assert not summary["passed"]
    assert any("vision_model" in p and "left unquantized" in p for p in summary["problems"])
    assert summary["towers"]["image"].get("linear_quantized", 0) == 0


def test_the_audit_stage_stops_the_run_naming_every_gap(tmp_path):
    """The stage itself, on a quantize artifact of ModelOpt's default config: AuditError naming the gaps, with
    the audit table for the UI; the same stage on the project's config publishes its verdict."""
    import json

    import modelopt.torch.quantization as mtq

    from clip_fp8.artifacts import ArtifactRef
    from clip_fp8.errors import AuditError
    from clip_fp8.tasks.audit import audit

    def quantized(model, name: str) -> ArtifactRef:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "quantizers.json").write_text(json.dumps(quantizer_table(model)))
        return ArtifactRef(stage="quantize", path=str(folder), digest=name, files={"quantizers": "quantizers.json"})

    cfg = QuantizationConfig()
    with pytest.raises(AuditError) as info:
        audit(quantized(_quantize(copy.deepcopy(mtq.FP8_DEFAULT_CFG)), "default"), cfg, tmp_path / "out-default")
    assert str(info.value).startswith("quantization audit failed: Linear vision_model."), str(info.value)
    assert not any("text_model" in p for p in info.value.failures)  # only the image side escaped
    assert len(info.value.failures) > 5 and "quantization-audit" in info.value.reports
    (tmp_path / "out-ours").mkdir()
    passed = audit(quantized(_quantize(fp8_quant_config(cfg)), "ours"), cfg, tmp_path / "out-ours")
    assert passed.meta["towers"]["image"]["linear_quantized"] > 0


def test_exclusion_entries_come_last_so_they_win():
    entries = fp8_quant_config(QuantizationConfig(exclude=["*mlp*"]))["quant_cfg"]
    assert entries[-1] == {"quantizer_name": "*mlp*", "enable": False}


def test_exclusion_that_matches_nothing_is_an_error():
    model = load_clip(MODEL, PipelineConfig().model)
    check_exclusions_match(model, ["*patch_embedding*", "*.fc1.input_quantizer"])
    with pytest.raises(PipelineInputError, match=r"'\*patch_embeding\*'"):
        check_exclusions_match(model, ["*patch_embeding*"])
