"""A Hydra sweeper on Optuna >= 4 with pruning, resumable studies and several cooperating processes.

Written here because the released hydra-optuna-sweeper (1.3.0) pins optuna < 3, its RDB storage
fails under SQLAlchemy 2, and it cannot prune: the job never sees its trial (hydra#1954). Its
configs work here unchanged (see config.py and space.py). Each job learns its storage, study and
trial number from environment variables set through its `hydra.job.env_set`, never from task
overrides, so `hydra.job.override_dirname` holds only the job's own parameters; the job reports
its epochs to that trial through the storage (experiments.sweep).
"""

import contextlib
import logging
import math
from pathlib import Path
from typing import Any

from hydra.core.plugins import Plugins
from hydra.core.utils import JobStatus
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, ListConfig, OmegaConf

# A signal waits for a write to the study's storage to end (a journal line, an RDB transaction).
from experiments.backend import DEVICE_SLOT_ENV
from experiments.interrupts import uninterrupted
from experiments.processes import TRIAL_KEYS, Owner, this_process
from experiments.studies import JOURNAL_PREFIX, open_storage
from experiments.sweep import STORAGE_ENV, STUDY_ENV, TRIAL_ENV, defining_overrides
from experiments.tracking import tags as T
from hydra_plugins.experiments_sweeper import SweepError
from hydra_plugins.experiments_sweeper.config import MOTPE_REMOVED, register
from hydra_plugins.experiments_sweeper.space import SearchSpace, search_space

log = logging.getLogger(__name__)

# Asks that may be discarded as duplicates before a batch is given up.
MAX_ASK_ATTEMPTS = 100
# Metrics minimized when hydra.sweeper.direction is not given (names holding one of these words,
# or seconds: `_s`); any other is maximized.
MINIMIZED = ("loss", "time", "params", "size", "rss", "error")

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


@uninterrupted
def join_workers(study, attempts: int = 50) -> int:
    """This process's number among the workers of `study`, 0 for the first.

    The study's `workers` user attr lists them. Optuna has no atomic update of an attr, so two
    workers joining at once may overwrite each other's entry: each writes, reads back, and
    writes again until it finds itself listed.
    """
    import random
    import time

    me = this_process()
    name = f"{me.host}:{me.pid}:{me.started:.2f}"
    for _ in range(attempts):
        workers = list(study.user_attrs.get("workers", []))
        if name in workers:
            return workers.index(name)
        study.set_user_attr("workers", [*workers, name])
        time.sleep(random.uniform(0.05, 0.2))  # let a racing write land before reading back
    return len(study.user_attrs.get("workers", []))


def retried_numbers(trials) -> set[int]:
    """Numbers of the trials that were failed as stale and queued again with the same params:
    they do not count toward n_trials, their retry does."""
    return {t.system_attrs["failed_trial"] for t in trials if "failed_trial" in t.system_attrs}


