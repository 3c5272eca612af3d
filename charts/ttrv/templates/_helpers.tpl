{{- define "ttrv.name" -}}
{{- .Values.nameOverride | default .Release.Name -}}
{{- end -}}

{{/*
Checks JSON Schema cannot express (values.schema.json covers types, ranges and unknown keys). The operator
validates the whole spec again with pydantic; failing here gives the same message before anything is created.
The defaults below are ttrv.spec's (RolloutSpec.votes, .group_size, SchedulingSpec.trainer_api); a test fails if
they differ.
*/}}
{{- define "ttrv.validate" -}}
{{- $name := include "ttrv.name" . -}}
{{- if not (regexMatch "^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$" $name) -}}
{{- fail (printf "nameOverride: %q (default: the release name) must be a DNS label of at most 63 lowercase letters, digits and '-'; set nameOverride" $name) -}}
{{- end -}}
{{- $votes := dig "rollout" "votes" 32 .Values.AsMap | int -}}
{{- $group := dig "rollout" "groupSize" 16 .Values.AsMap | int -}}
{{- if gt $group $votes -}}
{{- fail (printf "rollout.groupSize (%d) > rollout.votes (%d): the trained group is taken from the votes; set groupSize <= votes (reference: votes 32, groupSize 16)" $group $votes) -}}
{{- end -}}
{{- $uri := dig "storage" "uri" "" .Values.AsMap -}}
{{- if or (regexMatch "^[a-z0-9]+://[^/]*@" $uri) (regexMatch "^([a-z]+://)?[^/]*@" (dig "storage" "endpoint" "" .Values.AsMap | default "")) -}}
{{- fail "storage.uri / storage.endpoint: holds credentials (user:password@); remove them: the pods read them from the Secret named by s3Secret" -}}
{{- end -}}
{{- if not (hasPrefix "s3://" $uri) -}}
{{- fail (printf "storage.uri: %q: the trainer and rollout pods share no file system; set storage.uri to s3://bucket/prefix (the operator chart's bundled MinIO serves s3://ttrv)" $uri) -}}
{{- end -}}
{{- if not (regexMatch "^s3://[^/]" $uri) -}}
{{- fail (printf "storage.uri: %q names no bucket; write s3://bucket/prefix" $uri) -}}
{{- end -}}
{{- if regexMatch "/\\.\\.(/|$)" $uri -}}
{{- fail (printf "storage.uri: %q contains '..'; write the store prefix without parent-directory steps" $uri) -}}
{{- end -}}
{{- if and (dig "scheduling" "topologySpreadConstraints" list .Values.AsMap) (ne (dig "scheduling" "trainerApi" "auto" .Values.AsMap) "pytorchjob") -}}
{{- fail (printf "scheduling: topologySpreadConstraints need trainerApi: pytorchjob (it is %s): a TrainJob cannot carry them; set trainerApi: pytorchjob, or spread the pods with affinity (pod anti-affinity) or Kueue's topology annotations in pod.annotations" (dig "scheduling" "trainerApi" "auto" .Values.AsMap)) -}}
{{- end -}}
{{- $seen := dict -}}
{{- range $index, $dataset := .Values.datasets -}}
{{- if hasKey $seen $dataset.name -}}
{{- fail (printf "datasets: the name %q appears twice; dataset names must be unique" $dataset.name) -}}
{{- end -}}
{{- $_ := set $seen $dataset.name true -}}
{{- range (dig "pathMap" list $dataset) -}}
{{- if not (regexMatch "^[^=]+=" .) -}}
{{- fail (printf "datasets.%d.pathMap: %q is not OLD=NEW; write e.g. '/data/authors/imagenet=/mnt/imagenet'" $index .) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
