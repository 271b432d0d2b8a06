{{/*
Named templates of the adamwatch chart.

Every template here reads only .Values and .Release, so that another chart can
call the attach templates with this chart's values:
  {{- $aw := dict "Values" .Values.adamwatch "Release" .Release }}
  {{- include "adamwatch.sidecar" $aw | nindent 8 }}
*/}}

{{/* Prefix of every resource name: "<release>-adamwatch", truncated to 63. */}}
{{- define "adamwatch.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains "adamwatch" .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-adamwatch" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* A resource name "<fullname>-<suffix>", within the 63 characters of a label value / DNS label. */}}
{{- define "adamwatch.name" -}}
{{- $full := include "adamwatch.fullname" .context -}}
{{- printf "%s-%s" ($full | trunc (int (sub 62 (len .suffix)))) .suffix | trimSuffix "-" -}}
{{- end -}}

{{/* Labels of every resource the chart renders. */}}
{{- define "adamwatch.labels" -}}
app.kubernetes.io/name: adamwatch
app.kubernetes.io/instance: {{ .Release.Name | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service | default "Helm" | quote }}
app.kubernetes.io/part-of: adamwatch
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/*
Labels a trainer pod carries to be watched: the PodMonitor, the ServiceMonitor's
Service, the webhook Service and the NetworkPolicy all select on them.
*/}}
{{- define "adamwatch.podLabels" -}}
adamwatch.io/instance: {{ include "adamwatch.fullname" . | quote }}
{{- end -}}

{{/* The selector form of adamwatch.podLabels, for Services and monitors. */}}
{{- define "adamwatch.podSelector" -}}
{{ include "adamwatch.podLabels" . }}
{{- end -}}

{{/* Name of the training job when known: workload.jobName, else the example's name. */}}
{{- define "adamwatch.jobName" -}}
{{- if .Values.workload.jobName -}}
{{- .Values.workload.jobName -}}
{{- else if .Values.example.enabled -}}
{{- include "adamwatch.exampleName" . -}}
{{- end -}}
{{- end -}}

{{/* Pod label that holds the job name, set by the Job controller / training operator. */}}
{{- define "adamwatch.jobNameLabel" -}}
{{- if eq .Values.workload.kind "PyTorchJob" -}}
training.kubeflow.org/job-name
{{- else -}}
batch.kubernetes.io/job-name
{{- end -}}
{{- end -}}

{{/* Pod labels that pick the rank-0 pod (YAML map). */}}
{{- define "adamwatch.rank0PodLabels" -}}
{{- if .Values.workload.rank0PodLabels -}}
{{ toYaml .Values.workload.rank0PodLabels }}
{{- else if eq .Values.workload.kind "PyTorchJob" -}}
training.kubeflow.org/replica-type: master
training.kubeflow.org/replica-index: "0"
{{- else -}}
batch.kubernetes.io/job-completion-index: "0"
{{- end -}}
{{- end -}}

{{- define "adamwatch.exampleName" -}}
{{- .Values.example.name | default (include "adamwatch.name" (dict "context" . "suffix" "example")) -}}
{{- end -}}

{{- define "adamwatch.configMapName" -}}
{{- include "adamwatch.name" (dict "context" . "suffix" "config") -}}
{{- end -}}

{{- define "adamwatch.controlTokenSecretName" -}}
{{- .Values.controlToken.existingSecret | default (include "adamwatch.name" (dict "context" . "suffix" "control-token")) -}}
{{- end -}}

{{- define "adamwatch.pagerdutySecretName" -}}
{{- .Values.alertmanagerConfig.pagerduty.routingKey.existingSecret | default (include "adamwatch.name" (dict "context" . "suffix" "pagerduty")) -}}
{{- end -}}

{{- define "adamwatch.controlServiceName" -}}
{{- include "adamwatch.name" (dict "context" . "suffix" "control") -}}
{{- end -}}

{{/* Path of the trainer's socket and the endpoint both containers agree on. */}}
{{- define "adamwatch.endpoint" -}}
{{- printf "unix://%s/adamwatch.sock" (.Values.sidecar.socketDir | trimSuffix "/") -}}
{{- end -}}

