#!/usr/bin/env bash
# The Python client's tests against the real agent: a virtual environment
# with the pinned requirements, the stubs generated from proto/ (into a temp
# dir: nothing generated is committed), then pytest.
#
# Uses the debug build (target/debug, or NINE9S_BIN_DIR) and builds nothing:
# CI runs this right after `cargo test --workspace`, which built it.
# NINE9S_PY_VENV picks the venv (default ${TMPDIR:-/tmp}/nine9s-py-venv; it is
# reused while requirements.txt is unchanged). Arguments go to pytest.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
venv=${NINE9S_PY_VENV:-${TMPDIR:-/tmp}/nine9s-py-venv}
export NINE9S_BIN_DIR=${NINE9S_BIN_DIR:-$root/target/debug}
python=${PYTHON:-python3}

say() { echo "python client: $*" >&2; }

for file in agent libnine9s_0_2_0.so libfixture_unhealthy.so; do
    if [ ! -f "$NINE9S_BIN_DIR/$file" ]; then
        say "$NINE9S_BIN_DIR/$file is missing: run \`cargo build --workspace\` first" \
            "(or set NINE9S_BIN_DIR to the directory that holds the agent and the sample libraries)"
        exit 1
    fi
done

apt_install() {
    if [ "$(id -u)" != 0 ]; then
        say "cannot install $* without root: apt-get install $*"
        exit 1
    fi
    apt-get update -qq && apt-get install -y -qq "$@" >/dev/null
}

if ! command -v "$python" >/dev/null; then
    say "$python is missing; installing Debian's python3"
    apt_install python3 python3-venv
fi

# A venv that works and was installed from this requirements.txt is reused.
stamp="$venv/.nine9s-requirements.sha256"
wanted=$(sha256sum "$here/requirements.txt" | cut -d' ' -f1)
if ! "$venv/bin/python" -c '' 2>/dev/null || [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
    rm -rf "$venv"
    # Debian's python3 lacks ensurepip until python3-venv is installed.
    if ! "$python" -m venv "$venv" >/dev/null 2>&1; then
        rm -rf "$venv"
        say "\`$python -m venv\` failed; installing python3-venv"
        apt_install python3-venv
        "$python" -m venv "$venv"
    fi
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
        -r "$here/requirements.txt"
    echo "$wanted" >"$stamp"
fi

stubs=$(mktemp -d "${TMPDIR:-/tmp}/nine9s-py-stubs.XXXXXX")
trap 'rm -rf "$stubs"' EXIT
"$venv/bin/python" "$here/generate_stubs.py" "$stubs" >/dev/null
export NINE9S_PY_STUBS=$stubs
export PYTHONDONTWRITEBYTECODE=1

cd "$here"
"$venv/bin/python" -m pytest -q "$@"
