#!/usr/bin/env bash
# Label Studio in its own cached venv (it pins Django & co., which conflict with ours).
#   scripts/labelstudio.sh install          create/refresh the venv (idempotent, ~95 s the first time)
#   scripts/labelstudio.sh bin              print the path of the `label-studio` executable
#   scripts/labelstudio.sh start PORT DIR   run it headless on 127.0.0.1:PORT with data in DIR
#       (admin user and API token from LABEL_STUDIO_USERNAME/PASSWORD/USER_TOKEN)
# Never call `label-studio --version`: it checks the network and hangs offline.
set -euo pipefail

VERSION="${LABEL_STUDIO_VERSION:-1.23.2}"
CACHE="${PROXYLOOP_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/proxyloop}"
VENV="$CACHE/labelstudio-venv-$VERSION"
STAMP="$VENV/.installed"
PYTHON="${PYTHON:-python3}"

install() {
    if [[ -f "$STAMP" ]]; then
        return 0
    fi
    mkdir -p "$CACHE"
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip
    "$VENV/bin/pip" install -q "label-studio==$VERSION"
    touch "$STAMP"
}

case "${1:-}" in
    install) install ;;
    bin) echo "$VENV/bin/label-studio" ;;
    start)
        install
        port="${2:?usage: labelstudio.sh start PORT DIR}"
        dir="${3:?usage: labelstudio.sh start PORT DIR}"
        mkdir -p "$dir"
        export LABEL_STUDIO_BASE_DATA_DIR="$dir"
        export LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN=true
        export LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK=true
        # Webhooks go to proxyloop on loopback, which SSRF protection refuses.
        export SSRF_PROTECTION_ENABLED=false
        # ... and so does the ML-backend connection unless this is set (proxyloop's backend is on loopback too).
        export ML_BLOCK_LOCAL_IP=false
        exec "$VENV/bin/label-studio" start --no-browser --host 127.0.0.1 --port "$port"
        ;;
    *) echo "usage: $0 install | bin | start PORT DIR" >&2; exit 2 ;;
esac
