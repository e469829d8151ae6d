#!/usr/bin/env bash
# Debian trixie's skopeo and podman, unpacked beside the system's (never installed), for the sigstore tests.
#
# Debian bookworm builds skopeo 1.9.3 and podman 4.3.1 with sigstore disabled; trixie's skopeo 1.18 and
# podman 5.4 have it. They need glibc 2.38 (bookworm has 2.36), so their ELF interpreter is set to trixie's
# loader and their RPATH to trixie's libraries, then bookworm's (patchelf): they run as themselves, so podman's
# re-executions of /proc/self/exe (containers/storage's chrooted untar) run podman again, not a loader.
# This script downloads the pinned .debs below with apt itself, from a sources list of its own whose Release
# file apt verifies with the Debian archive keyring (signed-by), with lists, caches and archives all under
# $TRIXIE_CACHE: the system's apt sources, lists, caches and dpkg state are not touched. The packages are
# unpacked with dpkg-deb -x into $TRIXIE_CACHE/root. Idempotent: a stamp names the pins it was made from.
set -euo pipefail

cache="${TRIXIE_CACHE:-/var/cache/registryproxy-tests/trixie}"
mirror="http://deb.debian.org/debian"
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
# Pinned to a release: the tools under test (skopeo, podman, netavark) to their upstream version, the libraries
# they load to trixie's ABI (libc6 2.41, ...). deb.debian.org keeps only each package's current version, so a pin
# is a pattern of Debian revisions (a trixie point release or binNMU rebuilds the same release): the version taken
# is printed; a release gone from the mirror fails with one line naming the pin to update.
pins=(
  'skopeo=1.18.0+ds1-*'
  'podman=5.4.2+ds1-*'
  'netavark=1.14.0-*'
  'libc6=2.41-*'
  'libgpgme11t64=1.24.*'
  'libassuan9=3.0.*'
  'libgpg-error0=1.51-*'
  'libseccomp2=2.6.*'
  'libsqlite3-0=3.46.*'
  'libsubid5=1:4.17.*'
)

stamp_want=$( (printf '%s\n' "${pins[@]}"; cat "${BASH_SOURCE[0]}") | sha256sum | cut -c1-16)
if [ -f "$cache/root/.complete-$stamp_want" ]; then
  exit 0
fi
die() { echo "trixie-tools: $*" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || die "needs root to write $cache (or set TRIXIE_CACHE to a writable directory)"
[ -f "$keyring" ] || die "no $keyring (install debian-archive-keyring)"
[ "$(dpkg --print-architecture)" = amd64 ] || die "the pinned packages are amd64 builds"
command -v patchelf >/dev/null || die "needs patchelf (a Debian package; ./run.sh test installs it)"

mkdir -p "$cache/lists/partial" "$cache/apt-cache/archives/partial" "$cache/debs"
# One install at a time (test sessions may start together); the winner's tree is the loser's.
exec 9>"$cache/.lock"
flock -w 600 9 || die "another install holds $cache/.lock"
if [ -f "$cache/root/.complete-$stamp_want" ]; then
  exit 0
fi
echo "deb [signed-by=$keyring] $mirror trixie main" > "$cache/trixie.list"
apt_opts=(
  -o "Dir::Etc::sourcelist=$cache/trixie.list" -o "Dir::Etc::sourceparts=-"
  -o "Dir::State::Lists=$cache/lists" -o "Dir::Cache=$cache/apt-cache" -o "APT::Get::List-Cleanup=0"
  -o "APT::Architecture=amd64" -o "APT::Architectures=amd64"
  -o "Acquire::AllowInsecureRepositories=false" -o "Acquire::AllowDowngradeToInsecureRepositories=false"
  -o "APT::Get::AllowUnauthenticated=false" -o "Acquire::http::Timeout=30" -o "Acquire::Retries=2"
)
if ! out=$(apt-get "${apt_opts[@]}" update 2>&1) || grep -qE '^(W|E):' <<<"$out"; then
  die "apt-get update of $mirror trixie failed: $(grep -E '^(W|E):' <<<"$out" | head -1)"
fi
chosen=()
for pin in "${pins[@]}"; do
  name=${pin%%=*} pattern=${pin#*=} version=""
  while read -r v; do
    # shellcheck disable=SC2053  # the pattern is a glob on purpose
    if [[ $v == $pattern ]]; then version=$v; break; fi
  done < <(apt-cache "${apt_opts[@]}" madison "$name" | awk -F'|' '{gsub(/ /, "", $2); print $2}')
  [ -n "$version" ] || die "$name $pattern is no longer on $mirror trixie (update the pins in tests/rig/trixie-tools.sh)"
  chosen+=("$name=$version")
done
echo "trixie-tools: taking ${chosen[*]}" >&2
rm -f "$cache"/debs/*.deb
(cd "$cache/debs" && apt-get -qq "${apt_opts[@]}" download "${chosen[@]}" 2>&1 | grep -v 'unsandboxed as root' >&2) || true
[ "$(find "$cache/debs" -name '*.deb' | wc -l)" -eq "${#pins[@]}" ] || die "apt-get download of ${chosen[*]} failed"
rm -rf "$cache/root.new"
mkdir -p "$cache/root.new"
for deb in "$cache"/debs/*.deb; do
  dpkg-deb -x "$deb" "$cache/root.new"
done
libs="$cache/root/usr/lib/x86_64-linux-gnu"
for bin in usr/bin/skopeo usr/bin/podman usr/lib/podman/netavark; do
  patchelf --set-interpreter "$libs/ld-linux-x86-64.so.2" --force-rpath \
    --set-rpath "$libs:/usr/lib/x86_64-linux-gnu:/lib/x86_64-linux-gnu" "$cache/root.new/$bin"
done
touch "$cache/root.new/.complete-$stamp_want"
rm -rf "$cache/root"
mv "$cache/root.new" "$cache/root"
echo "trixie-tools: $("$cache/root/usr/bin/skopeo" --version), $("$cache/root/usr/bin/podman" --version) in $cache/root"
