"""Pure builders of an experiment's Kubernetes objects: spec and metadata in, plain dicts out.

The operator and `ttrv render` call the same functions (KubeRay style): `adaptation_run` makes one dataset's
AdaptationRun from its Experiment, `run_children` the objects that run owns (ConfigMap, the trainer: a TrainJob or a
PyTorchJob, and, for a service rollout, the rollout Deployment, Service and NetworkPolicy), `training_runtime` the
ClusterTrainingRuntime (or namespaced TrainingRuntime) that every ttrv TrainJob references.

The trainer's two APIs (`scheduling.trainerApi`):
- `trainjob`: Kubeflow Trainer v2 (trainer.kubeflow.org/v1alpha1 TrainJob on a JobSet). Its objects go through the
  typed models of Kubeflow's own `kubeflow-trainer-api` package (`_typed`), the way Kubeflow's SDK builds them.
- `pytorchjob`: the v1 training operator (kubeflow.org/v1 PyTorchJob), for clusters that still run it.

The core kinds and the PyTorchJob are plain dicts, not the typed models of the kubernetes / kubeflow-training
clients: those models check little beyond required fields, and would make `ttrv render` need the cluster extras.
Trainer v2's objects pass through `kubeflow-trainer-api` (a core dependency: pydantic models only), which fixes
their shape but, like those, ignores unknown keys, so `_typed` insists on an exact round trip. The tests validate
every object built here against the real schemas (kubernetes-validate in strict mode, the vendored PyTorchJob and
Trainer v2 CRDs, the generated ttrv CRDs), which rejects a misspelt field as a typed constructor would, and a wrong
value as well.
"""

from ttrv.manifests.common import *  # noqa: F403
from ttrv.manifests.common import RuntimeRef, container_security_context, pod_security_context  # noqa: F401
from ttrv.manifests.rollout import shared_rollout  # noqa: F401
from ttrv.manifests.run import adaptation_run, check_names, experiment_objects, run_children  # noqa: F401
from ttrv.manifests.trainjob import training_runtime  # noqa: F401
