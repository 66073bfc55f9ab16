"""vaebench's SLURM launcher (`hydra/launcher=slurm`, conf/hydra/launcher/slurm.yaml): Hydra's
submitit launcher, with what a sweep of measurements needs when tasks end badly.

Each Hydra job (one config of the sweep) is one SLURM array task. submitit's own launcher waits
for each task's result and raises at the first task that has none (cancelled, timed out, its
node failed), which ends the sweep without its combined report; and it asks `sacct`, which a
cluster without an accounting database cannot answer, so it waits forever. This launcher:

- waits for every task, reading its state from the controller (`scontrol`; `sacct` through
  submitit where the controller has forgotten it);
- for a task that ended without finishing its run (its node failed, it was killed before it
  could write its records), writes a `failed` record for every job of that run that has none,
  with the metrics the job had saved (`partial: true`) and the task's fate in `error`
  ("SLURM task 7_2 on node n1: its node failed (NODE_FAIL)"). A task that never started its run
  is named on the console and makes the sweep exit 1;
- so the sweep's combined report and exit code come when the last task ends, whatever ended it.

A task that SLURM stops while it runs (scancel, its time limit) winds up by itself: vaebench
inside it catches SIGTERM (and submitit's SIGUSR2 before the time limit), kills the running
job's worker, writes its record with the reason from `scontrol` and returns
(`harness.cli`, `harness.slurm`).
"""

import logging
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf, SlurmQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher as _SubmititSlurm
from omegaconf import OmegaConf

log = logging.getLogger(__name__)


@dataclass
class VaebenchSlurmConf(SlurmQueueConf):
    """submitit's SLURM options, plus `exclusive` (sbatch --exclusive: a task has its node to
    itself, so throughput jobs may be timed there) and `poll_s` (how often the sweep asks the
    controller for its tasks' states). `signal_delay_s` 0: no SIGUSR2 before the time limit
    (SLURM's SIGTERM at the limit stops the running job, which is recorded)."""

    _target_: str = "hydra_plugins.vaebench_slurm.SlurmLauncher"
    exclusive: bool = False
    poll_s: float = 2.0
    signal_delay_s: int = 0


ConfigStore.instance().store(group="hydra/launcher", name="vaebench_slurm", node=VaebenchSlurmConf,
                             provider="vaebench")


class SlurmLauncher(_SubmititSlurm):
    """submitit's SLURM launcher that waits for every task and gives each job a record."""

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        import submitit

        from harness import slurm

        assert self.config is not None
        params = dict(self.params)
        poll_s = float(params.pop("poll_s", 2.0))
        if params.pop("exclusive", False):
            params["exclusive"] = True
        if int(params.get("signal_delay_s") or 0) <= 0:  # submitit always asks for a warning signal; SLURM may
            # send it up to a minute early, before the task can catch it: this one goes to the batch shell, which ignores it
            params["additional_parameters"] = {"signal": "B:URG@1", **(params.get("additional_parameters") or {})}
        executor = submitit.AutoExecutor(cluster="slurm", folder=params.pop("submitit_folder"),
                                         slurm_max_num_timeout=params.pop("max_num_timeout", 0))
        base = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        job_params: list[Any] = []
        for idx, overrides in enumerate(job_overrides, initial_job_idx):
            log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
            job_params.append((list(overrides), "hydra.sweep.dir", idx, f"job_id_for_{idx}", Singleton.get_state()))
        try:
            jobs = executor.map_array(self, *zip(*job_params))
        except submitit.core.utils.FailedJobError as exc:  # no cluster reachable, a refused option: nothing ran
            said = [line for line in str(exc).splitlines() if line.strip()]
            print(f"vaebench: slurm: sbatch refused the sweep, nothing was run: {said[-1] if said else exc}", file=sys.stderr)
            if not any(sweep_dir.glob("*/*.json")):  # the folder of a sweep that never began holds nothing to keep
                shutil.rmtree(sweep_dir, ignore_errors=True)
            raise SystemExit(2) from None
        print(f"slurm: submitted {len(jobs)} task(s) as array job {jobs[0].job_id.split('_')[0]} "
              f"(squeue, scancel); sweep folder {sweep_dir}", flush=True)
        ends = slurm.wait(jobs, poll_s)
        return [self._result(job, idx, list(overrides), ends.get(job.job_id), sweep_dir)
                for idx, (job, overrides) in enumerate(zip(jobs, job_overrides), initial_job_idx)]

    def _result(self, job: Any, idx: int, overrides: list[str], end: dict[str, str] | None,
                sweep_dir: Path) -> JobReturn:
        """The task's JobReturn; for a task without a result, its run's jobs get `failed`
        records naming the task's fate, and the JobReturn carries nothing (the sweep goes on)."""
        from harness import slurm

        why = None
        facts = {"job_id": job.job_id, "node": (end or {}).get("node"), "state": (end or {}).get("state")}
        if end is None:
            try:
                ret = job.results()[0]
            except Exception as exc:  # the task function raised, or submitit gave up on it
                why = f"SLURM task {job.job_id}: {str(exc).strip().splitlines()[-1][:300]}"
            else:
                if ret.status != JobStatus.FAILED:
                    return ret
                why = f"SLURM task {job.job_id}: vaebench raised {type(ret._return_value).__name__}: {ret._return_value}"
        else:
            why = slurm.describe(job.job_id, end)
        if not slurm.close_task_run(sweep_dir / str(idx), why, overrides, facts):
            from harness import cli

            cli._EXIT["code"] = max(cli._EXIT["code"], 1)  # a task left jobs without records
        return JobReturn(overrides=overrides, status=JobStatus.COMPLETED, _return_value=None)
