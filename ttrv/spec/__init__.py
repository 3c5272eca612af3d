"""Run and experiment specs: the single source of truth.

`RunSpec` is one adaptation run (one dataset): `ttrv run` and the trainer pod read it. `ExperimentSpec` is what a
user installs with `helm install` (several datasets, scheduling, images); the controller derives one `RunSpec` per
dataset from it with `ExperimentSpec.run_spec`. The chart's `values.schema.json` and the CRDs' openAPIV3Schema are
generated from these models (`ttrv spec schema`), and a test fails when the committed files drift.

Keys are camelCase, as in every Kubernetes resource; snake_case names are accepted too. Defaults are the TTRV
reference's settings (examples/ttrv/run.sh), so a spec only states what differs.

The package: `base` (patterns, the strict model, errors), `run` (RunSpec and its parts), `experiment`
(ExperimentSpec), `status` (the AdaptationRun spec and both resources' status). Import from here.
"""

from ttrv.spec.base import *  # noqa: F403
from ttrv.spec.experiment import *  # noqa: F403
from ttrv.spec.pod import *  # noqa: F403
from ttrv.spec.run import *  # noqa: F403
from ttrv.spec.status import *  # noqa: F403
