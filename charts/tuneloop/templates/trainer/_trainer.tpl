{{/* The retrain Job spec, shared by the CronJob's jobTemplate, the one-off Job and the
JobSet's replicated Job (trainer.workload=jobset). */}}
{{- define "tuneloop.trainer.jobSpec" -}}
{{- $t := .Values.trainer }}
{{- $ctx := dict "root" . "name" "trainer" }}
{{- $shm := and $t.shmSize (ne (toString $t.shmSize) "0") }}
{{- $storeVolume := not (include "tuneloop.storeOnObjectStorage" .) }}
{{- $nodes := int $t.nodes }}
{{- $perNode := int $t.processesPerNode }}
{{- $jobset := include "tuneloop.trainer.onJobSet" . }}
{{- if gt $nodes 1 }}
# One pod per node; pod 0 runs the pipeline and hosts the torchrun rendezvous, found at its
# stable name: <job>-0.<headless service>, or in a JobSet <jobset>-<replicated job>-0-0.<jobset>.
completionMode: Indexed
completions: {{ $nodes }}
parallelism: {{ $nodes }}
{{- end }}
backoffLimit: {{ $t.backoffLimit }}
activeDeadlineSeconds: {{ $t.activeDeadlineSeconds }}
{{- if not $jobset }}
ttlSecondsAfterFinished: {{ $t.ttlSecondsAfterFinished }}
{{- end }}
# A preempted or drained GPU node is not the run's fault: retry without spending the backoff.
podFailurePolicy:
  rules:
    - action: Ignore
      onPodConditions:
        - type: DisruptionTarget
          status: "True"
template:
  metadata:
    labels:
      {{- include "tuneloop.selectorLabels" $ctx | nindent 6 }}
      {{- with $t.podLabels }}
      {{- toYaml . | nindent 6 }}
      {{- end }}
    annotations:
      checksum/config: {{ include (print .Template.BasePath "/trainer/configmap.yaml") . | sha256sum }}
      {{- with $t.podAnnotations }}
      {{- toYaml . | nindent 6 }}
      {{- end }}
  spec:
    restartPolicy: Never
    {{- if and (gt $nodes 1) (not $jobset) }}
    subdomain: {{ include "tuneloop.componentName" $ctx }}
    {{- end }}
    serviceAccountName: {{ include "tuneloop.trainerServiceAccountName" . }}
    # The token is only needed to record the promoted version on the run's own Job.
    automountServiceAccountToken: {{ $t.rbac.create }}
    {{- with .Values.imagePullSecrets }}
    imagePullSecrets:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    securityContext:
      {{- toYaml .Values.podSecurityContext | nindent 6 }}
    {{- with $t.priorityClassName }}
    priorityClassName: {{ . }}
    {{- end }}
    {{- with $t.nodeSelector }}
    nodeSelector:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    {{- with $t.tolerations }}
    tolerations:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    {{- with $t.affinity }}
    affinity:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    containers:
      - name: trainer
        image: {{ include "tuneloop.image" (dict "root" . "image" $t.image) | quote }}
        imagePullPolicy: {{ include "tuneloop.imagePullPolicy" (dict "root" . "image" $t.image) }}
        args:
          - train
          - retrain
          - --config
          - /etc/tuneloop/retrain.yaml
          {{- range $t.extraArgs }}
          - {{ . | quote }}
          {{- end }}
        env:
          {{- include "tuneloop.commonEnv" . | nindent 10 }}
          {{- include "tuneloop.kafkaAuthEnv" $ctx | nindent 10 }}
          - name: TUNELOOP_REGISTRY_ROOT
            value: {{ .Values.persistence.registry.mountPath | quote }}
          {{- include "tuneloop.storeEnv" . | nindent 10 }}
          {{- with .Values.metrics.pushgateway.url }}
          - name: TUNELOOP_TRAINER_PUSHGATEWAY
            value: {{ . | quote }}
          {{- end }}
          # Run folders outlive the pod: the Job's next pod resumes the run from its checkpoint.
          - name: TUNELOOP_TRAINER_RUNS_DIR
            value: {{ .Values.persistence.runs.mountPath | quote }}
          # Where the run records its promoted version (annotation tuneloop.dev/promoted-version).
          - name: TUNELOOP_TRAINER_JOB_NAME
            valueFrom:
              fieldRef:
                fieldPath: metadata.labels['batch.kubernetes.io/job-name']
          - name: TUNELOOP_TRAINER_JOB_NAMESPACE
            valueFrom:
              fieldRef:
                fieldPath: metadata.namespace
          {{- if gt (mul $nodes $perNode) 1 }}
          # retrain starts its training stage under torchrun on these processes.
          - name: TUNELOOP_TRAINER_PROCESSES_PER_NODE
            value: {{ $perNode | quote }}
          {{- end }}
          {{- if gt $nodes 1 }}
          - name: TUNELOOP_TRAINER_NODES
            value: {{ $nodes | quote }}
          - name: TUNELOOP_TRAINER_NODE_RANK
            valueFrom:
              fieldRef:
                fieldPath: metadata.annotations['batch.kubernetes.io/job-completion-index']
          {{- if $jobset }}
          # The JobSet controller names its headless Service (the pods' subdomain) after the
          # JobSet, and its replicated Job's pods <jobset>-<replicated job>-<job index>-<pod index>.
          - name: JOBSET_NAME
            valueFrom:
              fieldRef:
                fieldPath: metadata.labels['jobset.sigs.k8s.io/jobset-name']
          - name: TUNELOOP_TRAINER_RENDEZVOUS_ENDPOINT
            value: {{ printf "$(JOBSET_NAME)-%s-0-0.$(JOBSET_NAME):%d" (include "tuneloop.trainer.replicatedJob" .) (int $t.rendezvousPort) | quote }}
          {{- else }}
          - name: TUNELOOP_TRAINER_RENDEZVOUS_ENDPOINT
            value: {{ printf "$(TUNELOOP_TRAINER_JOB_NAME)-0.%s:%d" (include "tuneloop.componentName" $ctx) (int $t.rendezvousPort) | quote }}
          {{- end }}
          # Unique per Job, also when a Job of the same name is made again.
          - name: TUNELOOP_TRAINER_RENDEZVOUS_ID
            valueFrom:
              fieldRef:
                fieldPath: metadata.labels['batch.kubernetes.io/controller-uid']
          - name: TUNELOOP_TRAINER_LOCAL_ADDR
            valueFrom:
              fieldRef:
                fieldPath: status.podIP
          {{- end }}
          {{- with $t.extraEnv }}
          {{- toYaml . | nindent 10 }}
          {{- end }}
        {{- if gt $nodes 1 }}
        ports:
          - name: rendezvous
            containerPort: {{ $t.rendezvousPort }}
            protocol: TCP
        {{- end }}
        resources:
          {{- include "tuneloop.trainer.resources" . | nindent 10 }}
        securityContext:
          {{- toYaml .Values.securityContext | nindent 10 }}
        volumeMounts:
          - name: tmp
            mountPath: /tmp
          {{- include "tuneloop.kafkaCaMount" $ctx | nindent 10 }}
          {{- if $shm }}
          - name: dshm
            mountPath: /dev/shm
          {{- end }}
          - name: config
            mountPath: /etc/tuneloop
            readOnly: true
          - name: registry
            mountPath: {{ .Values.persistence.registry.mountPath }}
          {{- if $storeVolume }}
          - name: store
            mountPath: {{ .Values.persistence.store.mountPath }}
            readOnly: true
          {{- end }}
          - name: runs
            mountPath: {{ .Values.persistence.runs.mountPath }}
    volumes:
      {{- include "tuneloop.tmpVolume" . | nindent 6 }}
      {{- include "tuneloop.kafkaCaVolume" $ctx | nindent 6 }}
      {{- if $shm }}
      - name: dshm
        emptyDir:
          medium: Memory
          sizeLimit: {{ include "tuneloop.trainer.shmSize" . }}
      {{- end }}
      - name: config
        configMap:
          name: {{ include "tuneloop.componentName" $ctx }}
      - name: registry
        persistentVolumeClaim:
          claimName: {{ include "tuneloop.registryClaimName" . }}
      {{- if $storeVolume }}
      - name: store
        persistentVolumeClaim:
          claimName: {{ include "tuneloop.storeClaimName" . }}
          readOnly: true
      {{- end }}
      - name: runs
        persistentVolumeClaim:
          claimName: {{ include "tuneloop.runsClaimName" . }}
{{- end }}

