"""Strings and encoded images in, the promoted encoders' embeddings out: a Triton Python-backend model that
promotion copies into every version of ``clip_raw`` as ``model.py``, beside the tokenizer and image
processor saved with the run.

Inputs (each optional, any number per request): ``text`` (UTF-8 strings), ``image`` (encoded image files,
JPEG or PNG bytes). It tokenizes and preprocesses exactly as the pipeline does (``CLIPProcessor``, text padded
to the context length) and asks the tensor models named by its parameters ``text_model`` and ``image_model``
(BLS requests, so their dynamic batchers still batch across clients). Outputs ``text_embeds`` and
``image_embeds``, one row per string or image given (zero rows where none were).
"""

import io
import json
import os
import site

for _path in os.environ.get("CLIP_FP8_SITE_PACKAGES", "").split(os.pathsep):
    if _path:
        site.addsitedir(_path)

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        from transformers import CLIPProcessor

        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in (config.get("parameters") or {}).items()}
        folder = os.path.join(args["model_repository"], args["model_version"])
        self.processor = CLIPProcessor.from_pretrained(folder)
        self.context = int(params["context_length"])
        self.dim = int(params["embedding_dim"])
        self.models = {kind: (params[f"{kind}_model"], params[f"{kind}_input"], params[f"{kind}_output"],
                              pb_utils.triton_string_to_numpy(params[f"{kind}_input_type"]))
                       for kind in ("text", "image")}

    def _encode(self, kind: str, batch: np.ndarray) -> np.ndarray:
        if len(batch) == 0:
            return np.zeros((0, self.dim), np.float32)
        model, input_name, output_name, dtype = self.models[kind]
        request = pb_utils.InferenceRequest(model_name=model, requested_output_names=[output_name],
                                            inputs=[pb_utils.Tensor(input_name, batch.astype(dtype))])
        response = request.exec()
        if response.has_error():
            raise RuntimeError(f"{model}: {response.error().message()}")
        return pb_utils.get_output_tensor_by_name(response, output_name).as_numpy().astype(np.float32)

    def _inputs(self, request, name: str) -> list:
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        return [] if tensor is None else list(tensor.as_numpy().reshape(-1))

    def execute(self, requests):
        from PIL import Image

        responses = []
        for request in requests:
            try:
                texts = [t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in self._inputs(request, "text")]
                images = [Image.open(io.BytesIO(b)).convert("RGB") for b in self._inputs(request, "image")]
                ids = self.processor.tokenizer(texts, padding="max_length", truncation=True, max_length=self.context,
                                               return_tensors="np")["input_ids"].astype(np.int64) if texts \
                    else np.zeros((0, self.context), np.int64)
                pixels = self.processor.image_processor(images, return_tensors="np")["pixel_values"].astype(np.float32) \
                    if images else np.zeros((0,), np.float32)
                outputs = [pb_utils.Tensor("text_embeds", self._encode("text", ids)),
                           pb_utils.Tensor("image_embeds", self._encode("image", pixels))]
                responses.append(pb_utils.InferenceResponse(outputs))
            except Exception as exc:  # noqa: BLE001 - a bad image or string fails its request, not the model
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(exc))))
        return responses
