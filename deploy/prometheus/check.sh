#!/usr/bin/env bash
# Checks the Prometheus rules and the Grafana dashboard of wsgate:
#   - promtool check rules  deploy/prometheus/wsgate-rules.yml
#   - promtool test rules   deploy/prometheus/wsgate-rules.test.yml
#   - the dashboard is valid JSON, every panel has a title, a type and PromQL targets,
#     and every expression (dashboard, rules, rule tests) names only metrics that
#     src/metrics.rs defines (histograms with _bucket/_sum/_count), process_*, up, or
#     a series recorded by wsgate-rules.yml.
# Usage, from anywhere: bash deploy/prometheus/check.sh
# Installs promtool (Debian package `prometheus`) and python3 when missing: needs root
# (or sudo) and apt, as on CI.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

RULES=deploy/prometheus/wsgate-rules.yml
TESTS=deploy/prometheus/wsgate-rules.test.yml
DASHBOARD=deploy/grafana/wsgate-dashboard.json
METRICS_RS=src/metrics.rs

apt_install() {
    local sudo=()
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null 2>&1 || { echo "check.sh: need root or sudo to install $*" >&2; exit 1; }
        sudo=(sudo)
    fi
    echo "check.sh: installing $* with apt-get" >&2
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    # No recommends: the prometheus package recommends node-exporter, smartmontools...
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

missing=()
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
command -v python3 >/dev/null 2>&1 || missing+=(python3)
if [ "${#missing[@]}" -gt 0 ]; then
    apt_install "${missing[@]}"
fi
command -v promtool >/dev/null 2>&1 || { echo "check.sh: promtool still missing" >&2; exit 1; }

promtool --version 2>&1 | head -n 1

echo "== promtool check rules $RULES"
promtool check rules "$RULES"

echo "== promtool test rules $TESTS"
promtool test rules "$TESTS"

echo "== python3 -m json.tool $DASHBOARD"
python3 -m json.tool "$DASHBOARD" >/dev/null
echo "  SUCCESS: valid JSON"

echo "== metric names and panels"
python3 - "$METRICS_RS" "$DASHBOARD" "$RULES" "$TESTS" <<'PY'
import json
import re
import sys

metrics_rs, dashboard_path, rules_path, tests_path = sys.argv[1:5]
errors = []

# --- the metric names wsgate exposes ------------------------------------------------------
src = open(metrics_rs, encoding="utf-8").read()
NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
defined = set(re.findall(r'"((?:wsgate|process)_[a-z0-9_]+)"', src))
histograms = set(re.findall(r'describe_histogram\(\s*"([a-z0-9_]+)"', src))
if not defined or not histograms:
    sys.exit(f"check.sh: found no metric names in {metrics_rs}: has the file moved?")
allowed = set(defined) | {"up"}
for h in histograms:
    allowed |= {h + "_bucket", h + "_sum", h + "_count"}


def allowed_name(name, recorded=()):
    return name in allowed or name.startswith("process_") or name in recorded


# --- a small PromQL scanner: the metric names an expression selects -----------------------
KEYWORDS = {
    "and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
    "group_left", "group_right", "inf", "nan", "atan2",
}


def metric_names(expr):
    e = re.sub(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`', '""', expr)  # strings
    e = re.sub(r"#[^\n]*", " ", e)                                            # comments
    e = re.sub(r"\{[^{}]*\}", " ", e)                                         # matchers
    e = re.sub(r"\[[^\[\]]*\]", " ", e)                                       # ranges
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", " ", e)
    e = re.sub(r"\boffset\s+-?[0-9a-z]+", " ", e)
    e = re.sub(r"\$\{[^}]*\}|\$" + NAME, " ", e)                              # variables
    e = re.sub(r"(?<![a-zA-Z0-9_:.])\d+(\.\d+)?([eE][-+]?\d+)?", " ", e)          # numbers
    names = []
    for m in re.finditer(NAME, e):
        word = m.group(0)
        if word.lower() in KEYWORDS:
            continue
        if re.match(r"\s*\(", e[m.end():]):                                   # function
            continue
        names.append(word)
    return names


def check_expr(where, expr, recorded=()):
    if not expr.strip():
        errors.append(f"{where}: empty expression")
        return
    names = metric_names(expr)
    if not names:
        errors.append(f"{where}: selects no metric: {expr!r}")
    for n in names:
        if not allowed_name(n, recorded):
            errors.append(f"{where}: unknown metric {n!r} (not in {metrics_rs}): {expr!r}")


# --- rules and rule tests: `record:`, `expr:` and `series:` values ------------------------
def yaml_values(path, key):
    """(line, value) of every `key:` in a YAML file, plain or block scalar."""
    lines = open(path, encoding="utf-8").read().split("\n")
    out = []
    i = 0
    pat = re.compile(r"^(\s*)(?:-\s+)?" + key + r":\s*(.*)$")
    while i < len(lines):
        m = pat.match(lines[i])
        if not m:
            i += 1
            continue
        indent, value = len(m.group(1)), m.group(2).strip()
        start = i + 1
        if value[:1] in ("|", ">"):
            block = []
            i += 1
            while i < len(lines) and (not lines[i].strip()
                                      or len(lines[i]) - len(lines[i].lstrip()) > indent):
                block.append(lines[i].strip())
                i += 1
            value = "\n".join(block)
        else:
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
                value = value[1:-1].replace("''", "'") if value[0] == "'" else value[1:-1]
            i += 1
        out.append((start, value))
    return out


recorded = {v for _, v in yaml_values(rules_path, "record")}
for name in recorded:
    if not re.fullmatch(NAME, name):
        errors.append(f"{rules_path}: bad recorded name {name!r}")
rule_exprs = yaml_values(rules_path, "expr")
for line, expr in rule_exprs:
    check_expr(f"{rules_path}:{line}", expr, recorded)
test_exprs = yaml_values(tests_path, "expr")
for line, expr in test_exprs:
    check_expr(f"{tests_path}:{line}", expr, recorded)
series = yaml_values(tests_path, "series")
for line, s in series:
    name = re.match(NAME, s)
    if not name or not allowed_name(name.group(0)):
        errors.append(f"{tests_path}:{line}: input series of an unknown metric: {s!r}")

# --- the dashboard --------------------------------------------------------------------------
dash = json.load(open(dashboard_path, encoding="utf-8"))
variables = {v.get("name") for v in dash.get("templating", {}).get("list", [])}
for v in ("DS_PROMETHEUS", "job", "instance"):
    if v not in variables:
        errors.append(f"{dashboard_path}: template variable {v!r} missing")
for v in dash.get("templating", {}).get("list", []):
    q = v.get("query")
    q = q.get("query", "") if isinstance(q, dict) else q
    if v.get("type") == "query":
        m = re.fullmatch(r"\s*label_values\((.*),\s*\w+\)\s*", q or "")
        if not m:
            errors.append(f"{dashboard_path}: variable {v['name']}: unexpected query {q!r}")
        else:
            check_expr(f"{dashboard_path}: variable {v['name']}", m.group(1))


def all_panels(panels):
    for p in panels:
        yield p
        yield from all_panels(p.get("panels", []))


count = exprs = 0
for p in all_panels(dash.get("panels", [])):
    if p.get("type") == "row":
        continue
    count += 1
    where = f"{dashboard_path}: panel {p.get('id')} {p.get('title')!r}"
    if not p.get("title"):
        errors.append(f"{where}: no title")
    if not p.get("type"):
        errors.append(f"{where}: no type")
    targets = p.get("targets") or []
    if not targets:
        errors.append(f"{where}: no targets")
    for t in targets:
        exprs += 1
        check_expr(f"{where} target {t.get('refId')}", t.get("expr", ""))
        ds = t.get("datasource") or p.get("datasource") or {}
        if ds.get("uid") != "${DS_PROMETHEUS}":
            errors.append(f"{where}: datasource is not ${{DS_PROMETHEUS}}: {ds!r}")
if count == 0:
    errors.append(f"{dashboard_path}: no panels")

if errors:
    print("check.sh: FAILED", file=sys.stderr)
    for e in errors:
        print("  " + e, file=sys.stderr)
    sys.exit(1)
print(f"  SUCCESS: {count} panels, {exprs} dashboard expressions, {len(rule_exprs)} rule and "
      f"{len(test_exprs)} test expressions, {len(series)} test series use only metrics "
      f"of {metrics_rs}")
PY

echo "check.sh: all Prometheus and Grafana checks passed"
