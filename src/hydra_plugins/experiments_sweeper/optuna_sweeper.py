"""A Hydra sweeper on Optuna >= 4 with pruning, resumable studies and several cooperating processes.

Written here because the released hydra-optuna-sweeper (1.3.0) pins optuna < 3, its RDB storage
fails under SQLAlchemy 2, and it cannot prune: the job never sees its trial (hydra#1954). Its
configs work here unchanged (see config.py and space.py). Each job learns its storage, study and
trial number from environment variables set through its `hydra.job.env_set`, never from task
overrides, so `hydra.job.override_dirname` holds only the job's own parameters; the job reports
its epochs to that trial through the storage (experiments.sweeps.trial).
"""

import logging
import os
from pathlib import Path
from typing import Any

from hydra.core.plugins import Plugins
from hydra.core.utils import JobStatus
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from experiments.sweeps.plugin import (
    JOURNAL_PREFIX,
    LAUNCHER_ENV,
    STORAGE_ENV,
    STUDY_ENV,
    TRIAL_KEYS,
    T,
    as_text,
    defining_overrides,
    open_storage,
    redact,
    this_process,
    uninterrupted,
)
from hydra_plugins.experiments_sweeper import SweepError
from hydra_plugins.experiments_sweeper.config import register
from hydra_plugins.experiments_sweeper.launching import Launching
from hydra_plugins.experiments_sweeper.results import (
    metric_names,
    objective_values,
    study_directions,
    tell,
    write_results,
)
from hydra_plugins.experiments_sweeper.samplers import (
    check_settings,
    configured_pruner,
    configured_sampler,
)
from hydra_plugins.experiments_sweeper.space import SearchSpace, search_space
from hydra_plugins.experiments_sweeper.warm_start import warm_start
from hydra_plugins.experiments_sweeper.workers import (
    heartbeats,
    join_workers,
    retried_numbers,
    take_over_stale_trials,
    wait_for_other_workers,
)

log = logging.getLogger(__name__)

# Asks that may be discarded as duplicates before a batch is given up.
MAX_ASK_ATTEMPTS = 100

register()


