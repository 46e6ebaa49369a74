"""`hydra/sweeper=optuna_resumable`: hydra-optuna-sweeper's sweeper, made to continue its study.

With a stored study (hydra.sweeper.storage and study_name, as conf/sweep/lr_optuna.yaml sets
them: SQLite under the sweep folder), running the same sweep again
- first continues each interrupted trial in its own job folder from its checkpoint: a job whose
  record (pipeline.training.sweep.JOB_RECORD, written by hydra/launcher=parallel and slurm)
  has no exit code (the sweep was killed) or one of a stop (75, 130) or a crash, launched again
  with its recorded overrides under its own number; its result joins the study as a completed
  trial of the same values (the interrupted trial itself stays failed: Optuna does not reopen
  a finished trial);
- then runs only the completed trials the study still lacks of hydra.sweeper.n_trials, as jobs
  numbered after the existing job folders, so no job folder is trained again with other
  values; the sampler is reseeded, so the new trials are not the first start's draws again.
A trial a killed sweep left running is marked failed. A job that failed for its settings (exit
2) or diverged (3) is not run again; a new trial replaces it. Without storage it is the plain
Optuna sweeper. Hydra finds it here, in the `hydra_plugins` namespace
package, as it finds every launcher and sweeper plugin.
"""

# No `from __future__ import annotations`: Hydra loads plugin modules outside sys.modules,
# where dataclasses cannot resolve string annotations.
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore

try:  # the `sweep` extra; without it Hydra's plugin scan must not warn on every command
    from hydra_plugins.hydra_optuna_sweeper.config import OptunaSweeperConf
    from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper
except ImportError:  # pragma: no cover - the dev and sweep extras install it
    OptunaSweeper = None

if OptunaSweeper is not None:
    SQLITE = "sqlite:///"

    class ResumableOptunaSweeper(OptunaSweeper):
        def sweep(self, arguments: list[str]) -> Any:
            # Here, not at the top: Hydra imports every plugin module at every start (3 s of
            # optuna for a command that sweeps nothing); the sweeper's own imports it here too.
            import optuna

            impl = self.sweeper
            if str(impl.storage).startswith(SQLITE):  # the folder of the database file
                Path(str(impl.storage)[len(SQLITE) :]).parent.mkdir(parents=True, exist_ok=True)
            if impl.storage is not None and impl.study_name is not None:
                study = optuna.create_study(
                    study_name=impl.study_name,
                    storage=impl.storage,
                    directions=impl._get_directions(),
                    load_if_exists=True,
                )
                failed, running = optuna.trial.TrialState.FAIL, optuna.trial.TrialState.RUNNING
                for trial in study.get_trials(deepcopy=False):
                    if trial.state == running:  # its sweep was killed
                        study._storage.set_trial_state(trial._trial_id, failed)
                sweep_dir = Path(str(impl.config.hydra.sweep.dir))
                if not self._continue_interrupted(study, sweep_dir):
                    return None  # stopped again: the next start continues
                trials = study.get_trials(deepcopy=False)
                complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
                impl.n_trials = max(0, impl.n_trials - len(complete))  # failed: tried anew
                impl.job_idx = 1 + max(
                    (int(p.parent.name) for p in _records(sweep_dir)), default=-1
                )
                if trials and hasattr(impl.sampler, "reseed_rng"):
                    impl.sampler.reseed_rng()  # not the first start's draws again
            return impl.sweep(arguments)

        def _continue_interrupted(self, study: Any, sweep_dir: Path) -> bool:
            """Run each interrupted job of the sweep again (see the module docstring), adding
            each result to the study; False if the sweep was stopped meanwhile."""
            import optuna

            from pipeline.errors import DIVERGED, USER_ERROR
            from pipeline.training.sweep import stop_requested

            jobs = {}
            for path in _records(sweep_dir):
                record = json.loads(path.read_text())
                if record.get("exit") not in (0, USER_ERROR, DIVERGED) and "task" in record:
                    jobs[int(path.parent.name)] = record
            failed = [
                t
                for t in study.get_trials(deepcopy=False)
                if t.state == optuna.trial.TrialState.FAIL
            ]
            for job in sorted(jobs):
                ret = self.sweeper.launcher.launch([jobs[job]["task"]], initial_job_idx=job)[0]
                if stop_requested():
                    return False
                task = set(jobs[job]["task"])  # holds the sweeper's `key=value` of the trial
                trial = next((t for t in failed if _values(t) <= task), None)
                if trial is not None:
                    failed.remove(trial)
                try:
                    value = ret.return_value  # raises for a job that raised
                except Exception:  # noqa: BLE001 - the job's error is in its log
                    value = None
                if trial is not None and isinstance(value, float) and math.isfinite(value):
                    study.add_trial(
                        optuna.trial.create_trial(
                            params=trial.params,
                            distributions=trial.distributions,
                            value=value,
                            user_attrs=trial.user_attrs,
                            system_attrs=trial.system_attrs,
                        )
                    )
            return True

    def _values(trial: Any) -> set[str]:
        """A trial's values as the sweeper passes them to its job: `key=value` overrides."""
        return {f"{k}={v}" for k, v in trial.params.items()}

    def _records(sweep_dir: Path) -> list[Path]:
        """The job records (JOB_RECORD) of the sweep's job folders `<sweep_dir>/<N>`."""
        from pipeline.training.sweep import JOB_RECORD

        return [p for p in sweep_dir.glob(f"*/{JOB_RECORD}") if p.parent.name.isdigit()]

    @dataclass
    class ResumableOptunaSweeperConf(OptunaSweeperConf):
        _target_: str = "hydra_plugins.pipeline_sweepers.resumable_optuna.ResumableOptunaSweeper"

    ConfigStore.instance().store(
        group="hydra/sweeper",
        name="optuna_resumable",
        node=ResumableOptunaSweeperConf,
        provider="pipeline",
    )
