{{- define "nextgpt.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "nextgpt.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains (include "nextgpt.name" .) .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "nextgpt.name" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Selector labels of one component: (dict "root" $ "component" "encoder") */}}
{{- define "nextgpt.selectorLabels" -}}
app.kubernetes.io/name: {{ include "nextgpt.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "nextgpt.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" }}
{{ include "nextgpt.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: nextgpt
{{- end -}}

{{- define "nextgpt.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "nextgpt.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Our image of a component: (dict "root" $ "c" .Values.encoder) */}}
{{- define "nextgpt.image" -}}
{{- $tag := .c.image.tag | default .root.Values.image.tag | default .root.Chart.AppVersion -}}
{{- printf "%s/%s:%s" .root.Values.image.registry .c.image.repository $tag -}}
{{- end -}}

{{/* A settings value as an environment string; whole numbers without Go's float notation, lists as JSON. */}}
{{- define "nextgpt.envValue" -}}
{{- if kindIs "float64" . -}}
{{- if eq . (floor .) }}{{ int64 . }}{{ else }}{{ . }}{{ end -}}
{{- else if or (kindIs "slice" .) (kindIs "map" .) -}}
{{- toJson . -}}
{{- else -}}
{{- toString . -}}
{{- end -}}
{{- end -}}

{{- define "nextgpt.redisHost" -}}
{{- printf "%s-redis" (include "nextgpt.fullname" .) -}}
{{- end -}}

{{- define "nextgpt.minioHost" -}}
{{- printf "%s-minio" (include "nextgpt.fullname" .) -}}
{{- end -}}

{{- define "nextgpt.secretEnv" -}}
- name: {{ .name }}
  valueFrom:
    secretKeyRef:
      name: {{ .root.Values.secrets.existingSecret }}
      key: {{ .key }}
{{- end -}}

{{/* Addresses and secrets every nextgpt container gets (settings come from the ConfigMap). */}}
{{- define "nextgpt.commonEnv" -}}
{{- $full := include "nextgpt.fullname" . -}}
- name: NEXTGPT_BUNDLE
  value: {{ .Values.bundle.mountPath | quote }}
- name: NEXTGPT_CACHE_DIR
  value: /var/cache/nextgpt
- name: NEXTGPT_HOST
  value: "0.0.0.0"
- name: NEXTGPT_PORT
  value: "8000"
{{- if .Values.redis.bundled.enabled }}
- name: NEXTGPT_REDIS__URL
  value: {{ printf "redis://%s:6379/0" (include "nextgpt.redisHost" .) | quote }}
{{- else if .Values.redis.external.urlFromSecret }}
{{ include "nextgpt.secretEnv" (dict "root" . "name" "NEXTGPT_REDIS__URL" "key" .Values.secrets.keys.redisUrl) }}
{{- else }}
- name: NEXTGPT_REDIS__URL
  value: {{ required "redis.external.url is required when redis.bundled.enabled is false" .Values.redis.external.url | quote }}
{{- end }}
- name: NEXTGPT_STORAGE__BACKEND
  value: s3
- name: NEXTGPT_STORAGE__LOCAL_DIR
  value: ""
- name: NEXTGPT_STORAGE__S3_BUCKET
  value: {{ .Values.objectStorage.bucket | quote }}
- name: NEXTGPT_STORAGE__S3_REGION
  value: {{ .Values.objectStorage.external.region | quote }}
- name: NEXTGPT_STORAGE__S3_ENDPOINT_URL
  value: {{ if .Values.objectStorage.bundled.enabled }}{{ printf "http://%s:9000" (include "nextgpt.minioHost" .) | quote }}{{ else }}{{ .Values.objectStorage.external.endpointUrl | quote }}{{ end }}
{{ include "nextgpt.secretEnv" (dict "root" . "name" "NEXTGPT_STORAGE__S3_ACCESS_KEY_ID" "key" .Values.secrets.keys.s3AccessKeyId) }}
{{ include "nextgpt.secretEnv" (dict "root" . "name" "NEXTGPT_STORAGE__S3_SECRET_ACCESS_KEY" "key" .Values.secrets.keys.s3SecretAccessKey) }}
- name: NEXTGPT_ENCODER__URL
  value: {{ printf "http://%s-encoder:8001" $full | quote }}
- name: NEXTGPT_LLM__URL
  value: {{ printf "http://%s-llm:8002" $full | quote }}
- name: NEXTGPT_LLM__BACKEND
  value: {{ .Values.llm.backend | quote }}
{{- if eq .Values.llm.backend "vllm" }}
- name: NEXTGPT_LLM__VLLM_URL
  value: {{ printf "http://%s-vllm:8100" $full | quote }}
- name: NEXTGPT_LLM__VLLM_POOLER_URL
  value: {{ printf "http://%s-pooler:8101" $full | quote }}
{{- end }}
{{- end -}}

{{/* The bundle volume and, when configured, the init container that fills it. */}}
{{- define "nextgpt.bundleVolume" -}}
- name: bundle
{{- if .Values.bundle.initContainer.enabled }}
  emptyDir:
    sizeLimit: {{ .Values.bundle.emptyDirSizeLimit }}
{{- else }}
  persistentVolumeClaim:
    claimName: {{ required "bundle.existingClaim (or bundle.initContainer.enabled)" .Values.bundle.existingClaim }}
    readOnly: true
{{- end }}
{{- end -}}

{{- define "nextgpt.bundleInit" -}}
{{- if .Values.bundle.initContainer.enabled }}
initContainers:
  - name: bundle
    image: {{ required "bundle.initContainer.image" .Values.bundle.initContainer.image }}
    imagePullPolicy: {{ .Values.image.pullPolicy }}
    command: {{ toJson (required "bundle.initContainer.command" .Values.bundle.initContainer.command) }}
    env:
      - name: BUNDLE_DIR
        value: {{ .Values.bundle.mountPath | quote }}
      - name: NEXTGPT_CACHE_DIR
        value: /var/cache/nextgpt
    securityContext: {{ toJson .Values.securityContext }}
    resources: {{ toJson .Values.bundle.initContainer.resources }}
    volumeMounts:
      - {name: bundle, mountPath: {{ .Values.bundle.mountPath }}}
      - {name: tmp, mountPath: /tmp}
      - {name: cache, mountPath: /var/cache/nextgpt}
{{- end }}
{{- end -}}

{{/* resources + GPUs of a component block */}}
{{- define "nextgpt.resources" -}}
{{- $res := deepCopy (.resources | default dict) -}}
{{- if gt (int (.gpu | default 0)) 0 -}}
{{- $limits := $res.limits | default dict -}}
{{- $_ := set $limits "nvidia.com/gpu" (int .gpu) -}}
{{- $_ := set $res "limits" $limits -}}
{{- end -}}
{{- toJson $res -}}
{{- end -}}

{{/* Scheduling fields shared by every pod of a component: (dict "root" $ "c" block) */}}
{{- define "nextgpt.podScheduling" -}}
serviceAccountName: {{ include "nextgpt.serviceAccountName" .root }}
automountServiceAccountToken: false
securityContext: {{ toJson .root.Values.podSecurityContext }}
{{- with .root.Values.imagePullSecrets }}
imagePullSecrets: {{ toJson . }}
{{- end }}
{{- with .c.nodeSelector }}
nodeSelector: {{ toJson . }}
{{- end }}
{{- with .c.tolerations }}
tolerations: {{ toJson . }}
{{- end }}
{{- with .c.affinity }}
affinity: {{ toJson . }}
{{- end }}
terminationGracePeriodSeconds: {{ .c.terminationGracePeriodSeconds | default 30 }}
{{- end -}}

{{/* HTTP probes with a long startup budget (model loading): (dict "c" block "port" N "ready" path "live" path) */}}
{{- define "nextgpt.probes" -}}
startupProbe:
  httpGet: {path: {{ .live }}, port: {{ .port }}}
  periodSeconds: {{ .c.probes.startup.periodSeconds }}
  failureThreshold: {{ .c.probes.startup.failureThreshold }}
  timeoutSeconds: 5
readinessProbe:
  httpGet: {path: {{ .ready }}, port: {{ .port }}}
  periodSeconds: {{ .c.probes.readiness.periodSeconds }}
  failureThreshold: {{ .c.probes.readiness.failureThreshold }}
  timeoutSeconds: 5
livenessProbe:
  httpGet: {path: {{ .live }}, port: {{ .port }}}
  periodSeconds: {{ .c.probes.liveness.periodSeconds }}
  failureThreshold: {{ .c.probes.liveness.failureThreshold }}
  timeoutSeconds: 5
{{- end -}}

{{/*
A nextgpt Deployment: (dict "root" $ "name" "encoder" "c" block "command" list "port" N "probes" bool
"replicas" N-or-nil "nextgptEnv" bool "image" string "bundle" bool)
*/}}
{{- define "nextgpt.deployment" -}}
{{- $root := .root -}}
{{- $labels := dict "root" $root "component" .name -}}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ include "nextgpt.fullname" $root }}-{{ .name }}
  labels:
    {{- include "nextgpt.labels" $labels | nindent 4 }}
spec:
  {{- if not (kindIs "invalid" .replicas) }}
  replicas: {{ .replicas }}
  {{- end }}
  revisionHistoryLimit: 5
  selector:
    matchLabels:
      {{- include "nextgpt.selectorLabels" $labels | nindent 6 }}
  template:
    metadata:
      labels:
        {{- include "nextgpt.selectorLabels" $labels | nindent 8 }}
      annotations:
        checksum/config: {{ include (print $root.Template.BasePath "/configmap.yaml") $root | sha256sum }}
        {{- with .c.podAnnotations }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
    spec:
      {{- include "nextgpt.podScheduling" (dict "root" $root "c" .c) | nindent 6 }}
      {{- if .bundle }}
      {{- include "nextgpt.bundleInit" $root | nindent 6 }}
      {{- end }}
      containers:
        - name: {{ .name }}
          image: {{ .image | default (include "nextgpt.image" (dict "root" $root "c" .c)) }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          command: {{ toJson .command }}
          {{- if or .port .metricsPort }}
          ports:
            {{- if .port }}
            - {name: http, containerPort: {{ .port }}}
            {{- end }}
            {{- if .metricsPort }}
            - {name: metrics, containerPort: {{ .metricsPort }}}
            {{- end }}
          {{- end }}
          {{- if .nextgptEnv }}
          envFrom:
            - configMapRef:
                name: {{ include "nextgpt.fullname" $root }}-config
          {{- end }}
          env:
            {{- if .nextgptEnv }}
            {{- include "nextgpt.commonEnv" $root | nindent 12 }}
            {{- end }}
            - name: HOME
              value: /tmp
            {{- with .metricsPort }}
            - name: NEXTGPT_DECODERS__METRICS_PORT
              value: {{ . | quote }}
            {{- end }}
            {{- with .c.env }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          resources: {{ include "nextgpt.resources" .c }}
          securityContext: {{ toJson $root.Values.securityContext }}
          {{- if .probes }}
          {{- include "nextgpt.probes" (dict "c" .c "port" .port "ready" (.readyPath | default "/readyz") "live" (.livePath | default "/healthz")) | nindent 10 }}
          {{- end }}
          volumeMounts:
            - {name: tmp, mountPath: /tmp}
            - {name: cache, mountPath: /var/cache/nextgpt}
            {{- if .bundle }}
            - name: bundle
              mountPath: {{ $root.Values.bundle.mountPath }}
              readOnly: true
              {{- with $root.Values.bundle.subPath }}
              subPath: {{ . }}
              {{- end }}
            {{- end }}
            {{- with .extraMounts }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
      volumes:
        - name: tmp
          emptyDir: {}
        - name: cache
          emptyDir: {}
        {{- if .bundle }}
        {{- include "nextgpt.bundleVolume" $root | nindent 8 }}
        {{- end }}
        {{- with .extraVolumes }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
{{- end -}}

{{/* ClusterIP Service of a component: (dict "root" $ "name" "encoder" "port" N "targetPort" N) */}}
{{- define "nextgpt.service" -}}
{{- $labels := dict "root" .root "component" .name -}}
apiVersion: v1
kind: Service
metadata:
  name: {{ include "nextgpt.fullname" .root }}-{{ .name }}
  labels:
    {{- include "nextgpt.labels" $labels | nindent 4 }}
spec:
  type: {{ .type | default "ClusterIP" }}
  selector:
    {{- include "nextgpt.selectorLabels" $labels | nindent 4 }}
  ports:
    - name: http
      port: {{ .port }}
      targetPort: {{ .targetPort | default .port }}
{{- end -}}

{{/* PodDisruptionBudget of a component: (dict "root" $ "name" "encoder" "c" block) */}}
{{- define "nextgpt.pdb" -}}
{{- if and .c.pdb .c.pdb.enabled }}
---
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ include "nextgpt.fullname" .root }}-{{ .name }}
  labels:
    {{- include "nextgpt.labels" (dict "root" .root "component" .name) | nindent 4 }}
spec:
  maxUnavailable: {{ .c.pdb.maxUnavailable }}
  selector:
    matchLabels:
      {{- include "nextgpt.selectorLabels" (dict "root" .root "component" .name) | nindent 6 }}
{{- end }}
{{- end -}}