def ask(study, distributions: dict):
    """study.ask, without the warning Optuna gives on every ask from a storage with heartbeats:
    outside study.optimize it cannot record them itself, and this sweeper does (heartbeats())."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="Heartbeat of storage is supposed to be used with Study.optimize"
        )
        return study.ask(fixed_distributions=distributions)


class OptunaSweeper(Sweeper):
    """Asks Optuna for trials, launches them as Hydra jobs, tells Optuna how each ended."""

    def __init__(self, **settings: Any) -> None:
        self.settings = OmegaConf.create(settings)
        self.sampler_seed: int | None = None
        self.config: DictConfig = None
        self.launcher = None

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.config = config
        # Also here, for a multirun whose callbacks leave out CheckSettings (samplers.py).
        check_settings(self.settings)
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: list[str]) -> None:
        settings = self.settings
        self.failures: list[tuple[int, str, str]] = []  # (trial, its error, its log), this sweep
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        space = search_space(settings.params, arguments)
        if not space.distributions and not settings.custom_search_space:
            log.warning(
                "the Optuna sweeper has nothing to search: it runs the same configuration "
                "%d times (n_trials); set hydra.sweeper.params (e.g. hparams_search=lr_head) or "
                "pass a sweep on the command line to search",
                int(settings.n_trials),
            )
        metrics = metric_names(self.config)
        directions = study_directions(settings.direction, metrics)
        sampler, n_trials = configured_sampler(self.settings, space, len(directions))
        storage_url = settings.storage or f"{JOURNAL_PREFIX}{sweep_dir / 'optuna.journal'}"
        study, storage = self._open_study(storage_url, space, sampler, directions, metrics)
        sampler, self.sampler_seed = self._seeded_per_worker(study, space, len(directions))
        study.sampler = sampler
        warm_start(study, space, settings.warm_start, self.config, storage_url)
        log.info(
            "study %s (%s %s, %s) in %s: %d of %d trials done",
            study.study_name,
            "/".join(directions),
            "/".join(metrics or ["the returned value"]),
            type(sampler).__name__,
            redact(storage_url),
            self._counted(study),
            n_trials,
        )
        try:
            self._run_trials(study, storage, space, n_trials, storage_url)
        finally:
            # Whatever ended the sweep, what the study holds so far is written out.
            write_results(study, sweep_dir, metrics)

    def _open_study(self, storage_url: str, space: SearchSpace, sampler, directions, metrics):
        """(the study, its storage): created, or loaded to be resumed when it is the same."""
        import optuna

        settings = self.settings
        storage = open_storage(storage_url, settings.heartbeat_interval, settings.grace_period)
        study = uninterrupted(optuna.create_study)(
            study_name=settings.study_name,
            storage=storage,
            sampler=sampler,
            pruner=configured_pruner(self.settings, len(directions)),
            directions=directions,
            load_if_exists=True,
        )
        self._check_same_study(study, space, storage_url)
        if len(directions) > 1 and metrics and study.metric_names is None:
            uninterrupted(study.set_metric_names)(metrics)
        return study, storage

    def _run_trials(self, study, storage, space: SearchSpace, n_trials: int, storage_url: str):
        """Ask, launch and tell trials, `n_jobs` at a time, until the study has `n_trials`."""
        # A storage URL with a password reaches the jobs through this process's environment,
        # which every launcher passes on (joblib's workers, submitit's local and SLURM jobs), not
        # through hydra.job.env_set, which each job's .hydra/hydra.yaml would keep, password and
        # all. Any other URL goes through env_set as well: a joblib worker kept from an earlier
        # sweep of this process would otherwise still hold that sweep's storage.
        os.environ[STORAGE_ENV] = storage_url
        # A job in another process of this host stops when this process is gone (kill -9):
        # experiments.core.processes.stopped_when_launcher_dies.
        plumbing = {STUDY_ENV: study.study_name, LAUNCHER_ENV: as_text(this_process())}
        if redact(storage_url) == storage_url:
            plumbing[STORAGE_ENV] = storage_url
        launching = Launching(
            self.launcher,
            self.config,
            int(self.settings.n_jobs),
            space,
            plumbing,
            ask=lambda how_many: self._ask(study, space, how_many, n_trials),
            tell=lambda trial, ret: self._tell(study, trial, ret),
            check=lambda: self._check_failures(study),
            between=lambda: take_over_stale_trials(study),
            others=lambda: wait_for_other_workers(study, storage),
            heartbeats=lambda trials: heartbeats(storage, trials),
        )
        if launching.side_by_side(bool(self.settings.keep_slots_busy)):
            launching.in_slots()
        else:
            launching.in_batches()

    def _seeded_per_worker(self, study, space: SearchSpace, objectives: int):
        """(the sampler, its seed): a seeded sampler's seed plus this worker's number in the
        study, so that workers sharing a study with one `sampler.seed` draw different trials.

        The first worker of a study keeps the seed as given (a sweep of one process is
        reproducible); each trial records the seed it was drawn with (`sampler_seed`).
        """
        seed = (self.settings.sampler or {}).get("seed")
        if seed is None:
            return study.sampler, None
        worker = join_workers(study)
        if worker:
            log.info(
                "worker %d of study %s: sampler seed %d + %d",
                worker,
                study.study_name,
                int(seed),
                worker,
            )
        sampler, _ = configured_sampler(self.settings, space, objectives, seed=int(seed) + worker)
        return sampler, int(seed) + worker

    @staticmethod
    def _check_same_study(study, space: SearchSpace, storage_url: str) -> None:
        """Resume a study only with the overrides and search space it was started with.

        A stored study records both; a command that differs (another `trainer.epochs`, another
        range) would mix incomparable trials into it, so it stops instead, saying how to go on.
        Where each machine writes and records may differ: they share the study.
        """
        identity = {
            "overrides": defining_overrides(space.fixed),
            "search_space": {k: repr(v) for k, v in sorted(space.distributions.items())},
        }
        stored = study.user_attrs.get("identity")
        if stored is None:
            uninterrupted(study.set_user_attr)("identity", identity)
        elif stored != identity:
            changed = [k.replace("_", " ") for k in identity if identity[k] != stored.get(k)]
            raise SweepError(
                f"study {study.study_name!r} in {redact(storage_url)} was started with other "
                f"{' and '.join(changed)} (there: {stored['overrides']}, "
                f"{list(stored['search_space'])}); to keep both, start a new study with "
                f"hydra.sweeper.study_name=<new name>, or rerun the original command to resume it"
            )

    @staticmethod
    def _counted(study) -> int:
        """Trials that count toward n_trials: all but surplus asks lost to another process,
        stale trials that run again as a retry, and trials a warm start brought."""
        return len(counted(study.get_trials(deepcopy=False)))

    @uninterrupted
    def _ask(self, study, space: SearchSpace, how_many: int, n_trials: int) -> list:
        """Up to `how_many` new trials, never more than n_trials in the whole study."""
        from hydra.utils import get_method
        from optuna.trial import TrialState

        extend = None
        if self.settings.custom_search_space:
            extend = get_method(str(self.settings.custom_search_space))
        asked, attempts = [], 0
        while len(asked) < how_many and attempts < MAX_ASK_ATTEMPTS:
            attempts += 1
            # Trials WAITING (enqueued, or a retry of a stale one) are still to be asked.
            trials = counted(study.get_trials(deepcopy=False))
            if sum(t.state != TrialState.WAITING for t in trials) >= n_trials:
                break
            trial = ask(study, space.distributions)
            if extend is not None:
                extend(self.config, trial)
            attrs = this_process().to_dict(TRIAL_KEYS)
            if self.sampler_seed is not None:
                attrs["sampler_seed"] = self.sampler_seed
            for key, value in attrs.items():
                trial.set_user_attr(key, value)
            trials = counted(study.get_trials(deepcopy=False))
            earlier = [t for t in trials if t.number < trial.number]
            same = [
                t.number
                for t in study.get_trials(
                    deepcopy=False,
                    states=(TrialState.RUNNING, TrialState.COMPLETE, TrialState.PRUNED),
                )
                if t.number != trial.number
                and not t.user_attrs.get("surplus")
                and t.params == trial.params
            ]
            # Processes sharing a storage ask at the same moment: the storage numbers trials
            # atomically, so only the first n_trials numbers run, and a configuration another
            # process already runs is not run twice (a search with nothing to search runs the
            # one configuration n_trials times, as upstream does). A trial not run is PRUNED,
            # marked `surplus`: it never counts as a failure, nor toward n_trials.
            searched = bool(space.distributions) or extend is not None
            if len(earlier) >= n_trials or (same and searched):
                trial.set_user_attr("surplus", True)
                if same:
                    trial.set_user_attr("duplicate_of", same[0])
                tell(study, trial, state=TrialState.PRUNED)
                if len(earlier) >= n_trials:
                    break
                study.sampler.reseed_rng()  # a seeded sampler in a new process repeats itself
                continue
            asked.append(trial)
        return asked

    @uninterrupted
    def _tell(self, study, trial, ret) -> None:
        import optuna
        from optuna.trial import TrialState

        from experiments.sweeps.plugin import tag_trial_runs

        if ret.status == JobStatus.COMPLETED:
            try:
                values = objective_values(ret.return_value, len(study.directions))
            except ValueError as err:
                log.warning("trial %d failed: %s", trial.number, err)
                self.failures.append((trial.number, str(err), job_log(ret)))
                tell(study, trial, state=TrialState.FAIL)
                state = "FAIL"
            else:
                state = tell(study, trial, values=values).name
        elif isinstance(ret._return_value, optuna.TrialPruned):  # the job's exception
            tell(study, trial, state=TrialState.PRUNED)
            state = "PRUNED"
        else:
            log.warning("trial %d failed: %r", trial.number, ret._return_value)
            error = ret._return_value
            first = (str(error).strip().splitlines() or [""])[0][:300]
            self.failures.append((trial.number, f"{type(error).__name__}: {first}", job_log(ret)))
            tell(study, trial, state=TrialState.FAIL)
            state = "FAIL"
        tags = {T.OPTUNA_STATE: state}
        if "warm_start" in trial.user_attrs:  # an enqueued configuration
            tags[T.WARM_START] = trial.user_attrs["warm_start"]
        tag_trial_runs(study.study_name, {trial.number: tags})

    def _check_failures(self, study) -> None:
        from optuna.trial import TrialState

        # Neither a stale trial run again as a retry (interrupted, not failed: a sweep killed
        # with several trials in flight resumes) nor a surplus or warm-started one.
        done = [t for t in counted(study.get_trials(deepcopy=False)) if t.state.is_finished()]
        failed = sum(t.state == TrialState.FAIL for t in done)
        if done and failed / len(done) > self.settings.max_failure_rate and len(done) >= 2:
            why = f"see the failed jobs' logs under {self.config.hydra.sweep.dir}"
            if self.failures:  # what the trials' own code raised, first of all
                number, error, path = self.failures[0]
                sharing = sum(e == error for _, e, _ in self.failures)
                why = (
                    f"the first, trial {number}: {error} ({sharing} of the {len(self.failures)} "
                    f"failed here say so); its log: {path}"
                )
            raise SweepError(
                f"stopping the sweep: {failed} of {len(done)} trials failed, more than "
                f"hydra.sweeper.max_failure_rate={self.settings.max_failure_rate}; {why}"
            )


def job_log(ret) -> str:
    """The log file of a job (Hydra's `<output dir>/<job name>.log`), else its folder."""
    try:
        folder = Path(ret.hydra_cfg.hydra.runtime.output_dir)
        name = ret.hydra_cfg.hydra.job.name
    except AttributeError:
        return str(ret.working_dir or "")
    path = folder / f"{name}.log"
    return str(path if path.is_file() else folder)


def counted(trials: list) -> list:
    """The trials that count toward n_trials: not a surplus ask lost to another process, not a
    stale trial that runs again as a retry, not one a warm start brought from elsewhere."""
    retried = retried_numbers(trials)
    return [
        t
        for t in trials
        if not t.user_attrs.get("surplus")
        and not t.user_attrs.get("imported")
        and t.number not in retried
    ]