@uninterrupted
def take_over_stale_trials(study) -> list[int]:
    """Fail the RUNNING trials whose process is gone and queue each again with its params.

    RDB storages ask Optuna's heartbeat (a process on any host); for every storage, a trial whose
    owner ran on this host and no longer exists is failed the same way, through the same retry
    callback, at once (the journal file has no heartbeat).
    The retry runs the same config, so its job resumes the interrupted run's checkpoint.
    """
    import optuna
    from optuna.trial import TrialState

    before = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))}
    # Any host's trial whose heartbeat stopped (RDB storages): failed, its retry queued.
    optuna.storages.fail_stale_trials(study)
    # This host's trials whose process is gone: known now, without waiting for a grace period.
    storage = study._storage  # Optuna's own handle: the call below has no Study-level form
    retry = optuna.storages.RetryHeartbeatStaleTrialCallback()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = Owner.from_dict(trial.user_attrs, TRIAL_KEYS)
        if trial.user_attrs.get("surplus") or owner is None or owner.alive():
            continue
        # Not study.tell(): this raises when another process failed the trial first, so
        # exactly one process queues its retry.
        try:
            storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
        retry(study, trial)
    after = study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
    taken = sorted(t.number for t in after if t.number not in before)
    if taken:
        from experiments.tracking import end_stale_trial_runs

        log.warning(
            "trial(s) %s were left RUNNING by processes that are gone: each runs again with the "
            "same params and resumes from its checkpoint",
            taken,
        )
        # A process on another host left its run RUNNING too: closed KILLED, so the retry's job
        # resumes it (a checkpoint folder on a shared disk holds its epochs).
        end_stale_trial_runs(study.study_name, taken)
    return taken


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
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: list[str]) -> None:
        settings = self.settings
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
        sampler, n_trials = self._sampler(space, len(directions))
        storage_url = settings.storage or f"{JOURNAL_PREFIX}{sweep_dir / 'optuna.journal'}"
        study, storage = self._open_study(storage_url, space, sampler, directions, metrics)
        sampler, self.sampler_seed = self._seeded_per_worker(study, space, len(directions))
        study.sampler = sampler
        log.info(
            "study %s (%s %s, %s) in %s: %d of %d trials done",
            study.study_name,
            "/".join(directions),
            "/".join(metrics or ["the returned value"]),
            type(sampler).__name__,
            storage_url,
            self._counted(study),
            n_trials,
        )
        try:
            self._run_trials(study, storage, space, n_trials, storage_url)
        finally:
            # Whatever ended the sweep, what the study holds so far is written out.
            self._write_results(study, sweep_dir, metrics)

    def _open_study(self, storage_url: str, space: SearchSpace, sampler, directions, metrics):
        """(the study, its storage): created, or loaded to be resumed when it is the same."""
        import optuna

        settings = self.settings
        storage = open_storage(storage_url, settings.heartbeat_interval, settings.grace_period)
        study = uninterrupted(optuna.create_study)(
            study_name=settings.study_name,
            storage=storage,
            sampler=sampler,
            pruner=self._pruner(len(directions)),
            directions=directions,
            load_if_exists=True,
        )
        self._check_same_study(study, space, storage_url)
        if len(directions) > 1 and metrics and study.metric_names is None:
            uninterrupted(study.set_metric_names)(metrics)
        return study, storage

    def _run_trials(self, study, storage, space: SearchSpace, n_trials: int, storage_url: str):
        """Ask, launch and tell batches of `n_jobs` trials until the study has `n_trials`."""
        plumbing = {STORAGE_ENV: storage_url, STUDY_ENV: study.study_name}
        job_index = 0
        while True:
            take_over_stale_trials(study)
            trials = self._ask(study, space, int(self.settings.n_jobs), n_trials)
            if not trials:
                if wait_for_other_workers(study, storage):
                    continue  # one of theirs died: its retry is queued for us
                break
            overrides = [
                [
                    *space.fixed,
                    *(f"{key}={value}" for key, value in trial.params.items()),
                    *hydra_env({**plumbing, TRIAL_ENV: trial.number, **slot(i, len(trials))}),
                ]
                for i, trial in enumerate(trials)
            ]
            with heartbeats(storage, trials):
                returns = self.launcher.launch(overrides, initial_job_idx=job_index)
            job_index += len(returns)
            for trial, ret in zip(trials, returns, strict=True):
                self._tell(study, trial, ret)
                release_frames(ret)
            del returns, ret  # before the next batch runs, not after
            self._check_failures(study)

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
        sampler, _ = self._sampler(space, objectives, seed=int(seed) + worker)
        return sampler, int(seed) + worker

    def _sampler(self, space: SearchSpace, objectives: int, seed: int | None = None):
        """The configured sampler and how many trials the study may have.

        `auto` is TPE for one objective and NSGA-II for several. A grid is built from the search
        space, and the study stops at its size. `seed` replaces the configured seed.
        """
        import functools

        import optuna
        from hydra.utils import instantiate

        node = OmegaConf.to_container(self.settings.sampler or {}, resolve=True)
        node = {k: v for k, v in node.items() if v is not None or k == "_target_"}
        if seed is not None:
            node["seed"] = seed
        target = node.get("_target_", "auto")
        n_trials = int(self.settings.n_trials)
        if target == "auto":
            chosen = optuna.samplers.NSGAIISampler if objectives > 1 else optuna.samplers.TPESampler
            return chosen(seed=node.get("seed")), n_trials
        if target.endswith("raise_motpe_removed"):
            raise SweepError(MOTPE_REMOVED)
        if target.endswith("GPSampler") and not _installed("torch"):
            raise SweepError(
                "hydra/sweeper/sampler=gp needs PyTorch, which is not installed: pip install torch "
                "(or choose tpe, random, grid, cmaes, nsgaii or qmc)"
            )
        if target.endswith("CmaEsSampler") and not _installed("cmaes"):
            raise SweepError(
                "hydra/sweeper/sampler=cmaes needs the cmaes package, which is not installed: "
                "pip install cmaes"
            )
        sampler = instantiate(node)
        if isinstance(sampler, functools.partial) and sampler.func is optuna.samplers.GridSampler:
            grid = space.grid()
            size = math.prod(len(values) for values in grid.values())
            if size < n_trials:
                log.info("the grid has %d points: n_trials is %d, not %d", size, size, n_trials)
            return sampler(grid), min(n_trials, size)
        return sampler, n_trials

    def _pruner(self, objectives: int):
        import optuna
        from hydra.utils import instantiate

        if not self.settings.pruner:
            return optuna.pruners.NopPruner()
        if objectives > 1:
            log.info(
                "pruning is off: Optuna prunes on one intermediate value, and this study has "
                "%d objectives",
                objectives,
            )
            return optuna.pruners.NopPruner()
        return instantiate(self.settings.pruner)

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
                f"study {study.study_name!r} in {storage_url} was started with other "
                f"{' and '.join(changed)} (there: {stored['overrides']}, "
                f"{list(stored['search_space'])}); to keep both, start a new study with "
                f"hydra.sweeper.study_name=<new name>, or rerun the original command to resume it"
            )

    @staticmethod
    def _counted(study) -> int:
        """Trials that count toward n_trials: all but surplus asks lost to another process and
        stale trials that run again as a retry."""
        trials = study.get_trials(deepcopy=False)
        retried = retried_numbers(trials)
        return sum(1 for t in trials if not t.user_attrs.get("surplus") and t.number not in retried)

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
            if self._counted(study) >= n_trials:
                break
            trial = ask(study, space.distributions)
            if extend is not None:
                extend(self.config, trial)
            attrs = this_process().to_dict(TRIAL_KEYS)
            if self.sampler_seed is not None:
                attrs["sampler_seed"] = self.sampler_seed
            for key, value in attrs.items():
                trial.set_user_attr(key, value)
            trials = study.get_trials(deepcopy=False)
            retried = retried_numbers(trials)
            earlier = [
                t
                for t in trials
                if t.number < trial.number
                and not t.user_attrs.get("surplus")
                and t.number not in retried
            ]
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

        from experiments.tracking import tag_trial_runs

        if ret.status == JobStatus.COMPLETED:
            try:
                values = objective_values(ret.return_value, len(study.directions))
            except ValueError as err:
                log.warning("trial %d failed: %s", trial.number, err)
                tell(study, trial, state=TrialState.FAIL)
                state = "FAIL"
            else:
                state = tell(study, trial, values=values).name
        elif isinstance(ret._return_value, optuna.TrialPruned):  # the job's exception
            tell(study, trial, state=TrialState.PRUNED)
            state = "PRUNED"
        else:
            log.warning("trial %d failed: %r", trial.number, ret._return_value)
            tell(study, trial, state=TrialState.FAIL)
            state = "FAIL"
        tag_trial_runs(study.study_name, {trial.number: {T.OPTUNA_STATE: state}})

    def _check_failures(self, study) -> None:
        from optuna.trial import TrialState

        done = [
            t
            for t in study.get_trials(deepcopy=False)
            if t.state.is_finished() and not t.user_attrs.get("surplus")
        ]
        failed = sum(t.state == TrialState.FAIL for t in done)
        if done and failed / len(done) > self.settings.max_failure_rate and len(done) >= 2:
            raise SweepError(
                f"stopping the sweep: {failed} of {len(done)} trials failed, more than "
                f"hydra.sweeper.max_failure_rate={self.settings.max_failure_rate}; see the "
                f"failed jobs' logs under {self.config.hydra.sweep.dir}"
            )

    @uninterrupted
    def _write_results(self, study, sweep_dir: Path, metrics: list[str] | None) -> None:
        from experiments.tracking import log_study, tag_trial_runs

        frame = study.trials_dataframe(
            attrs=("number", "state", "value", "duration", "params", "user_attrs")
        )
        if frame.empty:
            return
        # Stale trials run again as a retry: the retry's row is the trial's.
        frame = frame[~frame["number"].isin(retried_numbers(study.trials))]
        if "user_attrs_surplus" in frame:  # asks discarded as duplicates never ran
            frame = frame[frame["user_attrs_surplus"].isna()].drop(columns="user_attrs_surplus")
        frame = frame.drop(columns=[c for c in frame if c.startswith("user_attrs_owner_")])
        results = study_results(study, metrics)
        if "solutions" in results:
            front = {t.number for t in study.best_trials}
            frame["pareto"] = frame["number"].isin(front)
            tags = {n: {T.PARETO: str(n in front).lower()} for n in frame["number"]}
            tag_trial_runs(study.study_name, tags)
        frame.to_csv(sweep_dir / "trials.csv", index=False)
        OmegaConf.save(OmegaConf.create(results), sweep_dir / "optimization_results.yaml")
        log_study(study, sweep_dir, results, plots(study, sweep_dir, metrics))


