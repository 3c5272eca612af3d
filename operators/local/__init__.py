"""`ttrv experiment run --local`: an experiment executed on this machine, from the objects the chart deploys.

The builders render them (`experiment_objects`, `adaptation_run`, `run_children`) and the operator's own reconcile
loop (operators/reconcile.py, with `decide_experiment` and `decide_run`) schedules, restarts and reports them,
unchanged, against an in-memory API. What a cluster's other controllers and its kubelets do with those objects is
done here with local processes:

    Secret         the s3Secret, holding the embedded S3 server's generated credentials, in memory only
    ConfigMap      its keys written as files into <out>/<run>/<configmap>/, the folder that stands for its mount
    Deployment     its pod's container command as a local process, restarted with back-off when it exits (as the
                   kubelet does), ready once its readinessProbe answers
    Service        its DNS names (<name>.<namespace>.svc[.cluster.local]) resolve to the selected pod's local port
    NetworkPolicy  kept, not enforced: loopback has no pod network to police
    PyTorchJob     one local process per replica, the Master as node 0 and each Worker as a further local node, with
                   the env the training operator (v1.9) injects; restartPolicy ExitCode as it plays it: an exit
                   128-255 recreates that pod in place, 1-127 fails the job

The object store is an embedded S3 server (SeaweedFS) whose objects stay in <out>/s3. An s3:// storage.uri keeps its
bucket and prefix and gets the embedded endpoint; a file:// one (the default) becomes s3://ttrv. Runs keep the
cluster's namespacing, s3://<bucket>/<prefix>/<namespace>/<experiment>/<dataset> (`run_store_uri`), so a local store
has a cluster's layout.

The modules:

    command.py     the `ttrv experiment` command, which the ttrv CLI finds through its entry point
    controller.py  run_experiment: the embedded store, the Experiment, the reconcile rounds, status.json
    cluster.py     LocalCluster: the in-memory API plus the Deployment controller, the training operator, the kubelet
    api.py         MemoryKube: the in-memory API (the scale bench's too)
    pods.py        a pod template translated into a local process, and that process
    table.py       the `kubectl get` table printed at the end
"""
