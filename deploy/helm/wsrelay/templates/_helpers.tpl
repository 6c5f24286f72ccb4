{{- define "wsrelay.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "wsrelay.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: relay
{{- end -}}

{{- define "wsrelay.labels" -}}
{{ include "wsrelay.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/*
A list of Redis URLs from values: a YAML list, or a string (comma-separated, as
--set gives it). Returns them comma-joined, blanks dropped.
*/}}
{{- define "wsrelay.joinUrls" -}}
{{- $list := list -}}
{{- if kindIs "string" . -}}
{{- $list = splitList "," . -}}
{{- else if . -}}
{{- $list = . -}}
{{- end -}}
{{- $urls := list -}}
{{- range $list -}}
{{- $url := toString . | trim -}}
{{- if $url -}}
{{- $urls = append $urls $url -}}
{{- end -}}
{{- end -}}
{{- join "," $urls -}}
{{- end -}}

{{/*
The broker settings, checked: fails the render on values that contradict each
other (the relay refuses WSRELAY_REDIS_URL together with WSRELAY_REDIS_CLUSTER).
*/}}
{{- define "wsrelay.redis.validate" -}}
{{- $redis := .Values.redis -}}
{{- $cluster := $redis.cluster | default dict -}}
{{- $urls := include "wsrelay.joinUrls" $redis.urls -}}
{{- $seeds := include "wsrelay.joinUrls" $cluster.seeds -}}
{{- $config := .Values.config | default dict -}}
{{- if and $redis.url $urls -}}
{{- fail "redis.url and redis.urls are both set: put a single Redis (or a Sentinel URL) in redis.url, or every shard in redis.urls" -}}
{{- end -}}
{{- $standalone := or $redis.url $urls $redis.existingSecret (hasKey $config "WSRELAY_REDIS_URL") -}}
{{- $clustered := or $seeds $cluster.existingSecret (hasKey $config "WSRELAY_REDIS_CLUSTER") -}}
{{- if and $standalone $clustered -}}
{{- fail "both a Redis URL (redis.url, redis.urls, redis.existingSecret or config.WSRELAY_REDIS_URL) and Redis Cluster seeds (redis.cluster.seeds, redis.cluster.existingSecret or config.WSRELAY_REDIS_CLUSTER) are set: the relay takes WSRELAY_REDIS_URL or WSRELAY_REDIS_CLUSTER, not both; set one topology" -}}
{{- end -}}
{{- if and (hasKey $config "WSRELAY_REDIS_URL") (or $redis.url $urls $redis.existingSecret) -}}
{{- fail "config.WSRELAY_REDIS_URL and redis.url/urls/existingSecret are both set: use redis.* only" -}}
{{- end -}}
{{- if and (hasKey $config "WSRELAY_REDIS_CLUSTER") (or $seeds $cluster.existingSecret) -}}
{{- fail "config.WSRELAY_REDIS_CLUSTER and redis.cluster.seeds/existingSecret are both set: use redis.cluster.* only" -}}
{{- end -}}
{{- range $url := compact (splitList "," $urls) -}}
{{- if not (contains "://" $url) -}}
{{- fail (printf "redis.urls: %q is not a URL (redis://host:port): every shard needs its scheme" $url) -}}
{{- end -}}
{{- end -}}
{{- range $seed := compact (splitList "," $seeds) -}}
{{- if not (or (hasPrefix "redis://" $seed) (hasPrefix "rediss://" $seed)) -}}
{{- fail (printf "redis.cluster.seeds: %q is not a redis:// or rediss:// URL (a Sentinel URL goes in redis.url)" $seed) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* WSRELAY_REDIS_URL for the ConfigMap; empty when it comes from a Secret or is unset. */}}
{{- define "wsrelay.redis.url" -}}
{{- if not .Values.redis.existingSecret -}}
{{- .Values.redis.url | default (include "wsrelay.joinUrls" .Values.redis.urls) -}}
{{- end -}}
{{- end -}}

{{/* WSRELAY_REDIS_CLUSTER for the ConfigMap; empty when it comes from a Secret or is unset. */}}
{{- define "wsrelay.redis.cluster" -}}
{{- $cluster := .Values.redis.cluster | default dict -}}
{{- if not $cluster.existingSecret -}}
{{- include "wsrelay.joinUrls" $cluster.seeds -}}
{{- end -}}
{{- end -}}