def metric_names(config: DictConfig) -> list[str] | None:
    """The names of the job's objectives (`optimized_metric`), or None when it has none."""
    metric = config.get("optimized_metric")
    if metric is None:
        return None
    return [str(m) for m in metric] if isinstance(metric, ListConfig | list) else [str(metric)]


def study_directions(direction: Any, metrics: list[str] | None) -> list[str]:
    """One direction per objective: as given, or from each metric's name (minimize a loss, a
    time, a size or a parameter count; maximize the rest), or minimize (hydra-optuna-sweeper's
    default) for a task without `optimized_metric`."""
    if direction is None:
        if not metrics:
            return ["minimize"]
        return ["minimize" if any(word in m for word in MINIMIZED) else "maximize" for m in metrics]
    given = list(direction) if isinstance(direction, ListConfig | list | tuple) else [direction]
    given = [str(getattr(d, "name", d)) for d in given]
    if bad := [d for d in given if d not in ("minimize", "maximize")]:
        raise SweepError(f"hydra.sweeper.direction={bad[0]}: use minimize or maximize")
    if metrics and len(given) != len(metrics):
        raise SweepError(
            f"hydra.sweeper.direction gives {len(given)} direction(s) for the {len(metrics)} "
            f"metric(s) of optimized_metric={metrics}: give one per metric"
        )
    return given


