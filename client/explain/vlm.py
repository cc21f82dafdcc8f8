"""VLM backends behind one interface: `ask(images, prompt) -> text`.

- `GeminiBackend`: Google's Gemini API through google-genai. The key comes from
  GEMINI_API_KEY or GOOGLE_API_KEY only (never an argument on the command line, never
  logged); timeouts, and retries with exponential backoff on 408/429/5xx and on network
  timeouts, are the SDK's own (`HttpRetryOptions`). Answers are asked for as JSON.
- `QwenVLBackend`: Qwen3-VL or Qwen2-VL (any image-text-to-text model the transformers
  Auto classes load) from a local weights folder; GPU when present, greedy decoding.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from threading import Lock

from PIL import Image

KEY_VARIABLES = ("GEMINI_API_KEY", "GOOGLE_API_KEY")
RETRY_STATUS = (408, 429, 500, 502, 503, 504)


class BackendUnavailable(RuntimeError):
    """A backend that cannot run here (no key, no weights, no package); the message says what to do."""


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def api_key_from_env() -> str | None:
    for name in KEY_VARIABLES:
        if os.environ.get(name):
            return os.environ[name]
    return None


class GeminiBackend:
    name = "gemini"

    def __init__(
        self,
        model: str = "gemini-2.5-flash",
        timeout: float = 60.0,
        attempts: int = 4,
        initial_delay: float = 1.0,
        max_delay: float = 30.0,
        base_url: str | None = None,
        temperature: float = 0.2,
    ):
        from google import genai  # noqa: PLC0415 - optional dependency, only for the Gemini backend
        from google.genai import types  # noqa: PLC0415 - optional dependency, only for the Gemini backend

        key = api_key_from_env()
        if not key:
            raise BackendUnavailable(f"no Gemini API key: set {' or '.join(KEY_VARIABLES)} in the environment")
        self.model, self.timeout, self.attempts = model, timeout, attempts
        self._secret = key
        self._types = types
        retry = types.HttpRetryOptions(
            attempts=attempts,
            initial_delay=initial_delay,
            max_delay=max_delay,
            jitter=0.2 * initial_delay,
            http_status_codes=list(RETRY_STATUS),
        )
        options = types.HttpOptions(base_url=base_url, timeout=int(timeout * 1000), retry_options=retry)
        self._client = genai.Client(api_key=key, vertexai=False, http_options=options)
        self._config = types.GenerateContentConfig(
            response_mime_type="application/json",
            temperature=temperature,
            automatic_function_calling=types.AutomaticFunctionCallingConfig(disable=True),
        )

    @property
    def description(self) -> str:
        return f"gemini {self.model}"

    def ask(self, images: list[Image.Image], prompt: str) -> str:
        from google.genai import errors  # noqa: PLC0415 - optional dependency, only for the Gemini backend

        parts = [self._types.Part.from_bytes(data=png_bytes(im), mime_type="image/png") for im in images]
        try:
            response = self._client.models.generate_content(
                model=self.model, contents=[*parts, prompt], config=self._config
            )
        except errors.APIError as e:
            raise RuntimeError(
                self._clean(
                    f"Gemini answered {e.code} {e.status or ''} after up to {self.attempts} attempts: {e.message or e}"
                )
            ) from None
        except Exception as e:  # timeouts and connection errors from the HTTP client
            kind = "did not answer within" if "timeout" in type(e).__name__.lower() else "could not be reached in"
            raise RuntimeError(
                self._clean(f"Gemini {kind} {self.timeout:g} s ({self.attempts} attempts): {type(e).__name__}: {e}")
            ) from None
        return response.text or ""

    def _clean(self, text: str) -> str:
        return text.replace(self._secret, "***")


class QwenVLBackend:
    name = "qwen-vl"

    def __init__(self, weights: str | Path, device: str | None = None, max_new_tokens: int = 384):
        import torch  # noqa: PLC0415 - with the optional local VLM only
        from transformers import AutoModelForImageTextToText, AutoProcessor  # noqa: PLC0415 - optional heavy dependency

        path = Path(weights)
        if not (path / "config.json").is_file():
            raise BackendUnavailable(
                f"{path} is not a model folder (no config.json): put Qwen3-VL or Qwen2-VL weights there, "
                "e.g. 'huggingface-cli download Qwen/Qwen3-VL-2B-Instruct --local-dir DIR'"
            )
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        self.processor = AutoProcessor.from_pretrained(path, local_files_only=True)
        self.model = (
            AutoModelForImageTextToText.from_pretrained(path, local_files_only=True, dtype=dtype).to(self.device).eval()
        )
        self.path, self.max_new_tokens = path, max_new_tokens
        self._lock = Lock()

    @property
    def description(self) -> str:
        return f"{type(self.model).__name__} from {self.path} on {self.device}"

    def ask(self, images: list[Image.Image], prompt: str) -> str:
        import torch  # noqa: PLC0415 - with the optional local VLM only

        content = [{"type": "image", "image": im.convert("RGB")} for im in images] + [{"type": "text", "text": prompt}]
        inputs = self.processor.apply_chat_template(
            [{"role": "user", "content": content}],
            tokenize=True,
            add_generation_prompt=True,
            return_dict=True,
            return_tensors="pt",
        ).to(self.model.device)
        with self._lock, torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        return self.processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0]


VLM_BACKENDS = ("gemini", "qwen-vl")


def make_vlm(kind: str, model: str | None = None, weights: str | Path | None = None, **options):
    """A VLM backend by name; raises BackendUnavailable with what is missing."""
    if kind == "gemini":
        return GeminiBackend(model=model or "gemini-2.5-flash", **options)
    if kind == "qwen-vl":
        if weights is None:
            raise BackendUnavailable("qwen-vl needs a local weights folder (--vlm-weights DIR)")
        return QwenVLBackend(weights, **options)
    raise ValueError(f"unknown VLM backend {kind!r}; choose one of {', '.join(VLM_BACKENDS)}")