{{/*
The sidecar as a native sidecar: an init container with restartPolicy Always
starts before the trainer, keeps running beside it, and is stopped when the
trainer exits, so a Job still completes. Use under initContainers:.
*/}}
{{- define "adamwatch.sidecar" -}}
- name: adamwatch-sidecar
  image: {{ printf "%s:%s" .Values.sidecar.image.repository .Values.sidecar.image.tag | quote }}
  imagePullPolicy: {{ .Values.sidecar.image.pullPolicy }}
  restartPolicy: Always
  args:
    - serve
    - --listen
    - {{ include "adamwatch.endpoint" . | quote }}
    - --metrics-address
    - {{ printf "0.0.0.0:%d" (int .Values.sidecar.ports.metrics) | quote }}
    - --control-address
    - {{ printf "0.0.0.0:%d" (int .Values.sidecar.ports.control) | quote }}
    - --control-token-file
    - /etc/adamwatch/control/token
    - --config
    - /etc/adamwatch/config.yaml
    - --socket-mode
    - {{ .Values.sidecar.socket.mode | quote }}
    {{- with .Values.sidecar.socket.allowedUids }}
    - --allowed-uids
    - {{ join "," . | quote }}
    {{- end }}
    {{- with .Values.sidecar.socket.allowedGids }}
    - --allowed-gids
    - {{ join "," . | quote }}
    {{- end }}
  ports:
    - name: metrics
      containerPort: {{ .Values.sidecar.ports.metrics }}
      protocol: TCP
    - name: control
      containerPort: {{ .Values.sidecar.ports.control }}
      protocol: TCP
  {{- with .Values.sidecar.extraEnv }}
  env:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  startupProbe:
    httpGet:
      path: /readyz
      port: metrics
    periodSeconds: {{ .Values.sidecar.probes.startup.periodSeconds }}
    failureThreshold: {{ .Values.sidecar.probes.startup.failureThreshold }}
    timeoutSeconds: {{ .Values.sidecar.probes.startup.timeoutSeconds }}
  readinessProbe:
    httpGet:
      path: /readyz
      port: metrics
    periodSeconds: {{ .Values.sidecar.probes.readiness.periodSeconds }}
    failureThreshold: {{ .Values.sidecar.probes.readiness.failureThreshold }}
    timeoutSeconds: {{ .Values.sidecar.probes.readiness.timeoutSeconds }}
  livenessProbe:
    httpGet:
      path: /healthz
      port: metrics
    periodSeconds: {{ .Values.sidecar.probes.liveness.periodSeconds }}
    failureThreshold: {{ .Values.sidecar.probes.liveness.failureThreshold }}
    timeoutSeconds: {{ .Values.sidecar.probes.liveness.timeoutSeconds }}
  resources:
    {{- toYaml .Values.sidecar.resources | nindent 4 }}
  securityContext:
    {{- toYaml .Values.sidecar.securityContext | nindent 4 }}
  volumeMounts:
    - name: adamwatch-socket
      mountPath: {{ .Values.sidecar.socketDir }}
    - name: adamwatch-config
      mountPath: /etc/adamwatch/config.yaml
      subPath: config.yaml
      readOnly: true
    - name: adamwatch-control-token
      mountPath: /etc/adamwatch/control
      readOnly: true
    - name: adamwatch-tmp
      mountPath: /tmp
    {{- if .Values.sidecar.auditLog.enabled }}
    - name: adamwatch-audit
      mountPath: /var/log/adamwatch
    {{- end }}
{{- end -}}

{{/* Environment of the trainer container: where the sidecar listens and the job's name. */}}
{{- define "adamwatch.trainerEnv" -}}
- name: ADAMWATCH_ENDPOINT
  value: {{ include "adamwatch.endpoint" . | quote }}
{{- $job := include "adamwatch.jobName" . }}
- name: ADAMWATCH_JOB
{{- if $job }}
  value: {{ $job | quote }}
{{- else }}
  valueFrom:
    fieldRef:
      fieldPath: {{ printf "metadata.labels['%s']" (include "adamwatch.jobNameLabel" .) }}
{{- end }}
{{- end -}}

{{/* Volume mounts of the trainer container: only the socket directory. */}}
{{- define "adamwatch.trainerVolumeMounts" -}}
- name: adamwatch-socket
  mountPath: {{ .Values.sidecar.socketDir }}
{{- end -}}

{{/* Pod volumes: the shared socket directory, the sidecar's config, token and scratch space. */}}
{{- define "adamwatch.volumes" -}}
- name: adamwatch-socket
  emptyDir:
    sizeLimit: 1Mi
- name: adamwatch-config
  configMap:
    name: {{ include "adamwatch.configMapName" . }}
- name: adamwatch-control-token
  secret:
    secretName: {{ include "adamwatch.controlTokenSecretName" . }}
    defaultMode: 0444
    items:
      - key: {{ .Values.controlToken.key }}
        path: token
- name: adamwatch-tmp
  emptyDir:
    sizeLimit: 16Mi
{{- if .Values.sidecar.auditLog.enabled }}
- name: adamwatch-audit
  emptyDir:
    sizeLimit: {{ .Values.sidecar.auditLog.sizeLimit }}
{{- end }}
{{- end -}}

{{/* AlertmanagerConfig matchers, quoted: a bare "=" is not a plain string to every YAML parser. */}}
{{- define "adamwatch.matchers" -}}
{{- range . }}
- name: {{ .name | quote }}
  value: {{ .value | quote }}
  matchType: {{ .matchType | default "=" | quote }}
{{- end }}
{{- end -}}

{{/*
Alertmanager matcher strings ('alertname=~"A|B"') as AlertmanagerConfig
matchers, for the inhibition rules copied from alerts/alertmanager.yaml.
*/}}
{{- define "adamwatch.parseMatchers" -}}
{{- $pattern := "^\\s*([a-zA-Z_][a-zA-Z0-9_]*)\\s*(=~|!~|!=|=)\\s*\"?(.*?)\"?\\s*$" }}
{{- range . }}
{{- if not (regexMatch $pattern .) }}
{{- fail (printf "alerts/alertmanager.yaml: cannot read the matcher %q" .) }}
{{- end }}
- name: {{ regexReplaceAll $pattern . "${1}" | quote }}
  value: {{ regexReplaceAll $pattern . "${3}" | quote }}
  matchType: {{ regexReplaceAll $pattern . "${2}" | quote }}
{{- end }}
{{- end -}}
