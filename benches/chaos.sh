#!/usr/bin/env bash
# The long chaos soak (issue 11, item 8): tests/chaos.rs for 300 s of chaos
# (CHAOS_SECS; the `cargo test` default is 30 s), in release, figures printed.
# Loopback only. Extra env: CHAOS_SEED, CHAOS_KEEP_LOG=1, CHAOS_GLIBC_DEFAULT=1
# (see tests/chaos.rs).
set -euo pipefail
cd "$(dirname "$0")/.."
CHAOS_SECS="${CHAOS_SECS:-300}" exec cargo test --release --test chaos -- --nocapture "$@"
