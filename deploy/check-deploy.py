#!/usr/bin/env python3
"""Consistency checks of wsgate's deployment files, used by deploy/check.sh.

Subcommands (run from anywhere; paths are relative to the repository root):

  manifests          cross-checks of deploy/kubernetes/*.yaml: the native sidecar, its
                     security context, ports and probes, the ConfigMap's config (ports,
                     live reload), the termination sequence (wsgate's preStop
                     `drain --wait`, OpenObserve's preStop sleep, the [shutdown] timers
                     against terminationGracePeriodSeconds), the Service, the
                     PodMonitor and PrometheusRule (fields, port names, rules identical
                     to deploy/prometheus/wsgate-rules.yml), kustomization.yaml
  dockerfile         a lint of deploy/Dockerfile and /.dockerignore for what this
                     project needs (multi-stage, --locked build, non-root USER,
                     STOPSIGNAL, pinned runtime, COPY sources not ignored, ...)
  build-step         prints the builder's cargo command and the binary path the
                     runtime stage COPYs, relative to the repository root (tab-separated)
  extract-config OUT writes the ConfigMap's config.toml to OUT
  extract-rules OUT  writes the PrometheusRule's spec (a Prometheus rule file) to OUT

Needs PyYAML; TOML is read with tomllib (Python 3.11+) or tomli.
"""

import re
import shlex
import sys
from pathlib import Path

import yaml

try:
    import tomllib
except ImportError:  # Python < 3.11
    import tomli as tomllib  # type: ignore

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "deploy" / "kubernetes"
RULES = REPO / "deploy" / "prometheus" / "wsgate-rules.yml"
DOCKERFILE = REPO / "deploy" / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
CONTAINER_CONFIG = REPO / "deploy" / "config.container.toml"
EXAMPLE_CONFIG = REPO / "config.example.toml"

SIDECAR = "wsgate"
CONFIG_MAP = "wsgate-config"
CONFIG_KEY = "config.toml"

# Seconds OpenObserve must at least get between its SIGTERM (when its preStop sleep is
# over) and the SIGKILL at terminationGracePeriodSeconds, to flush its in-memory data
# and exit. wsgate needs none of the grace period after that: it is signalled once
# OpenObserve has exited, has no WebSocket left by then and exits in milliseconds
# (and the kubelet gives it at least 2 s anyway).
BACKEND_SHUTDOWN_MIN = 15


class Checker:
    def __init__(self, name):
        self.name = name
        self.problems = []
        self.passed = 0

    def check(self, ok, message):
        if ok:
            self.passed += 1
        else:
            self.problems.append(message)
        return ok

    def finish(self):
        if self.problems:
            for p in self.problems:
                print(f"FAIL {self.name}: {p}")
            print(f"{self.name}: {len(self.problems)} problem(s), {self.passed} check(s) passed")
            return 1
        print(f"{self.name}: ok ({self.passed} checks)")
        return 0


def load_yaml(path):
    with open(path, encoding="utf-8") as f:
        docs = [d for d in yaml.safe_load_all(f) if d is not None]
    if len(docs) != 1:
        raise SystemExit(f"{path}: expected one YAML document, found {len(docs)}")
    return docs[0]


def rel(path):
    return str(Path(path).relative_to(REPO))


# --- durations and addresses ----------------------------------------------------------

_UNITS = {
    "ns": 1e-9, "nsec": 1e-9,
    "us": 1e-6, "usec": 1e-6,
    "ms": 1e-3, "msec": 1e-3, "millis": 1e-3,
    "s": 1, "sec": 1, "secs": 1, "second": 1, "seconds": 1,
    "m": 60, "min": 60, "mins": 60, "minute": 60, "minutes": 60,
    "h": 3600, "hr": 3600, "hrs": 3600, "hour": 3600, "hours": 3600,
    "d": 86400, "day": 86400, "days": 86400,
}