{{/* trainer.resources, with its GPUs (nvidia.com/gpu, amd.com/gpu: per process) times processesPerNode. */}}
{{- define "tuneloop.trainer.resources" -}}
{{- $t := .Values.trainer }}
{{- $perNode := int $t.processesPerNode }}
{{- if eq $perNode 1 }}
{{- toYaml $t.resources }}
{{- else }}
{{- $out := dict }}
{{- range $kind, $amounts := $t.resources }}
{{- $scaled := dict }}
{{- range $name, $amount := $amounts }}
{{- if hasSuffix "/gpu" $name }}
{{- $_ := set $scaled $name (mul (int $amount) $perNode) }}
{{- else }}
{{- $_ := set $scaled $name $amount }}
{{- end }}
{{- end }}
{{- $_ := set $out $kind $scaled }}
{{- end }}
{{- toYaml $out }}
{{- end }}
{{- end }}

{{/* /dev/shm for the pod: trainer.shmSize is per process (the collectives and the data
loaders of each process share it). The schema keeps it a whole number of Ki, Mi or Gi. */}}
{{- define "tuneloop.trainer.shmSize" -}}
{{- $t := .Values.trainer }}
{{- if kindIs "string" $t.shmSize }}
{{- $amount := regexFind "^[0-9]+" $t.shmSize }}
{{- printf "%d%s" (mul (int64 $amount) (int64 $t.processesPerNode)) (trimPrefix $amount $t.shmSize) }}
{{- else }}
{{- mul (int64 $t.shmSize) (int64 $t.processesPerNode) }}
{{- end }}
{{- end }}

{{/* "true" when the retrain runs as a JobSet (trainer.workload), empty otherwise. */}}
{{- define "tuneloop.trainer.onJobSet" -}}
{{- if eq (toString (.Values.trainer.workload | default "job")) "jobset" }}true{{ end }}
{{- end }}

{{/* The JobSet's one replicated Job: its name is part of every pod's hostname. */}}
{{- define "tuneloop.trainer.replicatedJob" -}}
node
{{- end }}
