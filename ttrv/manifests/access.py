"""The trainer's own identity, for its progress reports: a ServiceAccount per run, a Role that lets it patch the
status of its own AdaptationRun and nothing else, and the RoleBinding between them; and the pieces of the trainer
pod that use it (a projected token, where the reporter finds it).

Why the trainer pushes its progress instead of the operator reading progress.json from the store: the store and its
endpoint are the tenant's (`storage.endpoint`), so an operator reading them needs credentials to every team's store
and sends its signed requests wherever a spec points. Here the operator holds no store credentials and contacts
nothing a spec names; the trainer writes with a token whose only right is its own run's status (docs/operator.md,
"Progress"). Kubeflow Trainer's KEP-2779 weighs the same choice for TrainJob progress (proposals/2779-trainjob-
progress/README.md, "Trainer Pods updating the TrainJob status directly"): its cons are a per-job service account
(created here by the operator) and a Kubernetes client in the runtime (ttrv's is a few lines of the standard
library, ttrv/status_report.py).
"""

from __future__ import annotations

from ttrv.crds import GROUP
from ttrv.labels import TRAINER
from ttrv.manifests.common import _Context

# Where the trainer finds its token and the cluster's CA: the same files the kubelet's default service-account
# volume has (token, ca.crt, namespace), at a path of ttrv's own, mounted only in the trainer container.
STATUS_TOKEN_DIR = "/var/run/secrets/ttrv.io/status"
STATUS_VOLUME = "ttrv-status-token"
# The kubelet renews a projected token at 80% of its lifetime; the reporter reads the file on every report.
TOKEN_SECONDS = 3600


def trainer_service_account(ctx: _Context) -> str:
    """The trainer pods' ServiceAccount: the spec's pod.serviceAccountName when a platform team gives one (workload
    identity, image pulls), else the run's own."""
    return ctx.spec.pod.service_account_name or f"{ctx.name}-trainer"


def progress_access(ctx: _Context) -> list[dict]:
    """ServiceAccount, Role and RoleBinding: the trainer may patch `adaptationruns/status` of this one run
    (resourceNames), nothing else. The operator holds that right itself (Kubernetes lets a Role be created only
    by someone who has what it grants)."""
    name, account_name = f"{ctx.name}-trainer", trainer_service_account(ctx)
    account = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": ctx.metadata(name, TRAINER),
               # Only the trainer's projected volume carries a token; no pod gets one by default.
               "automountServiceAccountToken": False}
    role = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": ctx.metadata(name, TRAINER),
            "rules": [{"apiGroups": [GROUP], "resources": ["adaptationruns/status"], "resourceNames": [ctx.name],
                       "verbs": ["patch"]}]}
    binding = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
               "metadata": ctx.metadata(name, TRAINER),
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
               "subjects": [{"kind": "ServiceAccount", "name": account_name, "namespace": ctx.namespace}]}
    # With pod.serviceAccountName the Role is bound to the team's own account, which ttrv neither creates nor owns.
    return [account, role, binding] if account_name == name else [role, binding]


def status_volume() -> dict:
    """The token (audience: the API server, the default), the cluster's CA and the namespace, as the kubelet's
    own service-account volume projects them."""
    return {"name": STATUS_VOLUME, "projected": {"defaultMode": 0o444, "sources": [
        {"serviceAccountToken": {"path": "token", "expirationSeconds": TOKEN_SECONDS}},
        {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
    ]}}


def status_mount() -> dict:
    return {"name": STATUS_VOLUME, "mountPath": STATUS_TOKEN_DIR, "readOnly": True}


def status_env(ctx: _Context) -> list[dict]:
    """What ttrv/status_report.py reads: which object to patch, and where the token is."""
    return [{"name": "TTRV_STATUS_DIR", "value": STATUS_TOKEN_DIR},
            {"name": "TTRV_RUN_NAMESPACE", "value": ctx.namespace},
            {"name": "TTRV_RUN_NAME", "value": ctx.name}]
