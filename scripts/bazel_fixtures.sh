#!/usr/bin/env bash
# Regenerates tests/fixtures/bazel/<build>/events.{bin,json}: real Build Event
# Protocol streams written by a real Bazel 2.1.0 over the tiny workspace in
# tests/fixtures/bazel/workspace. See tests/fixtures/bazel/README.md.
#
#   scripts/bazel_fixtures.sh            # BAZEL_CACHE overrides the npm cache dir
#
# Needs npm (the Bazel binary comes from the npm registry's
# @bazel/bazel-linux_x64 package, which embeds its own JDK) and no other
# network: nothing the builds use is downloaded. Idempotent: every run starts
# from empty /tmp directories; the event files differ between runs only in
# times, uuids and the like.
set -euo pipefail

BAZEL_VERSION=2.1.0
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
FIXTURES=$REPO_ROOT/tests/fixtures/bazel
CACHE=${BAZEL_CACHE:-$HOME/.cache/evbridge-bazel}
# Fixed paths, so that the absolute paths in the events are the same each run.
WS=/tmp/evbridge-bazel-ws
STUBS=/tmp/evbridge-bazel-repos
ROOT=/tmp/evbridge-bazel-root
FAKE_HOME=/tmp/evbridge-bazel-home
BIN=/tmp/evbridge-bazel-bin   # the binary's path is in the events too

log() { echo "bazel_fixtures: $*" >&2; }

# --- the Bazel binary, cached outside the repo -----------------------------
PKG_DIR=$CACHE/node_modules/@bazel/bazel-linux_x64
find_bazel() {
    [[ -d "$PKG_DIR" ]] || return 0
    find "$PKG_DIR" -maxdepth 1 -type f -name "bazel-$BAZEL_VERSION-linux-x86_64" | head -n 1
}
BAZEL=$(find_bazel)
if [[ -z "$BAZEL" ]]; then
    log "installing @bazel/bazel-linux_x64@$BAZEL_VERSION into $CACHE"
    mkdir -p "$CACHE"
    npm install --prefix "$CACHE" --no-save --no-audit --no-fund --loglevel=error \
        "@bazel/bazel-linux_x64@$BAZEL_VERSION" >&2
    BAZEL=$(find_bazel)
    [[ -n "$BAZEL" ]] || { log "no bazel-$BAZEL_VERSION-linux-x86_64 under $PKG_DIR"; exit 1; }
fi

# --- fresh copies at fixed paths -------------------------------------------
wipe() { if [[ -e "$1" ]]; then chmod -R u+w "$1" 2>/dev/null || true; rm -rf "$1"; fi; }
wipe "$WS"; wipe "$STUBS"; wipe "$ROOT"; wipe "$FAKE_HOME"; wipe "$BIN"
cp -R "$FIXTURES/workspace" "$WS"
cp -R "$FIXTURES/offline_repos" "$STUBS"
mkdir -p "$FAKE_HOME" "$BIN"
cp "$BAZEL" "$BIN/bazel"
chmod +x "$BIN/bazel"
BAZEL=$BIN/bazel

# A clean, fixed environment: no rc files, no user variables in the events.
# (sh_test's implicit launcher is a cc_binary, so Bazel's C++ autoconfiguration
# runs and needs a cc/gcc on PATH, though nothing is compiled on Linux.)
run_bazel() {
    local output_base=$1; shift
    (cd "$WS" && env -i \
        HOME="$FAKE_HOME" USER=fixture-user LANG=C.UTF-8 TMPDIR=/tmp \
        PATH=/usr/local/bin:/usr/bin:/bin \
        "$BAZEL" --nosystem_rc --nohome_rc --noworkspace_rc --batch \
        --output_user_root="$ROOT" --output_base="$output_base" "$@")
}

installed=$(run_bazel "$ROOT/version" version 2>/dev/null | sed -n 's/^Build label: //p')
[[ "$installed" == "$BAZEL_VERSION" ]] || { log "expected Bazel $BAZEL_VERSION, got '$installed'"; exit 1; }

# Flags common to every build (the README lists them too).
COMMON_FLAGS=(
    --color=no --curses=no --show_progress_rate_limit=0
    --jobs=1 --spawn_strategy=local --incompatible_strict_action_env
    --workspace_status_command="$WS/status.sh"
    --build_event_publish_all_actions
    --build_event_json_file_path_conversion=false
    --build_event_binary_file_path_conversion=false
    --experimental_convenience_symlinks_bep_event
    --build_metadata=REPO=evbridge --build_metadata=PURPOSE=fixture
    --tool_tag=evbridge-fixtures
    --output_groups=+logs
    # Bazel 2.1's @bazel_tools would download these three for any sh_test;
    # tests/fixtures/bazel/offline_repos has stand-ins re-exporting the native rules.
    --override_repository=rules_cc="$STUBS/rules_cc"
    --override_repository=rules_java="$STUBS/rules_java"
    --override_repository=remote_coverage_tools="$STUBS/remote_coverage_tools"
)

GREEN_TARGETS=(//:hello //:upper //:bundle //:report //:pass_test)

# name, expected exit code, then the command and its own flags and targets.
BUILDS=(
    "green|0|test ${GREEN_TARGETS[*]}"
    "failing|1|build //:hello //:broken //:downstream"
    "keep_going|1|test --keep_going ${GREEN_TARGETS[*]} //:broken //:downstream //:fail_test"
    "test_failure|3|test //:pass_test //:fail_test"
)

# One line per build: events and the payload kinds they carry.
summarize() {
    python3 - "$1" "$2" <<'EOF'
import collections, json, sys

def varints(path):
    data = open(path, "rb").read()
    n = i = 0
    while i < len(data):
        size = shift = 0
        while True:
            b = data[i]; i += 1
            size |= (b & 0x7F) << shift; shift += 7
            if not b & 0x80:
                break
        i += size; n += 1
    assert i == len(data), "truncated binary stream"
    return n

name, out = sys.argv[1], sys.argv[2]
events = [json.loads(line) for line in open(out + "/events.json")]
binary = varints(out + "/events.bin")
if binary != len(events):
    sys.exit(f"{name}: {binary} binary events but {len(events)} JSON events")
if not events[-1].get("lastMessage"):
    sys.exit(f"{name}: the last JSON event has no lastMessage")
kinds = collections.Counter(
    k for e in events for k in e if k not in ("id", "children", "lastMessage"))
print(f"{name}: {len(events)} events; " +
      ", ".join(f"{k}={v}" for k, v in sorted(kinds.items())))
EOF
}

for spec in "${BUILDS[@]}"; do
    IFS='|' read -r name want cmdline <<<"$spec"
    read -r -a args <<<"$cmdline"
    command=${args[0]}
    out=$FIXTURES/$name
    mkdir -p "$out"
    start=$SECONDS
    set +e
    run_bazel "$ROOT/$name" "$command" "${COMMON_FLAGS[@]}" \
        --build_event_binary_file="$ROOT/$name.events.bin" \
        --build_event_json_file="$ROOT/$name.events.json" \
        "${args[@]:1}" >"$ROOT/$name.log" 2>&1
    rc=$?
    set -e
    if [[ "$rc" != "$want" ]]; then
        log "$name: bazel exited $rc, expected $want; its output:"
        cat "$ROOT/$name.log" >&2
        exit 1
    fi
    cp "$ROOT/$name.events.bin" "$out/events.bin"
    cp "$ROOT/$name.events.json" "$out/events.json"
    echo "$(summarize "$name" "$out"); exit $rc; $((SECONDS - start))s"
done
