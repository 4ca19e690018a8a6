"""A Hydra sweeper on Optuna >= 4 with pruning, resumable studies and several cooperating processes.

Written here because the released hydra-optuna-sweeper (1.3.0) pins optuna < 3, its RDB storage
fails under SQLAlchemy 2, and it cannot prune: the job never sees its trial (hydra#1954). This one
passes each job the storage, the study name and the trial number (`sweeper_trial.*`), and the job
reports its epochs to that trial through the storage (experiments.sweep).
"""

import contextlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict  # noqa: UP035 - OmegaConf reads these annotations

from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep
from hydra.core.plugins import Plugins
from hydra.core.utils import JobStatus
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

# A signal waits for a write to the study's storage to end (a journal line, an RDB transaction).
from experiments.interrupts import uninterrupted

log = logging.getLogger(__name__)

JOURNAL_PREFIX = "journal:"
# Asks that may be discarded as duplicates before a batch is given up.
MAX_ASK_ATTEMPTS = 100


@dataclass
class OptunaSweeperConf:
    _target_: str = "hydra_plugins.experiments_sweeper.optuna_sweeper.OptunaSweeper"
    _recursive_: bool = False  # the sweeper builds its sampler and pruner itself
    sampler: Any = field(
        default_factory=lambda: {"_target_": "optuna.samplers.TPESampler", "seed": 42}
    )
    pruner: Any = field(
        default_factory=lambda: {
            "_target_": "optuna.pruners.MedianPruner",
            "n_startup_trials": 5,
            "n_warmup_steps": 1,
        }
    )
    # maximize or minimize; null: minimize when optimized_metric names a loss, else maximize.
    direction: Any = None
    # Any Optuna storage URL (sqlite:///..., postgresql://...); null: a journal in the sweep dir.
    storage: Any = None
    study_name: str = "experiments"
    n_trials: int = 20
    # Trials launched together through the launcher (parallel with hydra-joblib-launcher).
    n_jobs: int = 1
    max_failure_rate: float = 0.5
    # RDB storages: a trial whose process stops beating this long is failed and run again by
    # another process (Optuna's heartbeat). The journal file has none: a trial whose process on
    # this host is gone is taken over instead.
    heartbeat_interval: int = 60
    grace_period: Any = None  # null: 2 x heartbeat_interval
    params: Dict[str, str] = field(default_factory=dict)  # noqa: UP006


ConfigStore.instance().store(
    group="hydra/sweeper", name="experiments_optuna", node=OptunaSweeperConf, provider="experiments"
)


def distribution_for(override: Override):
    """The Optuna distribution of a sweep override: choice, range, interval, tag(log, ...)."""
    import optuna.distributions as d

    value = override.value()
    if isinstance(value, ChoiceSweep):
        return d.CategoricalDistribution([as_override_text(v) for v in value.list])
    if isinstance(value, RangeSweep):
        return d.CategoricalDistribution([as_override_text(v) for v in override.sweep_iterator()])
    if isinstance(value, IntervalSweep):
        log_scale = "log" in value.tags
        if isinstance(value.start, int) and isinstance(value.end, int):
            return d.IntDistribution(value.start, value.end, log=log_scale)
        return d.FloatDistribution(float(value.start), float(value.end), log=log_scale)
    raise ValueError(
        f"{override.key_or_group}={override.input_line}: not a sweep; use choice(), "
        f"range(), interval() or tag(log, interval())"
    )


def as_override_text(value: Any) -> Any:
    """Optuna categories must be scalars: lists and dicts travel as their override text."""
    if isinstance(value, list):
        return "[" + ",".join(str(as_override_text(v)) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{as_override_text(v)}" for k, v in value.items()) + "}"
    return value


def open_storage(url: str, heartbeat_interval: int | None = None, grace_period=None):
    """An Optuna storage from a URL, or from `journal:<path>` for a journal file.

    With `heartbeat_interval`, an RDB storage fails the trials of processes that stopped
    beating and queues each again with the same params (Optuna's retry callback).
    """
    import warnings

    import optuna

    # Heartbeats and their retry callback have been "experimental" since Optuna 2.8 (2021).
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

    if url.startswith(JOURNAL_PREFIX):
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        return JournalStorage(JournalFileBackend(url[len(JOURNAL_PREFIX) :]))
    if heartbeat_interval is None:
        return url
    return optuna.storages.RDBStorage(
        url,
        heartbeat_interval=int(heartbeat_interval),
        grace_period=int(grace_period) if grace_period else None,
        heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(),
    )


def owner_attrs() -> dict[str, Any]:
    """Which process on which host runs a trial: its trial is taken over once it is gone."""
    import socket

    import psutil

    return {
        "owner_host": socket.gethostname(),
        "owner_pid": os.getpid(),
        "owner_started": round(psutil.Process().create_time(), 2),
    }


