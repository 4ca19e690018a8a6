"""What Hydra tells a job: whether it is one of a multirun, its overrides and its output folder;
and which of a multirun's overrides define its jobs."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

# The multirun's own overrides (JSON), set by tracking.MlflowSweepCallback: a job's other
# overrides are what its sweep gave it.
SWEEP_OVERRIDES_ENV = "EXPERIMENTS_SWEEP_OVERRIDES"


def in_multirun() -> bool:
    """Whether Hydra runs this job as one of a multirun."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def output_dir(root: str, name: str) -> Path:
    """Hydra's output directory for this job, or a fresh one under `root`/`name`."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        runtime = HydraConfig.get().runtime
        if runtime.get("output_dir"):
            return Path(runtime.output_dir)
    parent = Path(root) / str(name)
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=time.strftime("%Y-%m-%d_%H-%M-%S-"), dir=parent))


def task_overrides() -> list[str]:
    """The command-line overrides of this job, when Hydra launched it."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return list(HydraConfig.get().overrides.task)
    return []


def defining_overrides(overrides) -> list[str]:
    """A sweep's overrides that define its jobs, sorted: all but where a machine writes
    (`paths.*`), where it records (`tracking.*`) and how it resumes (`resume=`), which differ
    between the machines that share one study and between a run and its resumption."""
    return sorted(
        o for o in overrides if not o.lstrip("+~").startswith(("paths.", "tracking.", "resume="))
    )


def parsed(overrides) -> list:
    """Hydra's parse of `overrides`, less the ones that set Hydra itself (`hydra.*`)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    kept = [o for o in overrides if not o.lstrip("+~").startswith("hydra.")]
    return OverridesParser.create().parse_overrides(kept)


def fixed_keys(overrides: list) -> set[str]:
    """The keys that parsed `overrides` set to one value (not a sweep's several)."""
    return {o.key_or_group for o in overrides if not o.is_sweep_override()}


def sweep_keys(overrides: list[str], search_space) -> list[str]:
    """The config keys a multirun varies: its sweep overrides (`a=1,2`, `choice(...)`) and its
    sweeper's search space (`hydra.sweeper.params`), less the keys its command line fixes."""
    given = parsed(overrides)
    fixed = fixed_keys(given)
    swept = [o.key_or_group for o in given if o.is_sweep_override()]
    swept += [str(key) for key in (search_space or {}) if str(key) not in fixed]
    return list(dict.fromkeys(swept))
