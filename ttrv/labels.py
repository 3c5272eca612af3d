"""Label keys and values of the objects an Experiment makes, in one place: the builders (ttrv/manifests/) set
them, the operator (operators/) selects on them. KubeRay keeps its own the same way, as constants in one file
(ray-operator/controllers/ray/utils/constant.go: RayClusterLabelKey, KubernetesApplicationNameLabelKey, ...).
"""

from __future__ import annotations

# Kubernetes' recommended labels (kubernetes.io/docs/concepts/overview/working-with-objects/common-labels).
NAME_LABEL = "app.kubernetes.io/name"
INSTANCE_LABEL = "app.kubernetes.io/instance"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
COMPONENT_LABEL = "app.kubernetes.io/component"

# ttrv's own: which experiment, run and dataset an object belongs to.
EXPERIMENT_LABEL = "ttrv.io/experiment"
RUN_LABEL = "ttrv.io/run"
DATASET_LABEL = "ttrv.io/dataset"

# Other controllers' labels that the builders set or the operator reads.
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
"""Kueue: the LocalQueue a job waits in."""
JOB_UID_LABEL = "kueue.x-k8s.io/job-uid"
"""Kueue: on a Workload, the uid of the job it admits."""
REPLICA_TYPE_LABEL = "training.kubeflow.org/replica-type"
"""The training operator: on a PyTorchJob's pod, its replica type in lower case (master, worker)."""

# Values.
APP = "ttrv"
MANAGER = "ttrv-operator"
TRAINER = "trainer"
ROLLOUT = "rollout"

MANAGED_BY = {MANAGED_BY_LABEL: MANAGER}
"""What the operator's watches select its own children by."""
