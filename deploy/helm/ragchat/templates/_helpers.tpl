{{/* Chart name, at most 63 characters. */}}
{{- define "ragchat.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name, at most 63 characters (DNS labels). The release name alone
when it already contains the chart name.
*/}}
{{- define "ragchat.fullname" -}}
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

{{/* Chart name and version, for the helm.sh/chart label. */}}
{{- define "ragchat.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every object. */}}
{{- define "ragchat.labels" -}}
helm.sh/chart: {{ include "ragchat.chart" . }}
{{ include "ragchat.selectorLabels" . }}
app.kubernetes.io/version: {{ include "ragchat.imageTag" . | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Selector labels (immutable in a Deployment: keep them stable). */}}
{{- define "ragchat.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ragchat.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* The ServiceAccount the pods run as. */}}
{{- define "ragchat.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "ragchat.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The image tag: image.tag, else the chart's appVersion. */}}
{{- define "ragchat.imageTag" -}}
{{- .Values.image.tag | default .Chart.AppVersion | toString }}
{{- end }}

{{/*
The Secret holding the URLs with passwords, the JWT secret and the metrics token:
existingSecret.name, or the one this chart renders (secrets.create). Fails when the
settings cannot work: both or neither source of the JWT secret, a JWT secret shorter
than the 32 bytes production requires, secret values with nowhere to go.
*/}}
{{- define "ragchat.secretName" -}}
{{- $existing := .Values.existingSecret.name -}}
{{- if and .Values.secrets.create $existing -}}
{{- fail "set either secrets.create=true (the chart renders the Secret) or existingSecret.name, not both" -}}
{{- end -}}
{{- if $existing -}}
{{- if not .Values.existingSecret.keys.jwtSecret -}}
{{- fail "existingSecret.keys.jwtSecret is required: the key of the JWT secret in the existing Secret" -}}
{{- end -}}
{{- $existing -}}
{{- else -}}
{{- if and (not .Values.secrets.create) (or .Values.auth.jwtSecret .Values.externalPostgresql.url .Values.externalRedis.url .Values.externalMongodb.url .Values.metrics.token) -}}
{{- fail "auth.jwtSecret, the external store URLs and metrics.token go into a Kubernetes Secret: set secrets.create=true to render it from these values, or existingSecret.name to use your own" -}}
{{- end -}}
{{- $jwt := required "auth.jwtSecret is required: the JWT signing secret (RAGCHAT__AUTH__JWT_SECRET) has no default. Set secrets.create=true and auth.jwtSecret (at least 32 bytes, e.g. openssl rand -base64 48), or existingSecret.name with the key existingSecret.keys.jwtSecret" .Values.auth.jwtSecret -}}
{{- if lt (len $jwt) 32 -}}
{{- fail "auth.jwtSecret must be at least 32 bytes: production refuses a shorter JWT secret" -}}
{{- end -}}
{{- if and .Values.metrics.token (lt (len .Values.metrics.token) 24) -}}
{{- fail "metrics.token must be at least 24 characters (or empty: superusers only)" -}}
{{- end -}}
{{- include "ragchat.fullname" . -}}
{{- end -}}
{{- end }}

{{/*
The env vars read from the Secret (secretKeyRef). With existingSecret: each setting
whose key in existingSecret.keys is set (the Redis URL, MongoDB URL and metrics token
as optional references). With the chart's Secret: each setting whose value is set.
*/}}
{{- define "ragchat.secretEnv" -}}
{{- $secret := include "ragchat.secretName" . -}}
{{- $settings := list
  (dict "env" "RAGCHAT__AUTH__JWT_SECRET" "key" "jwtSecret" "value" .Values.auth.jwtSecret "optional" false)
  (dict "env" "RAGCHAT__DATABASE__URL" "key" "databaseUrl" "value" .Values.externalPostgresql.url "optional" false)
  (dict "env" "RAGCHAT__REDIS__URL" "key" "redisUrl" "value" .Values.externalRedis.url "optional" true)
  (dict "env" "RAGCHAT__KNOWLEDGE__MONGODB_URL" "key" "mongodbUrl" "value" .Values.externalMongodb.url "optional" true)
  (dict "env" "RAGCHAT__METRICS__TOKEN" "key" "metricsToken" "value" .Values.metrics.token "optional" true)
-}}
{{- range $settings }}
{{- $key := "" }}
{{- if $.Values.existingSecret.name }}
{{- $key = index $.Values.existingSecret.keys .key | default "" }}
{{- else if .value }}
{{- $key = .key | kebabcase }}
{{- end }}
{{- if $key }}
- name: {{ .env }}
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: {{ $key }}
      {{- if and .optional $.Values.existingSecret.name }}
      optional: true
      {{- end }}
{{- end }}
{{- end }}
{{- end }}
