{{/*
The objects every long-running service has: Deployment, Service, HPA, PDB, ServiceMonitor.
Each service's own template files call these with its name and what is particular to it:
  root   $
  name   "generation" | "reward" | "feedback" | "store" | "gateway"
  http   true for the gateway (an HTTP serving port and HTTP probes)
  args   extra CLI arguments
  env    extra EnvVars (list of dicts)
  mounts any of "registry" (read-only), "registry-rw" (the gateway's promote and roll back),
         "store" (read-write), "store-ro", "runs-ro", "api-keys",
         "workbench" (the projects ConfigMap and the state volume); the store volume only when
         store.root is not an object-storage URL (tuneloop.storeOnObjectStorage)
*/}}

{{- define "tuneloop.deployment" -}}
{{- $root := .root }}
{{- $name := .name }}
{{- $v := index $root.Values $name }}
{{- $ctx := dict "root" $root "name" $name }}
{{- $mounts := .mounts | default list }}
{{- $shm := and $v.shmSize (ne (toString $v.shmSize) "0") }}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ include "tuneloop.componentName" $ctx }}
  labels:
    {{- include "tuneloop.labels" $ctx | nindent 4 }}
spec:
  {{- if not $v.autoscaling.enabled }}
  replicas: {{ $v.replicas }}
  {{- end }}
  revisionHistoryLimit: 5
  selector:
    matchLabels:
      {{- include "tuneloop.selectorLabels" $ctx | nindent 6 }}
  {{- /* The store rolls like the others: its replicas share the partitions in one consumer
  group, and Delta refuses the second of two commits for one partition (a rebalance's overlap). */}}
  strategy:
    type: RollingUpdate
    rollingUpdate:
      maxUnavailable: 0
      maxSurge: 1
  template:
    metadata:
      labels:
        {{- include "tuneloop.selectorLabels" $ctx | nindent 8 }}
        {{- with $v.podLabels }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- if or (has "api-keys" $mounts) $v.podAnnotations }}
      annotations:
        {{- if has "api-keys" $mounts }}
        checksum/api-keys: {{ include (print $root.Template.BasePath "/gateway/secret-api-keys.yaml") $root | sha256sum }}
        {{- end }}
        {{- with $v.podAnnotations }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- end }}
    spec:
      serviceAccountName: {{ include "tuneloop.serviceAccountName" $root }}
      # Services never call the Kubernetes API.
      automountServiceAccountToken: false
      {{- with $root.Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      securityContext:
        {{- toYaml $root.Values.podSecurityContext | nindent 8 }}
      {{- with $v.priorityClassName }}
      priorityClassName: {{ . }}
      {{- end }}
      terminationGracePeriodSeconds: {{ $v.terminationGracePeriodSeconds }}
      {{- with $v.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $v.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $v.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $v.topologySpreadConstraints }}
      topologySpreadConstraints:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      containers:
        - name: {{ $name }}
          image: {{ include "tuneloop.image" (dict "root" $root "image" $v.image) | quote }}
          imagePullPolicy: {{ include "tuneloop.imagePullPolicy" (dict "root" $root "image" $v.image) }}
          args:
            - serve
            - {{ $name }}
            - --port
            - {{ $v.port | quote }}
            - --metrics-port
            - {{ $v.metricsPort | quote }}
            {{- range .args }}
            - {{ . | quote }}
            {{- end }}
            {{- range $v.extraArgs }}
            - {{ . | quote }}
            {{- end }}
          env:
            {{- include "tuneloop.commonEnv" $root | nindent 12 }}
            {{- include "tuneloop.kafkaAuthEnv" $ctx | nindent 12 }}
            {{- with .env }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
            {{- with $v.extraEnv }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          ports:
            {{- if .http }}
            - name: http
              containerPort: {{ $v.port }}
              protocol: TCP
            {{- else }}
            - name: grpc
              containerPort: {{ $v.port }}
              protocol: TCP
            {{- end }}
            - name: metrics
              containerPort: {{ $v.metricsPort }}
              protocol: TCP
          {{- if .http }}
          startupProbe:
            httpGet: {path: /healthz, port: http}
            {{- toYaml $v.probes.startup | nindent 12 }}
          livenessProbe:
            httpGet: {path: /healthz, port: http}
            {{- toYaml $v.probes.liveness | nindent 12 }}
          readinessProbe:
            httpGet: {path: /readyz, port: http}
            {{- toYaml $v.probes.readiness | nindent 12 }}
          {{- else }}
          startupProbe:
            grpc: {port: {{ $v.port }}}
            {{- toYaml $v.probes.startup | nindent 12 }}
          livenessProbe:
            grpc: {port: {{ $v.port }}}
            {{- toYaml $v.probes.liveness | nindent 12 }}
          readinessProbe:
            grpc: {port: {{ $v.port }}}
            {{- toYaml $v.probes.readiness | nindent 12 }}
          {{- end }}
          resources:
            {{- toYaml $v.resources | nindent 12 }}
          securityContext:
            {{- toYaml $root.Values.securityContext | nindent 12 }}
          volumeMounts:
            - name: tmp
              mountPath: /tmp
            {{- include "tuneloop.kafkaCaMount" $ctx | nindent 12 }}
            {{- if $shm }}
            - name: dshm
              mountPath: /dev/shm
            {{- end }}
            {{- if or (has "registry" $mounts) (has "registry-rw" $mounts) }}
            - name: registry
              mountPath: {{ $root.Values.persistence.registry.mountPath }}
              {{- if not (has "registry-rw" $mounts) }}
              readOnly: true
              {{- end }}
            {{- end }}
            {{- if or (has "store" $mounts) (has "store-ro" $mounts) }}
            - name: store
              mountPath: {{ $root.Values.persistence.store.mountPath }}
              {{- if has "store-ro" $mounts }}
              readOnly: true
              {{- end }}
            {{- end }}
            {{- if has "runs-ro" $mounts }}
            - name: runs
              mountPath: {{ $root.Values.persistence.runs.mountPath }}
              readOnly: true
            {{- end }}
            {{- if has "workbench" $mounts }}
            - name: workbench
              mountPath: /etc/tuneloop/workbench
              readOnly: true
            - name: workbench-state
              mountPath: {{ $root.Values.persistence.workbench.mountPath }}
            {{- end }}
            {{- if has "api-keys" $mounts }}
            - name: api-keys
              mountPath: /etc/tuneloop/api-keys
              readOnly: true
            {{- end }}
      volumes:
        {{- include "tuneloop.tmpVolume" $root | nindent 8 }}
        {{- include "tuneloop.kafkaCaVolume" $ctx | nindent 8 }}
        {{- if $shm }}
        - name: dshm
          emptyDir:
            medium: Memory
            sizeLimit: {{ $v.shmSize }}
        {{- end }}
        {{- if or (has "registry" $mounts) (has "registry-rw" $mounts) }}
        - name: registry
          persistentVolumeClaim:
            claimName: {{ include "tuneloop.registryClaimName" $root }}
            {{- if not (has "registry-rw" $mounts) }}
            readOnly: true
            {{- end }}
        {{- end }}
        {{- if or (has "store" $mounts) (has "store-ro" $mounts) }}
        - name: store
          persistentVolumeClaim:
            claimName: {{ include "tuneloop.storeClaimName" $root }}
            {{- if has "store-ro" $mounts }}
            readOnly: true
            {{- end }}
        {{- end }}
        {{- if has "runs-ro" $mounts }}
        - name: runs
          persistentVolumeClaim:
            claimName: {{ include "tuneloop.runsClaimName" $root }}
            readOnly: true
        {{- end }}
        {{- if has "workbench" $mounts }}
        - name: workbench
          configMap:
            name: {{ include "tuneloop.componentName" (dict "root" $root "name" "workbench") }}
        - name: workbench-state
          persistentVolumeClaim:
            claimName: {{ include "tuneloop.workbenchClaimName" $root }}
        {{- end }}
        {{- if has "api-keys" $mounts }}
        - name: api-keys
          secret:
            secretName: {{ include "tuneloop.apiKeysSecretName" $root }}
            defaultMode: 0440
            # Only the keys file (hashes); never the plain bootstrap key.
            items:
              - key: {{ $root.Values.gateway.apiKeys.secretKey }}
                path: {{ $root.Values.gateway.apiKeys.secretKey }}
        {{- end }}
{{- end }}

{{- define "tuneloop.service" -}}
{{- $v := index .root.Values .name }}
{{- $ctx := dict "root" .root "name" .name }}
apiVersion: v1
kind: Service
metadata:
  name: {{ include "tuneloop.componentName" $ctx }}
  labels:
    {{- include "tuneloop.labels" $ctx | nindent 4 }}
  {{- with $v.service.annotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  type: {{ $v.service.type }}
  selector:
    {{- include "tuneloop.selectorLabels" $ctx | nindent 4 }}
  ports:
    {{- if .http }}
    - name: http
      port: {{ $v.port }}
      targetPort: http
      protocol: TCP
      appProtocol: http
    {{- else }}
    - name: grpc
      port: {{ $v.port }}
      targetPort: grpc
      protocol: TCP
      appProtocol: grpc
    {{- end }}
    - name: metrics
      port: {{ $v.metricsPort }}
      targetPort: metrics
      protocol: TCP
      appProtocol: http
{{- end }}

{{- define "tuneloop.hpa" -}}
{{- $v := index .root.Values .name }}
{{- $ctx := dict "root" .root "name" .name }}
{{- if $v.autoscaling.enabled }}
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata:
  name: {{ include "tuneloop.componentName" $ctx }}
  labels:
    {{- include "tuneloop.labels" $ctx | nindent 4 }}
spec:
  scaleTargetRef:
    apiVersion: apps/v1
    kind: Deployment
    name: {{ include "tuneloop.componentName" $ctx }}
  minReplicas: {{ $v.autoscaling.minReplicas }}
  maxReplicas: {{ $v.autoscaling.maxReplicas }}
  metrics:
    - type: Resource
      resource:
        name: cpu
        target:
          type: Utilization
          averageUtilization: {{ $v.autoscaling.targetCPUUtilizationPercentage }}
    {{- with $v.autoscaling.customMetric }}
    {{- if .name }}
    - type: Pods
      pods:
        metric:
          name: {{ .name }}
        target:
          type: AverageValue
          averageValue: {{ .targetAverageValue | quote }}
    {{- end }}
    {{- end }}
{{- end }}
{{- end }}

{{- define "tuneloop.pdb" -}}
{{- $v := index .root.Values .name }}
{{- $ctx := dict "root" .root "name" .name }}
{{- if $v.pdb.enabled }}
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ include "tuneloop.componentName" $ctx }}
  labels:
    {{- include "tuneloop.labels" $ctx | nindent 4 }}
spec:
  {{- if hasKey $v.pdb "minAvailable" }}
  minAvailable: {{ $v.pdb.minAvailable }}
  {{- else }}
  maxUnavailable: {{ $v.pdb.maxUnavailable }}
  {{- end }}
  selector:
    matchLabels:
      {{- include "tuneloop.selectorLabels" $ctx | nindent 6 }}
{{- end }}
{{- end }}

{{- define "tuneloop.serviceMonitor" -}}
{{- $ctx := dict "root" .root "name" .name }}
{{- $sm := .root.Values.metrics.serviceMonitor }}
{{- if $sm.enabled }}
apiVersion: monitoring.coreos.com/v1
kind: ServiceMonitor
metadata:
  name: {{ include "tuneloop.componentName" $ctx }}
  labels:
    {{- include "tuneloop.labels" $ctx | nindent 4 }}
    {{- with $sm.labels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  selector:
    matchLabels:
      {{- include "tuneloop.selectorLabels" $ctx | nindent 6 }}
  endpoints:
    - port: metrics
      # Keep the metrics' own `service` label (the gRPC service) instead of renaming it to
      # exported_service in favour of the Kubernetes Service name.
      honorLabels: true
      path: /metrics
      interval: {{ $sm.interval }}
      scrapeTimeout: {{ $sm.scrapeTimeout }}
{{- end }}
{{- end }}
