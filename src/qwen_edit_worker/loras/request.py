"""The `input.loras` field: what a caller may ask for, and where each path points.

Why this exists: LoRA paths are strangers' strings that end up as URLs, Hugging Face repo ids
and file names inside a folder, so they are read once, here, into a typed `LoraItem` whose
`source` says exactly what will be fetched; everything else (a bad scale, an unknown field, a
name that climbs out of LORA_DIR, a scheme other than http(s)) is a RequestError naming the
item (`input.loras[1].path`).  The names follow RunPod's public LoRA endpoint
(`{"path", "scale"}`), so a request moves between the two unchanged.  Pure: no torch, no network.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from ..errors import RequestError, describe

ITEM_FIELDS = ("path", "scale")
MIN_SCALE, MAX_SCALE = -4.0, 4.0
MAX_PATH_CHARS = 2048
SUFFIX = ".safetensors"
KINDS = ("url", "huggingface", "local")
_HF_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_LOCAL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
HF_HOSTS = ("huggingface.co", "www.huggingface.co", "hf.co")


@dataclass(frozen=True)
class LoraSource:
    """Where one LoRA comes from.  `key` names the source for the cache index (never logged as is)."""

    kind: str  # "url" | "huggingface" | "local"
    url: str = ""  # kind url: the URL to GET (a huggingface.co blob link already rewritten to resolve)
    repo: str = ""  # kind huggingface: ORG/NAME
    revision: str = "main"
    filename: str = ""  # huggingface: the file in the repo ("" = the repo's only .safetensors); local: the name

    @property
    def key(self) -> str:
        if self.kind == "url":
            return f"url:{self.url}"
        if self.kind == "huggingface":
            return f"hf:{self.repo}@{self.revision}/{self.filename}"
        return f"local:{self.filename}"


@dataclass(frozen=True)
class LoraItem:
    """One validated entry of `input.loras`."""

    path: str  # as sent
    scale: float
    field: str  # "input.loras[i]", for error messages
    source: LoraSource

    @property
    def shown_path(self) -> str:
        """The path as it may appear in outputs and logs: a URL without its query string or fragment."""
        return strip_query(self.path)


def strip_query(path: str) -> str:
    """`path` without `?query` and `#fragment` (signed URLs carry credentials there) nor user:password@."""
    if not path.lower().startswith(("http://", "https://")):
        return path
    parts = urlsplit(path)
    host = parts.hostname or ""
    netloc = host if parts.port is None else f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def parse_loras(raw: Any, max_loras: int) -> tuple[LoraItem, ...]:
    """Validate `input.loras` (absent or null: none); raise RequestError naming the first bad item."""
    if raw is None:
        return ()
    if not isinstance(raw, list) or len(raw) > max_loras:
        raise RequestError("input.loras", f"must be a list of 0 to {max_loras} objects {{\"path\", \"scale\"}} "
                                          f"(MAX_LORAS; got {describe(raw)})")
    items = []
    for index, entry in enumerate(raw):
        field = f"input.loras[{index}]"
        if not isinstance(entry, dict):
            raise RequestError(field, f'must be an object {{"path": ..., "scale": ...}} (got {describe(entry)})')
        unknown = sorted(str(k) for k in entry if k not in ITEM_FIELDS)
        if unknown:
            raise RequestError(field, f"unknown field(s) {', '.join(unknown)}; allowed: {', '.join(ITEM_FIELDS)}")
        path = entry.get("path")
        if not isinstance(path, str) or not path.strip() or len(path) > MAX_PATH_CHARS:
            raise RequestError(f"{field}.path", f"required: a .safetensors URL, a Hugging Face ORG/NAME[/FILE] or a "
                                                f"name in LORA_DIR, at most {MAX_PATH_CHARS} characters")
        path = path.strip()
        items.append(LoraItem(path=path, scale=_scale(entry.get("scale"), f"{field}.scale"), field=field,
                              source=classify(path, f"{field}.path")))
    return tuple(items)


def _scale(value: Any, field: str) -> float:
    if value is None:
        return 1.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not MIN_SCALE <= value <= MAX_SCALE:
        raise RequestError(field, f"must be a number from {MIN_SCALE:g} to {MAX_SCALE:g} (got {describe(value)})")
    return float(value)


def classify(path: str, field: str) -> LoraSource:
    """What `path` names: an http(s) URL, a Hugging Face file (ORG/NAME[@REV][/FILE]) or a LORA_DIR name."""
    if "://" in path:
        scheme = path.split("://", 1)[0].lower()
        if scheme not in ("http", "https"):
            raise RequestError(field, f"only http and https URLs are fetched (got a {scheme[:10]!r} URL)")
        return LoraSource("url", url=_resolve_link(path))
    if path.startswith(("/", "\\", "~")) or any(part in (".", "..") for part in re.split(r"[/\\]", path)):
        raise RequestError(field, f"a path that leaves LORA_DIR (absolute, '~', '.' or '..') is not allowed; give a "
                                  f"name in LORA_DIR, an https URL or a Hugging Face ORG/NAME (got {describe(path)})")
    if "/" in path:
        return _huggingface(path, field)
    name = path
    if not _LOCAL.match(name) or ".." in name:
        raise RequestError(field, f"a LORA_DIR name is letters, digits, '.', '_' and '-' (no folders, no '..'); "
                                  f"got {describe(name)}")
    return LoraSource("local", filename=name if name.endswith(SUFFIX) else name + SUFFIX)


def _resolve_link(url: str) -> str:
    """A huggingface.co `.../blob/REV/FILE` page link read as its `.../resolve/REV/FILE` download link."""
    parts = urlsplit(url)
    if (parts.hostname or "").lower() in HF_HOSTS:
        segments = parts.path.split("/")
        if len(segments) > 4 and segments[3] == "blob":
            segments[3] = "resolve"
            return urlunsplit((parts.scheme, parts.netloc, "/".join(segments), parts.query, ""))
    return url


def _huggingface(path: str, field: str) -> LoraSource:
    org, name_rev, *rest = path.split("/")
    name, _, revision = name_rev.partition("@")
    revision = revision or "main"
    filename = "/".join(rest)
    problem = None
    if not (_HF_PART.match(org) and _HF_PART.match(name)) or ".." in org + name:
        problem = "ORG/NAME must be a Hugging Face repo id (letters, digits, '.', '_', '-')"
    elif not _REVISION.match(revision):
        problem = "the revision after '@' must be a branch, tag or commit (letters, digits, '.', '_', '-')"
    elif rest and (not filename.endswith(SUFFIX) or any(p in ("", ".", "..") for p in rest)):
        problem = f"the file in the repo must be a {SUFFIX} path without '..' or empty parts"
    if problem:
        raise RequestError(field, f"{problem}: ORG/NAME, ORG/NAME/FILE{SUFFIX} or ORG/NAME@REVISION/FILE{SUFFIX} "
                                  f"(got {describe(path)})")
    return LoraSource("huggingface", repo=f"{org}/{name}", revision=revision, filename=filename)
