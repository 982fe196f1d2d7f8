"""One RunPod job, from `input` to edited pictures, timing, cost and a log line.

Why this exists: this is the job's whole story in order (validate, read the pictures, wait for
the model if it is still loading, edit, encode, report), and the one place that turns every
failure into the caller-facing shape: a request or load error is returned as the job's `error`;
CUDA out-of-memory frees the cache and asks RunPod for a fresh worker (`refresh_worker`); any
other error is logged with its traceback and answered briefly, and the next job still runs.
Never logs pictures, base64 data, tokens or keys.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Mapping
from typing import Any

from .. import comfy, placement, safety
from ..accounting.cost import job_cost
from ..accounting.timing import StageClock, billed_seconds, timing_report
from ..errors import RequestError, SettingsError, WorkerError
from ..loras.service import RequestLoras
from ..model.loaded import LoadEvents
from ..pictures import images_in, images_out, sizing, uploads
from ..schema import MAX_SEED, RANDOM_SEEDS, EditRequest, ModelDefaults, parse_request
from ..settings import Settings
from .gpu_section import GpuSection
from .lazy import LazyLoad

log = logging.getLogger(__name__)
Progress = Callable[[Mapping[str, Any], Any], None]
WARM_UP_SIZE = (1024, 1024)  # the default 1 MP square; other sizes compile on first use
WARM_UP_SIZE_TINY = (64, 64)
LIGHTNING_MAX_STEPS = 4  # the LoRA is distilled for 4 steps; 3 is this worker's default


class Worker:
    """Handles jobs; create one per process."""

    def __init__(self, env: Mapping[str, str] | None = None, progress: Progress | None = None) -> None:
        self.progress = progress
        self.settings: Settings | None = None
        self.settings_error: SettingsError | None = None
        try:
            self.settings = Settings.from_env(env)
        except SettingsError as err:
            log.error("bad setting, every job will fail until it is fixed: %s", err)
            self.settings_error = err
        self.model: LazyLoad[Any] = LazyLoad(self._load)
        self.section = GpuSection()  # one job at a time on the model, including prompts encoded while it loads
        self.loras = RequestLoras(self.settings) if self.settings is not None else None
        s = self.settings
        self.bucket = uploads.Bucket(s.bucket_endpoint_url, s.bucket_access_key_id, s.bucket_secret_access_key,
                                     s.bucket_name) if s is not None and s.bucket_configured else None

    def start(self) -> None:
        """Start loading in the background when WARMUP is on (the default)."""
        if self.settings is not None:
            log.info("settings: %s", self.settings.summary())
            if self.settings.warmup:
                self.model.start()

    def concurrency(self, current: int = 1) -> int:
        """The SDK's `concurrency_modifier`: how many jobs this worker holds at once (CONCURRENCY).

        The SDK passes the current value; the answer is always the setting (1 when settings are bad:
        each job is then answered with the settings error at once anyway).
        """
        return self.settings.concurrency if self.settings is not None else 1

    def _load(self) -> Any:
        from ..model import readahead

        assert self.settings is not None
        reader = readahead.start_for(self.settings)  # the weights start coming in before torch is imported
        from ..model.sequence import load_model
        from ..model.speedups import warm_up
        from .engine import Editor

        try:
            editor = Editor(load_model(self.settings, _Listener(self.model, reader)), self.section)
        finally:
            if reader is not None:
                reader.stop()
        assert self.loras is not None
        lora_slots = self.loras.prepare(editor.model)  # COMPILE=regional: LoRA slots before compiling
        if self.settings.compile == "regional":  # compile now, so no job pays for it
            size = WARM_UP_SIZE_TINY if self.settings.tiny_model else WARM_UP_SIZE
            editor.model.load_seconds += warm_up(editor.warm_up, size)
            if lora_slots is not None:
                with lora_slots.all_on():  # the adapters-on variant of the compiled blocks
                    editor.model.load_seconds += warm_up(editor.warm_up, size)
        return editor

    def handle(self, job: Mapping[str, Any]) -> dict[str, Any]:
        """The RunPod handler: a job in, the output (or `error`) out."""
        return self.attempt(job)[0]

    def attempt(self, job: Mapping[str, Any], upload: bool = True) -> tuple[dict[str, Any], Exception | None]:
        """`handle`'s answer and the error behind it (None on success), for a front door that maps errors
        to its own status codes (serving/http).  `upload=False` keeps the pictures inline as base64 even
        when a bucket is configured."""
        job_id = str(job.get("id", "local"))
        try:
            return self._run(job, job_id, upload), None
        except WorkerError as err:
            log.warning("job %s failed: %s", job_id, err)
            return {"error": str(err)} | ({"refresh_worker": True} if self._machine_fault(err) else {}), err
        except Exception as err:  # the worker must keep serving; the caller gets a short cause
            if type(err).__name__ == "OutOfMemoryError":
                return self._out_of_memory(job_id), err
            log.exception("job %s failed with an internal error", job_id)
            return {"error": f"internal error ({type(err).__name__}); details are in the worker log"}, err

    def _run(self, job: Mapping[str, Any], job_id: str, upload: bool = True) -> dict[str, Any]:
        if self.settings_error is not None:
            raise self.settings_error
        assert self.settings is not None
        workflow = comfy.workflow_job(job.get("input"), self.settings)  # worker-comfyui's request, else None
        if workflow is None:
            return self._run_input(job, job_id, upload, job.get("input"))
        try:
            out = self._run_input(job, job_id, upload, workflow.input, workflow.object_names())
        except RequestError as err:  # named as the caller sent it: input.workflow.<id>.inputs.<name>, ...
            raise workflow.rename(err) from None
        return comfy.shape(out, workflow)

    def _run_input(self, job: Mapping[str, Any], job_id: str, upload: bool, raw: Any,
                   names: list[str] | None = None) -> dict[str, Any]:
        assert self.settings is not None
        settings = self.settings
        clock = StageClock()
        defaults = ModelDefaults.for_model(settings.variant, settings.lightning)
        request = parse_request(raw, settings.variant, defaults, settings.max_loras)
        safety.wanted(settings.safety_checker, request.enable_safety_checker)  # a refused false fails before any work
        bucket = uploads.job_bucket(job, self.bucket) if upload else None
        limits = images_in.InputLimits(settings.max_input_bytes, settings.max_input_pixels,
                                       settings.allow_loopback_urls)
        with clock.stage("inputs"):
            area = sizing.working_area(request.size, request.megapixels)
            pictures = [images_in.load_image(source, field, limits, area) for source, field in request.sources()]
        assert self.loras is not None
        loras = self.loras.fetch(request.loras, clock)  # before the GPU: the next job's LoRA downloads meanwhile
        try:
            return self._edit(job, job_id, request, pictures, loras, bucket, clock, names)
        finally:
            self.loras.release(loras)

    def _edit(self, job: Mapping[str, Any], job_id: str, request: EditRequest, pictures: list[Any], loras: list[Any],
              bucket: uploads.Bucket | None, clock: StageClock, names: list[str] | None = None) -> dict[str, Any]:
        assert self.settings is not None and self.loras is not None
        settings = self.settings
        size, warnings = _plan(request, pictures[-1].size, settings.lightning)
        encoded, early_wait = self._encode_early(request, pictures, size, clock)
        editor, cold, waited = self.model.get()
        cold, waited = cold or encoded is not None, waited + early_wait
        model = editor.model
        clock.set_sync(editor.sync)
        fit = placement.fit_request(editor.model.placement, size, pictures, request, settings.variant,
                                    self.loras.gpu_bytes(loras) if loras else 0)  # or refuse
        seed = request.seed if request.seed is not None else secrets.randbelow(RANDOM_SEEDS)
        seeds = [(seed + i) % (MAX_SEED + 1) for i in range(request.num_images)]

        def on_step(done: int, total: int) -> None:
            if self.progress is not None:
                self.progress(job, {"step": done, "steps": total})

        pixels = editor.edit(
            pictures, prompt=request.prompt, negative_prompt=request.negative_prompt,
            true_cfg_scale=request.true_cfg_scale, steps=request.num_inference_steps, size=size, seeds=seeds,
            clock=clock, on_step=on_step, batch=fit.batch, around=self.loras.applied(editor.model, loras, clock),
            encoded=encoded,
        )
        checked, note = safety.wanted(settings.safety_checker, request.enable_safety_checker)
        flags = None
        if checked:
            assert model.safety is not None  # loaded whenever SAFETY_CHECKER is not off
            with clock.stage("safety"):  # before encoding: a flagged picture is blacked out, never encoded
                flags, pixels = model.safety.screen(pixels)
        warnings += [note] if note else []
        with clock.stage("outputs"):
            images, image_url = _outputs(job_id, pixels, seeds, request, bucket, settings.max_response_bytes,
                                         flags, names)
        timing = timing_report(clock, cold_start=cold, load_seconds=waited, steps=request.num_inference_steps)
        cost = job_cost(billed_seconds(clock), len(images), model.gpu_name, settings.gpu_price_per_second,
                        settings.gpu_prices)
        log.info(
            "job %s done: %d image(s) %dx%d from %d input(s), %d steps, cfg %.1f, seed %d, cold=%s, "
            "stages ms: %s, total %.0f ms, cost %s, nsfw %s, loras %d%s", job_id, len(images), size[0], size[1],
            len(pictures),
            request.num_inference_steps, request.true_cfg_scale, seed, cold,
            " ".join(f"{k.removesuffix('_ms')}={v}" for k, v in timing.items() if k.endswith("_ms")),
            timing["total_ms"], "unknown" if cost["usd"] is None else f"${cost['usd']:.5f}",
            "unchecked" if flags is None else f"{sum(flags)}/{len(flags)}",
            len(loras), "".join(f" {item.sha256[:12]}" for item in loras),  # sha256s only: URLs may be signed
        )
        info = {**model.info(request.num_inference_steps), "loras": self.loras.report(loras)}
        out = {"images": images, "image_url": image_url, "seed": seed, "timing": timing, "cost": cost,
               "model": info, "warnings": warnings}
        return out if flags is None else out | {"has_nsfw_concepts": flags}

    def _encode_early(self, request: EditRequest, pictures: list[Any], size: tuple[int, int],
                      clock: StageClock) -> tuple[Any, float]:
        """A job that comes while the model loads: its prompt encoded as soon as the text stage is in, while the
        transformer is still being read (serving/early_text.py); (the encodings or None, seconds waited)."""
        if self.model.ready:
            return None, 0.0
        pipe, waited = self.model.part("text")  # the load's error, if it failed first
        if pipe is None:  # the load ended meanwhile, or its placement encodes only once everything is in
            return None, waited
        from .early_text import prompt_embeddings

        return self.section.run(clock, lambda: prompt_embeddings(
            pipe, pictures, request.prompt, request.negative_prompt, request.true_cfg_scale, size, clock)), waited

    def _machine_fault(self, err: WorkerError) -> bool:
        """Whether `err` is the load's, failed for a cause of this machine (a CUDA error, out of memory): a new
        worker, on other hardware, may load; any other load error would fail the same way on a new worker."""
        cause = self.model.unforeseen
        if err is not self.model.error or cause is None:
            return False
        from ..weights.lightning_file import machine_fault

        if machine_fault(cause):
            log.error("the model failed to load for a cause of this machine (%s); asking RunPod to replace this "
                      "worker after the job", type(cause).__name__)
            return True
        return False

    def _out_of_memory(self, job_id: str) -> dict[str, Any]:
        import gc

        import torch

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        log.error("job %s ran out of GPU memory; asking RunPod to refresh this worker", job_id)
        return {
            "error": "out of GPU memory: try a smaller input.megapixels (or width and height, or size) or fewer "
                     "input.num_images; this worker will be replaced after this job",
            "refresh_worker": True,
        }


def _outputs(job_id: str, pixels: Any, seeds: list[int], request: EditRequest, bucket: uploads.Bucket | None,
             limit: int, flags: list[bool] | None = None,
             names: list[str] | None = None) -> tuple[list[dict[str, Any]], str]:
    """Encode each picture (at `input.size` exactly when asked), then upload it (URL out) or inline it
    as base64 (size-checked); also the `image_url` of RunPod's public endpoints: the first picture's
    URL, else its data URI.

    `flags`: the safety checker's verdicts (None: not checked); a flagged picture is already black here.
    `names`: the bucket object names (a workflow's file names); default `<n>-<seed>.<format>`.
    """
    images = []
    for index, (picture_pixels, image_seed) in enumerate(zip(pixels, seeds, strict=True)):
        if request.exact_size is not None:
            picture_pixels = images_out.resized(picture_pixels, request.exact_size)
        encoded = images_out.encode(picture_pixels, request.output_format, request.output_quality)
        if bucket is not None:
            name = _safe_key(names[index], ".") if names else f"{index}-{image_seed}.{encoded.format}"
            key = f"{_safe_key(job_id)}/{name}"
            data, kind = uploads.upload(bucket, key, encoded.data, encoded.format), "url"
        else:
            data, kind = encoded.base64(), "base64"
        images.append({"image": data, "type": kind, "format": encoded.format, "width": encoded.width,
                       "height": encoded.height, "seed": image_seed}
                      | ({} if flags is None else {"nsfw": flags[index]}))
    first = images[0]
    image_url = first["image"] if first["type"] == "url" else images_out.data_uri(first["format"], first["image"])
    if bucket is None:
        size = sum(len(item["image"]) for item in images) + len(image_url) + 4096  # base64 and the rest of the JSON
        if size > limit:
            raise WorkerError("output", (
                f"the response would be {size / 1e6:.1f} MB, over the {limit / 1e6:g} MB limit "
                "(RunPod refuses larger results; MAX_RESPONSE_BYTES): ask for output_format jpeg or webp, "
                "fewer num_images or a smaller megapixels, or configure a bucket (BUCKET_ENDPOINT_URL and "
                "keys, or the job's s3Config) to get URLs instead"))
    return images, image_url


def _safe_key(text: str, keep: str = "") -> str:
    return "".join(c if c.isalnum() or c in "-_" + keep else "_" for c in text)[:120] or "job"


def _plan(request: EditRequest, last_input: tuple[int, int], lightning: bool) -> tuple[tuple[int, int], list[str]]:
    """The output size and any warnings worth telling the caller."""
    warnings: list[str] = []
    if request.size is not None:
        size = request.size
    else:
        size = sizing.output_size(last_input[0] / last_input[1], request.megapixels)
        exact = sizing.output_size(1.0, request.megapixels)
        if abs(size[0] * size[1] - exact[0] * exact[1]) > 0.2 * exact[0] * exact[1]:
            warnings.append(f"the input's aspect ratio is extreme; output is {size[0]}x{size[1]} (sides are "
                            f"kept within {sizing.MIN_SIDE}..{sizing.MAX_SIDE} px)")
    if lightning and request.num_inference_steps > LIGHTNING_MAX_STEPS:
        warnings.append(f"{request.num_inference_steps} steps with the Lightning LoRA, which is distilled for "
                        f"{LIGHTNING_MAX_STEPS}: more steps cost more and rarely help")
    if lightning and request.true_cfg_scale > 1.0:
        warnings.append("true_cfg_scale above 1 with the Lightning LoRA (distilled for 1.0) doubles the work "
                        "per step")
    return size, warnings


class _Listener(LoadEvents):
    """Tells the read-ahead what the load has consumed, and waiting jobs that the text stage is in."""

    def __init__(self, model: LazyLoad[Any], reader: Any) -> None:
        self.model, self.reader = model, reader

    def read(self, folders: tuple[str, ...], device: str) -> None:
        if self.reader is not None:
            self.reader.release(folders, device)

    def text_ready(self, pipe: Any) -> None:
        self.model.publish("text", pipe)