def objective_values(returned: Any, objectives: int) -> list[float]:
    """The job's return value as one float per objective; ValueError says what is wrong."""
    many = isinstance(returned, list | tuple | ListConfig)
    if objectives == 1 and not many:
        values = [returned]
    elif objectives > 1 and many:
        values = list(returned)
    else:
        shape = "a number" if objectives == 1 else f"a list or tuple of {objectives} numbers"
        raise ValueError(
            f"the job returned {returned!r}; a study of {objectives} objective(s) needs {shape}"
        )
    if len(values) != objectives:
        raise ValueError(
            f"the job returned {len(values)} value(s), {returned!r}, for {objectives} objectives"
        )
    try:
        return [float(v) for v in values]
    except (TypeError, ValueError):
        raise ValueError(f"the job returned {returned!r}, which is not numeric") from None


def tell(study, trial, **outcome):
    """study.tell, whose GridSampler stops the study once the grid is covered: outside
    study.optimize that stop raises, after the trial's state is stored. The sweep ends on its
    own then, as n_trials is capped at the grid's size."""
    try:
        study.tell(trial, **outcome)
    except RuntimeError as err:
        if "Study.stop" not in str(err):
            raise
    return study.get_trials(deepcopy=False)[trial.number].state


def study_results(study, metrics: list[str] | None) -> dict[str, Any]:
    """optimization_results.yaml as hydra-optuna-sweeper writes it: the best params and value,
    or the Pareto front (`solutions`) of a multi-objective study."""
    from optuna.trial import TrialState

    results: dict[str, Any] = {"name": "optuna"}
    if metrics:
        results["metric"] = metrics[0] if len(metrics) == 1 else metrics
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return results
    if len(study.directions) == 1:
        log.info("best value %.4f with %s", study.best_value, study.best_params)
        return results | {"best_params": dict(study.best_params), "best_value": study.best_value}
    front = study.best_trials
    log.info("%d trial(s) on the Pareto front", len(front))
    for t in front:
        log.info("    trial %d: values %s, params %s", t.number, t.values, t.params)
    return results | {
        "directions": [d.name.lower() for d in study.directions],
        "solutions": [{"params": dict(t.params), "values": list(t.values)} for t in front],
    }


