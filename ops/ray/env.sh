# Shared settings of the loopback Ray cluster, sourced by the scripts in ops/ray/.
# Token authentication is on (as a lab network needs): the token lives in a 0700 directory,
# 0600, and every Ray process and client of this cluster reads it from RAY_AUTH_TOKEN_PATH.
RAY=${RAY:-.venv/bin/ray}
RAY_PORT=${RAY_PORT:-6390}
RAY_TMP=${RAY_TMP:-/tmp/ray-fleet}
RAY_NODE_IP=${RAY_NODE_IP:-127.0.0.1}  # every Ray server binds this address only
RAY_SECRETS=${RAY_SECRETS:-var/ray}
export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN_PATH=${RAY_AUTH_TOKEN_PATH:-$PWD/$RAY_SECRETS/auth_token}  # absolute

ensure_ray_token() {
  if [ ! -s "$RAY_AUTH_TOKEN_PATH" ]; then
    mkdir -p "$(dirname "$RAY_AUTH_TOKEN_PATH")"
    chmod 700 "$(dirname "$RAY_AUTH_TOKEN_PATH")"
    (umask 077 && .venv/bin/python -c 'import secrets; print(secrets.token_hex(32), end="")' \
      > "$RAY_AUTH_TOKEN_PATH")
    echo "ray: new cluster token in $RAY_AUTH_TOKEN_PATH (0600)"
  fi
}
