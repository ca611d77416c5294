"""Every guard seen firing: put one realistic defect at a time into the code, run the test that should catch
it, put the code back, and print whether the test went red. A guard whose test stays green is a defect.

    .venv/bin/python scripts/check_guards.py          # all (about 10 minutes on 2 cores)
    .venv/bin/python scripts/check_guards.py 0 3      # by index

Each defect is a text replacement in one file; the script stops if the text is no longer there (the code
moved on: update the defect with it). When you add a guard, add its defect here and its test to the README.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# (defect, file, text, replacement, test that must go red)
MUTANTS = [
    ("gate drop computed FP8 - baseline", "tasks/gate.py", "    drop, limit = before - after, allowed_drop(metric, max_drop)",
     "    drop, limit = after - before, allowed_drop(metric, max_drop)",
     "tests/test_gate.py::test_the_gate_passes_within_the_limits_and_names_the_worst_metric_when_it_fails"),
    ("ONNX check compares ORT with itself", "tasks/surgery.py",
     "sims = cosine(onnx_embeddings(path, inputs[encoder]), torch_embeddings(model, encoder, inputs[encoder]))",
     "sims = cosine(onnx_embeddings(path, inputs[encoder]), onnx_embeddings(path, inputs[encoder]))",
     "tests/test_pipeline_e2e.py::test_cli_gate_and_onnx_check_exit_2_naming_what_failed"),
    ("library versions dropped from the key", "clip_fp8/caching.py", '"libraries": library_versions(external)}', '"libraries": {}}',
     "tests/test_architecture.py::test_a_library_upgrade_rekeys_exactly_the_stages_that_import_it"),
    ("every failure retried", "clip_fp8/errors.py", "    return not isinstance(exc, (PipelineError, KeyboardInterrupt, SystemExit))", "    return True",
     "tests/test_units.py::test_prefect_retries_a_transient_failure_and_never_a_deterministic_one"),
    ("published artifacts not reused", "clip_fp8/artifacts.py", "        try:\n            ref = ArtifactRef.model_validate_json(",
     "        return None\n        try:\n            ref = ArtifactRef.model_validate_json(",
     "tests/test_pipeline_e2e.py::test_published_artifacts_are_reused_without_prefects_records"),
    ("no interrupt handler (the CLI as before)", "clip_fp8/cli.py", "    _stop_cleanly_on_interrupt(server)\n", "",
     "tests/test_cli.py::test_ctrl_c_stops_within_seconds_leaves_nothing_and_the_same_command_resumes"),
    ("calibration limits checked in the old order", "tasks/calibration_data.py",
     "    if len(pairs) < cfg.num_samples:\n        # Every image was tried",
     "    if False:\n        # Every image was tried",
     "tests/test_bad_inputs.py::test_unreadable_dataset_images_name_the_limit_hit_and_the_change_that_fixes_it"),
    ("lock renewal forgets the lease (an expiry-less lock)", "clip_fp8/locking.py",
     'json.dumps({"holder": holder, "expiration": str(expiration)})', 'json.dumps({"holder": holder, "expiration": None})',
     "tests/test_locking.py::test_live_holder_keeps_the_lock_and_a_killed_one_loses_it"),
    ("pre-flight ignores the parser's verdict", "tasks/preflight.py", "    parsed = bool(parser.parse_from_file(str(onnx_path)))",
     "    parsed = bool(parser.parse_from_file(str(onnx_path))) or True",
     "tests/test_surgery.py::test_raw_export_is_rejected_by_the_strongly_typed_parser"),
    ("audit never raises", "tasks/audit.py", '    if not summary["passed"]:\n        raise collected(AuditError',
     '    if False:\n        raise collected(AuditError', "tests/test_quantization_audit.py::test_the_audit_stage_stops_the_run_naming_every_gap"),
    ("regression check compares the promoted run with this one the wrong way round", "flows/regression_and_promotion.py",
     "        if why := over_limit(metric, then[metric], now[metric], config.evaluation.max_drop):",
     "        if why := over_limit(metric, now[metric], then[metric], config.evaluation.max_drop):",
     "tests/test_history.py::test_three_nights_are_recorded_unchanged_and_regressed_and_only_the_first_is_promoted"),
    ("latest.json moved before the model configs", "clip_fp8/triton_repository.py",
     "    for rel, config in staged.configs.items():\n        repo.write(rel, config)\n    repo.write(LATEST,",
     "    repo.write(LATEST, json.dumps({\"version\": staged.version, \"configs\": staged.configs}))\n"
     "    for rel, config in staged.configs.items():\n        repo.write(rel, config)\n    repo.write(LATEST,",
     "tests/test_history.py::test_a_crash_in_the_middle_of_promotion_leaves_latest_on_the_previous_version"),
    ("recovery ignores its FP16 budget", "tasks/recovery.py",
     "        if fp16_share(ranking, [u[\"unit\"] for u in [*chosen, unit]]) > max_fp16_fraction + 1e-12:",
     "        if False:", "tests/test_recovery.py::test_a_gate_out_of_budget_ends_with_the_best_reached"),
    ("the audit calls recovery's exclusions the user's", "tasks/audit.py",
     "            return f\"quantization.recovery '{pattern}' ({why})\"",
     "            return f\"quantization.exclude '{pattern}'\"",
     "tests/test_recovery.py::test_auto_leaves_exactly_the_outlier_gemm_in_fp16_and_passes"),
    ("sensitivity ranked least sensitive first", "tasks/sensitivity.py",
     "units.sort(key=lambda u: (u[\"score\"] is None, -(u[\"score\"] or 0.0), u[\"unit\"]))",
     "units.sort(key=lambda u: (u[\"score\"] is None, (u[\"score\"] or 0.0), u[\"unit\"]))",
     "tests/test_recovery.py::test_suggest_names_the_outlier_first_as_a_ready_set"),
    ("a baseline load outside the CLIPModel construction lock", "tasks/checkpoints.py",
     "    with clip_model_construction():\n        model = CLIPModel.from_pretrained(",
     "    if True:\n        model = CLIPModel.from_pretrained(",
     "tests/test_units.py::test_a_baseline_loaded_while_a_quantized_checkpoint_restores_stays_a_baseline"),
    ("bucket locks created without If-None-Match", "clip_fp8/object_locks.py",
     'etag = self._write(key, holder, {"IfNoneMatch": "*"})', "etag = self._write(key, holder, {})",
     "tests/test_remote_store.py::test_object_store_locks_admit_one_holder_and_expire_a_dead_one"),
    ("a dead holder's bucket lock deleted without If-Match", "clip_fp8/object_locks.py",
     '            self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self._object(key), IfMatch=etag)',
     '            self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self._object(key))',
     "tests/test_remote_store.py::test_object_store_locks_admit_one_holder_and_expire_a_dead_one"),
    ("a stage keyed on whole config sections, not the fields it reads", "clip_fp8/caching.py",
     '"inputs": {k: canonical(v, read.get(k)) for k, v', '"inputs": {k: canonical(v) for k, v',
     "tests/test_gate.py::test_a_stage_is_keyed_on_the_fields_it_reads"),
    ("a stage may read config fields it did not declare", "clip_fp8/stage.py",
     "        output = fn(**views(fn, inputs), out_dir=tmp)", "        output = fn(**inputs, out_dir=tmp)",
     "tests/test_gate.py::test_a_stage_that_reads_a_field_it_did_not_declare_fails_naming_it"),
    ("the gate judges the fake-quant model in place of what ships", "tasks/gate.py",
     "    judged = {name: quality_gate(baseline, runtimes[name], cfg.max_drop)",
     "    judged = {name: quality_gate(baseline, runtimes[FAKEQUANT], cfg.max_drop)",
     "tests/test_pipeline_e2e.py::test_damaged_fp8_graph_passes_the_fakequant_gate_and_fails_the_deployed_one"),
    ("promotable when any judged runtime passes", "tasks/gate.py", '    promotable = all(g["passed"]', '    promotable = any(g["passed"]',
     "tests/test_gate.py::test_what_ships_is_judged_and_marking_keeps_the_run_not_promotable"),
    ("the gate step re-run by an evaluation setting's change only (thresholds key the evaluations)", "tasks/evaluate.py",
     'EvalSettings = Reads[EvaluationConfig, "datasets", "tasks", "num_samples", "batch_size", "seed", "recall_k"]',
     'EvalSettings = Reads[EvaluationConfig, "datasets", "tasks", "num_samples", "batch_size", "seed", "recall_k", "max_drop"]',
     "tests/test_pipeline_e2e.py::test_a_new_gate_threshold_reruns_only_the_gate"),
    ("the speed gate holds every size to 1.0x whatever promotion.min_speedup says", "tasks/gate.py",
     "            if speedup < min_speedup - 1e-9:", "            if speedup < 1.0 - 1e-9:",
     "tests/test_gate.py::test_a_higher_bar_fails_every_size_under_it_and_no_gpu_skips_the_gate_saying_why"),
    ("serving.small_batch=fp8 ignored by the speed gate", "tasks/gate.py",
     '    return {"auto": measured, "fp8": "fp8", "fp16":', '    return {"auto": measured, "fp8": measured, "fp16":',
     "tests/test_gate.py::test_fp8_forced_at_a_losing_size_is_marked_failed_or_promoted_as_fp16_naming_the_size"),
    ("speedups compared with another GPU type's", "flows/regression_and_promotion.py",
     '        before = (promoted.get("serving") or {}).get(gpu, {})',
     '        before = next(iter((promoted.get("serving") or {}).values()), {})',
     "tests/test_history.py::test_speedups_as_served_are_recorded_and_a_drop_on_the_same_gpu_regresses"),
    ("every size served by FP8 whatever the table says", "clip_fp8/fp8_runtime.py",
     '        return self.table.get(tower, {}).get(size, "fp8")', '        return "fp8"',
     "tests/test_pipeline_e2e.py::test_torch_fp8_fuses_qkv_exactly_and_serves_each_size_by_the_form_its_table_names"),
    ("QKV fusion leaves r_v out of the out projection's dequantization", "clip_fp8/fp8_runtime.py",
     "        attention.out_proj.weight_scale.mul_(ratio[id(v)])\n", "",
     "tests/test_pipeline_e2e.py::test_torch_fp8_fuses_qkv_exactly_and_serves_each_size_by_the_form_its_table_names"),
    ("help texts read as Rich markup (a [/queue] crashes deploy --help)", "clip_fp8/cli.py", "rich_markup_mode=None,", "",
     "tests/test_cli.py::test_every_help_exits_0_and_prints_its_options_as_written"),
    ("a library's print inside a stage reaches the quiet console", "clip_fp8/console.py",
     "and os.path.realpath(record.pathname).startswith(_our_code())", "",
     "tests/test_cli.py::test_ctrl_c_stops_within_seconds_leaves_nothing_and_the_same_command_resumes"),
    ("an attention recovery left in FP16 counted as an audit gap", "tasks/audit.py",
     '            if not any(r.startswith(("quantization.exclude", "quantization.recovery")) for r in reasons):\n'
     '                towers[tower]["attention_in_scope"] += 1',
     '            towers[tower]["attention_in_scope"] += 1',
     "tests/test_quantization_audit.py::test_an_attention_unit_recovery_leaves_in_fp16_passes_the_audit_attributed_to_recovery"),
    ("suggest out of budget says only 'raise it'", "tasks/recovery.py",
     "                   else out_of_budget(ranking, max_fp16_fraction))",
     "                   else f\"no unit fits in quantization.max_fp16_fraction {max_fp16_fraction}; raise it\")",
     "tests/test_recovery.py::test_suggest_out_of_budget_names_the_units_and_the_budget_that_admits_the_first"),
    ("a reused artifact trusted as found", "clip_fp8/integrity.py", "    why = check(path, ref)\n    if why is None:",
     "    why = None\n    if why is None:",
     "tests/test_integrity.py::test_the_next_run_quarantines_names_and_recomputes_them"),
    ("sizes alone checked (a flipped byte keeps the size)", "clip_fp8/integrity.py",
     '        if file_digest(file) != entry["sha256"]:', "        if False:",
     "tests/test_integrity.py::test_verify_names_both_corrupt_artifacts_and_exits_2"),
    ("clip-fp8 verify exits 0 with corrupt artifacts listed", "clip_fp8/cli.py", "    if corrupt:\n        raise typer.Exit(2)",
     "    if False:\n        raise typer.Exit(2)", "tests/test_integrity.py::test_verify_names_both_corrupt_artifacts_and_exits_2"),
    ("the regression check compares with the first promoted run", "clip_fp8/history.py",
     "    for record in reversed(records):\n        if record.get(\"model_key\") == model",
     "    for record in records:\n        if record.get(\"model_key\") == model",
     "tests/test_history.py::test_the_regression_check_compares_with_the_newest_promoted_run_of_the_same_model"),
    ("throughput from the mean, not the median", "tasks/tensorrt.py",
     '"throughput_samples_s": batch * 1000 / stats["median_ms"]', '"throughput_samples_s": batch * 1000 / stats["mean_ms"]',
     "tests/test_engines.py::test_a_benchmark_rows_throughput_is_samples_per_second_of_its_median"),
    ("the evaluation subset ignores its seed", "tasks/eval_datasets.py",
     "        indices = np.random.default_rng(seed).permutation(len(dataset))[:n]",
     "        indices = np.random.default_rng(0).permutation(len(dataset))[:n]",
     "tests/test_eval_datasets.py::test_the_evaluation_seed_picks_the_subset_and_the_same_seed_the_same_one"),
    ("QKV fusion leaves r_q r_k out of the softmax scale", "clip_fp8/fp8_runtime.py",
     "                FusedQKVAttention(attention, qkv, ratio[id(q)] * ratio[id(k)]))",
     "                FusedQKVAttention(attention, qkv, 1.0))",
     "tests/test_pipeline_e2e.py::test_torch_fp8_fuses_qkv_exactly_and_serves_each_size_by_the_form_its_table_names"),
    ("a second checkout's clip_fp8 mixed with this one's tasks", "clip_fp8/__init__.py",
     "    if here.parent not in (core, core.parent):", "    if False:",
     "tests/test_architecture.py::test_a_second_checkout_on_the_path_is_refused_naming_both_trees"),
    ("torch-fp8 weights saved without their scales", "tasks/torch_fp8.py",
     '            scale = compressed.weight_quantizer._scale if leaf == "weight_scale" else input_scales[owner]',
     '            scale = torch.ones(()) if leaf == "weight_scale" else input_scales[owner]',
     "tests/test_pipeline_e2e.py::test_torch_fp8_artifact_holds_fp8_weights_and_matches_fakequant"),
    ("engines labelled for the target whatever GPU built them", "flows/engines.py",
     '    if found.gpu not in ("none", target.gpu):', "    if False:",
     "tests/test_build_matrix.py::test_engines_are_labelled_for_the_target_and_a_worker_with_another_gpu_is_refused"),
    ("a target no worker picks up is waited for forever", "flows/engines.py",
     "            if claimed_at is None and time.time() - started > cfg.target_timeout:",
     "            if claimed_at is None and time.time() - started > float('inf'):",
     "tests/test_deployment.py::test_build_matrix_builds_on_each_gpu_pool_and_reports_a_missing_one_pending"),
    ("set_scales writes the placeholder scales back", "tasks/set_scales.py",
     "            updates[name] = scale_value(calibrated[quantizer], node.op_type, traced, stored)",
     "            updates[name] = scale_value(amax[quantizer], node.op_type, traced, stored)",
     "tests/test_export.py::test_set_scales_ships_the_graphs_modelopt_exports_from_the_checkpoint"),
    ("set_scales skips its check of the placeholder arithmetic", "tasks/set_scales.py",
     "        if scale_value(amax[quantizer], node.op_type, traced, stored).tobytes() != stored.tobytes():",
     "        if False:",
     "tests/test_export.py::test_set_scales_exports_afresh_when_the_export_does_not_match_the_checkpoint[placeholder scale]"),
    ("set_scales trusts the export's FP8 weights", "tasks/set_scales.py",
     "            if calibrated[quantizer] != amax[quantizer]:", "            if False:",
     "tests/test_export.py::test_set_scales_exports_afresh_when_the_export_does_not_match_the_checkpoint[weights]"),
    ("set_scales trusts the quantizer sets to match", "tasks/set_scales.py",
     "    if set(amax) != set(calibrated):", "    if False:",
     "tests/test_export.py::test_set_scales_exports_afresh_when_the_export_does_not_match_the_checkpoint[quantizers]"),
    ("the device is looked up by importing torch on every host", "clip_fp8/devices.py",
     '    if "torch" not in sys.modules and not any(', "    if False and not any(",
     "tests/test_units.py::test_picking_the_device_imports_torch_only_where_a_gpu_driver_could_answer"),
    ("stage keys parsed in the task threads (the 3.11 parser race)", "flows/stage_task.py",
     "    warm_keys()\n    context = FlowRunContext.get()", "    context = FlowRunContext.get()",
     "tests/test_units.py::test_no_stage_parses_source_once_the_flow_has_entered_stage_results"),
    ("the parser race's SystemError raised, not retried", "clip_fp8/imports.py",
     '                if "recursion depth mismatch" not in str(exc) or attempt == _PARSE_ATTEMPTS - 1:',
     "                if True:", "tests/test_units.py::test_a_parse_that_meets_the_interpreter_wide_counter_race_is_retried"),
    ("promotion activates a version without its smoke check", "clip_fp8/triton_repository.py",
     'required=smoke == "required") if smoke != "off" else', 'required=smoke == "required") if False else',
     "tests/test_serving.py::test_a_version_with_a_deleted_weight_file_fails_the_smoke_check_and_latest_stays"),
    ("the smoke check's tolerance never applied", "clip_fp8/triton_repository.py",
     "    if bad := {m: c for m, c in results.items() if not c >= SMOKE_MIN_COSINE}:",
     "    if bad := {m: c for m, c in results.items() if not c >= -1.0}:",
     "tests/test_serving.py::test_a_version_that_loads_but_answers_other_embeddings_is_refused_naming_the_model"),
    ("served outputs in another dtype than the config declares", "clip_fp8/triton_model.py",
     "            out = np.ascontiguousarray(self._run(np.concatenate(arrays)), dtype=self.output_dtype)",
     "            out = np.ascontiguousarray(self._run(np.concatenate(arrays)), dtype=np.float32)",
     "tests/test_serving.py::test_clip_fp8_serve_answers_over_http_and_grpc_with_the_pipelines_embeddings"),
    ("the stub sees this environment's NumPy 2", "clip_fp8/triton_server.py",
     "    env[SITE_ENV] = os.pathsep.join([*install.site, *site_packages()])",
     "    env[SITE_ENV] = os.pathsep.join(site_packages())",
     "tests/test_serving.py::test_promotion_smoke_checks_the_version_on_a_real_server_before_latest_moves"),
    ("serve exits on Ctrl-C without stopping tritonserver", "clip_fp8/cli.py",
     "        code = server.stop()\n", "        code = None\n",
     "tests/test_serving.py::test_ctrl_c_stops_the_server_within_10_s_leaving_no_process"),
]


def main(selected: list[str]) -> int:
    missed = 0
    print("| defect | test | result |\n|---|---|---|")
    for index, (what, rel, old, new, test) in enumerate(MUTANTS):
        if selected and str(index) not in selected:
            continue
        path = ROOT / rel
        original = path.read_text()
        if original.count(old) != 1:
            raise SystemExit(f"defect {index} ({what}): its text is not (once) in {rel}; update it with the code")
        try:
            path.write_text(original.replace(old, new))
            run = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", test],
                                 cwd=ROOT, capture_output=True, text=True, timeout=1800)
        finally:
            path.write_text(original)
        last = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else run.stderr[-200:]
        missed += run.returncode == 0
        print(f"| {what} | `{test}` | {'red' if run.returncode else 'GREEN: the guard missed it'} ({last}) |", flush=True)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