def plots(study, sweep_dir: Path, metrics: list[str] | None) -> list[Path]:
    """Optuna's plots of the study as PNG files: the history, importances and parallel
    coordinates of one objective, or the Pareto front of several."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as optuna_plots

    if len(study.directions) > 1:
        names = metrics if metrics and len(metrics) == len(study.directions) else None
        wanted = {
            "pareto_front": lambda s: optuna_plots.plot_pareto_front(s, target_names=names),
        }
    else:
        wanted = {
            "optimization_history": optuna_plots.plot_optimization_history,
            "param_importances": optuna_plots.plot_param_importances,
            "parallel_coordinate": optuna_plots.plot_parallel_coordinate,
        }
    saved = []
    for name, plot in wanted.items():
        try:
            axes = plot(study)
        except (ValueError, RuntimeError) as err:  # e.g. importances need 2+ complete trials
            log.info("no %s plot: %s", name, err)
            continue
        figure = (axes.flat[0] if hasattr(axes, "flat") else axes).get_figure()
        path = sweep_dir / f"{name}.png"
        figure.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(figure)
        saved.append(path)
    return saved


def slot(index: int, jobs: int) -> dict[str, str]:
    """The device slot of the index-th of `jobs` jobs launched together: each takes a GPU of its
    own (experiments.backend.use_device_slot); none for a job launched alone."""
    return {DEVICE_SLOT_ENV: f"{index}/{jobs}"} if jobs > 1 else {}


def hydra_env(values: dict[str, Any]) -> list[str]:
    """Overrides setting environment variables for a job through its hydra node: they are not
    task overrides, so they stay out of hydra.job.override_dirname."""
    return [f"++hydra.job.env_set.{key}={quoted(str(value))}" for key, value in values.items()]


def quoted(text: str) -> str:
    """`text` as a quoted value of Hydra's override grammar (a URL may hold = , or spaces)."""
    return "'" + text.replace("'", "\\'") + "'"


def _installed(package: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(package) is not None


def wait_for_other_workers(study, storage) -> bool:
    """On an RDB storage with heartbeats, wait while other processes still run trials of the
    study; True as soon as one of them is found dead (its trial then waits to be run again).

    Without this, the last worker to run out of new trials would leave, and a trial whose
    worker died near the end would stay RUNNING until someone ran the command again.
    """
    import time

    import optuna
    from optuna.trial import TrialState

    if not isinstance(storage, optuna.storages.RDBStorage) or not storage.get_heartbeat_interval():
        return False
    announced = False
    while True:
        others = [
            t.number
            for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if not t.user_attrs.get("surplus")
        ]
        if not others:
            return False
        if not announced:
            log.info("waiting for trial(s) %s of other workers to end or go stale", others)
            announced = True
        time.sleep(storage.get_heartbeat_interval())
        take_over_stale_trials(study)
        if study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            return True


@contextlib.contextmanager
def heartbeats(storage, trials):
    """Record Optuna heartbeats for `trials` while their jobs run (RDB storages only).

    Not Optuna's own heartbeat thread: that one is private and serves `study.optimize`, where
    the trial runs in the same process; here the launcher runs the jobs.
    """
    import threading

    import optuna

    if not isinstance(storage, optuna.storages.RDBStorage) or not storage.get_heartbeat_interval():
        yield
        return
    stop = threading.Event()

    def beat() -> None:
        while True:
            for trial in trials:
                storage.record_heartbeat(trial._trial_id)
            if stop.wait(storage.get_heartbeat_interval()):
                return

    thread = threading.Thread(target=beat, name="optuna-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def release_frames(ret) -> None:
    """Drop the tracebacks of a pruned or failed job's exception, kept in its JobReturn.

    They hold the job's frames, and with them its model, images and features: kept until the
    next batch returns, they would add a whole job's memory to the next trial's peak.
    """
    err = ret._return_value
    while isinstance(err, BaseException):
        err.__traceback__ = None
        err = err.__cause__ or err.__context__
