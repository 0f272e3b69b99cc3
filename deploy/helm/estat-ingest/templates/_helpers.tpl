{{/* The chart name, or nameOverride; the app.kubernetes.io/name label (and the scrape job). */}}
{{- define "estat-ingest.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Object names: the release name when it already holds the chart name (helm install estat-ingest ...). */}}
{{- define "estat-ingest.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := include "estat-ingest.name" . }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "estat-ingest.selectorLabels" -}}
app.kubernetes.io/name: {{ include "estat-ingest.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "estat-ingest.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "estat-ingest.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: estat
{{- end }}

{{- define "estat-ingest.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "estat-ingest.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "estat-ingest.dlqClaimName" -}}
{{- .Values.dlq.persistence.existingClaim | default (printf "%s-dlq" (include "estat-ingest.fullname" .)) }}
{{- end }}
