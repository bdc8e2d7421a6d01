"""`hydra/launcher=processes`: every sweep job in a process of its own, so that one killed job
(a signal, the out-of-memory killer) is a failed row and its siblings finish. Hydra accepts
launchers only from the `hydra_plugins` package; the work is done in
`llmarch_compose.sweep.launcher`."""

from typing import Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

from llmarch_compose.sweep import launcher as _impl


class ProcessLauncher(Launcher):
    def __init__(self, n_jobs: int = -1) -> None:
        self.n_jobs = n_jobs
        self.config = self.task_function = self.hydra_context = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.task_function, self.hydra_context = config, task_function, hydra_context

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        return _impl.launch(self, job_overrides, initial_job_idx)


ConfigStore.instance().store(group="hydra/launcher", name="processes", node=_impl.ProcessLauncherConf,
                             provider="llmarch_compose")
