"""The `kubernetes` backend: every instance is a pod, reached through a relay on this host.

A hutch node (`hutch node`, or `hutch serve`) asks the Kubernetes API for one pod per instance:
the hutch image running the agent, listening on TCP (`--listen 0.0.0.0:<agent_port>`), as the
sandbox user (uid 1000), under a RuntimeClass (`gvisor`, `kata`) when one is configured. What the
pod gets, and why, is in `build_pod`:

- no service account token (`automountServiceAccountToken: false`) and no service links: nothing
  in the pod can talk to the API server as anybody, or learn the cluster's services;
- non-root, read-only root file system, every capability dropped, no privilege escalation, the
  runtime's default seccomp profile: the `restricted` Pod Security Standard holds;
- the `Resources` as requests = limits (Guaranteed QoS): cpu, memory (the `/tmp` tmpfs counts in
  it, as under bwrap), the workspace's size as an emptyDir limit and ephemeral storage; pids as
  RLIMIT_NPROC where the pod has a kernel or uid range of its own (a RuntimeClass, or
  `user_namespace`: otherwise uid 1000 is shared by every pod of the node and so is the limit);
  the wall-clock cap as `activeDeadlineSeconds`;
- `build_network_policy`: one NetworkPolicy for all sandbox pods denies every egress (DNS
  included) and lets in only hutch's node pods, on the agent's port.

The contract stays the one of `hutch.runtime.base`: the only channel to an instance is a Unix
socket on this host (`<data>/instances/<id>/run/agent.sock`). Here that socket is a `Relay`, an
asyncio listener in the hutch process that pipes each connection to the pod's agent at
podIP:agent_port, so the scheduler, the gateway and the readiness probe work unchanged.

Pods are found by labels: `hutch.dev/owner` (this node) and `hutch.dev/instance`. A local record
(`instance.json`, the format the other backends write, so `MultiRuntime` knows to adopt with this
backend after a restart) keeps what changes while the pod runs (the workspace key). Deaths are
seen by a watch on this node's pods (a pod that failed, finished, or was deleted by anyone but
hutch is a crash). Statistics come from the pod's cgroup on the host (`cgroup_root`: the host's
`/sys/fs/cgroup`, mounted into the node pod), which only works for pods on this node: pods are
pinned to it (`nodeName`) when `node_name` is known.

Workspaces: an emptyDir by default (it dies with the pod: `persistWorkspace` and recovery after
a crash get a fresh one). With `workspace_claim` (a ReadWriteMany PVC, e.g. JuiceFS's CSI driver)
whose file system this host's workspace store also has at `workspace_root`, the store attaches the
workspace as usual and the pod mounts the claim with the workspace's path as `subPath`; a rename
at warm-pool claim keeps the pod's bind (it follows the directory).

The Kubernetes client (`lightkube`, the `kubernetes` extra) is imported only when this backend is
made; without it, or without a cluster configuration, `make_runtime` raises `BackendUnavailable`.

Modules: `pods.py` (the pod and NetworkPolicy builders, reading a pod's state; pure), `relay.py`
(`Relay`), `runtime.py` (`KubernetesRuntime`: the API calls, the watch, adoption).
"""
