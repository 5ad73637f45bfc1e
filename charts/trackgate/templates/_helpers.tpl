{{/* Chart name, overridable. */}}
{{- define "trackgate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name of the release's objects. A release called "trackgate" gives "trackgate", not
"trackgate-trackgate".
*/}}
{{- define "trackgate.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "trackgate.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object of the release. */}}
{{- define "trackgate.labels" -}}
helm.sh/chart: {{ include "trackgate.chart" . }}
app.kubernetes.io/name: {{ include "trackgate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: trackgate
{{- end }}

{{/* Selector of the operator pods; immutable once installed, so it never carries the version. */}}
{{- define "trackgate.operatorSelectorLabels" -}}
app.kubernetes.io/name: {{ include "trackgate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "trackgate.operatorLabels" -}}
{{ include "trackgate.labels" . }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "trackgate.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "trackgate.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The image reference, by digest when one is given. */}}
{{- define "trackgate.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}
