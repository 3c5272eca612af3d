{{- define "ttrv-operator.fullname" -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "ttrv-operator.labels" -}}
app.kubernetes.io/name: ttrv-operator
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "ttrv-operator.selector" -}}
app.kubernetes.io/name: ttrv-operator
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "ttrv-operator.minioSelector" -}}
app.kubernetes.io/name: ttrv-operator
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: minio
{{- end -}}

{{- define "ttrv-operator.minioName" -}}
{{- printf "%s-minio" (include "ttrv-operator.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The same restricted profile as the pods ttrv-operator creates (ttrv/manifests.py). */}}
{{- define "ttrv-operator.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 1000
runAsGroup: 1000
fsGroup: 1000
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "ttrv-operator.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
{{- end -}}

{{/* The training runtime's kind: a namespaced install (watchNamespaces) makes a ClusterTrainingRuntime a
TrainingRuntime in each watched namespace, since it asks for nothing cluster-wide. */}}
{{- define "ttrv-operator.runtimeKind" -}}
{{- if and .Values.watchNamespaces (eq .Values.trainer.runtime.kind "ClusterTrainingRuntime") -}}
TrainingRuntime
{{- else -}}
{{- .Values.trainer.runtime.kind -}}
{{- end -}}
{{- end -}}
