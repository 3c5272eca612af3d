"""The trainer's progress report into its own AdaptationRun's status, in a cluster.

The operator reads a run's progress from `status.trainerProgress` and from nowhere else (operators/progress.py):
it holds no credentials to the teams' object stores. The trainer writes that field with a JSON merge patch of the
`status` subresource, authenticated by its run's own ServiceAccount token, whose Role allows `patch` on that one
AdaptationRun's status and nothing else (ttrv/manifests/access.py builds the account, the Role and the projected
token volume). A merge patch names only `trainerProgress`, so the operator's own status fields are untouched.

Standard library only (the KEP-2779 objection to pods updating status directly is "a kubernetes client in the
runtime": this is one HTTPS request). A report that fails is logged and dropped: progress is for people watching,
and training must never wait on or fail for it; the next report carries the whole document again.

Active only when the pod has what the manifests give it (TTRV_STATUS_DIR with a token, TTRV_RUN_NAMESPACE,
TTRV_RUN_NAME) and the kubelet's KUBERNETES_SERVICE_HOST; elsewhere (a laptop, `ttrv experiment run --local`)
`report_progress` does nothing.
"""

from __future__ import annotations

import json
import os
import ssl
import threading
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path

from ttrv import log

logger = log.get_logger(__name__)

# The operator ignores the step's metrics (they go to events.jsonl and Prometheus); the status keeps to the contract.
_LEFT_OUT = ("metrics",)
# AdaptationRunStatus.trainerProgress's maxLength (ttrv/spec/status.py).
MAX_CHARS = 8192
TIMEOUT_SECONDS = 5.0


class StatusReporter:
    def __init__(self, api_url: str, namespace: str, name: str, token_file: Path, ca_file: Path | None = None):
        self.url = f"{api_url.rstrip('/')}/apis/ttrv.io/v1alpha1/namespaces/{namespace}/adaptationruns/{name}/status"
        self.token_file = token_file
        # The cluster's CA (projected from kube-root-ca.crt); without one, the system's trust store.
        self.context = ssl.create_default_context(cafile=str(ca_file) if ca_file is not None else None)
        self.failures = 0

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> StatusReporter | None:
        directory = environ.get("TTRV_STATUS_DIR")
        host, port = environ.get("KUBERNETES_SERVICE_HOST"), environ.get("KUBERNETES_SERVICE_PORT", "443")
        namespace, name = environ.get("TTRV_RUN_NAMESPACE"), environ.get("TTRV_RUN_NAME")
        if not (directory and host and namespace and name and (Path(directory) / "token").is_file()):
            return None
        host = f"[{host}]" if ":" in host else host  # an IPv6 service address
        ca = Path(directory) / "ca.crt"
        return cls(f"https://{host}:{port}", namespace, name, Path(directory) / "token", ca if ca.is_file() else None)

    def report(self, document: Mapping) -> bool:
        try:
            text = json.dumps({key: value for key, value in document.items() if key not in _LEFT_OUT},
                              separators=(",", ":"), allow_nan=False)
        except ValueError as error:  # NaN or infinity: the API server's JSON has neither
            logger.warning("progress_report_not_json", error=str(error))
            return False
        if len(text) > MAX_CHARS:
            logger.warning("progress_report_too_long", chars=len(text), limit=MAX_CHARS)
            return False
        body = json.dumps({"status": {"trainerProgress": text}}).encode()
        request = urllib.request.Request(self.url, data=body, method="PATCH", headers={
            # The token is read on every report: the kubelet renews the projected file before it expires.
            "Authorization": f"Bearer {self.token_file.read_text().strip()}",
            "Content-Type": "application/merge-patch+json", "Accept": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT_SECONDS, context=self.context) as response:
                response.read()
        except (OSError, urllib.error.URLError) as error:
            self.failures += 1
            # The first failure and then every 20th: a step every few seconds must not flood the log.
            if self.failures == 1 or self.failures % 20 == 0:
                detail = error.read().decode(errors="replace")[:300] if isinstance(error, urllib.error.HTTPError) \
                    else str(error)
                logger.warning("progress_report_failed", url=self.url, failures=self.failures, error=detail)
            return False
        return True


_reporter: StatusReporter | None = None
_looked = False
_lock = threading.Lock()


def report_progress(document: Mapping) -> None:
    """Reports `document` (progress.json's) into the run's status when running in a cluster pod; else nothing."""
    global _reporter, _looked
    with _lock:
        if not _looked:
            _looked = True
            _reporter = StatusReporter.from_environment()
            logger.info("progress_reporting", to_status=_reporter is not None,
                        url=_reporter.url if _reporter else None)
        reporter = _reporter
    if reporter is not None:
        reporter.report(document)
