#!/usr/bin/env bash
# The image, as far as a machine that may not run containers or pull base
# images allows (this project's build machines):
#   1. a stand-in for the runtime base (gcr.io/distroless/cc-debian12:nonroot)
#      is assembled from scratch: the glibc libraries the binary links, the
#      loader, CA certificates, /etc/passwd with the nonroot user 65532;
#   2. the Dockerfile's runtime stage is built with buildah, verbatim but for
#      its FROM (the stand-in) and its COPY --from=build (the binary given in
#      SDGATE: the build stage itself, the profile-guided build, is not run);
#   3. the image's user, entrypoint and ports are read back, its filesystem is
#      exported (podman create + export: nothing runs), and the binary in it
#      runs, with the image's own loader and libraries, `check` on the config
#      of deploy/'s ConfigMap.
# Usage: bash tests/deploy/image.sh   (SDGATE=path, default target/release/sdgate;
# installs podman and buildah with apt-get when missing; Debian 12, as root)
set -euo pipefail
cd "$(dirname "$0")/../.."
SDGATE=${SDGATE:-target/release/sdgate}
[ -x "$SDGATE" ] || { echo "no binary at $SDGATE (cargo build --release)" >&2; exit 1; }
if ! command -v buildah >/dev/null 2>&1 || ! command -v podman >/dev/null 2>&1; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman buildah >/dev/null; } ||
    { echo "SKIP: cannot install podman and buildah"; exit 0; }
fi
STORE=(--storage-driver vfs)
WORK=$(mktemp -d)
TAG=localhost/sdgate:image-check
BASE=localhost/sdgate-distroless-standin:cc
cleanup() {
  podman "${STORE[@]}" rm -f sdgate-image-check >/dev/null 2>&1 || true
  buildah "${STORE[@]}" rmi -f "$TAG" "$BASE" >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT

echo "== 1. the runtime base, assembled: the libraries $SDGATE links, CA certificates, user 65532"
# A machine where buildah cannot even start from scratch says so and skips;
# anything after this that fails is the image's fault.
base=$(buildah "${STORE[@]}" from scratch 2>"$WORK/buildah.err") ||
  { echo "SKIP: buildah cannot work here: $(tail -n1 "$WORK/buildah.err")"; exit 0; }
for lib in $(ldd "$SDGATE" | awk '/=>/ { print $3 } /ld-linux/ { print $1 }'); do
  buildah "${STORE[@]}" copy "$base" "$lib" "$lib" >/dev/null
done
buildah "${STORE[@]}" copy "$base" /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt >/dev/null
printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' >"$WORK/passwd"
buildah "${STORE[@]}" copy "$base" "$WORK/passwd" /etc/passwd >/dev/null
buildah "${STORE[@]}" commit -q "$base" "$BASE" >/dev/null
buildah "${STORE[@]}" rm "$base" >/dev/null

echo "== 2. the Dockerfile's runtime stage, on that base, with $SDGATE as the build stage's output"
awk '/^FROM /{ stage = "" } { stage = stage $0 "\n" } END { printf "%s", stage }' Dockerfile |
  sed "s|^FROM .*|FROM $BASE|; s|^COPY --from=build /usr/local/bin/sdgate |COPY sdgate |" >"$WORK/Containerfile"
grep -q "^COPY sdgate /usr/local/bin/sdgate" "$WORK/Containerfile" || { echo "the runtime stage's COPY changed" >&2; exit 1; }
cat "$WORK/Containerfile"
cp "$SDGATE" "$WORK/sdgate"
buildah "${STORE[@]}" bud -q -f "$WORK/Containerfile" -t "$TAG" "$WORK" >/dev/null

echo "== 3. the image read back"
config=$(podman "${STORE[@]}" image inspect "$TAG" --format '{{.Config.User}} {{json .Config.Entrypoint}} {{json .Config.ExposedPorts}}')
echo "user, entrypoint, ports: $config"
case "$config" in
  '65532:65532 ["/usr/local/bin/sdgate"] {"8080/tcp":{},"9090/tcp":{}}') ;;
  *) echo "unexpected image config" >&2; exit 1 ;;
esac
podman "${STORE[@]}" create --name sdgate-image-check "$TAG" >/dev/null
mkdir "$WORK/fs"
podman "${STORE[@]}" export sdgate-image-check | tar -x -C "$WORK/fs"
# deploy/'s ConfigMap config (the block under `config.yaml: |`).
awk '/config.yaml: \|/ { on = 1; next } on && /^---/ { exit } on { sub(/^    /, ""); print }' deploy/sdgate.yaml >"$WORK/config.yaml"
loader=$(ldd "$SDGATE" | awk '/ld-linux/ { print $1 }')
"$WORK/fs$loader" --library-path "$WORK/fs/lib/x86_64-linux-gnu" "$WORK/fs/usr/local/bin/sdgate" check --config "$WORK/config.yaml" >/dev/null 2>"$WORK/check.err" ||
  { cat "$WORK/check.err" >&2; exit 1; }
echo "the image's binary, on its own loader and libraries: $(tail -n1 "$WORK/check.err")"
echo "image check: ok (the build stage, the profile-guided build, was not run here)"
