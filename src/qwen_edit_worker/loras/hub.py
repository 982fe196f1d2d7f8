"""Fetching a LoRA file from a Hugging Face hub (HF_ENDPOINT), with HF_TOKEN, despite HF_HUB_OFFLINE.

Why this exists: `ORG/NAME[@REVISION][/FILE]` paths name files on a hub, which huggingface_hub
reads best (its API lists a repo's files with their sizes, its download resumes and follows the
hub's CDN redirects).  But the image sets HF_HUB_OFFLINE=1 so the base model never reaches the
network, and huggingface_hub then refuses every request.  `hub_online` lifts that switch for the
LoRA calls only (counted, so two jobs' downloads can overlap) and puts it back after.  The token
is the endpoint's HF_TOKEN, passed explicitly (`False` when unset, so no token file on disk is
read either); a request never carries one.  The endpoint is the operator's, not the caller's, so
the SSRF guard for caller URLs does not apply here.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .request import SUFFIX, LoraSource

_online_lock = threading.Lock()
_online_users = 0
_saved_offline = False


class HubError(Exception):
    """The hub refused or could not serve the file; the message says why, without the token."""


@contextmanager
def hub_online() -> Iterator[None]:
    """Let huggingface_hub make requests for the duration, whatever HF_HUB_OFFLINE said at import."""
    global _online_users, _saved_offline
    from huggingface_hub import constants

    with _online_lock:
        if _online_users == 0:
            _saved_offline = constants.HF_HUB_OFFLINE
            constants.HF_HUB_OFFLINE = False
        _online_users += 1
    try:
        yield
    finally:
        with _online_lock:
            _online_users -= 1
            if _online_users == 0:
                constants.HF_HUB_OFFLINE = _saved_offline


def download(source: LoraSource, endpoint: str, token: str, max_bytes: int, out: Path) -> str:
    """Download `source`'s file to `out` (replaced); return the file's name in the repo."""
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{source.repo}@{source.revision}"
    auth: str | bool = token or False
    try:
        with hub_online():
            info = HfApi(endpoint=endpoint, token=auth).model_info(source.repo, revision=source.revision,
                                                                   files_metadata=True)
            sizes = {s.rfilename: s.size for s in info.siblings or []}
            filename = source.filename or _only_safetensors(sizes, where)
            if filename not in sizes:
                raise HubError(f"{where} has no file {filename}")
            if (sizes[filename] or 0) > max_bytes:
                raise HubError(f"{where}/{filename} is {sizes[filename]:,} bytes, over the {max_bytes:,}-byte "
                               "limit (LORA_MAX_BYTES)")
            folder = Path(tempfile.mkdtemp(dir=out.parent, prefix="hf-"))
            try:
                fetched = hf_hub_download(source.repo, filename, revision=info.sha or source.revision,
                                          endpoint=endpoint, token=auth, local_dir=folder)
                Path(fetched).replace(out)
            finally:
                shutil.rmtree(folder, ignore_errors=True)
    except GatedRepoError:
        raise HubError(f"{where} is gated or private: set HF_TOKEN on the endpoint to a token with access") from None
    except RepositoryNotFoundError:
        raise HubError(f"{where}: no such repo on {endpoint} (or it is private: set HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise HubError(f"{where}: no such revision") from None
    except EntryNotFoundError:
        raise HubError(f"{where}: no such file") from None
    except HfHubHTTPError as err:
        status = getattr(getattr(err, "response", None), "status_code", "?")
        hint = ": HF_TOKEN is refused" if status in (401, 403) else ""
        raise HubError(f"{where}: the hub answered HTTP {status}{hint}") from None
    except OSError as err:  # connection failures (httpx errors are not OSError: caught below)
        raise HubError(f"{where}: cannot reach {endpoint} ({type(err).__name__})") from None
    except Exception as err:
        if type(err).__module__.startswith(("httpx", "httpcore")):
            raise HubError(f"{where}: cannot reach {endpoint} ({type(err).__name__})") from None
        raise
    return filename


def _only_safetensors(sizes: dict[str, int | None], where: str) -> str:
    names = sorted(name for name in sizes if name.endswith(SUFFIX))
    if len(names) != 1:
        listed = ", ".join(names[:6]) + (" ..." if len(names) > 6 else "") if names else "none"
        raise HubError(f"{where} holds {len(names)} {SUFFIX} files ({listed}): name one as ORG/NAME/FILE{SUFFIX}")
    return names[0]
