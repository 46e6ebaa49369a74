"""What a failed Hugging Face hub call means and what to do: the token lookup and the one
mapping of huggingface_hub and network errors to HubError, used around every hub call of
pipeline.interop (shards, checkpoints, exported models, OpenAI's weights)."""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import contextmanager

from huggingface_hub import errors as hf_errors
from huggingface_hub import get_token

from pipeline.errors import HubError

LOGIN_HINT = "run `hf auth login` (older huggingface_hub: `huggingface-cli login`) or set HF_TOKEN"
RETRY_HINT = "run the same command again: files already on the hub or on disk are not sent twice"


def require_token(token: str | None) -> str:
    """An explicit token, else the one of `hf auth login` or HF_TOKEN. Raises HubError."""
    token = token or get_token()
    if not token:
        raise HubError(f"uploading needs a Hugging Face token with write access: {LOGIN_HINT}")
    return token


def _network_errors() -> tuple[type[BaseException], ...]:
    """Connection and timeout errors of the HTTP client this huggingface_hub version uses."""
    found = []
    for module, names in (
        ("httpx2", ("TransportError",)),
        ("httpx", ("TransportError",)),
        ("requests", ("ConnectionError", "Timeout")),
    ):
        try:
            found += [getattr(importlib.import_module(module), n) for n in names]
        except (ImportError, AttributeError):
            pass
    return tuple(found)


def _http_status(error: BaseException) -> int | None:
    return getattr(getattr(error, "response", None), "status_code", None)


def explain(error: BaseException, action: str, repo: str) -> str:
    """What went wrong in a hub call and what to do, for the usual huggingface_hub errors."""
    if isinstance(error, hf_errors.OfflineModeIsEnabled):
        return f"{action} {repo}: HF_HUB_OFFLINE=1 forbids network access; unset HF_HUB_OFFLINE"
    if isinstance(error, hf_errors.LocalEntryNotFoundError):
        return (
            f"{action} {repo}: the hub cannot be reached (offline: no network, or HF_HUB_OFFLINE=1)"
            " and nothing is cached; check the network connection, unset HF_HUB_OFFLINE, retry"
        )
    if isinstance(error, hf_errors.RepositoryNotFoundError):
        return (
            f"{action} {repo}: not found, or private and not readable with your token; check the "
            f"name (USER/NAME) and, for a private repo, {LOGIN_HINT}"
        )
    if isinstance(error, hf_errors.RevisionNotFoundError):
        return f"{action} {repo}: no such revision (branch, tag or commit); check --revision"
    if isinstance(error, hf_errors.HFValidationError):
        return f"{action} {repo}: invalid repo id or revision ({error}); use USER/NAME"
    status = _http_status(error)
    if status == 401:
        return f"{action} {repo}: the token was refused (HTTP 401); log in again: {LOGIN_HINT}"
    if status == 403:
        return (
            f"{action} {repo}: not allowed (HTTP 403); use a token with write access "
            "(https://huggingface.co/settings/tokens) and a namespace you own"
        )
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if isinstance(error, hf_errors.HfHubHTTPError):
        return f"{action} {repo}: the hub answered with an error ({first_line}); {RETRY_HINT}"
    return f"{action} {repo}: network error ({first_line}); check the connection and {RETRY_HINT}"


@contextmanager
def hub_errors(action: str, repo_id: str, repo_type: str) -> Iterator[None]:
    """Turn huggingface_hub and network errors inside the block into a HubError (see explain),
    e.g. `with hub_errors("pushing to", "user/gpt2", "model"): api.upload_folder(...)`."""
    known = (
        hf_errors.OfflineModeIsEnabled,
        hf_errors.LocalEntryNotFoundError,
        hf_errors.HfHubHTTPError,
        hf_errors.HFValidationError,
        *_network_errors(),
    )
    try:
        yield
    except known as e:
        raise HubError(explain(e, action, f"{repo_type} repo {repo_id}")) from e
