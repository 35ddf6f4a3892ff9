{{- define "nextgpt.notes" -}}
nextgpt-serve {{ .Chart.AppVersion }} is being deployed as "{{ .Release.Name }}" in namespace {{ .Release.Namespace }}.

1. Secrets (by reference, never in values). The pods wait for this Secret:

   kubectl -n {{ .Release.Namespace }} create secret generic {{ .Values.secrets.existingSecret }} \
     --from-file={{ .Values.secrets.keys.apiKeys }}=./api-keys.txt \
     --from-literal={{ .Values.secrets.keys.urlSigningKey }}="$(openssl rand -hex 32)" \
     --from-literal={{ .Values.secrets.keys.s3AccessKeyId }}=... \
     --from-literal={{ .Values.secrets.keys.s3SecretAccessKey }}=...{{ if .Values.redis.external.urlFromSecret }} \{{ end }}
{{- if .Values.redis.external.urlFromSecret }}
     --from-literal={{ .Values.secrets.keys.redisUrl }}=redis://:PASSWORD@HOST:6379/0
{{- end }}

   api-keys.txt holds one API key per line.

2. The model bundle is read from {{ if .Values.bundle.initContainer.enabled }}an init container ({{ .Values.bundle.initContainer.image }}){{ else }}the PVC "{{ .Values.bundle.existingClaim }}"{{ end }}, mounted read-only at {{ .Values.bundle.mountPath }}.
   Model pods need minutes to load: watch `kubectl -n {{ .Release.Namespace }} get pods -l app.kubernetes.io/instance={{ .Release.Name }} -w`.

3. The API:
{{- if .Values.gateway.ingress.enabled }}
   https://{{ .Values.gateway.ingress.host }}{{ .Values.gateway.ingress.path }}
{{- else }}
   kubectl -n {{ .Release.Namespace }} port-forward svc/{{ include "nextgpt.fullname" . }}-gateway 8000:{{ .Values.gateway.service.port }}
   curl -H "Authorization: Bearer $KEY" http://127.0.0.1:8000/readyz
{{- end }}
{{- if and (not .Values.config.gateway.public_base_url) .Values.gateway.ingress.enabled }}

   Set config.gateway.public_base_url (e.g. https://{{ .Values.gateway.ingress.host }}) or config.gateway.trusted_proxies
   so that artifact URLs point where clients are.
{{- end }}
{{- if .Values.keda.enabled }}

4. Decoder workers scale with KEDA on the Redis lists "{{ .Values.config.redis.key_prefix }}<queue>".
{{- end }}
{{- end -}}
