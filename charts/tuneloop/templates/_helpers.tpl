{{/* Names, labels and the pieces every pod shares. */}}

{{- define "tuneloop.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "tuneloop.fullname" -}}
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

{{/* Object name of one component, e.g. "tuneloop-generation". Args: (dict "root" $ "name" "generation") */}}
{{- define "tuneloop.componentName" -}}
{{- printf "%s-%s" (include "tuneloop.fullname" .root) .name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "tuneloop.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selects every pod of this release; NetworkPolicies use it to mean "inside tuneloop". */}}
{{- define "tuneloop.instanceSelectorLabels" -}}
app.kubernetes.io/name: {{ include "tuneloop.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Args: (dict "root" $ "name" "generation") */}}
{{- define "tuneloop.selectorLabels" -}}
{{ include "tuneloop.instanceSelectorLabels" .root }}
app.kubernetes.io/component: {{ .name }}
{{- end }}

{{/* Args: (dict "root" $ "name" "generation"); name may be empty for release-wide objects. */}}
{{- define "tuneloop.labels" -}}
helm.sh/chart: {{ include "tuneloop.chart" .root }}
{{ include "tuneloop.instanceSelectorLabels" .root }}
{{- if .name }}
app.kubernetes.io/component: {{ .name }}
{{- end }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: tuneloop
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Image of a component: its own image block, falling back field by field to .Values.image.
Args: (dict "root" $ "image" .Values.generation.image) */}}
{{- define "tuneloop.image" -}}
{{- $g := .root.Values.image }}
{{- $c := .image | default dict }}
{{- $repo := $c.repository | default $g.repository }}
{{- $digest := $c.digest | default $g.digest }}
{{- if $digest }}
{{- printf "%s@%s" $repo $digest }}
{{- else }}
{{- printf "%s:%s" $repo ($c.tag | default $g.tag | default .root.Chart.AppVersion) }}
{{- end }}
{{- end }}

{{- define "tuneloop.imagePullPolicy" -}}
{{- $c := .image | default dict }}
{{- $c.pullPolicy | default .root.Values.image.pullPolicy }}
{{- end }}

{{- define "tuneloop.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "tuneloop.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "tuneloop.trainerServiceAccountName" -}}
{{- if .Values.trainer.serviceAccount.create }}
{{- default (include "tuneloop.componentName" (dict "root" . "name" "trainer")) .Values.trainer.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.trainer.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "tuneloop.apiKeysSecretName" -}}
{{- .Values.gateway.apiKeys.existingSecret | default (include "tuneloop.componentName" (dict "root" . "name" "api-keys")) }}
{{- end }}

{{- define "tuneloop.registryClaimName" -}}
{{- .Values.persistence.registry.existingClaim | default (include "tuneloop.componentName" (dict "root" . "name" "registry")) }}
{{- end }}

{{- define "tuneloop.storeClaimName" -}}
{{- .Values.persistence.store.existingClaim | default (include "tuneloop.componentName" (dict "root" . "name" "preferences")) }}
{{- end }}

{{/* "true" when store.root is an object-storage URL (s3://...): no store volume then, anywhere. */}}
{{- define "tuneloop.storeOnObjectStorage" -}}
{{- if hasPrefix "s3://" .Values.store.root }}true{{ end }}
{{- end }}

{{/* Where the preference store's Delta tables live, for every reader and writer: store.root when it
is a URL or a path inside the store volume, else the store volume's mountPath. */}}
{{- define "tuneloop.storeRoot" -}}
{{- $root := .Values.store.root }}
{{- $mount := .Values.persistence.store.mountPath | trimSuffix "/" }}
{{- if include "tuneloop.storeOnObjectStorage" . }}
{{- $root }}
{{- else if $root }}
{{- if not (or (eq ($root | trimSuffix "/") $mount) (hasPrefix (printf "%s/" $mount) $root)) }}
{{- fail (printf "store.root %q is neither an object-storage URL (s3://...) nor a folder inside the store volume (persistence.store.mountPath %q)" $root $mount) }}
{{- end }}
{{- $root }}
{{- else }}
{{- .Values.persistence.store.mountPath }}
{{- end }}
{{- end }}

{{/* EnvVars of every pod that reads or writes the preference store: TUNELOOP_STORE_ROOT and, on
object storage, the AWS_* settings delta-rs reads itself (YAML list; callers use fromYamlArray
or nindent). */}}
{{- define "tuneloop.storeEnv" -}}
- name: TUNELOOP_STORE_ROOT
  value: {{ include "tuneloop.storeRoot" . | quote }}
{{- if include "tuneloop.storeOnObjectStorage" . }}
{{- $o := .Values.store.objectStorage }}
{{- with $o.endpoint }}
- name: AWS_ENDPOINT_URL
  value: {{ . | quote }}
{{- end }}
{{- with $o.region }}
- name: AWS_REGION
  value: {{ . | quote }}
{{- end }}
{{- if $o.allowHttp }}
- name: AWS_ALLOW_HTTP
  value: "true"
{{- end }}
{{- /* Concurrent writers (the store replicas) commit safely only with conditional puts. */}}
- name: AWS_CONDITIONAL_PUT
  value: etag
{{- with $o.credentialsSecret }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: AWS_ACCESS_KEY_ID
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: AWS_SECRET_ACCESS_KEY
{{- end }}
{{- end }}
{{- end }}

{{- define "tuneloop.workbenchClaimName" -}}
{{- .Values.persistence.workbench.existingClaim | default (include "tuneloop.componentName" (dict "root" . "name" "workbench")) }}
{{- end }}

{{- define "tuneloop.runsClaimName" -}}
{{- .Values.persistence.runs.existingClaim | default (include "tuneloop.componentName" (dict "root" . "name" "runs")) }}
{{- end }}

{{/* gRPC target of a service inside the cluster, e.g. "tuneloop-generation:50051".
Args: (dict "root" $ "name" "generation") */}}
{{- define "tuneloop.grpcTarget" -}}
{{- printf "%s:%v" (include "tuneloop.componentName" .) (index .root.Values .name).port }}
{{- end }}

{{/* Env every container gets: Kafka, a writable HOME and caches (the root filesystem is
read-only), then the release-wide extraEnv. */}}
{{- define "tuneloop.commonEnv" -}}
- name: TUNELOOP_KAFKA_BOOTSTRAP_SERVERS
  value: {{ .Values.kafka.bootstrapServers | quote }}
- name: HOME
  value: /tmp
- name: XDG_CACHE_HOME
  value: /tmp/.cache
- name: HF_HOME
  value: /tmp/.cache/huggingface
- name: PYTHONDONTWRITEBYTECODE
  value: "1"
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Kafka login of one workload (TUNELOOP_KAFKA_SECURITY_PROTOCOL, SASL_* and the CA file) when
kafka.auth is on and the workload has a user in kafka.auth.users; nothing otherwise.
Args: (dict "root" $ "name" "feedback") */}}
{{- define "tuneloop.kafkaAuthEnv" -}}
{{- $a := .root.Values.kafka.auth }}
{{- $user := index $a.users .name | default "" }}
{{- if and $a.enabled $user }}
- name: TUNELOOP_KAFKA_SECURITY_PROTOCOL
  value: {{ $a.securityProtocol | quote }}
- name: TUNELOOP_KAFKA_SASL_MECHANISM
  value: {{ $a.saslMechanism | quote }}
- name: TUNELOOP_KAFKA_SASL_USERNAME
  value: {{ $user | quote }}
- name: TUNELOOP_KAFKA_SASL_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $user }}
      key: {{ $a.passwordKey }}
{{- if include "tuneloop.kafkaTls" . }}
- name: TUNELOOP_KAFKA_SSL_CAFILE
  value: {{ printf "%s/%s" (include "tuneloop.kafkaCaDir" .) $a.caSecret.key | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/* "true" when the workload logs in over TLS and so mounts the brokers' CA. Args as kafkaAuthEnv. */}}
{{- define "tuneloop.kafkaTls" -}}
{{- $a := .root.Values.kafka.auth }}
{{- if and $a.enabled (index $a.users .name) (hasSuffix "SSL" $a.securityProtocol) }}true{{ end }}
{{- end }}

{{/* Not under /etc/tuneloop: the trainer mounts its config there, and a mount inside another
volume is fragile. */}}
{{- define "tuneloop.kafkaCaDir" -}}
/etc/kafka/ca
{{- end }}

{{/* The CA's volumeMount and volume (YAML lists; empty without TLS). Args as kafkaAuthEnv. */}}
{{- define "tuneloop.kafkaCaMount" -}}
{{- if include "tuneloop.kafkaTls" . }}
- name: kafka-ca
  mountPath: {{ include "tuneloop.kafkaCaDir" . }}
  readOnly: true
{{- end }}
{{- end }}

{{- define "tuneloop.kafkaCaVolume" -}}
{{- if include "tuneloop.kafkaTls" . }}
{{- $ca := .root.Values.kafka.auth.caSecret }}
- name: kafka-ca
  secret:
    secretName: {{ $ca.name }}
    items:
      - key: {{ $ca.key }}
        path: {{ $ca.key }}
{{- end }}
{{- end }}

{{- define "tuneloop.tmpVolume" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.tmp.sizeLimit }}
{{- end }}
