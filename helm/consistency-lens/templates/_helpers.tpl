{{/* Chart name, capped at 63 characters. */}}
{{- define "consistency-lens.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Object name prefix: the release name (the launcher names releases after run.name). Capped at 52 characters because
the operator names pods and services `<name>-worker-<N>`, which must stay a 63-character DNS label.
*/}}
{{- define "consistency-lens.fullname" -}}
{{- default .Release.Name .Values.fullnameOverride | trunc 52 | trimSuffix "-" -}}
{{- end -}}

{{- define "consistency-lens.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "consistency-lens.selectorLabels" -}}
app.kubernetes.io/name: {{ include "consistency-lens.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "consistency-lens.labels" -}}
helm.sh/chart: {{ include "consistency-lens.chart" . }}
{{ include "consistency-lens.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: consistency-lens
{{- end -}}

{{- define "consistency-lens.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "consistency-lens.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "consistency-lens.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/*
Cross-field checks the schema cannot express. Each names the bad key; one `fail` prints them all.
*/}}
{{- define "consistency-lens.validateValues" -}}
{{- $errors := list -}}
{{- $w := .Values.workers -}}
{{- if not (and (le (int $w.minReplicas) (int $w.replicas)) (le (int $w.replicas) (int $w.maxReplicas))) -}}
{{- $errors = append $errors (printf "workers: need minReplicas (%d) <= replicas (%d) <= maxReplicas (%d)" (int $w.minReplicas) (int $w.replicas) (int $w.maxReplicas)) -}}
{{- end -}}
{{- if gt (int .Values.dump.parallelism) (int .Values.dump.completions) -}}
{{- $errors = append $errors (printf "dump.parallelism (%d) must be <= dump.completions (%d)" (int .Values.dump.parallelism) (int .Values.dump.completions)) -}}
{{- end -}}
{{- range $name, $_ := .Values.extraEnv -}}
{{- if or (hasPrefix "PET_" $name) (hasPrefix "MASTER_" $name) (has $name (list "WORLD_SIZE" "RANK" "LOCAL_RANK" "NODE_RANK" "LOCAL_WORLD_SIZE" "GROUP_RANK" "TORCHELASTIC_RUN_ID")) -}}
{{- $errors = append $errors (printf "extraEnv.%s: set by the training operator or torchrun, not by the chart" $name) -}}
{{- end -}}
{{- $value := get $.Values.extraEnv $name -}}
{{- if not (kindIs "map" $value) -}}
{{- if include "consistency-lens.credentialName" $name -}}
{{- $errors = append $errors (printf "extraEnv.%s: looks like a credential (*TOKEN*, *SECRET*, *PASSWORD*, *_KEY); keep it in a Secret: secrets.* (W&B, HF, AWS) or extraEnv.%s.valueFrom.secretKeyRef {name, key}" $name $name) -}}
{{- else if include "consistency-lens.urlWithCredentials" $value -}}
{{- $errors = append $errors (printf "extraEnv.%s: a URL with user:password@; keep credentials in a Secret (extraEnv.%s.valueFrom.secretKeyRef)" $name $name) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if include "consistency-lens.urlWithCredentials" .Values.storage.endpointUrl -}}
{{- $errors = append $errors "storage.endpointUrl: a URL with user:password@; give S3 credentials with secrets.aws.existingSecret (or a ServiceAccount for IRSA)" -}}
{{- end -}}
{{- if and .Values.modelCache.hostPath .Values.modelCache.persistentVolumeClaim -}}
{{- $errors = append $errors "modelCache: set hostPath or persistentVolumeClaim, not both (one volume holds the local copy of the model)" -}}
{{- end -}}
{{- if $errors -}}
{{- fail (printf "\nVALUES VALIDATION:\n%s" (join "\n" $errors)) -}}
{{- end -}}
{{- end -}}

{{/* "true" when an env var name looks like a credential: its value belongs in a Secret. */}}
{{- define "consistency-lens.credentialName" -}}
{{- $n := upper . -}}
{{- if or (contains "TOKEN" $n) (contains "SECRET" $n) (contains "PASSWORD" $n) (contains "PASSWD" $n) (hasSuffix "_KEY" $n) (and (hasPrefix "AWS_" $n) (contains "KEY" $n)) -}}
true
{{- end -}}
{{- end -}}

{{/* "true" when a value is a URL carrying user:password@ (it would be stored in the manifest and the ConfigMap). */}}
{{- define "consistency-lens.urlWithCredentials" -}}
{{- if regexMatch "^[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*@" (toString .) -}}
true
{{- end -}}
{{- end -}}

{{/* Node selection: the spot preset merged with user nodeSelector. */}}
{{- define "consistency-lens.nodeSelector" -}}
{{- $presets := dict
  "none" (dict)
  "karpenter" (dict "karpenter.sh/capacity-type" "spot")
  "eks" (dict "eks.amazonaws.com/capacityType" "SPOT")
  "gke" (dict "cloud.google.com/gke-spot" "true") -}}
{{- $selector := merge (deepCopy .Values.nodeSelector) (get $presets .Values.spot.preset) -}}
{{- with $selector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/*
Tolerations: pods leave a not-ready/unreachable node after preemption.nodeLostTolerationSeconds (instead of
Kubernetes' 300 s), plus GPU nodes' usual taint, the GKE spot taint, and the user's.
Call with (dict "root" $ "gpus" N).
*/}}
{{- define "consistency-lens.tolerations" -}}
{{- $v := .root.Values -}}
{{- $list := list -}}
{{- range $key := list "node.kubernetes.io/not-ready" "node.kubernetes.io/unreachable" -}}
{{- $list = append $list (dict "key" $key "operator" "Exists" "effect" "NoExecute" "tolerationSeconds" (int $v.preemption.nodeLostTolerationSeconds)) -}}
{{- end -}}
{{- if gt (int .gpus) 0 -}}
{{- $list = append $list (dict "key" $v.gpuResource "operator" "Exists" "effect" "NoSchedule") -}}
{{- end -}}
{{- if eq $v.spot.preset "gke" -}}
{{- $list = append $list (dict "key" "cloud.google.com/gke-spot" "operator" "Equal" "value" "true" "effect" "NoSchedule") -}}
{{- end -}}
{{- range $name := keys $v.tolerations | sortAlpha -}}
{{- $list = append $list (get $v.tolerations $name) -}}
{{- end }}
tolerations:
  {{- toYaml $list | nindent 2 }}
{{- end -}}

{{/*
Pod-level fields shared by the trainer and the dump pods. Call with (dict "root" $ "component" NAME "gpus" N).
*/}}
{{- define "consistency-lens.podMeta" -}}
{{- $v := .root.Values -}}
labels:
  {{- include "consistency-lens.labels" .root | nindent 2 }}
  app.kubernetes.io/component: {{ .component }}
  {{- with $v.podLabels }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- $annotations := deepCopy $v.podAnnotations -}}
{{- if eq $v.spot.preset "karpenter" -}}
{{- /* Karpenter must not consolidate a node away under a running job; spot interruptions still happen. */ -}}
{{- $_ := set $annotations "karpenter.sh/do-not-disrupt" "true" -}}
{{- end -}}
{{- with $annotations }}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{- define "consistency-lens.podSpec" -}}
{{- $v := .root.Values -}}
serviceAccountName: {{ include "consistency-lens.serviceAccountName" .root }}
automountServiceAccountToken: false
terminationGracePeriodSeconds: {{ $v.preemption.terminationGracePeriodSeconds }}
{{- with $v.priorityClassName }}
priorityClassName: {{ . | quote }}
{{- end }}
securityContext:
  runAsNonRoot: true
  runAsUser: {{ $v.securityContext.runAsUser }}
  runAsGroup: {{ $v.securityContext.runAsGroup }}
  fsGroup: {{ $v.securityContext.fsGroup }}
  seccompProfile:
    type: RuntimeDefault
{{- with $v.imagePullSecrets }}
imagePullSecrets:
  {{- range . }}
  - name: {{ . | quote }}
  {{- end }}
{{- end }}
{{- include "consistency-lens.nodeSelector" .root }}
{{- include "consistency-lens.tolerations" . }}
{{- with $v.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
volumes:
  - name: config
    configMap:
      name: {{ include "consistency-lens.fullname" .root }}-config
  - name: shm
    emptyDir:
      medium: Memory
      sizeLimit: {{ $v.shmSize }}
  - name: tmp
    emptyDir: {}
  - name: cache
    emptyDir:
      sizeLimit: {{ $v.cacheSize }}
  {{- with $v.modelCache.hostPath }}
  - name: model-cache
    hostPath:
      path: {{ . | quote }}
      type: Directory
  {{- end }}
  {{- with $v.modelCache.persistentVolumeClaim }}
  - name: model-cache
    persistentVolumeClaim:
      claimName: {{ . | quote }}
  {{- end }}
{{- end -}}

{{/*
Container fields shared by the trainer and the dump containers: image, env (secrets by reference only), mounts,
security context, resources; for the trainer ("trainer" true) also the preemption hook. Call with
(dict "root" $ "gpus" N "resources" MAP "env" MAP "trainer" BOOL).

The preemption hook: kubelet runs preStop before it sends SIGTERM, and the grace period counts from its start.
The hook writes the flag (the trainer saves at its next step boundary and then removes the flag) and waits for
that, at most the grace period less 35 s: torchrun needs 30 s after SIGTERM to stop its workers. The trainer gets
the wait less 5 s as its save budget (LENS_PREEMPT_GRACE_S).
*/}}
{{- define "consistency-lens.container" -}}
{{- $v := .root.Values -}}
image: {{ include "consistency-lens.image" .root | quote }}
imagePullPolicy: {{ $v.image.pullPolicy }}
env:
  - name: LENS_RUN_NAME
    value: {{ $v.run.name | quote }}
  {{- if .trainer }}
  - name: LENS_PREEMPT_FLAG
    value: {{ $v.preemption.preStopFlag | quote }}
  - name: LENS_PREEMPT_GRACE_S
    value: {{ include "consistency-lens.preStopWait" .root | int | add -5 | quote }}
  # Each rendezvous round's rank 0 hosts a fresh store for the process group: a shared agent store keeps keys of
  # dead workers, and its address is cached per agent, which breaks when a replacement node becomes rank 0.
  - name: TORCH_DISABLE_SHARE_RDZV_TCP_STORE
    value: "1"
  {{- end }}
  {{- include "consistency-lens.cacheEnv" . | trim | nindent 2 }}
  {{- with $v.storage.endpointUrl }}
  - name: AWS_ENDPOINT_URL
    value: {{ . | quote }}
  {{- end }}
  {{- with $v.storage.region }}
  - name: AWS_REGION
    value: {{ . | quote }}
  {{- end }}
  {{- with $v.secrets.wandb.existingSecret }}
  - name: WANDB_API_KEY
    valueFrom:
      secretKeyRef:
        name: {{ . | quote }}
        key: {{ $v.secrets.wandb.apiKeyKey | quote }}
  {{- end }}
  {{- with $v.secrets.huggingface.existingSecret }}
  - name: HF_TOKEN
    valueFrom:
      secretKeyRef:
        name: {{ . | quote }}
        key: {{ $v.secrets.huggingface.tokenKey | quote }}
  {{- end }}
  {{- with $v.secrets.aws.existingSecret }}
  - name: AWS_ACCESS_KEY_ID
    valueFrom:
      secretKeyRef:
        name: {{ . | quote }}
        key: {{ $v.secrets.aws.accessKeyIdKey | quote }}
  - name: AWS_SECRET_ACCESS_KEY
    valueFrom:
      secretKeyRef:
        name: {{ . | quote }}
        key: {{ $v.secrets.aws.secretAccessKeyKey | quote }}
  {{- end }}
  {{- $extra := merge (default (dict) .env) $v.extraEnv }}
  {{- range $name := keys $extra | sortAlpha }}
  {{- $value := get $extra $name }}
  - name: {{ $name }}
    {{- if kindIs "map" $value }}
    valueFrom:
      {{- toYaml $value.valueFrom | nindent 6 }}
    {{- else }}
    value: {{ $value | toString | quote }}
    {{- end }}
  {{- end }}
volumeMounts:
  - name: config
    mountPath: /etc/lens
    readOnly: true
  - name: shm
    mountPath: /dev/shm
  - name: tmp
    mountPath: /tmp
  - name: cache
    mountPath: {{ include "consistency-lens.cacheDir" . }}
  {{- if or $v.modelCache.hostPath $v.modelCache.persistentVolumeClaim }}
  - name: model-cache
    mountPath: {{ include "consistency-lens.modelCacheDir" . }}
  {{- end }}
{{- if .trainer }}
{{- $flag := $v.preemption.preStopFlag }}
lifecycle:
  preStop:
    exec:
      # Runs before SIGTERM (pod deletion, spot drain): the trainer sees the flag, checkpoints and removes it.
      command: ["/bin/sh", "-c", {{ printf "date -u +%%s > %s; i=0; while [ -e %s ] && [ $i -lt %d ]; do sleep 1; i=$((i+1)); done" $flag $flag (include "consistency-lens.preStopWait" .root | int) | quote }}]
{{- end }}
securityContext:
  allowPrivilegeEscalation: false
  privileged: false
  readOnlyRootFilesystem: {{ $v.securityContext.readOnlyRootFilesystem }}
  capabilities:
    drop: ["ALL"]
{{- $resources := deepCopy .resources }}
{{- if gt (int .gpus) 0 }}
{{- $limits := default (dict) $resources.limits }}
{{- $_ := set $limits $v.gpuResource (int .gpus) }}
{{- $_ := set $resources "limits" $limits }}
{{- end }}
{{- with $resources }}
resources:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* Seconds the preStop hook waits for the trainer's preemption checkpoint (see consistency-lens.container). */}}
{{- define "consistency-lens.preStopWait" -}}
{{- sub .Values.preemption.terminationGracePeriodSeconds 35 -}}
{{- end -}}

{{/*
Where every program in the pods writes its caches and scratch files: the `cache` emptyDir, so the image's root
can stay read-only (securityContext.readOnlyRootFilesystem). LENS_SCRATCH holds metrics.jsonl, events.jsonl and the
W&B run folder of a run whose run.dir is remote; the trainer uploads them to run.dir (lens/tracking.py).
*/}}
{{- define "consistency-lens.cacheDir" -}}
/var/cache/lens
{{- end -}}

{{/* $LENS_CACHE/models: where lens keeps its local copy of the model mirror (lens/models/mirror.py). */}}
{{- define "consistency-lens.modelCacheDir" -}}
{{ include "consistency-lens.cacheDir" . }}/consistency-lens/models
{{- end -}}

{{- define "consistency-lens.cacheEnv" -}}
{{- $dir := include "consistency-lens.cacheDir" . -}}
{{- $vars := dict
  "HF_HOME" "huggingface"
  "LENS_CACHE" "consistency-lens"
  "LENS_SCRATCH" "run"
  "TORCHINDUCTOR_CACHE_DIR" "torchinductor"
  "TRITON_CACHE_DIR" "triton"
  "WANDB_CACHE_DIR" "wandb/cache"
  "WANDB_CONFIG_DIR" "wandb/config"
  "WANDB_DATA_DIR" "wandb/data"
  "WANDB_DIR" "wandb"
  "XDG_CACHE_HOME" "xdg" -}}
{{- range $name := keys $vars | sortAlpha }}
- name: {{ $name }}
  value: {{ printf "%s/%s" $dir (get $vars $name) | quote }}
{{- end }}
{{- end -}}
