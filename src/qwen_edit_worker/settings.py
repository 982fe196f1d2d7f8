"""Every setting the worker reads from its environment, parsed once into a frozen object.

Why this exists: settings are the worker's public contract with the people deploying it
(docs/settings.md and hub.json list the same names and defaults), so they live in one place.
`from_env` is a pure function of a mapping (tests pass a dict; nothing reads os.environ behind
their back), and a bad value is a SettingsError naming the setting and what is allowed.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

from .errors import SettingsError
from .model.readers import MAX_READERS, PER_CPU
from .safety.policy import DEFAULT_MODE as SAFETY_DEFAULT
from .safety.policy import MODES as SAFETY_MODES
from .safety.tiny import parse_flags
from .weights.precision import PRECISION_SETTINGS, PRECISIONS
from .weights.variants import DEFAULT_VARIANT, VARIANTS, Variant

ATTENTION_BACKENDS = ("auto", "native", "xformers", "flash", "_native_cudnn", "_native_flash", "_native_efficient")
MEMORY_SAVING_MODES = ("auto", "on", "off")
OFFLOAD_MODES = ("auto", "none", "text_encoder", "model", "group")
COMPILE_MODES = ("off", "regional")
MAX_CONCURRENCY = 4  # one job on the GPU, the others loading or sending pictures; more only holds jobs back
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
ENDPOINT_TYPES = ("queue", "lb")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")

# Name -> (default as the environment would spell it, one-line description).  docs/settings.md
# and hub.json are checked against this table by the tests.
SETTINGS: dict[str, tuple[str, str]] = {
    "MODEL_VARIANT": (DEFAULT_VARIANT, "edit | edit-2509 | edit-2511"),
    "MODEL_PATH": ("", "diffusers folder; empty means /models/<variant>, or RunPod's cached model (the endpoint's "
                       "Model field) when the image bakes none"),
    "LORA_PATH": ("", "Lightning LoRA file; empty means the variant's file in the baked layout"),
    "LIGHTNING": ("1", "1: fuse the Lightning LoRA (3 steps, no CFG); 0: base model"),
    "TINY_MODEL": ("0", "1: tiny random-weight model built in code (tests, demos; output is noise)"),
    "ATTENTION_BACKEND": ("auto", "auto (fastest measured at load) | native | xformers | flash | _native_cudnn | "
                                    "_native_flash | _native_efficient"),
    "MEMORY_SAVING": ("auto", "auto | on | off (auto: on for GPUs under 48 GB)"),
    "PRECISION": ("bf16", "bf16 | int8 | fp8 | auto: the transformer's linear layers quantised (torchao) after the "
                          "LoRA is fused; int8 needs sm80+ (Ampere), fp8 sm89+ (Ada, Hopper); auto: fp8 on sm89+, "
                          "int8 on sm80+, else bf16 (a quantised bake: as baked); must match a quantised bake"),
    "TEXT_ENCODER_PRECISION": ("bf16", "bf16 | int8 | fp8: the text encoder's language-model linear layers "
                                       "quantised (torchao); the vision tower stays bf16; must match the bake"),
    "COMPILE": ("off", "off | regional: compile the repeated transformer block at load (torch.compile)"),
    "OFFLOAD": ("auto", "auto (fastest placement that fits this GPU) | none | text_encoder | model | group"),
    "WARMUP": ("1", "1: start loading the model in the background at worker start"),
    "CONCURRENCY": ("2", "jobs a worker holds at once (1 to 4): the next job's pictures load while one is on the GPU"),
    "GPU_PRICE_PER_SECOND": ("", "USD per second for cost reports; empty: GPU_PRICES, else RunPod's price table"),
    "GPU_PRICES": ("", "JSON object: GPU type as RunPod's catalog names it (its `id`, what the GPU calls itself, "
                       "e.g. \"NVIDIA GeForce RTX 4090\") -> USD per second; prices this worker's own GPU before "
                       "the built-in table (`qwen-edit deploy` writes it from RunPod's live catalog)"),
    "MAX_INPUT_BYTES": ("20000000", "largest accepted input image, in bytes"),
    "MAX_INPUT_PIXELS": ("40000000", "largest accepted input image, in pixels"),
    "MAX_RESPONSE_BYTES": ("20000000", "largest base64 response; RunPod refuses results over 20 MB"),
    "ALLOW_LOOPBACK_URLS": ("0", "test aid: 1 lets input URLs point at 127.0.0.1; keep 0 in production"),
    "BUCKET_ENDPOINT_URL": ("", "S3-compatible endpoint; with the keys, outputs are uploaded and returned as URLs"),
    "BUCKET_ACCESS_KEY_ID": ("", "the bucket's access key id"),
    "BUCKET_SECRET_ACCESS_KEY": ("", "the bucket's secret key (never logged)"),
    "BUCKET_NAME": ("", "bucket to upload to; empty: RunPod's default, named by month (MM-YY)"),
    "LOG_LEVEL": ("INFO", "DEBUG | INFO | WARNING | ERROR"),
    "READAHEAD_READERS": ("auto", "readers bringing the weights into the page cache from the load's first moment: auto "
                                  f"({PER_CPU} a CPU this process may use, at most {MAX_READERS}) | 1 to 64"),
    # The safety checker (src/qwen_edit_worker/safety/).
    "SAFETY_CHECKER": (SAFETY_DEFAULT, "off (nothing loaded or baked) | request (input.enable_safety_checker decides, "
                                       "default true) | always (every picture checked; a caller's false is refused); "
                                       "a flagged picture comes back black"),
    "TINY_SAFETY_FLAGS": ("none", "test aid with TINY_MODEL=1: which pictures the tiny safety checker flags: none | "
                                  "all | batch indexes such as 0,2"),
    # Request-time LoRAs (input.loras; src/qwen_edit_worker/loras/).
    "MAX_LORAS": ("3", "most LoRAs one job may ask for (0 to 8; 0 turns input.loras off)"),
    "LORA_MAX_BYTES": ("2000000000", "largest LoRA file fetched or read, in bytes (a download stops at the cap)"),
    "LORA_DIR": ("", "folder of LoRAs a job may name; empty: /runpod-volume/loras when it exists, else none"),
    "LORA_CACHE_DIR": ("", "downloaded LoRAs, by content; empty: /runpod-volume/lora-cache when /runpod-volume "
                           "is writable, else a folder under /tmp"),
    "LORA_CACHE_GB": ("20", "disk the LoRA cache may use; least recently used files go past it"),
    "LORA_SLOTS": ("4", "LoRAs kept loaded on the model between jobs (1 to 16), least recently used out"),
    "LORA_MAX_RANK": ("32", "COMPILE=regional only: the rank its LoRA slots are padded to (made at load); 0: no LoRAs"),
    "HF_ENDPOINT": ("https://huggingface.co", "the Hugging Face hub that ORG/NAME LoRA paths are fetched from"),
    "HF_TOKEN": ("", "token for private or gated LoRA repos on HF_ENDPOINT (never taken from a request; never logged)"),
    # The front door (serving/http/): RunPod's queue, or a load-balancing endpoint's own HTTP server.
    "ENDPOINT_TYPE": ("queue", "queue: RunPod's job queue (the SDK's job loop) | lb: a load-balancing endpoint: an "
                               "HTTP server with the OpenAI Images API, /runsync and /ping"),
    "PORT": ("80", "lb: the HTTP port (RunPod sets it; its default is 80)"),
    "PORT_HEALTH": ("", "lb: the port of GET /ping; empty: PORT"),
    "LB_MAX_WAITING": ("2", "lb: requests a worker keeps waiting beyond CONCURRENCY running (0 to 16); more: 429"),
    "API_KEY": ("", "lb: when set, every route but /ping needs Authorization: Bearer <key> (never logged)"),
}
# Settings that only the load-balancing front door reads: the Hub template is a queue endpoint (one
# endpointType per template), so hub.json offers none of them; docs/deploy.md says how to use them.
LB_SETTINGS = ("ENDPOINT_TYPE", "PORT", "PORT_HEALTH", "LB_MAX_WAITING", "API_KEY")
# Settings `qwen-edit deploy` writes for the endpoint (a person never types them): the Hub template offers none.
DEPLOY_SETTINGS = ("GPU_PRICES",)
# Tuning for a host, not a choice a deployer makes: the default is measured for the host at start
# (model/readers.py), so the Hub's form leaves it out; the endpoint's environment can still set it.
HOST_TUNING = ("READAHEAD_READERS",)
MAX_READAHEAD_READERS = 64
RUNPOD_VOLUME = Path("/runpod-volume")
MAX_MAX_LORAS = 8


@dataclass(frozen=True)
class Settings:
    """The worker's configuration.  Build it with `Settings.from_env`."""

    variant: Variant
    model_path: Path
    lora_path: Path | None  # None: the default for the model source (baked layout or tiny file)
    lightning: bool
    tiny_model: bool
    attention_backend: str
    memory_saving: str
    precision: str
    text_encoder_precision: str
    compile: str
    offload: str
    warmup: bool
    concurrency: int
    gpu_price_per_second: float | None
    gpu_prices: dict[str, float]  # GPU_PRICES: catalog GPU type name -> USD per second ({}: none given)
    max_input_bytes: int
    max_input_pixels: int
    max_response_bytes: int
    allow_loopback_urls: bool
    bucket_endpoint_url: str
    bucket_access_key_id: str
    bucket_secret_access_key: str = field(repr=False)
    bucket_name: str
    log_level: str
    readahead_readers: int | None  # None: chosen from the host at start (model/readers.py)
    safety_checker: str
    tiny_safety_flags: str | frozenset[int]
    max_loras: int
    lora_max_bytes: int
    lora_dir: Path | None  # None: no LORA_DIR (a local name in input.loras is then an error)
    lora_cache_dir: Path
    lora_cache_bytes: int
    lora_slots: int
    lora_max_rank: int
    hf_endpoint: str
    hf_token: str = field(repr=False)
    endpoint_type: str
    port: int
    port_health: int
    lb_max_waiting: int
    api_key: str = field(repr=False)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Parse settings from `env` (default: os.environ); raise SettingsError on a bad value."""
        env = os.environ if env is None else env

        def raw(name: str) -> str:
            value = env.get(name, "")
            return value.strip() if value.strip() else SETTINGS[name][0]

        variant_name = raw("MODEL_VARIANT").lower()
        if variant_name not in VARIANTS:
            raise SettingsError("MODEL_VARIANT", f"must be one of {', '.join(VARIANTS)} (got {variant_name!r})")
        model_path = Path(raw("MODEL_PATH") or f"/models/{variant_name}")
        lora = raw("LORA_PATH")
        bucket = [raw(n) for n in ("BUCKET_ENDPOINT_URL", "BUCKET_ACCESS_KEY_ID", "BUCKET_SECRET_ACCESS_KEY")]
        if any(bucket) and not all(bucket):
            raise SettingsError("BUCKET_ENDPOINT_URL", "BUCKET_ENDPOINT_URL, BUCKET_ACCESS_KEY_ID and "
                                "BUCKET_SECRET_ACCESS_KEY go together: set all three or none")
        return cls(
            variant=VARIANTS[variant_name],
            model_path=model_path,
            lora_path=Path(lora) if lora else None,
            lightning=_flag("LIGHTNING", raw("LIGHTNING")),
            tiny_model=_flag("TINY_MODEL", raw("TINY_MODEL")),
            attention_backend=_choice("ATTENTION_BACKEND", raw("ATTENTION_BACKEND").lower(), ATTENTION_BACKENDS),
            memory_saving=_choice("MEMORY_SAVING", raw("MEMORY_SAVING").lower(), MEMORY_SAVING_MODES),
            precision=_choice("PRECISION", raw("PRECISION").lower(), PRECISION_SETTINGS),
            text_encoder_precision=_choice("TEXT_ENCODER_PRECISION", raw("TEXT_ENCODER_PRECISION").lower(), PRECISIONS),
            compile=_choice("COMPILE", raw("COMPILE").lower(), COMPILE_MODES),
            offload=_choice("OFFLOAD", raw("OFFLOAD").lower(), OFFLOAD_MODES),
            warmup=_flag("WARMUP", raw("WARMUP")),
            concurrency=_int_in("CONCURRENCY", raw("CONCURRENCY"), 1, MAX_CONCURRENCY),
            gpu_price_per_second=_price(raw("GPU_PRICE_PER_SECOND")),
            gpu_prices=_prices(raw("GPU_PRICES")),
            max_input_bytes=_positive_int("MAX_INPUT_BYTES", raw("MAX_INPUT_BYTES")),
            max_input_pixels=_positive_int("MAX_INPUT_PIXELS", raw("MAX_INPUT_PIXELS")),
            max_response_bytes=_positive_int("MAX_RESPONSE_BYTES", raw("MAX_RESPONSE_BYTES")),
            allow_loopback_urls=_flag("ALLOW_LOOPBACK_URLS", raw("ALLOW_LOOPBACK_URLS")),
            bucket_endpoint_url=_url("BUCKET_ENDPOINT_URL", raw("BUCKET_ENDPOINT_URL")),
            bucket_access_key_id=raw("BUCKET_ACCESS_KEY_ID"),
            bucket_secret_access_key=raw("BUCKET_SECRET_ACCESS_KEY"),
            bucket_name=raw("BUCKET_NAME"),
            log_level=_choice("LOG_LEVEL", raw("LOG_LEVEL").upper(), LOG_LEVELS),
            readahead_readers=_readers(raw("READAHEAD_READERS")),
            safety_checker=_choice("SAFETY_CHECKER", raw("SAFETY_CHECKER").lower(), SAFETY_MODES),
            tiny_safety_flags=parse_flags(raw("TINY_SAFETY_FLAGS")),
            max_loras=_int_in("MAX_LORAS", raw("MAX_LORAS"), 0, MAX_MAX_LORAS),
            lora_max_bytes=_positive_int("LORA_MAX_BYTES", raw("LORA_MAX_BYTES")),
            lora_dir=_lora_dir(raw("LORA_DIR"), RUNPOD_VOLUME),
            lora_cache_dir=_lora_cache_dir(raw("LORA_CACHE_DIR"), RUNPOD_VOLUME),
            lora_cache_bytes=_gigabytes("LORA_CACHE_GB", raw("LORA_CACHE_GB")),
            lora_slots=_int_in("LORA_SLOTS", raw("LORA_SLOTS"), 1, 16),
            lora_max_rank=_int_in("LORA_MAX_RANK", raw("LORA_MAX_RANK"), 0, 512),
            hf_endpoint=_url("HF_ENDPOINT", raw("HF_ENDPOINT")).rstrip("/"),
            hf_token=raw("HF_TOKEN"),
            endpoint_type=_choice("ENDPOINT_TYPE", raw("ENDPOINT_TYPE").lower(), ENDPOINT_TYPES),
            port=_int_in("PORT", raw("PORT"), 1, 65535),
            port_health=_int_in("PORT_HEALTH", raw("PORT_HEALTH") or raw("PORT"), 1, 65535),
            lb_max_waiting=_int_in("LB_MAX_WAITING", raw("LB_MAX_WAITING"), 0, 16),
            api_key=raw("API_KEY"),
        )

    @property
    def bucket_configured(self) -> bool:
        return bool(self.bucket_endpoint_url and self.bucket_access_key_id and self.bucket_secret_access_key)

    def summary(self) -> dict[str, object]:
        """The settings as plain values for the startup log, keys and secrets left out."""
        out: dict[str, object] = {}
        for f in fields(self):
            if (f.name.startswith("bucket_") and f.name not in ("bucket_endpoint_url", "bucket_name")) \
                    or f.name in ("hf_token", "api_key"):
                out[f.name] = "(set)" if getattr(self, f.name) else "(empty)"
                continue
            value = getattr(self, f.name)
            if isinstance(value, frozenset):
                value = sorted(value)
            out[f.name] = value.name if isinstance(value, Variant) else str(value) if isinstance(value, Path) else value
        return out


def front_door(env: Mapping[str, str], queue_present: bool) -> str:
    """The endpoint type `python handler.py` serves: ENDPOINT_TYPE ("queue" or "lb").

    A bad value cannot say which was meant: where RunPod's queue is present (`queue_present`) the
    queue path runs and answers every job with the setting's error; elsewhere the HTTP server runs
    and its /ping answers 503 with it.  Either way the worker stays up and says what to fix.
    """
    value = env.get("ENDPOINT_TYPE", "").strip().lower() or SETTINGS["ENDPOINT_TYPE"][0]
    if value in ENDPOINT_TYPES:
        return value
    return "queue" if queue_present else "lb"


def _flag(name: str, value: str) -> bool:
    lowered = value.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise SettingsError(name, f"must be 1 or 0 (also true/false, yes/no, on/off); got {value!r}")


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise SettingsError(name, f"must be one of {', '.join(allowed)} (got {value!r})")
    return value


def _price(value: str) -> float | None:
    if not value:
        return None
    try:
        price = float(value)
    except ValueError:
        price = -1.0
    if not 0 < price < 1:
        raise SettingsError(
            "GPU_PRICE_PER_SECOND", f"must be a price in USD per second, above 0 and below 1 (got {value!r})"
        )
    return price


def _prices(value: str) -> dict[str, float]:
    """GPU_PRICES: a JSON object of GPU type name -> USD per second, each above 0 and below 0.1 ($360 an hour: a
    price per hour, the catalog's unit, is refused rather than billed 3600 times over)."""
    if not value:
        return {}
    try:
        parsed = json.loads(value)
    except ValueError:
        parsed = None
    good = isinstance(parsed, dict) and all(
        isinstance(name, str) and name.strip() and isinstance(price, int | float) and not isinstance(price, bool)
        and 0 < price < 0.1 for name, price in parsed.items())
    if not good:
        raise SettingsError("GPU_PRICES", "must be a JSON object of GPU type name -> USD per second (above 0, below "
                            "0.1: the catalog's price per hour / 3600), like "
                            f'{{"NVIDIA GeForce RTX 4090": 0.00031}} (got {value[:80]!r})')
    return {name.strip(): float(price) for name, price in parsed.items()}


def _url(name: str, value: str) -> str:
    if value and not value.lower().startswith(("http://", "https://")):
        raise SettingsError(name, f"must be an http(s) URL (got {value[:60]!r})")
    return value


def _int_in(name: str, value: str, low: int, high: int) -> int:
    try:
        number = int(value)
    except ValueError:
        number = low - 1
    if not low <= number <= high:
        raise SettingsError(name, f"must be a whole number from {low} to {high} (got {value!r})")
    return number


def _readers(value: str) -> int | None:
    """READAHEAD_READERS: None for auto (the host decides), else a count from 1 to MAX_READAHEAD_READERS."""
    if value.lower() == "auto":
        return None
    try:
        number = int(value)
    except ValueError:
        number = 0
    if not 1 <= number <= MAX_READAHEAD_READERS:
        raise SettingsError("READAHEAD_READERS", f"must be auto ({PER_CPU} readers a CPU, at most {MAX_READERS}) "
                            f"or a whole number from 1 to {MAX_READAHEAD_READERS} (got {value!r})")
    return number


def _positive_int(name: str, value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number <= 0:
        raise SettingsError(name, f"must be a positive whole number (got {value!r})")
    return number


def _gigabytes(name: str, value: str) -> int:
    try:
        number = float(value)
    except ValueError:
        number = 0.0
    if not 0 < number < 1e6:
        raise SettingsError(name, f"must be a positive number of gigabytes (got {value!r})")
    return int(number * 1e9)


def _lora_dir(value: str, volume: Path) -> Path | None:
    """LORA_DIR as given; empty: <volume>/loras when that folder exists (a network volume), else none."""
    if value:
        return Path(value)
    default = volume / "loras"
    return default if default.is_dir() else None


def _lora_cache_dir(value: str, volume: Path) -> Path:
    """LORA_CACHE_DIR as given; empty: on the network volume when it is writable (survives workers), else /tmp."""
    if value:
        return Path(value)
    if volume.is_dir() and os.access(volume, os.W_OK):
        return volume / "lora-cache"
    return Path(tempfile.gettempdir()) / "qwen-edit-lora-cache"