def owner_alive(attrs: dict[str, Any]) -> bool:
    """False when the trial's owner ran on this host and is gone (a reused pid is not it)."""
    import socket

    import psutil

    if attrs.get("owner_host") != socket.gethostname() or "owner_pid" not in attrs:
        return True  # another host's process: only a heartbeat (RDB) can tell
    try:
        started = psutil.Process(int(attrs["owner_pid"])).create_time()
    except psutil.Error:
        return False
    return abs(started - float(attrs.get("owner_started", started))) < 1.0


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
        if trial.user_attrs.get("surplus") or owner_alive(trial.user_attrs):
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
        log.warning(
            "trial(s) %s were left RUNNING by processes that are gone: each runs again with the "
            "same params and resumes from its checkpoint",
            taken,
        )
    return taken


class OptunaSweeper(Sweeper):
    """Asks Optuna for trials, launches them as Hydra jobs, tells Optuna how each ended."""

    def __init__(self, **settings: Any) -> None:
        self.settings = OmegaConf.create(settings)
        self.config: DictConfig = None
        self.launcher = None

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: list[str]) -> Any:
        import optuna
        from hydra.utils import instantiate

        settings = self.settings
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        fixed, distributions = self._search_space(arguments)
        storage_url = settings.storage or f"{JOURNAL_PREFIX}{sweep_dir / 'optuna.journal'}"
        metric = str(self.config.get("optimized_metric", "val_accuracy"))
        direction = settings.direction or ("minimize" if "loss" in metric else "maximize")
        storage = open_storage(storage_url, settings.heartbeat_interval, settings.grace_period)
        study = uninterrupted(optuna.create_study)(
            study_name=settings.study_name,
            storage=storage,
            sampler=instantiate(settings.sampler) if settings.sampler else None,
            pruner=instantiate(settings.pruner) if settings.pruner else optuna.pruners.NopPruner(),
            direction=direction,
            load_if_exists=True,
        )
        self._check_same_study(study, fixed, distributions, storage_url)
        log.info(
            "study %s (%s %s) in %s: %d of %d trials done",
            settings.study_name,
            direction,
            metric,
            storage_url,
            self._counted(study),
            settings.n_trials,
        )
        job_index = 0
        while True:
            take_over_stale_trials(study)
            trials = self._ask(study, distributions, int(settings.n_jobs))
            if not trials:
                break
            overrides = [
                [
                    *fixed,
                    *(f"{k}={v}" for k, v in trial.params.items()),
                    f"++sweeper_trial.storage={storage_url}",
                    f"++sweeper_trial.study={settings.study_name}",
                    f"++sweeper_trial.number={trial.number}",
                ]
                for trial in trials
            ]
            with heartbeats(storage, trials):
                returns = self.launcher.launch(overrides, initial_job_idx=job_index)
            job_index += len(returns)
            for trial, ret in zip(trials, returns, strict=True):
                self._tell(study, trial, ret)
                release_frames(ret)
            del returns, ret  # before the next batch runs, not after
            self._check_failures(study)
        self._write_results(study, sweep_dir, metric)
        return study

    def _search_space(self, arguments: list[str]):
        parser = OverridesParser.create()
        params = [f"{k}={v}" for k, v in (self.settings.params or {}).items()]
        fixed, distributions = [], {}
        for override in parser.parse_overrides(params + list(arguments)):
            if override.is_sweep_override():
                distributions[override.get_key_element()] = distribution_for(override)
            else:
                fixed.append(override.input_line)
        if not distributions:
            raise ValueError(
                "the Optuna sweeper has nothing to search: set hydra.sweeper.params "
                "(e.g. hparams_search=lr_head) or pass a sweep on the command line"
            )
        return fixed, distributions

    @staticmethod
    def _check_same_study(study, fixed: list[str], distributions: dict, storage_url: str) -> None:
        """Resume a study only with the overrides and search space it was started with.

        A stored study records both; a command that differs (another `trainer.epochs`, another
        range) would mix incomparable trials into it, so it stops instead, saying how to go on.
        """
        identity = {
            "overrides": sorted(fixed),
            "search_space": {k: repr(v) for k, v in sorted(distributions.items())},
        }
        stored = study.user_attrs.get("identity")
        if stored is None:
            study.set_user_attr("identity", identity)
        elif stored != identity:
            changed = [k.replace("_", " ") for k in identity if identity[k] != stored.get(k)]
            raise ValueError(
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
    def _ask(self, study, distributions, how_many: int) -> list:
        """Up to `how_many` new trials, never more than n_trials in the whole study."""
        from optuna.trial import TrialState

        asked, attempts = [], 0
        while len(asked) < how_many and attempts < MAX_ASK_ATTEMPTS:
            attempts += 1
            if self._counted(study) >= self.settings.n_trials:
                break
            trial = study.ask(fixed_distributions=distributions)
            for key, value in owner_attrs().items():
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
            running = [
                t.params
                for t in study.get_trials(
                    deepcopy=False,
                    states=(TrialState.RUNNING, TrialState.COMPLETE, TrialState.PRUNED),
                )
                if t.number != trial.number and not t.user_attrs.get("surplus")
            ]
            # Processes sharing a storage ask at the same moment: the storage numbers trials
            # atomically, so only the first n_trials numbers run, and a configuration another
            # process already runs is not run twice.
            if len(earlier) >= self.settings.n_trials or trial.params in running:
                trial.set_user_attr("surplus", True)
                study.tell(trial, state=TrialState.FAIL)
                if len(earlier) >= self.settings.n_trials:
                    break
                study.sampler.reseed_rng()  # a seeded sampler in a new process repeats itself
                continue
            asked.append(trial)
        return asked

    @uninterrupted
    def _tell(self, study, trial, ret) -> None:
        import optuna
        from optuna.trial import TrialState

        if ret.status == JobStatus.COMPLETED:
            study.tell(trial, float(ret.return_value))
            state = "COMPLETE"
        elif isinstance(ret._return_value, optuna.TrialPruned):  # the job's exception
            study.tell(trial, state=TrialState.PRUNED)
            state = "PRUNED"
        else:
            log.warning("trial %d failed: %r", trial.number, ret._return_value)
            study.tell(trial, state=TrialState.FAIL)
            state = "FAIL"
        tag_child_run(trial.number, state)

    def _check_failures(self, study) -> None:
        from optuna.trial import TrialState

        done = [
            t
            for t in study.get_trials(deepcopy=False)
            if t.state.is_finished() and not t.user_attrs.get("surplus")
        ]
        failed = sum(t.state == TrialState.FAIL for t in done)
        if done and failed / len(done) > self.settings.max_failure_rate and len(done) >= 2:
            raise RuntimeError(
                f"stopping the sweep: {failed} of {len(done)} trials failed, more than "
                f"hydra.sweeper.max_failure_rate={self.settings.max_failure_rate}; see the "
                f"failed jobs' logs under {self.config.hydra.sweep.dir}"
            )

    @uninterrupted
    def _write_results(self, study, sweep_dir: Path, metric: str) -> None:
        from optuna.trial import TrialState

        complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
        frame = study.trials_dataframe(
            attrs=("number", "state", "value", "duration", "params", "user_attrs")
        )
        # Stale trials run again as a retry: the retry's row is the trial's.
        frame = frame[~frame["number"].isin(retried_numbers(study.trials))]
        if "user_attrs_surplus" in frame:  # asks discarded as duplicates never ran
            frame = frame[frame["user_attrs_surplus"].isna()].drop(columns="user_attrs_surplus")
        frame = frame.drop(columns=[c for c in frame if c.startswith("user_attrs_owner_")])
        frame.to_csv(sweep_dir / "trials.csv", index=False)
        results = {"name": "optuna", "metric": metric}
        if complete:
            results |= {"best_params": dict(study.best_params), "best_value": study.best_value}
            log.info("best %s %.4f with %s", metric, study.best_value, study.best_params)
        OmegaConf.save(OmegaConf.create(results), sweep_dir / "optimization_results.yaml")
        log_study_to_parent(study, sweep_dir, results)


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


def tag_child_run(number: int, state: str) -> None:
    """Tag the MLflow child run of trial `number` with its Optuna state."""
    from experiments.tracking import PARENT_RUN_ENV

    parent = os.environ.get(PARENT_RUN_ENV)
    if not parent:
        return
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    experiment = client.get_run(parent).info.experiment_id
    for run in client.search_runs(
        [experiment],
        filter_string=(f"tags.mlflow.parentRunId = '{parent}' and tags.optuna_trial = '{number}'"),
    ):
        client.set_tag(run.info.run_id, "optuna_state", state)


def log_study_to_parent(study, sweep_dir: Path, results: dict) -> None:
    """Best params and value, the trials table and Optuna's plots, on the sweep's parent run."""
    from experiments.tracking import PARENT_RUN_ENV

    parent = os.environ.get(PARENT_RUN_ENV)
    if not parent:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from mlflow.tracking import MlflowClient
    from optuna.visualization import matplotlib as plots

    client = MlflowClient()
    if "best_value" in results:
        client.log_metric(parent, "best_value", float(results["best_value"]))
        for key, value in results["best_params"].items():
            client.log_param(parent, f"best.{key}", str(value))
    client.set_tag(parent, "optuna_study", study.study_name)
    for name in ("trials.csv", "optimization_results.yaml"):
        client.log_artifact(parent, str(sweep_dir / name), artifact_path="study")
    for name, plot in (
        ("optimization_history", plots.plot_optimization_history),
        ("param_importances", plots.plot_param_importances),
        ("parallel_coordinate", plots.plot_parallel_coordinate),
    ):
        try:
            axes = plot(study)
        except (ValueError, RuntimeError) as err:  # e.g. importances need 2+ complete trials
            log.info("no %s plot: %s", name, err)
            continue
        figure = (axes.flat[0] if hasattr(axes, "flat") else axes).get_figure()
        path = sweep_dir / f"{name}.png"
        figure.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(figure)
        client.log_artifact(parent, str(path), artifact_path="study")


def release_frames(ret) -> None:
    """Drop the tracebacks of a pruned or failed job's exception, kept in its JobReturn.

    They hold the job's frames, and with them its model, images and features: kept until the
    next batch returns, they would add a whole job's memory to the next trial's peak.
    """
    err = ret._return_value
    while isinstance(err, BaseException):
        err.__traceback__ = None
        err = err.__cause__ or err.__context__