def parse_duration(text):
    """Seconds in a humantime duration such as "25s", "1m", "1m 30s", "500ms"."""
    s = text.strip()
    if not s:
        raise ValueError(f"empty duration {text!r}")
    total, pos = 0.0, 0
    for m in re.finditer(r"\s*(\d+)\s*([a-z]+)\s*", s):
        if m.start() != pos or m.group(2) not in _UNITS:
            raise ValueError(f"not a duration: {text!r}")
        total += int(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if pos != len(s):
        raise ValueError(f"not a duration: {text!r}")
    return total


def addr_port(addr):
    """Port of an "IP:PORT" or "[IPv6]:PORT" socket address."""
    return int(addr.rsplit(":", 1)[1])


def addr_host(addr):
    return addr.rsplit(":", 1)[0].strip("[]")


def flatten(table, prefix=()):
    """{("section", "key"): value} of a TOML table."""
    out = {}
    for k, v in table.items():
        if isinstance(v, dict):
            out.update(flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


# --- manifests ------------------------------------------------------------------------


def wsgate_config_from_configmap(cm):
    text = (cm.get("data") or {}).get(CONFIG_KEY)
    if text is None:
        raise SystemExit(f"ConfigMap {CONFIG_MAP} has no data key {CONFIG_KEY}")
    return text


def probe_port(probe):
    for kind in ("httpGet", "tcpSocket", "grpc"):
        if kind in probe:
            return probe[kind].get("port")
    return None


def resolve_port(ref, ports_by_name):
    """A probe/Service port reference (name or number) as a number, or None."""
    if isinstance(ref, int):
        return ref
    if isinstance(ref, str) and ref.isdigit():
        return int(ref)
    return ports_by_name.get(ref)


def cmd_manifests():
    c = Checker("manifests")
    dep = load_yaml(K8S / "deployment.yaml")
    cm = load_yaml(K8S / "configmap.yaml")
    svc = load_yaml(K8S / "service.yaml")
    pm = load_yaml(K8S / "podmonitor.yaml")
    pr = load_yaml(K8S / "prometheusrule.yaml")
    kust = load_yaml(K8S / "kustomization.yaml")

    # kustomization lists every manifest, and only existing ones; no generator.
    manifests = sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    resources = kust.get("resources") or []
    c.check(sorted(resources) == manifests,
            f"kustomization.yaml resources {sorted(resources)} != files {manifests}")
    c.check("configMapGenerator" not in kust, "kustomization.yaml must keep the plain ConfigMap")

    # Kinds and names.
    for doc, api, kind in ((dep, "apps/v1", "Deployment"), (cm, "v1", "ConfigMap"),
                           (svc, "v1", "Service"),
                           (pm, "monitoring.coreos.com/v1", "PodMonitor"),
                           (pr, "monitoring.coreos.com/v1", "PrometheusRule")):
        c.check(doc.get("apiVersion") == api and doc.get("kind") == kind,
                f"expected {api} {kind}, found {doc.get('apiVersion')} {doc.get('kind')}")
        c.check(bool((doc.get("metadata") or {}).get("name")), f"{kind} has no metadata.name")
    c.check(cm["metadata"]["name"] == CONFIG_MAP, f"ConfigMap must be named {CONFIG_MAP}")

    tpl = dep["spec"]["template"]
    pod = tpl["spec"]
    pod_labels = tpl["metadata"].get("labels") or {}
    annotations = tpl["metadata"].get("annotations") or {}
    sel = dep["spec"]["selector"].get("matchLabels") or {}
    c.check(sel and all(pod_labels.get(k) == v for k, v in sel.items()),
            "Deployment selector does not match the pod template labels")

    # The native sidecar.
    inits = {x["name"]: x for x in pod.get("initContainers") or []}
    mains = {x["name"]: x for x in pod.get("containers") or []}
    if not c.check(SIDECAR in inits, f"no initContainer named {SIDECAR}"):
        return c.finish()
    ws = inits[SIDECAR]
    c.check(SIDECAR not in mains, f"{SIDECAR} must not also be a regular container")
    c.check(ws.get("restartPolicy") == "Always",
            "wsgate must be a native sidecar: initContainers[].restartPolicy: Always")
    c.check(bool(ws.get("image")), "wsgate has no image")
    c.check(not str(ws.get("image", "")).endswith(":latest"), "wsgate image must not be :latest")
    ws_ports = {p["name"]: p["containerPort"] for p in ws.get("ports") or [] if "name" in p}
    c.check(set(ws_ports) >= {"http", "admin"},
            f"wsgate must name its ports http and admin, found {sorted(ws_ports)}")
    for probe in ("livenessProbe", "readinessProbe"):
        c.check(probe in ws, f"wsgate has no {probe}")
    expected_paths = {"livenessProbe": "/livez", "readinessProbe": "/readyz",
                      "startupProbe": ("/livez", "/readyz")}
    for probe, paths in expected_paths.items():
        if probe not in ws:
            continue
        get = ws[probe].get("httpGet") or {}
        c.check(get.get("path") in (paths if isinstance(paths, tuple) else (paths,)),
                f"wsgate {probe} path {get.get('path')!r}, expected {paths}")
        port = resolve_port(probe_port(ws[probe]), ws_ports)
        c.check(port is not None and port == ws_ports.get("admin"),
                f"wsgate {probe} port {probe_port(ws[probe])!r} is not the admin port "
                f"{ws_ports.get('admin')}")
    sc = ws.get("securityContext") or {}
    for key, want in (("runAsNonRoot", True), ("runAsUser", 65532),
                      ("readOnlyRootFilesystem", True), ("allowPrivilegeEscalation", False)):
        c.check(sc.get(key) == want, f"wsgate securityContext.{key} must be {want!r}")
    c.check((sc.get("capabilities") or {}).get("drop") == ["ALL"],
            "wsgate securityContext.capabilities.drop must be [ALL]")
    seccomp = (sc.get("seccompProfile") or (pod.get("securityContext") or {}).get("seccompProfile")
               or {})
    c.check(seccomp.get("type") == "RuntimeDefault", "wsgate seccompProfile must be RuntimeDefault")
    res = ws.get("resources") or {}
    c.check(bool((res.get("requests") or {}).get("memory"))
            and bool((res.get("limits") or {}).get("memory")),
            "wsgate needs memory requests and limits")

    # The config file: mounted from the ConfigMap where --config points.
    args = ws.get("args") or []
    config_path = args[args.index("--config") + 1] if "--config" in args[:-1] else None
    c.check(config_path is not None, f"wsgate args {args} have no --config FILE")
    vols = {v["name"]: v for v in pod.get("volumes") or []}
    mounted = False
    for m in ws.get("volumeMounts") or []:
        v = vols.get(m["name"], {})
        if (v.get("configMap") or {}).get("name") == CONFIG_MAP and config_path:
            sub = m.get("subPath")
            target = m["mountPath"] if sub else f"{m['mountPath'].rstrip('/')}/{CONFIG_KEY}"
            mounted |= target == config_path and (sub in (None, CONFIG_KEY))
            c.check(sub is None, f"volumeMount {m['name']} uses subPath {sub!r}: the kubelet "
                    "never updates a subPath mount, so ConfigMap changes would not reach "
                    "wsgate's live reload; mount the ConfigMap as a directory")
    c.check(mounted, f"--config {config_path} is not the ConfigMap {CONFIG_MAP}'s {CONFIG_KEY}")

    # The ConfigMap's config against the pod. It is meant to be complete: every key
    # config.example.toml documents is set, so a new key gets a conscious value here.
    conf = tomllib.loads(wsgate_config_from_configmap(cm))
    example = flatten(tomllib.loads(EXAMPLE_CONFIG.read_text(encoding="utf-8")))
    missing = sorted(".".join(k) for k in set(example) - set(flatten(conf)))
    c.check(not missing, f"configmap.yaml's config.toml does not set {missing} "
            "(config.example.toml does): add them with a value for this pod")
    listen = conf.get("listen", "0.0.0.0:8080")
    admin_listen = (conf.get("admin") or {}).get("listen", "127.0.0.1:9090")
    c.check(addr_port(listen) == ws_ports.get("http"),
            f"config listen {listen} != container port http {ws_ports.get('http')}")
    c.check(admin_listen != "" and addr_port(admin_listen) == ws_ports.get("admin"),
            f"config admin.listen {admin_listen!r} != container port admin {ws_ports.get('admin')}")
    c.check(admin_listen != "" and addr_host(admin_listen) in ("0.0.0.0", "::"),
            f"config admin.listen {admin_listen!r} must listen on all interfaces for probes")
    c.check(addr_host(listen) in ("0.0.0.0", "::"),
            f"config listen {listen!r} must listen on all interfaces for the Service")
    c.check(((conf.get("log") or {}).get("format")) == "json", "config log.format should be json")
    backend = conf.get("backend", "http://127.0.0.1:5080")
    backend_url = re.fullmatch(r"http://(127\.0\.0\.1|localhost|\[::1\]):(\d+)/?", backend)
    backend_ports = {p["containerPort"] for x in mains.values() for p in x.get("ports") or []}
    c.check(backend_url is not None and int(backend_url.group(2)) in backend_ports,
            f"config backend {backend} is not a loopback port of a main container "
            f"{sorted(backend_ports)}")
    reload = parse_duration(conf.get("reload_interval", "10s"))
    c.check(reload > 0, "config reload_interval is 0s (SIGHUP only): nobody can send SIGHUP "
            "into the distroless container, so ConfigMap changes would never apply")

    # The termination sequence (deploy/README.md, "Rollouts: the termination sequence").
    # t=0: wsgate's preStop `wsgate drain --wait` begins the drain while OpenObserve still
    # serves, and OpenObserve's preStop sleep begins; WebSockets get their Close within
    # spread, each handshake over within close_timeout; OpenObserve gets SIGTERM when its
    # sleep is over, wsgate after OpenObserve has exited.
    shutdown = conf.get("shutdown") or {}
    drain = parse_duration(shutdown.get("drain_timeout", "25s"))
    spread = parse_duration(shutdown["spread"]) if "spread" in shutdown else drain / 5
    close = parse_duration((conf.get("websocket") or {}).get("close_timeout", "5s"))
    grace = pod.get("terminationGracePeriodSeconds", 30)
    closed_by = spread + close

    # wsgate's hook: an exec of the image's binary (distroless: no shell, no PATH
    # lookup), `drain --wait`, reading the admin address from the file the container runs
    # with (not --admin: one place for the port).
    hook = (ws.get("lifecycle") or {}).get("preStop") or {}
    if c.check(set(hook) == {"exec"}, f"wsgate's preStop must be an exec hook running "
               f"`wsgate drain --wait`, found {sorted(hook) or 'none'}: without it the drain "
               "starts at wsgate's SIGTERM, after OpenObserve has exited, and every browser "
               "gets 1014"):
        command = (hook.get("exec") or {}).get("command") or []
        binary = image_binary()
        c.check(command[:1] == [binary], f"wsgate's preStop runs {command[:1]}, not the "
                f"image's binary {binary} (deploy/Dockerfile ENTRYPOINT)")
        c.check(command[1:2] == ["drain"],
                f"wsgate's preStop {command} is not `wsgate drain`")
        options, hook_config, waits = command[2:], None, False
        while options:
            opt = options.pop(0)
            if opt == "--wait":
                waits = True
            elif opt == "--config" and options:
                hook_config = options.pop(0)
            else:
                if opt.startswith("--") and options and not options[0].startswith("--"):
                    opt += " " + options.pop(0)
                c.check(False, f"wsgate's preStop: unexpected argument {opt!r} in {command} "
                        "(only --wait and --config FILE)")
        c.check(waits, f"wsgate's preStop {command} lacks --wait: the hook must last until "
                "the WebSockets are closed (or the drain deadline) and fail visibly if it "
                "cannot")
        c.check(hook_config is not None and hook_config == config_path,
                f"wsgate's preStop reads --config {hook_config}, the container runs with "
                f"--config {config_path}: the hook must find the admin listener of that file")
    c.check(admin_listen != "" and addr_host(admin_listen) in ("0.0.0.0", "::", "127.0.0.1",
                                                               "::1"),
            f"config admin.listen {admin_listen!r}: `wsgate drain` must reach it over "
            "loopback (POST /drain is refused, 403, to any other peer)")

    # OpenObserve (the container the backend URL points at) keeps serving until every
    # close handshake is over: its preStop sleep delays its SIGTERM by >= spread +
    # close_timeout.
    backend_port = int(backend_url.group(2)) if backend_url else None
    backends = [x for x in mains.values()
                if any(p["containerPort"] == backend_port for p in x.get("ports") or [])]
    sleep = None
    if c.check(len(backends) == 1, f"no single main container serves the backend port "
               f"{backend_port}"):
        be = backends[0]
        be_hook = (be.get("lifecycle") or {}).get("preStop") or {}
        sleep = (be_hook.get("sleep") or {}).get("seconds")
        c.check(set(be_hook) == {"sleep"} and isinstance(sleep, int),
                f"container {be['name']} needs a preStop sleep action (lifecycle.preStop."
                f"sleep.seconds, Kubernetes 1.30+), found {sorted(be_hook) or 'none'}: it must "
                "keep serving while wsgate closes the WebSockets")
    if sleep is not None:
        c.check(sleep >= closed_by, f"OpenObserve's preStop sleep {sleep}s < shutdown.spread "
                f"{spread:g}s + websocket.close_timeout {close:g}s = {closed_by:g}s: it would "
                "get SIGTERM while WebSockets are still closing (they would end with 1014)")
        c.check(grace - sleep >= BACKEND_SHUTDOWN_MIN,
                f"terminationGracePeriodSeconds {grace} leaves OpenObserve {grace - sleep}s "
                f"after its preStop sleep of {sleep}s, below {BACKEND_SHUTDOWN_MIN}s for its "
                "own shutdown: raise the grace period")
    c.check(spread < drain, f"shutdown.spread {spread:g}s must be below drain_timeout "
            f"{drain:g}s")
    c.check(closed_by < drain, f"shutdown.spread {spread:g}s + websocket.close_timeout "
            f"{close:g}s = {closed_by:g}s must be below drain_timeout {drain:g}s: the drain "
            "deadline would reset connections still in their close handshake")
    c.check(drain < grace, f"shutdown.drain_timeout {drain:g}s must be strictly below "
            f"terminationGracePeriodSeconds {grace}: the preStop hook waits until that "
            "deadline at the latest and must end before the kubelet gives up on it")
    print(f"  termination: wsgate preStop `drain --wait` at t=0; Closes within spread "
          f"{spread:g}s, every handshake over by spread + close_timeout = {closed_by:g}s")
    if sleep is not None:
        print(f"  OpenObserve preStop sleep {sleep}s (>= {closed_by:g}s, margin "
              f"{sleep - closed_by:g}s): SIGTERM at t={sleep}s, {grace - sleep}s (>= "
              f"{BACKEND_SHUTDOWN_MIN}s) to exit before SIGKILL at t={grace}s")
    print(f"  drain deadline t={drain:g}s: {closed_by:g}s < drain_timeout {drain:g}s < "
          f"terminationGracePeriodSeconds {grace}; reload_interval {reload:g}s")

    # Prometheus annotations point at the admin port.
    c.check(annotations.get("prometheus.io/scrape") == "true", "prometheus.io/scrape != \"true\"")
    c.check(str(annotations.get("prometheus.io/port")) == str(ws_ports.get("admin")),
            f"prometheus.io/port {annotations.get('prometheus.io/port')!r} != admin port")
    c.check(annotations.get("prometheus.io/path") == "/metrics", "prometheus.io/path != /metrics")

    # Service: selects the pods, every port targets wsgate, http through wsgate's http.
    ssel = svc["spec"].get("selector") or {}
    c.check(ssel and all(pod_labels.get(k) == v for k, v in ssel.items()),
            "Service selector does not match the pod labels")
    sports = {p.get("name"): p for p in svc["spec"].get("ports") or []}
    c.check(set(sports) >= {"http", "admin"}, f"Service ports {sorted(sports)} lack http/admin")
    for name, p in sports.items():
        target = resolve_port(p.get("targetPort", p.get("port")), ws_ports)
        c.check(target in ws_ports.values(),
                f"Service port {name} targets {p.get('targetPort')!r}, not a wsgate port")
    if "http" in sports:
        c.check(sports["http"].get("targetPort") in ("http", ws_ports.get("http")),
                "Service port http must target wsgate's http port")
    if "admin" in sports:
        c.check(sports["admin"].get("targetPort") in ("admin", ws_ports.get("admin")),
                "Service port admin must target wsgate's admin port")

    # PodMonitor.
    pms = pm.get("spec") or {}
    pmsel = (pms.get("selector") or {}).get("matchLabels") or {}
    c.check(pmsel and all(pod_labels.get(k) == v for k, v in pmsel.items()),
            f"PodMonitor spec.selector {pmsel} does not select the pods")
    eps = pms.get("podMetricsEndpoints") or []
    c.check(bool(eps), "PodMonitor has no podMetricsEndpoints")
    for ep in eps:
        c.check(ep.get("port") in ws_ports,
                f"PodMonitor endpoint port {ep.get('port')!r} is not a wsgate container port "
                f"name {sorted(ws_ports)}")
        c.check(ep.get("port") == "admin", "PodMonitor must scrape the admin port")
        c.check(ep.get("path", "/metrics") == "/metrics", "PodMonitor path must be /metrics")
    job_label = pms.get("jobLabel")
    c.check(job_label is not None and pod_labels.get(job_label) == "wsgate",
            f"PodMonitor jobLabel {job_label!r} must name a pod label whose value is wsgate")

    # PrometheusRule: the rule file's groups, unchanged.
    groups = (pr.get("spec") or {}).get("groups")
    c.check(bool(groups), "PrometheusRule spec.groups is empty")
    source = load_yaml(RULES)
    c.check(groups == source.get("groups"),
            f"PrometheusRule spec.groups differ from {rel(RULES)} "
            "(run python3 deploy/kubernetes/gen-prometheusrule.py)")
    for g in groups or []:
        c.check(bool(g.get("name")) and bool(g.get("rules")), f"rule group {g.get('name')!r} "
                "has no name or no rules")
    print(f"  admin port {ws_ports.get('admin')} = probes = annotation = PodMonitor port "
          "'admin'")
    return c.finish()


# --- Dockerfile -----------------------------------------------------------------------


def dockerfile_instructions():
    """(instruction, arguments) pairs, continuation lines joined, comments dropped."""
    out, buf = [], ""
    for line in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):
            continue  # comment lines inside a continuation are ignored by Docker
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        buf += stripped
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    if buf:
        raise SystemExit(f"{rel(DOCKERFILE)}: dangling line continuation")
    return out


def image_binary():
    """The program the image runs: the runtime stage's ENTRYPOINT (exec form)."""
    import json
    entry = [r for w, r in dockerfile_stages()[-1]["ins"] if w == "ENTRYPOINT"]
    if not entry or not entry[-1].lstrip().startswith("["):
        raise SystemExit(f"{rel(DOCKERFILE)}: the runtime stage has no exec-form ENTRYPOINT")
    return json.loads(entry[-1])[0]


def dockerfile_stages():
    """List of stages: dict(image, name, instructions)."""
    stages, args = [], {}
    for word, rest in dockerfile_instructions():
        if word == "ARG" and not stages:
            name, _, default = rest.partition("=")
            args[name.strip()] = default.strip()
            continue
        if word == "FROM":
            parts = [p for p in rest.split() if not p.startswith("--")]
            image = re.sub(r"\$\{(\w+)\}|\$(\w+)",
                           lambda m: args.get(m.group(1) or m.group(2), ""), parts[0])
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else None
            stages.append({"image": image, "name": name, "ins": []})
            continue
        if not stages:
            raise SystemExit(f"{rel(DOCKERFILE)}: {word} before FROM")
        stages[-1]["ins"].append((word, rest))
    return stages


def copy_args(rest):
    """(flags, sources, destination) of a COPY instruction (shell or JSON form)."""
    if rest.lstrip().startswith("["):
        import json
        words = json.loads(rest)
    else:
        words = shlex.split(rest)
    flags = [w for w in words if w.startswith("--")]
    paths = [w for w in words if not w.startswith("--")]
    return flags, paths[:-1], paths[-1]


def workdir_of(stage):
    wd = "/"
    for word, rest in stage["ins"]:
        if word == "WORKDIR":
            wd = rest if rest.startswith("/") else f"{wd.rstrip('/')}/{rest}"
    return wd


def build_step(stages):
    """(cargo command, binary path relative to the build context) or raises."""
    final = stages[-1]
    for word, rest in final["ins"]:
        if word != "COPY":
            continue
        flags, srcs, dest = copy_args(rest)
        frm = [f.split("=", 1)[1] for f in flags if f.startswith("--from=")]
        if frm and dest == "/usr/local/bin/wsgate":
            builder = next(s for s in stages if s["name"] == frm[0] or str(stages.index(s)) == frm[0])
            wd = workdir_of(builder).rstrip("/") + "/"
            if len(srcs) != 1 or not srcs[0].startswith(wd):
                raise SystemExit(f"{rel(DOCKERFILE)}: binary {srcs} is not under WORKDIR {wd}")
            cargo = None
            for w, r in builder["ins"]:
                if w == "RUN":
                    for part in r.split("&&"):
                        if part.strip().startswith("cargo build"):
                            cargo = part.strip()
            if cargo is None:
                raise SystemExit(f"{rel(DOCKERFILE)}: the builder stage runs no cargo build")
            return cargo, srcs[0][len(wd):]
    raise SystemExit(f"{rel(DOCKERFILE)}: no COPY --from=<builder> ... /usr/local/bin/wsgate")


def ignore_patterns():
    pats = []
    for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        neg = line.startswith("!")
        p = line[1:] if neg else line
        p = p.strip().strip("/")
        # Docker's patterns: * and ? within a path element, ** across elements.
        rx = ""
        i = 0
        while i < len(p):
            if p.startswith("**", i):
                rx += ".*"
                i += 2
                if p.startswith("/", i):
                    rx = rx[:-2] + "(?:.*/)?"
                    i += 1
            elif p[i] == "*":
                rx += "[^/]*"
                i += 1
            elif p[i] == "?":
                rx += "[^/]"
                i += 1
            else:
                rx += re.escape(p[i])
                i += 1
        pats.append((neg, re.compile(rx + r"\Z")))
    return pats


def ignored(path, pats):
    """Docker semantics: the last matching pattern wins; a pattern matching a parent
    directory matches everything below it."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    result = False
    for neg, rx in pats:
        if any(rx.match(p) for p in prefixes):
            result = not neg
    return result


def cmd_dockerfile():
    c = Checker("dockerfile")
    stages = dockerfile_stages()
    c.check(len(stages) >= 2, "not a multi-stage build")
    final = stages[-1]
    image = final["image"]
    c.check("@sha256:" in image or (":" in image.rsplit("/", 1)[-1]
                                     and not image.endswith(":latest")),
            f"runtime image {image!r} must be pinned (a tag other than latest, or a digest)")
    c.check("distroless" in image or image == "scratch",
            f"runtime image {image!r} should be distroless or scratch")
    users = [r for w, r in final["ins"] if w == "USER"]
    c.check(bool(users) and users[-1].split(":")[0] not in ("root", "0"),
            "the runtime stage must end with a non-root USER")
    c.check(bool(users) and users[-1].split(":")[0].isdigit(),
            "USER should be numeric so that runAsNonRoot can verify it")
    stop = [r for w, r in final["ins"] if w == "STOPSIGNAL"]
    c.check(stop == ["SIGTERM"], f"STOPSIGNAL must be SIGTERM, found {stop}")
    entry = [r for w, r in final["ins"] if w == "ENTRYPOINT"]
    c.check(entry == ['["/usr/local/bin/wsgate"]'], f"ENTRYPOINT {entry}")
    cmd = [r for w, r in final["ins"] if w == "CMD"]
    c.check(cmd == ['["--config", "/etc/wsgate/config.toml"]'], f"CMD {cmd}")
    expose = sorted(int(p.split("/")[0]) for w, r in final["ins"] if w == "EXPOSE"
                    for p in r.split())
    conf = tomllib.loads(CONTAINER_CONFIG.read_text(encoding="utf-8"))
    want = sorted([addr_port(conf["listen"]), addr_port(conf["admin"]["listen"])])
    c.check(expose == want, f"EXPOSE {expose} != ports of config.container.toml {want}")
    copies = [copy_args(r) for w, r in final["ins"] if w == "COPY"]
    c.check(any(s == ["deploy/config.container.toml"] and d == "/etc/wsgate/config.toml"
                for f, s, d in copies),
            "COPY deploy/config.container.toml /etc/wsgate/config.toml is missing")
    builders = stages[:-1]
    runs = " ".join(r for s in builders for w, r in s["ins"] if w == "RUN")
    c.check("cargo build --release --locked" in runs,
            "the builder must run cargo build --release --locked")
    for s in stages:
        img = s["image"]
        c.check(img == "scratch" or "@sha256:" in img
                or (":" in img.rsplit("/", 1)[-1] and not img.endswith(":latest")),
                f"stage image {img!r} has no tag or uses latest")
    try:
        cargo, binary = build_step(stages)
        c.check(binary == "target/release/wsgate", f"binary path {binary}")
    except SystemExit as e:
        c.check(False, str(e))

    # Every COPY source from the context survives .dockerignore.
    pats = ignore_patterns()
    sources = set()
    for s in stages:
        for w, r in s["ins"]:
            if w in ("COPY", "ADD"):
                flags, srcs, _ = copy_args(r)
                if not any(f.startswith("--from=") for f in flags):
                    sources.update(x.rstrip("/") for x in srcs)
    for src in sorted(sources):
        path = REPO / src
        c.check(path.exists(), f"COPY source {src} does not exist")
        files = [src] if path.is_file() else [
            str(p.relative_to(REPO)) for p in path.rglob("*.rs")]
        bad = [f for f in files if ignored(f, pats)]
        c.check(not bad, f".dockerignore excludes COPY sources: {bad[:5]}")
    for junk in ("target/release/wsgate", ".git/HEAD", "tests/binary.rs", ".ci/run"):
        c.check(ignored(junk, pats), f".dockerignore does not exclude {junk}")

    # The crate needs nothing the Dockerfile does not copy (it copies src/ only).
    cargo_toml = tomllib.loads((REPO / "Cargo.toml").read_text(encoding="utf-8"))
    pkg = cargo_toml.get("package") or {}
    c.check(not (REPO / "build.rs").exists() and "build" not in pkg,
            "the crate has a build script: COPY it in deploy/Dockerfile")
    # Cargo loads every workspace member's manifest even to build wsgate alone: the
    # builder must COPY each one (and give it a placeholder main.rs).
    workspace = cargo_toml.get("workspace") or {}
    for member in workspace.get("members") or []:
        if member.strip("./") == "":
            continue
        manifest = f"{member.rstrip('/')}/Cargo.toml"
        c.check(manifest in sources,
                f"workspace member {member}: deploy/Dockerfile does not COPY {manifest}")
        c.check(f"{member.rstrip('/')}/src/main.rs" in runs,
                f"workspace member {member}: deploy/Dockerfile makes no placeholder "
                f"{member.rstrip('/')}/src/main.rs")
    for kind in ("bin", "lib", "test", "bench", "example"):
        targets = cargo_toml.get(kind) or []
        targets = [targets] if isinstance(targets, dict) else targets
        for t in targets:
            p = t.get("path")
            c.check(p is None or p.startswith("src/"),
                    f"[[{kind}]] {t.get('name')} at {p}: the Dockerfile copies only src/")
    for section in ("dependencies", "build-dependencies"):
        for name, spec in (cargo_toml.get(section) or {}).items():
            c.check(not (isinstance(spec, dict) and "path" in spec),
                    f"{section}.{name} is a path dependency: the Dockerfile does not copy it")
    return c.finish()


def cmd_build_step():
    cargo, binary = build_step(dockerfile_stages())
    print(f"{cargo}\t{binary}")
    return 0


def cmd_extract_config(out):
    Path(out).write_text(wsgate_config_from_configmap(load_yaml(K8S / "configmap.yaml")),
                         encoding="utf-8")
    return 0


def cmd_extract_rules(out):
    spec = load_yaml(K8S / "prometheusrule.yaml").get("spec") or {}
    with open(out, "w", encoding="utf-8") as f:
        yaml.safe_dump({"groups": spec.get("groups") or []}, f, sort_keys=False)
    return 0


def main(argv):
    commands = {
        "manifests": (cmd_manifests, 0),
        "dockerfile": (cmd_dockerfile, 0),
        "build-step": (cmd_build_step, 0),
        "extract-config": (cmd_extract_config, 1),
        "extract-rules": (cmd_extract_rules, 1),
    }
    if len(argv) < 1 or argv[0] not in commands or len(argv) - 1 != commands[argv[0]][1]:
        print(__doc__, file=sys.stderr)
        return 2
    fn, _ = commands[argv[0]]
    return fn(*argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
