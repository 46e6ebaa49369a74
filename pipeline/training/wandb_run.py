"""Weights & Biases for a training run, which never decides whether the run trains.

- A missing API key is a problem found before any work (`login_problem`: exit 2 with how to log
  in or log offline), as W&B would otherwise stop the run with a traceback after its start.
- A server that cannot be reached (a rented machine's broken network, a W&B outage) makes the
  run log offline under the same run id, said in one line with the `wandb sync` command that
  uploads it later; a resumed run (the id is in its checkpoint) logs into the same W&B run.
- A W&B failure in the middle of a run (its service process gone, a broken connection) is one
  warning line; training goes on, and metrics.jsonl keeps every record.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import string
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.config import LoggerConfig

ID_ALPHABET = string.ascii_lowercase + string.digits
"""W&B run ids: 8 characters of these, as wandb generates them."""
SERVICE = "WANDB_SERVICE"
"""The variable through which a process finds W&B's service process (wandb.env.SERVICE)."""


def mode(cfg: LoggerConfig) -> str:
    """online, offline or disabled: logger.mode, else the WANDB_MODE variable, else online."""
    return cfg.mode or os.environ.get("WANDB_MODE") or "online"


def login_problem(cfg: LoggerConfig) -> str | None:
    """Why logger=wandb cannot log online here (no API key in WANDB_API_KEY, the netrc file or
    W&B's settings, or one W&B rejects as malformed; checked without network and without a
    prompt), or None."""
    if cfg.kind != "wandb" or mode(cfg) != "online":
        return None
    import wandb

    try:
        if _has_credentials():
            return None
    except wandb.errors.Error as e:  # AuthenticationError: a key of the wrong form
        return (
            f"logger=wandb: W&B refuses its API key ({_reason(e)}): run `wandb login "
            "--relogin` (or fix WANDB_API_KEY), or log offline with WANDB_MODE=offline, or "
            "use logger=none"
        )
    return (
        "logger=wandb found no W&B API key: run `wandb login` (or set WANDB_API_KEY) first, or "
        "log offline with WANDB_MODE=offline and upload later with `wandb sync`, or use "
        "logger=none"
    )


def _has_credentials() -> bool:
    """Whether W&B finds credentials for its server (WANDB_API_KEY, an identity token file,
    its settings file or the netrc file), as wandb.init would, without network or a prompt.
    wandb.login(prompt=False) answers the same but asks the server for its settings first,
    seconds lost when the server cannot be reached; it remains the fallback should W&B's
    credential lookup move."""
    import wandb

    try:
        from wandb.sdk import wandb_setup
        from wandb.sdk.lib import wbauth

        settings = wandb_setup.singleton().settings  # the environment's W&B settings
        host = wbauth.HostUrl(settings.base_url, app_url=settings.app_url)
        found = wbauth.authenticate_session(
            host=host, source="pipeline.train", prompt=False, update_session=False
        )
        return found is not None
    except (ImportError, AttributeError, TypeError):
        with open(os.devnull, "w") as quiet, contextlib.redirect_stderr(quiet):
            return bool(wandb.login(prompt=False, verify=False))


class WandbRun:
    """One W&B run of a training run: started online, or offline when the server cannot be
    reached; every later call that fails disables W&B for the rest of this process with one
    warning through `say`."""

    def __init__(
        self,
        cfg: LoggerConfig,
        run_dir: Path,
        run_name: str,
        config: dict,
        run_id: str | None,
        say: Callable[[str], None],
    ):
        import wandb

        self.say, self.run = say, None
        self.id = run_id or "".join(secrets.choice(ID_ALPHABET) for _ in range(8))
        kwargs = dict(
            project=cfg.project,
            entity=cfg.entity,
            group=cfg.group,
            tags=list(cfg.tags) or None,
            name=run_name,
            id=self.id,
            resume="allow",
            dir=str(run_dir),
            config=config,
        )
        # quiet: no "logged in as" line, whose lookup alone retries for ~10 s when the server
        # cannot be reached
        wanted = dict(init_timeout=cfg.init_timeout, finish_timeout=cfg.finish_timeout, quiet=True)
        known = getattr(wandb.Settings, "model_fields", wanted)  # a setting W&B may drop
        settings = wandb.Settings(**{k: v for k, v in wanted.items() if k in known})
        try:
            self.run = wandb.init(mode=mode(cfg), settings=settings, **kwargs)
        except Exception as e:  # noqa: BLE001 - unreachable, refused, timed out: log offline
            with contextlib.suppress(Exception):
                wandb.teardown()  # the failed attempt's service, before a new one
            # The service that took the failed attempt still holds its run id for a while (or
            # for good, when it is shared and named in WANDB_SERVICE): the offline run gets a
            # service of its own.
            os.environ.pop(SERVICE, None)
            reason = _reason(e)
            try:
                self.run = wandb.init(mode="offline", settings=settings, **kwargs)
            except Exception as offline:  # noqa: BLE001 - not even offline: metrics.jsonl only
                say(
                    f"warning: W&B cannot start ({reason}; offline: {_reason(offline)}): this "
                    f"run logs to metrics.jsonl only"
                )
                return
            folder = Path(self.run.settings.sync_dir)
            say(
                f"warning: W&B could not start online ({reason}): logging offline to {folder}; "
                f"upload it later with `wandb sync {folder}`"
            )
        self._call(self._define_metrics)

    def _define_metrics(self) -> None:
        # Curves against tokens seen (comparable across batch sizes); best val in summary.
        self.run.define_metric("tokens_seen")
        for kind in ("train", "val", "skip", "hellaswag"):
            self.run.define_metric(f"{kind}/*", step_metric="tokens_seen")
        self.run.define_metric("val/loss", summary="min")

    @property
    def active(self) -> bool:
        return self.run is not None

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self._call(lambda: self.run.log(metrics, step=step))

    def table(self, key: str, columns: list[str], rows: list[list], step: int) -> None:
        import wandb

        self._call(lambda: self.run.log({key: wandb.Table(columns=columns, data=rows)}, step=step))

    def summary(self, values: dict[str, Any]) -> None:
        self._call(lambda: self.run.summary.update(values))

    def finish(self) -> None:
        self._call(self.run.finish if self.run is not None else lambda: None)
        self.run = None

    def _call(self, fn: Callable[[], Any]) -> None:
        """Run one W&B call; on failure say so once and stop using W&B in this process."""
        if self.run is None:
            return
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - any W&B failure must not stop training
            import wandb

            self.run = None
            with contextlib.suppress(Exception):
                wandb.teardown()  # so that its exit hook does not fail again at exit
            self.say(
                f"warning: W&B stopped working ({_reason(e)}): training goes on and "
                "metrics.jsonl keeps every record; W&B gets no more of this session"
            )


def _reason(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0][:160]}" if lines else type(error).__name__
