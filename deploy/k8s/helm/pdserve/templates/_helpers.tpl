{{/* Names: <release>-pdserve unless the release name already contains the chart name. */}}
{{- define "pdserve.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "pdserve.selectorLabels" -}}
app.kubernetes.io/name: pdserve
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "pdserve.labels" -}}
{{ include "pdserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* Labels of one component; the role label is what router discovery selects on. */}}
{{- define "pdserve.componentSelector" -}}
{{ include "pdserve.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
pdserve.io/role: {{ .component }}
{{- end -}}

{{- define "pdserve.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "pdserve.serviceAccountName" -}}
{{- default (printf "%s-router" (include "pdserve.fullname" .)) .Values.serviceAccount.name -}}
{{- end -}}

{{/* Base label selector for router discovery: this release's pdserve pods. */}}
{{- define "pdserve.discoverySelector" -}}
{{- printf "app.kubernetes.io/name=pdserve,app.kubernetes.io/instance=%s" .Release.Name -}}
{{- end -}}

{{- define "pdserve.redisUrl" -}}
{{- if .Values.redis.enabled -}}
{{- printf "redis://%s-redis:%d/0" (include "pdserve.fullname" .) (int .Values.redis.port) -}}
{{- else -}}
{{- required "kvConnector=redis needs redis.enabled=true or redis.url" .Values.redis.url -}}
{{- end -}}
{{- end -}}

{{/* The router policy file: values' router.config, discovery defaulting to this release. */}}
{{- define "pdserve.routerConfig" -}}
{{- $cfg := deepCopy .Values.router.config -}}
{{- if not $cfg -}}
{{- $cfg = dict "version" 1 "mode" "always" "prefill" (dict "policy" "prefix_aware" "block_size" 16) "decode" (dict "policy" "least_loaded") -}}
{{- end -}}
{{- if not (hasKey $cfg "discovery") -}}
{{- $k8s := dict "source" .Values.router.discoverySource "selector" (include "pdserve.discoverySelector" .) "role_label" "pdserve.io/role" "port_name" "grpc" -}}
{{- $_ := set $cfg "discovery" (dict "backend" "kubernetes" "kubernetes" $k8s) -}}
{{- end -}}
{{- toYaml $cfg -}}
{{- end -}}

{{- define "pdserve.tlsArgs" -}}
{{- if .Values.tls.enabled }}
- --tls-cert={{ .Values.tls.mountPath }}/{{ .Values.tls.certFile }}
- --tls-key={{ .Values.tls.mountPath }}/{{ .Values.tls.keyFile }}
- --tls-ca={{ .Values.tls.mountPath }}/{{ .Values.tls.caFile }}
{{- end }}
{{- end -}}

{{- define "pdserve.tlsVolume" -}}
{{- if .Values.tls.enabled }}
- name: tls
  secret:
    secretName: {{ required "tls.enabled needs tls.existingSecret" .Values.tls.existingSecret }}
    defaultMode: 0440
{{- end }}
{{- end -}}

{{- define "pdserve.tlsMount" -}}
{{- if .Values.tls.enabled }}
- name: tls
  mountPath: {{ .Values.tls.mountPath }}
  readOnly: true
{{- end }}
{{- end -}}

{{/* Mutual TLS between pdserve services (router -> workers, decode -> prefill). */}}
{{- define "pdserve.internalTlsArgs" -}}
{{- with .Values.tls.internal }}
{{- if .enabled }}
- --internal-tls-cert={{ .mountPath }}/tls.crt
- --internal-tls-key={{ .mountPath }}/tls.key
- --internal-tls-ca={{ .mountPath }}/ca.crt
- --internal-tls-server-name={{ .serverName }}
{{- end }}
{{- end }}
{{- end -}}

{{- define "pdserve.internalTlsVolume" -}}
{{- if .Values.tls.internal.enabled }}
- name: internal-tls
  secret:
    secretName: {{ required "tls.internal.enabled needs tls.internal.existingSecret" .Values.tls.internal.existingSecret }}
    defaultMode: 0440
{{- end }}
{{- end -}}

{{- define "pdserve.internalTlsMount" -}}
{{- if .Values.tls.internal.enabled }}
- name: internal-tls
  mountPath: {{ .Values.tls.internal.mountPath }}
  readOnly: true
{{- end }}
{{- end -}}

{{- define "pdserve.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "pdserve.containerSecurityContext" -}}
allowPrivilegeEscalation: false
capabilities:
  drop: ["ALL"]
{{- end -}}

{{/* All labels of one component's objects: common labels + component + role. */}}
{{- define "pdserve.componentLabels" -}}
{{ include "pdserve.labels" .root }}
app.kubernetes.io/component: {{ .component }}
pdserve.io/role: {{ .component }}
{{- end -}}

{{/* The internal plane's shared secret (internalAuth): its Secret, flag, volume, mount. */}}
{{- define "pdserve.internalAuthSecret" -}}
{{- default (printf "%s-internal-auth" (include "pdserve.fullname" .)) .Values.internalAuth.existingSecret -}}
{{- end -}}

{{- define "pdserve.internalAuthArgs" -}}
{{- if .Values.internalAuth.enabled }}
- --internal-token-file={{ .Values.internalAuth.mountPath }}/token
{{- end }}
{{- end -}}

{{- define "pdserve.internalAuthVolume" -}}
{{- if .Values.internalAuth.enabled }}
- name: internal-auth
  secret:
    secretName: {{ include "pdserve.internalAuthSecret" . }}
    defaultMode: 0440
    items:
      - {key: {{ .Values.internalAuth.secretKey }}, path: token}
{{- end }}
{{- end -}}

{{- define "pdserve.internalAuthMount" -}}
{{- if .Values.internalAuth.enabled }}
- name: internal-auth
  mountPath: {{ .Values.internalAuth.mountPath }}
  readOnly: true
{{- end }}
{{- end -}}

{{/* A worker's resources with nvidia.com/gpu from <role>.gpus (null: 1 unless device is
cpu) in both requests and limits; 0 removes it. */}}
{{- define "pdserve.workerResources" -}}
{{- $r := deepCopy (.w.resources | default dict) -}}
{{- $gpus := .w.gpus -}}
{{- if kindIs "invalid" $gpus -}}{{- $gpus = ternary 0 1 (eq (.device | default "cuda") "cpu") -}}{{- end -}}
{{- range $part := list "requests" "limits" -}}
{{- $q := deepCopy (get $r $part | default dict) -}}
{{- if gt (int $gpus) 0 -}}{{- $_ := set $q "nvidia.com/gpu" (int $gpus) -}}{{- else -}}{{- $_ := unset $q "nvidia.com/gpu" -}}{{- end -}}
{{- if $q -}}{{- $_ := set $r $part $q -}}{{- else -}}{{- $_ := unset $r $part -}}{{- end -}}
{{- end -}}
{{- toYaml $r -}}
{{- end -}}
