"""`hydra/sweeper=optuna_resumable`: hydra-optuna-sweeper's sweeper, made to continue its study.

With a stored study (hydra.sweeper.storage and study_name, as conf/sweep/lr_optuna.yaml sets
them: SQLite under the sweep folder), running the same sweep again runs only the completed
trials the study still lacks of hydra.sweeper.n_trials, numbered after the stored ones, so
trial N is always job N (the run `<run_name>/<N>`) and no job folder is trained again with
other values; the sampler is reseeded, so the new trials are not the first start's draws again.
A trial a killed sweep left running is marked failed (its job folder stays as it was), and
failed trials are replaced by new ones. Without
storage it is the plain Optuna sweeper. Hydra finds it here, in the `hydra_plugins` namespace
package, as it finds every launcher and sweeper plugin.
"""

# No `from __future__ import annotations`: Hydra loads plugin modules outside sys.modules,
# where dataclasses cannot resolve string annotations.
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore

try:  # the `sweep` extra; without it Hydra's plugin scan must not warn on every command
    import optuna
    from hydra_plugins.hydra_optuna_sweeper.config import OptunaSweeperConf
    from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper
except ImportError:  # pragma: no cover - the dev and sweep extras install it
    optuna = None

if optuna is not None:
    SQLITE = "sqlite:///"

    class ResumableOptunaSweeper(OptunaSweeper):
        def sweep(self, arguments: list[str]) -> Any:
            impl = self.sweeper
            if str(impl.storage).startswith(SQLITE):  # the folder of the database file
                Path(str(impl.storage)[len(SQLITE) :]).parent.mkdir(parents=True, exist_ok=True)
            if impl.storage is not None and impl.study_name is not None:
                study = optuna.create_study(study_name=impl.study_name, storage=impl.storage,
                                            directions=impl._get_directions(),
                                            load_if_exists=True)  # fmt: skip
                failed, running = optuna.trial.TrialState.FAIL, optuna.trial.TrialState.RUNNING
                for trial in study.get_trials(deepcopy=False):
                    if trial.state == running:  # its sweep was killed
                        study._storage.set_trial_state(trial._trial_id, failed)
                trials = study.get_trials(deepcopy=False)
                complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
                impl.n_trials = max(0, impl.n_trials - len(complete))  # failed ones are tried anew
                impl.job_idx = len(trials)  # trial N is job N
                if trials and hasattr(impl.sampler, "reseed_rng"):
                    impl.sampler.reseed_rng()  # not the first start's draws again
            return impl.sweep(arguments)

    @dataclass
    class ResumableOptunaSweeperConf(OptunaSweeperConf):
        _target_: str = "hydra_plugins.pipeline_sweepers.resumable_optuna.ResumableOptunaSweeper"

    ConfigStore.instance().store(group="hydra/sweeper", name="optuna_resumable",
                                 node=ResumableOptunaSweeperConf, provider="pipeline")  # fmt: skip
