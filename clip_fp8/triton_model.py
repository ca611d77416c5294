"""One CLIP encoder as a Triton Python-backend model: promotion copies this file into every version of
``clip_image_<form>`` / ``clip_text_<form>`` as ``model.py``, so a version serves with the code it was
promoted with.

The runtime is chosen when an instance loads (config parameter ``runtime``, default ``auto``):
- ``torch-fp8``: the run's torch-fp8 artifact (``torch_fp8/`` beside this file) through
  ``clip_fp8.fp8_runtime.load``, on an instance's GPU that supports FP8; compiled for the config's preferred
  batch sizes, with the FP16/FP8 dispatch the run's benchmark measured (``serving.json``);
- ``onnxruntime``: the repaired ONNX (``model.onnx``) run as written (graph optimizations off, as the
  pipeline's surgery check and its ``onnxruntime`` gate runtime run it), on the CUDA provider for a GPU
  instance where ONNX Runtime has it, else on the CPU. ``auto`` takes torch-fp8 where it can run, else this.
Each request batch from Triton's dynamic batcher is run as one array and split back per request.
"""

import json
import os
import site

# The stub's interpreter does not see the server's environment (clip_fp8.triton_server): add it first.
for _path in os.environ.get("CLIP_FP8_SITE_PACKAGES", "").split(os.pathsep):
    if _path:
        site.addsitedir(_path)

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402

RUNTIMES = ("auto", "torch-fp8", "onnxruntime")


def _parameters(config: dict) -> dict:
    return {k: v["string_value"] for k, v in (config.get("parameters") or {}).items()}


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = _parameters(config)
        self.folder = os.path.join(args["model_repository"], args["model_version"])
        self.encoder = params["encoder"]
        self.input = config["input"][0]["name"]
        self.output = config["output"][0]["name"]
        # Answer in the dtype the config declares (the FP16 graphs' outputs are FP16): another is sent as no data.
        self.output_dtype = pb_utils.triton_string_to_numpy(config["output"][0]["data_type"])
        gpu = args.get("model_instance_kind") == "GPU"
        device = f"cuda:{args.get('model_instance_device_id', '0')}" if gpu else "cpu"
        wanted = params.get("runtime", "auto")
        if wanted not in RUNTIMES:
            raise pb_utils.TritonModelException(f"{config['name']}: runtime '{wanted}' is not one of {', '.join(RUNTIMES)}")
        why_not = self._torch_fp8_why_not(device)
        if wanted == "torch-fp8" and why_not:
            raise pb_utils.TritonModelException(f"{config['name']}: runtime torch-fp8 cannot run here: {why_not}")
        self.runtime = "torch-fp8" if wanted == "torch-fp8" or (wanted == "auto" and not why_not) else "onnxruntime"
        sizes = sorted(int(b) for b in (config.get("dynamic_batching") or {}).get("preferred_batch_size") or [])
        if self.runtime == "torch-fp8":
            self._load_torch_fp8(device, sizes or [config["max_batch_size"]], params.get("small_batch", "auto"))
        else:
            self._load_onnxruntime(gpu)
        pb_utils.Logger.log_info(f"{config['name']} version {args['model_version']}: {self.encoder} encoder on "
                                 f"{self.runtime} ({device})")

    def _torch_fp8_why_not(self, device: str) -> str | None:
        if not os.path.isdir(os.path.join(self.folder, "torch_fp8")):
            return "this version has no torch_fp8 artifact"
        if not device.startswith("cuda"):
            return "a CPU instance (torch-fp8 is served on FP8 GPUs)"
        from clip_fp8.fp8_runtime import fp8_support

        return fp8_support(device)

    def _load_torch_fp8(self, device: str, sizes: list, small_batch: str) -> None:
        import torch

        from clip_fp8.fp8_runtime import load

        self.torch = torch
        self.device = device
        self.clip = load(os.path.join(self.folder, "torch_fp8"), device=device, batch_sizes=sizes,
                         small_batch=small_batch)
        self.clip.warm_up()  # every preferred size compiled and captured before the model reports ready

    def _load_onnxruntime(self, gpu: bool) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        providers = ["CPUExecutionProvider"]
        if gpu and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        self.session = ort.InferenceSession(os.path.join(self.folder, "model.onnx"), options, providers=providers)
        self.feed_type = self.session.get_inputs()[0].type

    def _run(self, batch: np.ndarray) -> np.ndarray:
        if self.runtime == "torch-fp8":
            x = self.torch.from_numpy(batch)
            out = self.clip.encode_image(x) if self.encoder == "image" else self.clip.encode_text(x)
            return out.cpu().numpy()
        if "float16" in self.feed_type:
            batch = batch.astype(np.float16)
        elif "float" in self.feed_type:
            batch = batch.astype(np.float32)
        return self.session.run(None, {self.session.get_inputs()[0].name: batch})[0]

    def execute(self, requests):
        arrays = [pb_utils.get_input_tensor_by_name(r, self.input).as_numpy() for r in requests]
        try:
            out = np.ascontiguousarray(self._run(np.concatenate(arrays)), dtype=self.output_dtype)
        except Exception as exc:  # noqa: BLE001 - every request of the batch gets the error, the model stays up
            error = pb_utils.TritonError(f"{self.encoder} encoder ({self.runtime}): {exc}")
            return [pb_utils.InferenceResponse(output_tensors=[], error=error) for _ in requests]
        responses, start = [], 0
        for array in arrays:
            rows = out[start:start + len(array)]
            start += len(array)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(self.output, rows)]))
        return responses
